"""The image-text Step model (models/vlm.py): image patches land on the `<image>` slots, generation
with the image in the prefill reuses the KV cache and matches a full forward, and TP=2 (+SP), EP=2,
DP=2 and PP=2 match 1 process in loss and every gradient (fp32, gloo)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from megatron_step import platform
from megatron_step.models.step_flash import tiny
from megatron_step.models.vlm import VisionConfig, build_step_vlm
from megatron_step.platform import ParallelConfig
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.rl.policy import pack, token_logp
from megatron_step.testing import run_distributed
from megatron_step.testing.parity import GLOBAL_BATCH, SEED, compare_layout, make_reference

IMAGE_ID = 10
VISION = VisionConfig()
P = VISION.num_image_tokens
CFG = tiny()
BUILD = partial(build_step_vlm, CFG, VISION, image_token_id=IMAGE_ID)


def _data(seq: int = 40) -> dict:
    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(12, CFG.vocab_size, (GLOBAL_BATCH, seq + 1), generator=g)
    tokens[:, :P] = IMAGE_ID
    return {"tokens": tokens, "images": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)}


DATA = _data()


def _placement(rank, world_size):

    platform.setup(ParallelConfig(), seed=SEED)
    model = BUILD(ParallelConfig()).eval()
    x = DATA["tokens"][:2, :-1].clone()
    x[1, P + 3] = IMAGE_ID  # a later <image> token is an ordinary token
    pos = torch.arange(x.shape[1])[None].expand(2, -1)
    with torch.no_grad():
        merged = model.merged_embeddings(x, DATA["images"][:2])  # (S, B, H)
        img = model.image_embeddings(DATA["images"][:2])  # (P, B, H)
        words = model.language_model.embedding.word_embeddings(x).transpose(0, 1)
        a = model(x, pos, None, images=DATA["images"][:2])
        other = DATA["images"][:2].flip(0)
        b = model(x, pos, None, images=other)
    too_few = x.clone()
    too_few[0, 0] = 11
    try:
        model(too_few, pos, None, images=DATA["images"][:2])
        err = None
    except ValueError as e:
        err = str(e)
    return {
        "image slots": torch.allclose(merged[:P], img),
        "text slots": torch.equal(merged[P:], words[P:]),
        "later <image> is a word": torch.equal(merged[P + 3, 1], words[P + 3, 1]),
        "image changes logits": float((a - b).abs().max()),
        "error": err,
    }


def test_patches_fill_the_image_slots_in_order():
    out = run_distributed(_placement, 1)[0]
    assert out["image slots"] and out["text slots"] and out["later <image> is a word"]
    assert out["image changes logits"] > 1e-4
    assert "needs 16 <image> tokens" in out["error"]


def _generate(rank, world_size):

    platform.setup(ParallelConfig(), seed=SEED)
    model = build_step_vlm(CFG.replace(routing_replay=True), VISION, ParallelConfig(), IMAGE_ID).eval()
    engine = Engine(model, eos_id=3)
    prompts = [DATA["tokens"][i, : P + 5 + i].tolist() for i in range(3)]  # ragged prompts
    images = DATA["images"][:3]
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=6, seed=1), images=images)
    items = [
        {"prompt_ids": g.prompt_ids, "response_ids": g.response_ids, "routing": g.routing, "image": img}
        for g, img in zip(gens, images)
    ]
    batch = platform.to_device(pack(items))
    with torch.no_grad():
        fresh = token_logp(model, batch)
    fresh = fresh.cpu()
    got = torch.zeros_like(fresh)
    for i, g in enumerate(gens):
        p = len(g.prompt_ids)
        got[i, p - 1 : p - 1 + len(g.logprobs)] = torch.tensor(g.logprobs)
    err = float(((fresh - got) * batch["mask"].cpu()).abs().max())
    # without the image the same prompts give other log-probs: the image really reached the prefill
    plain = Engine(model, eos_id=3)
    again = plain.generate(prompts, SamplingParams(max_new_tokens=6, seed=1), images=images.flip(0))
    differs = again[0].logprobs != gens[0].logprobs
    device = str(next(model.parameters()).device)
    n = sum(len(g.response_ids) for g in gens)
    return {"err": err, "tokens": n, "differs": differs, "device": device}


def test_generation_with_the_image_in_the_prefill_matches_a_full_forward():
    out = run_distributed(_generate, 1)[0]
    assert out["tokens"] > 0
    assert out["err"] < 1e-4, out
    assert out["differs"]


@pytest.mark.gpu
def test_generation_with_the_image_on_the_gpu():
    out = run_distributed(_generate, 1)[0]  # the model goes to CUDA when there is one
    assert out["device"].startswith("cuda")
    assert out["tokens"] > 0 and out["differs"]
    assert out["err"] < 1e-3, out  # GPU matmuls (TF32 off by default in fp32): a looser bound


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return make_reference(BUILD, DATA, str(tmp_path_factory.mktemp("ref")))


# tp2-sp exercises the most (tensor-parallel ViT, projector and vocab-parallel embedding, the merged
# embeddings scattered along the sequence); the others are `slow` to keep `make test` short
@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param({"tp": 2}, marks=pytest.mark.slow),
        {"tp": 2, "sequence_parallel": True},
        pytest.param({"ep": 2}, marks=pytest.mark.slow),
        pytest.param({}, marks=pytest.mark.slow),
        pytest.param({"pp": 2}, marks=pytest.mark.slow),
    ],
    ids=["tp2", "tp2-sp", "ep2", "dp2", "pp2"],
)
def test_two_rank_layout_matches_1proc(reference, tmp_path, layout):
    compare_layout(BUILD, layout, DATA, reference, str(tmp_path))

"""Routing confidence Sigma_k (megatron_step.rl.routing_confidence): the formula by hand; the hook's
value against the router weights and the experts Megatron-Core's routing replay records; a
rollout's Sigma_k from the engine (KV cache, position by position) equal to the training forward's
on the same response positions; a stale replica's rollouts differ from the trainer's."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_step import platform
from megatron_step.platform import ParallelConfig, to_device
from megatron_step.rl.engine import Engine, SamplingParams, router_replays
from megatron_step.rl.policy import model_output, pack
from megatron_step.rl.routing_confidence import RouterConfidence, sigma_k
from megatron_step.testing import run_distributed
from megatron_step.training.setup import build_model_and_optimizer
from tests.rl.test_rl_layouts import EOS, SEED, _model_cfg, _optim, _prompts


def test_sigma_k_by_hand():
    logits = torch.tensor([[0.0, math.log(3), -math.log(3)]])  # sigmoid: 0.5, 0.75, 0.25
    chosen = torch.tensor([[True, True, False]])
    assert sigma_k(logits, chosen, "sigmoid", "share").item() == pytest.approx(1.25 / 1.5)
    assert sigma_k(logits, chosen, "sigmoid", "sum").item() == pytest.approx(1.25)
    soft = torch.softmax(logits, -1)[0]
    assert sigma_k(logits, chosen, "softmax", "share").item() == pytest.approx(float(soft[0] + soft[1]))
    with pytest.raises(ValueError, match="rl.routing_confidence='mass'"):
        RouterConfidence([], "mass")


def engine_vs_training(rank, world_size, mode="plain"):
    """Sampled rollouts with Sigma_k recorded by the engine (mode: plain decoding, MTP speculative
    decoding, or E3RL erasable rollouts with erasures); for each rollout alone, the training
    forward's Sigma_k over its response positions (routing replayed); and a hand computation of
    one router's values from its weight and the experts routing replay recorded."""
    from megatron_step.rl.config import E3RLConfig
    from megatron_step.rl.erasable import generate_erasable
    from megatron_step.rl.erasure_policy import E3RLPolicy

    platform.setup(ParallelConfig(), seed=SEED)
    chunks, _, _ = build_model_and_optimizer(_model_cfg(), ParallelConfig(), _optim(), 1)
    spec = {"speculative": 3} if mode == "spec" else {}
    engine = Engine(chunks, eos_id=EOS, routing_confidence="share", **spec)
    prompts = _prompts(_model_cfg().vocab_size)[:4]
    keys = [(i,) for i in range(4)]
    if mode == "e3rl":  # threshold 0 std: segments above their group's mean are erased
        ecfg = E3RLConfig(segment_len=4, num_segments=3, threshold_std=0.0, max_erasures=2)
        gens = generate_erasable(
            engine, prompts, [0, 0, 1, 1], SamplingParams(seed=3), E3RLPolicy(ecfg), keys=keys
        )
        assert sum(g.info["erasures"] for g in gens) > 0
    else:
        gens = engine.generate(prompts, SamplingParams(max_new_tokens=8, seed=3), keys=keys)
    model = chunks[0].module
    conf = RouterConfidence(chunks, "share")
    training = []
    for g in gens:
        item = {"prompt_ids": g.prompt_ids, "response_ids": g.response_ids, "routing": g.routing}
        batch = to_device(pack([item]))
        conf.reset()
        with torch.no_grad(), conf.capture(batch["mask"]):
            model_output(model, batch)
        training.append({layer: s for layer, s in conf.sums.items()})
    # by hand: the first MoE layer's router input (a hook), its weight, the recorded experts
    router = conf.routers[0]
    seen = {}
    handle = router.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach().clone()))
    replay = router_replays(model)[0]
    item = {"prompt_ids": gens[0].prompt_ids, "response_ids": gens[0].response_ids}
    batch = to_device(pack([item], replay=False))
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    replay.set_router_replay_action(RouterReplayAction.RECORD)
    with torch.no_grad(), conf.capture(rows=True):  # not model_output: it would clear the action
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    replay.clear_router_replay_action()
    handle.remove()
    idx = replay.get_recorded_indices()  # (tokens, K)
    logits = seen["x"].reshape(-1, seen["x"].shape[-1]).float() @ router.weight.float().T
    scores = torch.sigmoid(logits)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx.long(), True)
    by_hand = (scores * chosen).sum(-1) / scores.sum(-1)
    return [g.confidence for g in gens], training, conf.rows[0].tolist(), by_hand.tolist()


@pytest.mark.parametrize("mode", ["plain", "spec", "e3rl"])
def test_engine_and_training_forward_measure_the_same_positions(mode):
    ((rollout, training, hook, by_hand),) = run_distributed(engine_vs_training, 1, mode)
    assert hook == pytest.approx(by_hand, abs=1e-6)
    assert max(by_hand) - min(by_hand) > 1e-3  # values vary by position: a shift would show
    for g, t in zip(rollout, training):
        assert len(g) == len(t) >= 1
        for layer, s, n in g:
            tok, tn = t[layer]
            assert n == tn and s == pytest.approx(tok, rel=1e-5, abs=1e-6), (layer, s, tok)

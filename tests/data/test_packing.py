"""SFT sequence packing: the rows ChatDataset packs (by hand), the masks the forward step builds (by
hand), and the tiny Step model on a packed row gives every conversation the per-token loss it has run
alone (<= 1e-5) -- which fails without the block-diagonal mask, and fails with Megatron-Core's plain
local core attention (its window layers drop the mask)."""

from __future__ import annotations

import pytest
import torch

from megatron_step import platform
from megatron_step.data.chat import ChatTemplate, encode_chat
from megatron_step.data.sft import ChatDataset
from megatron_step.data.tokenizer import StepTokenizer
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed
from megatron_step.training.lm import collate
from megatron_step.training.step import packed_masks

QUESTIONS = [
    ("What is 2 + 3?", "2 + 3 = 5. <answer>5</answer>"),
    ("Sort the words: pear apple fig.", "apple fig pear"),
    ("def f(x): return x * 2 -- what is f(21)?", "f(21) = 21 * 2 = 42. <answer>42</answer>"),
    ("Hi", "Hello! How can I help?"),
    ("Name a prime above 10.", "11 is prime: it has no divisor but 1 and itself."),
]


def _samples(tok):
    template = ChatTemplate.load(None)
    out = []
    for i, (q, a) in enumerate(QUESTIONS):
        head = [{"role": "system", "content": "Be brief."}] if i % 2 else []
        out.append(
            encode_chat(
                tok, template, [*head, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
            )
        )
    return out


def test_rows_and_masks_by_hand(tok):
    samples = [
        ([2, 10, 11, 12], [0, 0, 1, 1]),
        ([2, 20, 21], [0, 1, 1]),
        ([2, 30, 31, 32, 33], [0, 0, 0, 1, 1]),
    ]
    ds = ChatDataset(samples, tok, seq_length=8, pack=True)
    assert len(ds) == 2 and ds.info["rows"] == 2 and ds.info["fill"] == round(9 / 16, 4)
    a, b = ds[0], ds[1]
    assert a["tokens"].tolist() == [2, 10, 11, 2, 20, tok.pad, tok.pad, tok.pad]
    assert a["labels"][:5].tolist() == [10, 11, 12, 20, 21]  # each sample's own next tokens
    assert a["loss_mask"].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    assert a["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2] and a["segment_ids"].tolist() == [
        0,
        0,
        0,
        1,
        1,
        2,
        2,
        2,
    ]
    assert b["tokens"][:4].tolist() == [2, 30, 31, 32] and b["segment_ids"].tolist() == [0] * 4 + [1] * 4
    attn, mtp = packed_masks(collate([a])["segment_ids"], collate([a])["loss_mask"], mtp_depth=1)
    allowed = (~attn[0, 0]).int().tolist()
    assert allowed[4] == [0, 0, 0, 1, 1, 0, 0, 0] and allowed[2] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert mtp[0].tolist() == [0, 1, 1, 0, 1, 0, 0, 0]  # each sample's first position cleared for MTP
    unpacked = ChatDataset(samples, tok, seq_length=8)
    assert len(unpacked) == 3 and "segment_ids" not in unpacked[0]


def _per_token(model, tokens, labels, pos, attn):
    with torch.no_grad():
        return model(tokens, pos, attn, labels=labels)


def packing_body(rank, ws, tok_model):
    platform.setup(ParallelConfig(), seed=0)
    try:
        tok = StepTokenizer(tok_model)
        cfg = tiny().replace(vocab_size=512)
        torch.manual_seed(0)
        model = build_step_flash(cfg, ParallelConfig()).eval()
        samples = _samples(tok)
        lengths = [len(ids) - 1 for ids, _ in samples]
        alone = []
        for ids, _ in samples:
            t = torch.tensor([ids[:-1]])
            alone.append(
                _per_token(model, t, torch.tensor([ids[1:]]), torch.arange(t.shape[1])[None], None)[0]
            )
        ds = ChatDataset(samples, tok, seq_length=sum(lengths) + 3, pack=True)
        assert len(ds) == 1
        batch = collate(ds.items)
        attn, _ = packed_masks(batch["segment_ids"], batch["loss_mask"], cfg.mtp_num_layers)
        runs = {"packed": attn, "no mask": None}
        out = {}
        for name, mask in runs.items():
            got = _per_token(model, batch["tokens"], batch["labels"], batch["position_ids"], mask)[0]
            out[name] = _diffs(got, alone, lengths)
        # Megatron-Core's own local core attention: the window layers replace the given mask
        cores = [m for m in model.modules() if hasattr(m, "core_attention") and getattr(m, "window", None)]
        saved = [(c.core_attention, c.core_attention.scale_mask_softmax) for c in cores]
        for core, wrapper in saved:
            core.scale_mask_softmax = wrapper.inner
        got = _per_token(model, batch["tokens"], batch["labels"], batch["position_ids"], attn)[0]
        out["window layers drop the mask"] = _diffs(got, alone, lengths)
        for core, wrapper in saved:
            core.scale_mask_softmax = wrapper
        out["window"], out["lengths"] = cfg.sliding_window, lengths
        return out
    finally:
        platform.teardown()


def _diffs(got, alone, lengths):
    at, res = 0, []
    for ref, n in zip(alone, lengths, strict=True):
        res.append((got[at : at + n] - ref).abs().max().item())
        at += n
    return res


@pytest.mark.distributed
def test_a_packed_row_gives_each_conversation_its_own_loss(tok_model):
    r = run_distributed(packing_body, 1, tok_model)[0]
    assert min(r["lengths"]) > r["window"] + 1  # every conversation is longer than the window
    assert max(r["packed"]) <= 1e-5, r
    assert r["no mask"][0] <= 1e-5 and min(r["no mask"][1:]) > 1e-3, r  # the test can fail
    assert r["window layers drop the mask"][0] <= 1e-5 and min(r["window layers drop the mask"][1:]) > 1e-3, r

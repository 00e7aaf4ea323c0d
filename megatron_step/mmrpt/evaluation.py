"""MMRPT's held-out evaluation: greedy reconstruction of one visual sentence per caption (attribute
accuracy, exact match, well-formed answers), D(s) ROC-AUC against the generator's visual/generic
labels, and the caption loss with each caption's own image and with another's.

    tasks = heldout_tasks(heldout, seed)                   # the same masked sentences for every run
    ev = {**reconstruction_eval(engine, codec, tasks, cfg.mmrpt), **dependency_auc(model, codec,
          heldout, layers), **caption_loss(model, codec, heldout)}
"""

from __future__ import annotations

import random

import torch

from megatron_step.mmrpt.config import MMRPTConfig
from megatron_step.mmrpt.data import Sample, images_of, lm_batch
from megatron_step.mmrpt.dependency import roc_auc, sentence_dependency
from megatron_step.mmrpt.text import CaptionCodec, semantic_visual_reward
from megatron_step.platform import to_device
from megatron_step.rl.engine import Engine, SamplingParams

__all__ = ["caption_loss", "dependency_auc", "heldout_tasks", "reconstruction_eval"]


def heldout_tasks(samples: list[Sample], seed: int) -> list[tuple[Sample, int]]:
    """(sample, masked sentence) per held-out sample: one of its visual sentences (ground truth),
    chosen by `seed`; samples without a visual sentence are left out."""
    rng = random.Random(seed)
    out = []
    for s in samples:
        visual = [k for k, t in enumerate(s.sentences) if t.visual]
        if visual:
            out.append((s, rng.choice(visual)))
    return out


@torch.no_grad()
def dependency_auc(model, codec: CaptionCodec, samples: list[Sample], layers, batch: int = 32) -> dict:
    """D(s) of every held-out sentence with a known label; ROC-AUC of D for visual vs generic."""
    scores, labels = [], []
    for i in range(0, len(samples), batch):
        part = samples[i : i + batch]
        enc = [codec.plain(s.sentences) for s in part]
        tok = lm_batch([e[0] for e in enc], images_of(part), codec.visual[1], codec.tok.pad)
        d = sentence_dependency(
            model, tok["tokens"], tok["images"], [e[1] for e in enc], codec.visual, layers
        )
        for s, ds in zip(part, d):
            for sent, v in zip(s.sentences, ds):
                if sent.visual is not None:
                    scores.append(v)
                    labels.append(sent.visual)
    vis = [x for x, y in zip(scores, labels) if y]
    gen = [x for x, y in zip(scores, labels) if not y]
    out = {"d_visual_mean": sum(vis) / max(1, len(vis)), "d_generic_mean": sum(gen) / max(1, len(gen))}
    if vis and gen:
        out["d_roc_auc"] = roc_auc(scores, labels)
    return out


@torch.no_grad()
def caption_loss(model, codec: CaptionCodec, samples: list[Sample], batch: int = 32) -> dict:
    """Held-out caption loss (nats per text token) with each caption's own image and with another
    sample's image (the batch rolled by one): the gap is what the model reads from the image."""
    was_training = model.training
    model.eval()
    sums = {"own": 0.0, "other": 0.0}
    n_tok = 0.0
    try:
        for i in range(0, len(samples), batch):
            part = samples[i : i + batch]
            b = to_device(
                lm_batch(
                    [codec.plain(s.sentences)[0] for s in part],
                    images_of(part),
                    codec.visual[1],
                    codec.tok.pad,
                )
            )
            for name, imgs in (("own", b["images"]), ("other", b["images"].roll(1, 0))):
                ce = model(b["tokens"], b["position_ids"], None, labels=b["labels"], images=imgs)
                sums[name] += float((ce.float() * b["loss_mask"]).sum())
            n_tok += float(b["loss_mask"].sum())
    finally:
        model.train(was_training)
    return {
        "caption_loss": sums["own"] / max(n_tok, 1.0),
        "caption_loss_other_image": sums["other"] / max(n_tok, 1.0),
    }


@torch.no_grad()
def reconstruction_eval(engine: Engine, codec: CaptionCodec, tasks, m: MMRPTConfig, batch: int = 64) -> dict:
    """Greedy reconstructions of the held-out masked sentences: mean attribute score, exact match and
    the well-formed share."""
    params = SamplingParams(
        max_new_tokens=m.max_new_tokens, greedy=True, stop_ids=(codec.answer_end_id,), temperature=1.0
    )
    sums = {"attribute": 0.0, "exact": 0.0, "format": 0.0}
    n_attr = 0
    examples = []
    for i in range(0, len(tasks), batch):
        part = tasks[i : i + batch]
        prompts = [codec.fill_in(s.sentences, k)[0] for s, k in part]
        gens = engine.generate(prompts, params, record_routing=False, images=images_of([s for s, _ in part]))
        for (s, k), g in zip(part, gens):
            answer, ok = codec.answer_of(g.response_ids)
            r = semantic_visual_reward(answer, ok, s.sentences[k], m)
            sums["exact"] += r["exact"]
            sums["format"] += r["format"]
            if "attribute" in r:
                sums["attribute"] += r["attribute"]
                n_attr += 1
            if len(examples) < 4:
                examples.append({"target": s.sentences[k].text, "answer": answer})
    n = max(1, len(tasks))
    return {
        "attribute_accuracy": sums["attribute"] / max(1, n_attr),
        "exact_match": sums["exact"] / n,
        "well_formed": sums["format"] / n,
        "examples": examples,
    }

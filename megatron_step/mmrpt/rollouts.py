"""One MMRPT step's rollouts: D(s) of every sentence of the step's captions -> the adaptive mask ->
G reconstruction rollouts per masked caption through the RL engine (the image in the prefill, KV cache
reused) -> the semantic-visual reward -> prompt groups of `Rollout`s for the GRPO / MIS-PO update
(megatron_step.rl.policy.PolicyUpdate).

    groups, metrics = mmrpt_rollouts(engine, model, codec, samples, cfg.mmrpt, version, layers, seed)
"""

from __future__ import annotations

import torch

from megatron_step.mmrpt.config import MMRPTConfig
from megatron_step.mmrpt.data import Sample, images_of, lm_batch
from megatron_step.mmrpt.dependency import select_masked, sentence_dependency
from megatron_step.mmrpt.text import CaptionCodec, semantic_visual_reward
from megatron_step.rl.buffer import Rollout
from megatron_step.rl.engine import Engine, SamplingParams

__all__ = ["mmrpt_rollouts"]


def mmrpt_rollouts(
    engine: Engine,
    model,
    codec: CaptionCodec,
    samples: list[Sample],
    m: MMRPTConfig,
    version: int,
    layers,
    seed: int,
):
    """D(s) -> masking -> G reconstruction rollouts per masked caption -> rewards. Returns (groups of
    Rollout, metrics)."""
    enc = [codec.plain(s.sentences) for s in samples]
    tok = lm_batch([e[0] for e in enc], images_of(samples), codec.visual[1], codec.tok.pad)
    dep = sentence_dependency(model, tok["tokens"], tok["images"], [e[1] for e in enc], codec.visual, layers)
    choice, tau = select_masked(dep, m.mask_quantile)
    chosen = [(s, k) for s, k in zip(samples, choice) if k is not None]
    metrics = {"mmrpt/mask_threshold": tau, "mmrpt/captions_masked": len(chosen) / max(1, len(samples))}
    known = [s.sentences[k].visual for s, k in chosen if s.sentences[k].visual is not None]
    if known:
        metrics["mmrpt/mask_visual_precision"] = sum(known) / len(known)  # masked sentences that are visual
    if not chosen:
        return [], metrics
    g = m.group_size
    prompts = [codec.fill_in(s.sentences, k)[0] for s, k in chosen for _ in range(g)]
    images = torch.stack([s.image for s, _ in chosen for _ in range(g)])
    params = SamplingParams(
        max_new_tokens=m.max_new_tokens, temperature=m.temperature, stop_ids=(codec.answer_end_id,), seed=seed
    )
    gens = engine.generate(prompts, params, images=images)
    groups, terms = [], {}
    for j, (s, k) in enumerate(chosen):
        grp = []
        for gen, img in zip(gens[j * g : (j + 1) * g], images[j * g : (j + 1) * g]):
            answer, ok = codec.answer_of(gen.response_ids)
            r = semantic_visual_reward(answer, ok, s.sentences[k], m)
            for key, v in r.items():
                terms.setdefault(key, []).append(v)
            grp.append(
                Rollout(
                    gen.prompt_ids,
                    gen.response_ids,
                    gen.logprobs,
                    r["total"],
                    group=j,
                    version=version,
                    routing=gen.routing,
                    image=img,
                )
            )
        groups.append(grp)
    metrics.update({f"mmrpt/reward_{k}": sum(v) / len(v) for k, v in terms.items()})
    metrics["mmrpt/response_tokens"] = sum(len(x.response_ids) for x in gens) / len(gens)
    return groups, metrics

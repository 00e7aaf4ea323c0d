"""E3RL after generation: how the sequence advantage is spread over a rollout's kept segments
(`segment_advantages`, with the attention shares of `attention_shares`) and the erasure metrics of a
batch (`erasure_stats`). The erasable generation itself is megatron_step.rl.erasable.

    shares = attention_shares(model, gens)
    scales = segment_advantages([1.0] * len(gens), gens, cfg.rl.e3rl, shares)   # per-token factors
"""

from __future__ import annotations

import torch

from megatron_step.rl.config import E3RLConfig
from megatron_step.rl.engine import Generation

__all__ = ["attention_shares", "erasure_stats", "segment_advantages"]


def segment_advantages(
    advantages: list[float], gens: list[Generation], cfg: E3RLConfig, shares: list[list[float]] | None = None
) -> list[list[float]]:
    """Per-token advantages of the kept response tokens: the sequence advantage split over segments.

    uniform:   every token of every kept segment gets the sequence advantage A (GRPO credit).
    attention: segment n's tokens get A * N_seg * share_n, share_n = the attention mass the final
               segment's queries put on segment n's keys (`attention_shares`), normalised over the
               segments so the scale averages 1: segments the answer leaned on carry more of the credit.
    Erased segments are not in `gens[i].response_ids`, so they get nothing."""
    out = []
    for k, (a, g) in enumerate(zip(advantages, gens)):
        n_tok = len(g.response_ids)
        starts = list(g.info.get("segments") or [0]) + [n_tok]
        if cfg.advantage_rule == "uniform" or shares is None:
            out.append([a] * n_tok)
            continue
        sh = torch.tensor(shares[k], dtype=torch.float64)
        scale = (sh / sh.sum().clamp(min=1e-12) * len(sh)).tolist() if len(sh) else []
        tok = []
        for n in range(len(starts) - 1):
            tok += [a * scale[n]] * (starts[n + 1] - starts[n])
        out.append(tok)
    return out


@torch.no_grad()
def attention_shares(model, gens: list[Generation]) -> list[list[float]]:
    """Per rollout, per kept segment: the share of attention the final segment's queries put on that
    segment's keys, averaged over heads and the model's full-attention layers (sliding-window layers
    cannot see far back, so they would credit only the last segments). One no-cache forward per
    rollout; the probabilities are read from Megatron-Core's local core attention (`scale_mask_softmax`),
    so the TE layer spec (fused kernels never materialise them) is refused."""
    mods = [
        m.core_attention.scale_mask_softmax
        for m in model.modules()
        if getattr(m, "window", "absent") is None and hasattr(m, "core_attention")
    ]
    if not mods or not all(isinstance(m, torch.nn.Module) for m in mods):
        raise RuntimeError(
            "rl.e3rl_advantage_rule=attention needs the local attention spec (full-attention layers whose "
            "probabilities are materialised); use advantage_rule=uniform with Transformer Engine layers"
        )
    probs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, a, out: probs.append(out.detach())) for m in mods]
    was_training = model.training
    model.eval()
    out = []
    try:
        for g in gens:
            seq = g.prompt_ids + g.response_ids
            if len(seq) < 2:
                out.append([1.0])
                continue
            dev = next(model.parameters()).device
            x = torch.tensor([seq[:-1]], device=dev)
            probs.clear()
            model(x, torch.arange(x.shape[1], device=dev)[None], None)
            p = torch.stack([q[0].float().mean(0) for q in probs]).mean(0)  # (sq, sk): heads, layers
            lp = len(g.prompt_ids)
            # response token t is produced by the query at position lp - 1 + t and is the key at lp + t
            starts = list(g.info.get("segments") or [0]) + [len(g.response_ids)]
            rows = p[lp - 1 + starts[-2] : lp - 1 + starts[-1]]  # the queries producing the final segment
            out.append([float(rows[:, lp + a : lp + b].sum(-1).mean()) for a, b in zip(starts, starts[1:])])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


def erasure_stats(gens: list[Generation], correct: list[float]) -> dict[str, float]:
    """TensorBoard metrics of one batch of erasable rollouts (per rollout means)."""
    n = max(1, len(gens))
    er = [g.info.get("erasures", 0) for g in gens]
    with_e = [c for c, e in zip(correct, er) if e > 0]
    without = [c for c, e in zip(correct, er) if e == 0]
    nan = float("nan")
    return {
        "e3rl/erasures_per_rollout": sum(er) / n,
        "e3rl/rollouts_with_erasure": sum(e > 0 for e in er) / n,
        "e3rl/tokens_regenerated": sum(g.info.get("regenerated_tokens", 0) for g in gens) / n,
        "e3rl/prefix_tokens_reused": sum(g.info.get("prefix_reused", 0) for g in gens) / n,
        "e3rl/accuracy_with_erasure": sum(with_e) / len(with_e) if with_e else nan,
        "e3rl/accuracy_without_erasure": sum(without) / len(without) if without else nan,
    }

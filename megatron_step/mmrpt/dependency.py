"""Visual dependency D(s) of caption sentences, the adaptive masking threshold, and ROC-AUC.

D(s) = mean over the sentence's tokens (as queries), the chosen decoder layers and their heads of
    (attention mass on the visual tokens) / (total attention mass)
read from Megatron-Core's local core attention (`DotProductAttention.scale_mask_softmax`, whose output
is the attention probabilities); Transformer Engine's fused attention never materialises them, so the
TE layer spec is refused here (the forward that measures D may use the local spec while training uses
TE: the weights are the same).
"""

from __future__ import annotations

import torch


def default_dependency_layers(lm_cfg) -> list[int]:
    """The full-attention decoder layers in the upper-middle half [L/4, 3L/4) (0-based); when there is
    none there, every full-attention layer."""
    n = lm_cfg.num_layers
    full = [i for i in range(n) if lm_cfg.is_full_attention(i)]
    mid = [i for i in full if n // 4 <= i < (3 * n + 3) // 4]
    return mid or full


def _softmax_modules(model, layers: list[int]) -> list[torch.nn.Module]:
    lm = getattr(model, "language_model", model)
    decoder_layers = lm.decoder.layers
    mods = []
    for i in layers:
        if not 0 <= i < len(decoder_layers):
            raise ValueError(
                f"mmrpt.dependency_layers: layer {i} out of range (the model has {len(decoder_layers)})"
            )
        core = decoder_layers[i].self_attention.core_attention
        sm = getattr(core, "scale_mask_softmax", None)
        if not isinstance(sm, torch.nn.Module):
            raise RuntimeError(
                f"D(s) needs attention probabilities; layer {i}'s core attention "
                f"({type(core).__name__}) does not materialise them (use the local layer spec, not "
                "Transformer Engine, for this forward)"
            )
        mods.append(sm)
    return mods


@torch.no_grad()
def sentence_dependency(
    model,
    tokens: torch.Tensor,
    images: torch.Tensor,
    spans: list[list[tuple[int, int]]],
    visual: tuple[int, int],
    layers: list[int],
) -> list[list[float]]:
    """D(s) for every sentence of a batch: tokens (B, S) in the plain layout with the visual tokens at
    positions [visual[0], visual[1]), spans[b] = the sentences' [start, end) positions. One forward,
    no KV cache."""
    mods = _softmax_modules(model, layers)
    probs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, a, out: probs.append(out.detach().float())) for m in mods]
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        b, s = tokens.shape
        pos = torch.arange(s, device=dev)[None].expand(b, s)
        model(tokens.to(dev), pos, None, images=images.to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    p = torch.stack([q.mean(1) for q in probs]).mean(0)  # (B, sq, sk): heads, then layers
    share = p[..., visual[0] : visual[1]].sum(-1) / p.sum(-1).clamp_min(1e-12)  # (B, sq)
    return [[float(share[i, a:e].mean()) for a, e in spans[i]] for i in range(b)]


def roc_auc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve of `scores` for the positive `labels` (Mann-Whitney U with ties counted
    half). Needs at least one positive and one negative."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        raise ValueError(f"roc_auc: need both classes, got {len(pos)} positive and {len(neg)} negative")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = sum(r for r, y in zip(ranks, labels) if y)
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def select_masked(dependency: list[list[float]], quantile: float) -> tuple[list[int | None], float]:
    """The adaptive threshold tau = the `quantile` quantile of D over all sentences of the batch; per
    caption, the sentence with the highest D when it reaches tau (else None). Returns (choices, tau)."""
    flat = torch.tensor([d for ds in dependency for d in ds], dtype=torch.float64)
    tau = float(torch.quantile(flat, quantile)) if len(flat) else float("inf")
    out: list[int | None] = []
    for ds in dependency:
        k = max(range(len(ds)), key=lambda j: ds[j]) if ds else None
        out.append(k if k is not None and ds[k] >= tau else None)
    return out, tau


__all__ = ["default_dependency_layers", "roc_auc", "select_masked", "sentence_dependency"]

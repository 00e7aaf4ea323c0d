"""Routing confidence (the Step 3.5 report's Sigma_k): per token and MoE layer, the score mass of the
experts the router activated. The report uses it to spot instability: a low or diverging Sigma_k
between the rollouts and the training forward means the run needs routing replay or stricter
on-policy training.

    conf = RouterConfidence(chunks, "share")        # forward hooks on the decoder's routers
    with conf.capture(mask_BS):                      # training forward: sums over the mask
        model(...)
    conf.sums                                        # {layer: (sum of Sigma_k, tokens)}
    with conf.capture():                             # engine forward: per-position rows
        model(...)
    conf.rows                                        # per router, (S * B,) Sigma_k, rows s * B + b

The report defines Sigma_k only in words ("the average probability mass of activated experts"); for
a sigmoid router the scores do not sum to 1, so the normaliser is ours, `rl.routing_confidence`:
  share  sum of the activated experts' scores / sum of all experts' scores (a probability mass in
         [0, 1]; equals the softmax mass for a softmax router). Default: comparable across layers
         and runs, 1 when the router puts all its mass on its choice;
  sum    the activated experts' scores summed (sigmoid: in [0, top-k]);
  off    no hooks.
Scores are the router's score function (sigmoid for Step 3.5 Flash) of its logits, without the
expert bias (which only steers the choice). The experts are the ones actually used: under routing
replay, the rollout's -- so the training forward's Sigma_k is the trainer's mass on the rollout's
choice.

The hook recomputes the router's logits from its input (one hidden x experts product, no grad): the
router's forward does not return them. Only decoder routers are hooked (MTP layers are not
measured: they do not run while generating).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter

MODES = ("share", "sum", "off")


def sigma_k(logits: torch.Tensor, chosen: torch.Tensor, score_function: str, mode: str) -> torch.Tensor:
    """(tokens,) Sigma_k from router logits (tokens, E) and the chosen experts (tokens, E) bool."""
    logits = logits.float()
    scores = torch.sigmoid(logits) if score_function == "sigmoid" else torch.softmax(logits, -1)
    mass = (scores * chosen).sum(-1)
    return mass / scores.sum(-1) if mode == "share" else mass


def _decoder(model):
    """The decoder block (a GPTModel's; the image-text model's language model's), else the model."""
    for path in ("decoder", "language_model.decoder"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
        if m is not None:
            return m
    return model


class RouterConfidence:
    """Forward hooks on the decoder MoE routers of `chunks` (module docstring)."""

    def __init__(self, chunks, mode: str = "share"):
        if mode not in MODES:
            raise ValueError(f"rl.routing_confidence={mode!r}: one of {', '.join(MODES)}")
        self.mode = mode
        decoders = [] if mode == "off" else [_decoder(getattr(c, "module", c)) for c in chunks]
        self.routers = [m for d in decoders for m in d.modules() if isinstance(m, TopKRouter)]
        self.layers = [int(r.layer_number) for r in self.routers]  # global layer numbers (1-based)
        self._active, self._mask = False, None
        self.rows: list[torch.Tensor] = []
        self.sums: dict[int, list[float]] = {}
        for r in self.routers:
            r.register_forward_hook(self._hook)

    def __bool__(self) -> bool:
        return bool(self.routers)

    @contextlib.contextmanager
    def capture(self, mask_BS: torch.Tensor | None = None, rows: bool = False):
        """Measure the forwards inside: with `mask_BS` (B, S) add to `sums` over the masked
        positions (this rank's sequence-parallel slice); with `rows`, append each router's
        per-position values to `rows` (cleared first)."""
        self._active, self._mask, self._rows = True, mask_BS, rows
        if rows:
            self.rows = []
        try:
            yield self
        finally:
            self._active, self._mask = False, None

    def reset(self) -> None:
        self.sums = {}

    @torch.no_grad()
    def _hook(self, router, args, output):
        if not self._active:
            return
        hidden = args[0]  # (S_local, B, H)
        logits = router.gating(hidden).reshape(-1, router.config.num_moe_experts)
        conf = sigma_k(logits, output[1].bool(), router.score_function, self.mode)  # (S_local * B,)
        if self._rows:
            self.rows.append(conf.cpu())
        if self._mask is not None:
            m = self._mask.T  # (S, B): rows s * B + b, as the router flattens them
            if m.shape[0] * m.shape[1] != conf.numel():  # sequence parallel: this TP rank's slice of S
                tp = ps.get_tensor_model_parallel_world_size()
                m = m.chunk(tp, 0)[ps.get_tensor_model_parallel_rank()]
            m = m.reshape(-1).to(conf.dtype)
            s = self.sums.setdefault(int(router.layer_number), [0.0, 0.0])
            s[0] += float((conf * m).sum())
            s[1] += float(m.sum())

    def reduced(self, sequence_parallel: bool, name: str) -> dict[str, float]:
        """`sums` as `routing/<name>/layer_XX` metrics, each over every token of the step: summed over
        the DP group (collective) and, under sequence parallelism, the TP group (each TP rank holds a
        slice of the positions). Layers of other pipeline stages are added by `merge_stages`."""
        layers = sorted(self.sums)
        flat = [x for layer in layers for x in self.sums[layer]]
        t = torch.tensor(flat or [0.0], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
            if sequence_parallel:
                dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
        vals = t.tolist()
        return {
            f"routing/{name}/layer_{layer:02d}": vals[2 * i] / max(vals[2 * i + 1], 1.0)
            for i, layer in enumerate(layers)
        }


def rollout_confidence(per_rollout: list[list[tuple[int, float, float]]]) -> dict[str, float]:
    """`routing/confidence_rollout/layer_XX` over this rank's rollouts, token-weighted: each rollout
    gives (layer, sum of Sigma_k over its response positions, count) per layer (Generation.confidence)."""
    sums: dict[int, list[float]] = {}
    for rows in per_rollout:
        for layer, s, n in rows:
            acc = sums.setdefault(layer, [0.0, 0.0])
            acc[0] += s
            acc[1] += n
    return {
        f"routing/confidence_rollout/layer_{k:02d}": s / max(n, 1.0) for k, (s, n) in sorted(sums.items())
    }


def merge_stages(metrics: dict[str, float]) -> dict[str, float]:
    """Under PP: every stage's `routing/*` metrics on every stage (collective, PP group), and the
    means over layers `routing/confidence_rollout`, `routing/confidence_train` and their gap."""
    if dist.is_initialized() and ps.model_parallel_is_initialized():
        pp = ps.get_pipeline_model_parallel_world_size()
        if pp > 1:
            mine = {k: v for k, v in metrics.items() if k.startswith("routing/")}
            parts = [None] * pp
            dist.all_gather_object(parts, mine, group=ps.get_pipeline_model_parallel_group())
            for p in parts:
                metrics.update(p)
    out = dict(metrics)
    for name in ("confidence_rollout", "confidence_train"):
        vals = [v for k, v in metrics.items() if k.startswith(f"routing/{name}/")]
        if vals:
            out[f"routing/{name}"] = sum(vals) / len(vals)
    if "routing/confidence_rollout" in out and "routing/confidence_train" in out:
        out["routing/confidence_gap"] = out["routing/confidence_train"] - out["routing/confidence_rollout"]
    return out


__all__ = ["MODES", "RouterConfidence", "merge_stages", "rollout_confidence", "sigma_k"]

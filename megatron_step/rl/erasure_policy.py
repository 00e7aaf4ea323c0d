"""The E3RL erasure rule: a segment's uncertainty U_n and its group-adaptive threshold Theta_n
(docs/design.md §5.3). megatron_step.rl.erasable generates with it; subclass to change the rule.
"""

from __future__ import annotations

import torch

from megatron_step.rl.config import E3RLConfig

__all__ = ["E3RLPolicy"]


class E3RLPolicy:
    """The erasure rule. Subclass and override `uncertainty` / `threshold` (or `decide`) to change it;
    `generate_erasable` only calls `decide`."""

    def __init__(self, cfg: E3RLConfig):
        self.cfg = cfg

    def token_signal(self, logprobs: list[float], entropies: list[float]) -> list[float]:
        return [-x for x in logprobs] if self.cfg.signal == "cross_entropy" else list(entropies)

    def uncertainty(self, x: list[float], prev_mean: float | None) -> float:
        """U of one segment from its token signal `x` (non-empty) and the previous kept segment's mean."""
        c = self.cfg
        t = torch.tensor(x, dtype=torch.float64)
        w = min(c.smooth_window, len(x))
        smooth = t.unfold(0, w, 1).mean(-1)  # (len - w + 1,) sliding means
        rise = 0.0 if prev_mean is None else max(0.0, float(t.mean()) - prev_mean)
        return c.w_mean * float(smooth.mean()) + c.w_max * float(t.max()) + c.w_rate * rise

    def threshold(self, mu: float, sigma: float, erasures: int, history: float) -> float:
        c = self.cfg
        return (mu + c.threshold_std * sigma) * (1.0 + c.penalty_growth) ** erasures * history

    def decide(
        self,
        u: list[float],
        groups: list[int],
        erasures: list[int],
        histories: list[list[float]],
        stats: dict[int, tuple[float, float]] | None = None,
    ) -> tuple[list[bool], list[float], dict]:
        """For the rows of one segment: erase?, Theta per row, and the group statistics used.

        u[i]: U of row i's segment; groups[i]: its prompt group; erasures[i]: erasures so far;
        histories[i]: U of its earlier kept segments. `stats` (group -> (mu, sigma)) fixes the group
        statistics (given on re-checks of a regenerated segment: the first pass's are kept)."""
        if stats is None:
            stats = {}
            for g in set(groups):
                vals = torch.tensor([x for x, gg in zip(u, groups) if gg == g], dtype=torch.float64)
                sd = float(vals.std(unbiased=False)) if len(vals) > 1 else 0.0
                stats[g] = (float(vals.mean()), sd)
        # history: this row's mean kept U relative to its group's mean kept U
        group_hist: dict[int, list[float]] = {}
        for h, g in zip(histories, groups):
            if h:
                group_hist.setdefault(g, []).append(sum(h) / len(h))
        thetas, erase = [], []
        for i, g in enumerate(groups):
            mu, sd = stats[g]
            hist = 1.0
            if histories[i] and group_hist.get(g):
                ref = sum(group_hist[g]) / len(group_hist[g])
                if ref > 0:
                    hist = (sum(histories[i]) / len(histories[i]) / ref) ** self.cfg.history_power
            th = self.threshold(mu, sd, erasures[i], hist)
            thetas.append(th)
            erase.append(sd > 0 and u[i] > th and erasures[i] < self.cfg.max_erasures)
        return erase, thetas, stats

"""MACRO: a manifold-constrained Riemannian optimizer for hidden 2-D weight matrices.

Per step, for a matrix W (out, in) on a manifold M of radius R (docs/design.md §5.1):
    M  <- beta * M + (1 - beta) * grad                  momentum (EMA form of the paper)
    G  <- beta * M + (1 - beta) * grad  if nesterov else M
    P  <- P_W(G)                                        Riemannian gradient (tangent projection)
    D  <- P_W(msign(P))                                 Newton-Schulz msign, re-projected ("aligned")
    W  <- Retr_R(W - lr * s * D)                        s: shape-aware step scale (scale_mode)
Manifolds (the normal directions are taken at the current W, so a W slightly off the sphere still
gets an exactly tangent step; R only enters the retraction):
    frobenius  ||W||_F = R              P_W(G) = G - <G, W> W / ||W||_F^2;   Retr: R * W / ||W||_F
    spectral   ||W||_2 = R              P_W(G) = G - <G, u v^T> u v^T     (top singular pair u, v by
                                        power iteration, warm-started from the previous step's v);
                                        Retr: R * W / ||W||_2 (exact spectral norm)
    oblique    ||W_i||_2 = R_i per row  P_W(G)_i = G_i - <G_i, W_i> W_i / ||W_i||^2; Retr: rows to R_i
               (per column with oblique_dim=0)
Radius (radius_mode): "init" -- the matrix's own value at its first step (the initialisation fixes
the scale); "fixed" -- R = radius for every matrix; "mup" -- the spectral condition of muP,
||W||_2 = s = radius * sqrt(out / in), expressed per manifold through a flat spectrum (frobenius:
R = s * sqrt(min(out, in)); oblique: every row norm s * sqrt(min(out, in) / out), columns likewise).
With "fixed"/"mup" the first retraction moves W onto the manifold.

Weight decay: scaling W by (1 - lr * wd) and then retracting to R is exactly a no-op on all three
manifolds, so MACRO has no weight-decay term; `optim.weight_decay` acts on the AdamW parameters only
(the paper's claim that the constraint replaces decoupled weight decay is what the switch tests).

The paper's constants are not public here: beta, the step scale rule and the Newton-Schulz
coefficients are constructor arguments; defaults follow Muon practice (beta 0.95, Nesterov, 5 quintic
Newton-Schulz steps) because MACRO's direction is Muon's msign restricted to the tangent space.
msign is emerging_optimizers' Newton-Schulz (the one Megatron-Core's Muon uses), not a new one.

Tensor parallelism (pg_collection given, parameter tagged `tensor_model_parallel`):
    tp_mode="duplicated"  every TP rank all-gathers W and the momentum along `partition_dim`, runs the
                          step on the whole matrix and keeps its slice: same result as TP=1 (the
                          SwiGLU fc1 interleave is a row permutation, to which every operation above
                          is equivariant). The default.
    tp_mode="blockwise"   each TP shard is its own matrix on its own manifold (no communication; a
                          product manifold -- not the TP=1 optimizer).
Expert matrices (`expert_tp`, set by Megatron-Core's factory) use the expert-TP group.

Checkpoints: Megatron-Core checkpoints optimizer state tensors shaped like their parameter, so only
the momentum is saved. The radius and the spectral warm-start vector are derived state: after a load
the radius is re-read from W (on the manifold to fp32 rounding, ~1e-7 relative) and the power
iteration cold-starts with `power_iters_cold` iterations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from emerging_optimizers import utils
from emerging_optimizers.orthogonalized_optimizers import OrthogonalizedOptimizer
from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

MANIFOLDS = ("frobenius", "spectral", "oblique")
RADIUS_MODES = ("init", "fixed", "mup")
SCALE_MODES = ("shape", "spectral", "none")
TP_MODES = ("duplicated", "blockwise")
_DERIVED_STATE = ("radius", "v")  # not checkpointed (see the module docstring)


def _top_singular_pair(w: torch.Tensor, v: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration for the top singular pair of w (m, n), starting from v (n,)."""
    for _ in range(iters):
        u = w @ v
        u = u / u.norm().clamp_min(1e-30)
        v = w.T @ u
        v = v / v.norm().clamp_min(1e-30)
    u = w @ v
    return u / u.norm().clamp_min(1e-30), v


def riemannian_grad(g: torch.Tensor, w: torch.Tensor, manifold: str, uv=None, oblique_dim: int = 1):
    """Project g onto the tangent space at w of the manifold through w (see the module docstring)."""
    if manifold == "frobenius":
        return g - (g * w).sum() / (w * w).sum().clamp_min(1e-30) * w
    if manifold == "spectral":
        u, v = uv
        return g - (u @ g @ v) * torch.outer(u, v)
    if manifold == "oblique":
        sq = (w * w).sum(dim=oblique_dim, keepdim=True).clamp_min(1e-30)
        return g - (g * w).sum(dim=oblique_dim, keepdim=True) / sq * w
    raise ValueError(f"manifold={manifold!r}: one of {MANIFOLDS}")


def manifold_norm(w: torch.Tensor, manifold: str, oblique_dim: int = 1) -> torch.Tensor:
    """The quantity the manifold fixes: ||W||_F, ||W||_2, or the row (column) norms."""
    if manifold == "frobenius":
        return w.norm()
    if manifold == "spectral":
        return torch.linalg.matrix_norm(w, ord=2)
    return w.norm(dim=oblique_dim, keepdim=True)


def step_scale(shape: tuple[int, int], mode: str) -> float:
    """Shape-aware step scale s for a (out, in) matrix. msign has unit singular values, so its RMS is
    sqrt(min / (out * in)); "shape" (Muon's rule) = sqrt(max(1, out / in)); "spectral" =
    0.2 * sqrt(max(out, in)), which gives the update an RMS near AdamW's so one LR serves both
    (Moonlight's rule); "none" = 1."""
    out, inp = shape
    if mode == "shape":
        return math.sqrt(max(1.0, out / inp))
    if mode == "spectral":
        return 0.2 * math.sqrt(max(out, inp))
    return 1.0


class MACRO(OrthogonalizedOptimizer):
    """See the module docstring. `params` are 2-D matrices; everything else belongs to AdamW."""

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        manifold: str = "frobenius",
        radius_mode: str = "init",
        radius: float = 1.0,
        oblique_dim: int = 1,
        num_ns_steps: int = 5,
        coefficient_type: str = "quintic",
        power_iters: int = 2,
        power_iters_cold: int = 30,
        scale_mode: str = "shape",
        tp_mode: str = "duplicated",
        pg_collection: Any = None,
        fp32_matmul_prec: str = "highest",
    ):
        for name, value, allowed in (
            ("manifold", manifold, MANIFOLDS),
            ("radius_mode", radius_mode, RADIUS_MODES),
            ("scale_mode", scale_mode, SCALE_MODES),
            ("tp_mode", tp_mode, TP_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"optim.macro_{name}={value!r}: one of {', '.join(allowed)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"optim.macro_momentum={momentum}: must be in [0, 1)")
        if lr <= 0:
            raise ValueError(f"optim.lr={lr}: must be > 0")
        if radius_mode != "init" and radius <= 0:
            raise ValueError(f"optim.macro_radius={radius}: must be > 0 with radius_mode={radius_mode!r}")
        if oblique_dim not in (0, 1):
            raise ValueError(f"optim.macro_oblique_dim={oblique_dim}: 1 (rows) or 0 (columns)")
        self.pg_collection = pg_collection
        self.tp_mode = tp_mode
        super().__init__(
            params,
            lr,
            momentum,
            0.0,  # weight decay: a no-op on the manifold (module docstring)
            nesterov=nesterov,
            weight_decay_method="decoupled",
            fp32_matmul_prec=fp32_matmul_prec,
            scaled_orthogonalize_fn=torch.nn.Identity(),  # unused: step() below is MACRO's own
            manifold=manifold,
            radius_mode=radius_mode,
            radius=radius,
            oblique_dim=oblique_dim,
            num_ns_steps=num_ns_steps,
            coefficient_type=coefficient_type,
            power_iters=power_iters,
            power_iters_cold=power_iters_cold,
            scale_mode=scale_mode,
        )
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"MACRO takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}"
                        " (send embeddings, norms, biases and routers to AdamW)"
                    )

    # -- state that is not checkpointed ---------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {
            k: {n: t for n, t in s.items() if n not in _DERIVED_STATE} for k, s in sd["state"].items()
        }
        return sd

    def _target_radius(self, w: torch.Tensor, group: dict) -> torch.Tensor:
        manifold, mode, dim = group["manifold"], group["radius_mode"], group["oblique_dim"]
        if mode == "init":
            r = manifold_norm(w, manifold, dim)
            if bool((r <= 0).any()):
                raise ValueError(
                    f"MACRO radius_mode='init' needs a nonzero {manifold} norm; a matrix of shape "
                    f"{tuple(w.shape)} has a zero one (zero-initialised?). Use radius_mode=fixed or mup."
                )
            return r
        out, inp = w.shape
        target = float(group["radius"])
        if mode == "mup":  # spectral norm radius * sqrt(out / in), per manifold
            spec = target * math.sqrt(out / inp)
            if manifold == "frobenius":
                target = spec * math.sqrt(min(out, inp))
            elif manifold == "spectral":
                target = spec
            else:  # a row (column) norm that makes a flat-spectrum matrix have that spectral norm
                target = spec * math.sqrt(min(out, inp) / w.shape[1 - dim])
        shape = manifold_norm(w, manifold, dim).shape
        return torch.full(shape, target, dtype=w.dtype, device=w.device)

    # -- tensor parallelism ------------------------------------------------------------------------
    def _tp(self, p) -> tuple[Any, int | None]:
        """(TP group, partition dim) when p's step needs the whole matrix gathered, else (None, None)."""
        if self.pg_collection is None or self.tp_mode == "blockwise":
            return None, None
        if not getattr(p, "tensor_model_parallel", False):
            return None, None
        dim = getattr(p, "partition_dim", -1)
        if dim not in (0, 1):
            return None, None
        group = getattr(self.pg_collection, "expt_tp" if getattr(p, "expert_tp", False) else "tp", None)
        if group is None or dist.get_world_size(group) == 1:
            return None, None
        return group, dim

    @staticmethod
    def _gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    # -- the step ------------------------------------------------------------------------------------
    def _update_full(self, w: torch.Tensor, m: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """The new value of the whole matrix w (fp32) given the momentum-mixed gradient m."""
        manifold, dim = group["manifold"], group["oblique_dim"]
        if "radius" not in state:
            state["radius"] = self._target_radius(w, group)
        uv = None
        if manifold == "spectral":
            v0 = state.get("v")
            iters = group["power_iters"]
            if v0 is None:  # first step or after a checkpoint load
                v0 = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) / math.sqrt(w.shape[1])
                iters = group["power_iters_cold"]
            uv = _top_singular_pair(w, v0, iters)
            state["v"] = uv[1]
        rg = riemannian_grad(m, w, manifold, uv, dim)
        d = newton_schulz(rg, steps=group["num_ns_steps"], coefficient_type=group["coefficient_type"])
        d = riemannian_grad(d, w, manifold, uv, dim)
        w = w - group["lr"] * step_scale(tuple(w.shape), group["scale_mode"]) * d
        return w * (state["radius"] / manifold_norm(w, manifold, dim))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MACRO.step: closures are not supported")
        for group in self.param_groups:
            self._init_group(group)
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad.float()
                buf = state["momentum_buffer"]
                buf.lerp_(grad.to(buf.dtype), 1 - beta)
                m = grad.lerp(buf.float(), beta) if self.nesterov else buf.float()
                tp_group, pdim = self._tp(p)
                w = p.detach().float()
                if tp_group is not None:
                    w, m = self._gather(w, tp_group, pdim), self._gather(m, tp_group, pdim)
                with utils.fp32_matmul_precision(self.fp32_matmul_prec):
                    w = self._update_full(w, m, state, group)
                if tp_group is not None:
                    w = w.chunk(dist.get_world_size(tp_group), dim=pdim)[dist.get_rank(tp_group)]
                p.copy_(w.to(p.dtype))
        return None

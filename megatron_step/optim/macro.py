"""MACRO: a manifold-constrained Riemannian optimizer for hidden 2-D weight matrices.

Per step, for a matrix W on a manifold M of radius R (DESIGN.md section 5):
    M  <- beta * M + (1 - beta) * grad                  momentum (EMA form of the paper)
    G  <- beta * M + (1 - beta) * grad  if nesterov else M
    P  <- P_W(G)                                        Riemannian gradient (tangent projection)
    D  <- P_W(msign(P))                                 Newton-Schulz msign, re-projected ("aligned")
    W  <- Retr_R(W - lr * s * D)                        s = sqrt(max(1, rows / cols)) (shape-aware)
Manifolds:
    frobenius  ||W||_F = R              P_W(G) = G - <G, W> W / R^2;       Retr: R * W / ||W||_F
    spectral   ||W||_2 = R              P_W(G) = G - <G, u v^T> u v^T     (top singular pair u, v by
                                        power iteration, warm-started from the previous step's v);
                                        Retr: R * W / ||W||_2 (exact spectral norm)
    oblique    ||W_i||_2 = R_i per row  P_W(G)_i = G_i - <G_i, W_i> W_i / R_i^2; Retr: rows to R_i
               (or per column with oblique_dim=0)
R defaults to the matrix's value at the first step (so the initialisation fixes the scale).

The paper's constants are not public here: beta, the step scale rule and the Newton-Schulz
coefficients are constructor arguments; defaults follow Muon practice (beta 0.95, Nesterov, 5 quintic
Newton-Schulz steps) because MACRO's direction is Muon's msign restricted to the tangent space.
msign is emerging_optimizers' Newton-Schulz (the one Megatron-Core's Muon uses), not a new one.

Status: single-process optimizer and its unit tests. Not yet: registration in Megatron-Core's
optimizer factory, the layer-wise distributed optimizer, TP/EP modes, dist-checkpointing of its
state, the AdamW/Muon comparison.
"""

from __future__ import annotations

import math

import torch
from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

MANIFOLDS = ("frobenius", "spectral", "oblique")


def _top_singular_pair(w: torch.Tensor, v: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration for the top singular pair of w (m, n), starting from v (n,)."""
    for _ in range(iters):
        u = w @ v
        u = u / u.norm().clamp_min(1e-30)
        v = w.T @ u
        v = v / v.norm().clamp_min(1e-30)
    u = w @ v
    return u / u.norm().clamp_min(1e-30), v


def riemannian_grad(g: torch.Tensor, w: torch.Tensor, manifold: str, radius, uv=None, oblique_dim: int = 1):
    """Project g onto the tangent space of the manifold at w (see the module docstring)."""
    if manifold == "frobenius":
        return g - (g * w).sum() / (radius**2) * w
    if manifold == "spectral":
        u, v = uv
        return g - (u @ g @ v) * torch.outer(u, v)
    if manifold == "oblique":
        coef = (g * w).sum(dim=oblique_dim, keepdim=True) / (radius**2)
        return g - coef * w
    raise ValueError(f"manifold={manifold!r}: one of {MANIFOLDS}")


class MACRO(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        manifold: str = "frobenius",
        radius: float | None = None,
        oblique_dim: int = 1,
        ns_steps: int = 5,
        ns_coefficients: str = "quintic",
        power_iters: int = 4,
        shape_scale: bool = True,
    ):
        if manifold not in MANIFOLDS:
            raise ValueError(f"optim.manifold={manifold!r}: one of {', '.join(MANIFOLDS)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"optim.momentum={momentum}: must be in [0, 1)")
        if lr <= 0:
            raise ValueError(f"optim.lr={lr}: must be > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            manifold=manifold,
            radius=radius,
            oblique_dim=oblique_dim,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            power_iters=power_iters,
            shape_scale=shape_scale,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"MACRO takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}"
                        " (send embeddings, norms, biases and routers to AdamW)"
                    )

    def _radius(self, p, group, state):
        if "radius" not in state:
            w = p.detach().float()
            if group["manifold"] == "oblique":
                r = w.norm(dim=group["oblique_dim"], keepdim=True)
                state["radius"] = torch.full_like(r, group["radius"]) if group["radius"] else r
            elif group["radius"]:
                state["radius"] = torch.tensor(float(group["radius"]))
            elif group["manifold"] == "frobenius":
                state["radius"] = w.norm()
            else:
                state["radius"] = torch.linalg.matrix_norm(w, ord=2)
        return state["radius"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta, manifold = group["momentum"], group["manifold"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                w = p.detach().float()
                g = p.grad.detach().float()
                r = self._radius(p, group, state)
                buf = state.setdefault("momentum_buffer", torch.zeros_like(g))
                buf.mul_(beta).add_(g, alpha=1 - beta)
                m = buf * beta + g * (1 - beta) if group["nesterov"] else buf
                uv = None
                if manifold == "spectral":
                    v0 = state.get("v")
                    if v0 is None:
                        v0 = torch.ones(w.shape[1], dtype=w.dtype) / math.sqrt(w.shape[1])
                    uv = _top_singular_pair(w, v0, group["power_iters"])
                    state["v"] = uv[1]
                rg = riemannian_grad(m, w, manifold, r, uv, group["oblique_dim"])
                d = newton_schulz(rg, steps=group["ns_steps"], coefficient_type=group["ns_coefficients"])
                d = riemannian_grad(d, w, manifold, r, uv, group["oblique_dim"])
                scale = math.sqrt(max(1.0, w.shape[0] / w.shape[1])) if group["shape_scale"] else 1.0
                w = w - group["lr"] * scale * d
                if manifold == "frobenius":
                    w = w * (r / w.norm())
                elif manifold == "spectral":
                    w = w * (r / torch.linalg.matrix_norm(w, ord=2))
                else:
                    w = w * (r / w.norm(dim=group["oblique_dim"], keepdim=True))
                p.copy_(w.to(p.dtype))
        return loss

"""Optimizers. MACRO (manifold-constrained, msign steps; `macro.py`) registered in Megatron-Core's
emerging-optimizer registry and built through its factory, with the layer-wise distributed optimizer
for data parallelism (`factory.py`)."""

from megatron_step.optim.factory import build_optimizer, leaf_optimizers, matrix_predicate, tag_routers
from megatron_step.optim.macro import MACRO, manifold_norm, riemannian_grad

__all__ = [
    "MACRO",
    "build_optimizer",
    "leaf_optimizers",
    "manifold_norm",
    "matrix_predicate",
    "riemannian_grad",
    "tag_routers",
]

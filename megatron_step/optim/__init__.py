"""Optimizers. MACRO (manifold-constrained, msign steps): the single-process core is here; its
integration into Megatron-Core's (layer-wise) distributed optimizer is not built yet."""

from megatron_step.optim.macro import MACRO, riemannian_grad

__all__ = ["MACRO", "riemannian_grad"]

"""Optimizers through Megatron-Core's factory: AdamW/SGD, Megatron-Core's Muon, and MACRO registered
in its emerging-optimizer registry, so `optim.optimizer: macro` builds like `adam` or `muon`.

    chunks = [wrap_ddp(model, True, layer_wise_params=matrix_predicate(cfg.optim))]
    optimizer = build_optimizer(cfg.optim, chunks, bf16=False)

Which parameters MACRO takes: hidden 2-D matrices. Embeddings, the output layer, norms, biases and
(by default) MoE routers go to AdamW, at `optim.scalar_lr` (default `optim.lr`).

Data parallelism (`optim.use_distributed_optimizer`):
  adam/sgd         Megatron-Core's DistributedOptimizer (ZeRO-1, byte-level shards).
  muon/macro       LayerWiseDistributedOptimizer: each DP rank owns *whole* matrices (msign needs
                   the whole matrix; Newton-Schulz cannot run inside a ZeRO byte shard), steps them
                   and all-gathers them through the DDP parameter buffer; the AdamW parameters in the
                   same model go through a DistributedOptimizer. DDP must then be built with the
                   layer-wise buffer layout (`wrap_ddp(..., layer_wise_params=...)`).
  False            every rank steps everything (plain all-reduce DDP).

One Megatron-Core 0.19.2 gap is closed here (not CPU-specific, so not in platform/cpu_patches):
LayerWiseDistributedOptimizer wraps its base torch optimizers in Megatron's mixed-precision wrapper
only when bf16 is on; in fp32 they stay raw torch optimizers and the first `step()` fails
(`'TensorParallelMuon' object has no attribute 'prepare_grads'`), and its checkpoint code reads the
bf16 wrapper's state layout. `_layer_wise_fp32` supplies an FP32Optimizer wrapper with that layout,
scoped to our factory call.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import megatron.core.optimizer as mcore_optimizer
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.emerging_optimizers import (
    _EMERGING_OPTIMIZERS,
    EmergingOptimizerEntry,
    _kwargs_from_config,
)
from megatron.core.optimizer.optimizer import FP32Optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.utils import get_pg_size

from megatron_step.optim.macro import MACRO

MATRIX_OPTIMIZERS = ("muon", "macro")


@dataclass
class StepOptimizerConfig(OptimizerConfig):
    """Megatron-Core's OptimizerConfig plus MACRO's fields. Megatron-Core's registry reads
    `macro_<arg>` for each MACRO constructor argument (`_kwargs_from_config`)."""

    macro_momentum: float = 0.95
    macro_nesterov: bool = True
    macro_manifold: str = "frobenius"
    macro_radius_mode: str = "init"
    macro_radius: float = 1.0
    macro_oblique_dim: int = 1
    macro_num_ns_steps: int = 5
    macro_coefficient_type: str = "quintic"
    macro_power_iters: int = 2
    macro_scale_mode: str = "spectral"
    macro_tp_mode: str = "duplicated"
    macro_fp32_matmul_prec: str = "highest"


# ---------------------------------------------------------------------------------------------
# which parameters are matrices for MACRO
# ---------------------------------------------------------------------------------------------
def is_macro_matrix(param) -> bool:
    """A hidden 2-D weight matrix (routers are tagged `is_router` by `tag_routers`)."""
    return (
        param.ndim == 2
        and not getattr(param, "is_embedding_or_output_parameter", False)
        and not getattr(param, "is_router", False)
    )


def is_muon_matrix(param) -> bool:
    """Megatron-Core's own rule for Muon (2-D, not embedding/output; routers included)."""
    return param.ndim == 2 and not getattr(param, "is_embedding_or_output_parameter", False)


def tag_routers(model, routers_to_adam: bool = True) -> None:
    """Mark MoE router weights so MACRO leaves them to AdamW (a router is a 2-D matrix but its
    scale sets the routing temperature; constraining it is a different experiment)."""
    for name, p in model.named_parameters():
        if ".router." in name:
            p.is_router = routers_to_adam


def matrix_predicate(optim_cfg):
    """The parameter predicate of the layer-wise buffer layout for `optim_cfg`, or None when the
    layout is not layer-wise."""
    if optim_cfg.optimizer not in MATRIX_OPTIMIZERS or not optim_cfg.use_distributed_optimizer:
        return None
    return is_macro_matrix if optim_cfg.optimizer == "macro" else is_muon_matrix


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
def _macro_config_to_kwargs(config, model_chunks, pg_collection) -> dict:
    kwargs = _kwargs_from_config(MACRO, "macro", config)
    kwargs["pg_collection"] = pg_collection
    return kwargs


_NOT_MACRO_MATRIX = ParamPredicate(name="macro_not_matrix", fn=lambda p: not is_macro_matrix(p))


def register_macro() -> None:
    """Add MACRO to Megatron-Core's emerging-optimizer registry (idempotent)."""
    if "macro" in _EMERGING_OPTIMIZERS:
        return
    _EMERGING_OPTIMIZERS["macro"] = EmergingOptimizerEntry(
        optimizer_cls=MACRO,
        config_to_kwargs=_macro_config_to_kwargs,
        default_param_overrides={ParamKey(predicate=_NOT_MACRO_MATRIX): {"optimizer": "adam"}},
    )


register_macro()


class _LayerWiseFP32Optimizer(FP32Optimizer):
    """FP32Optimizer whose (sharded) state dict is nested under "optimizer", the layout of the bf16
    wrapper that LayerWiseDistributedOptimizer's checkpoint code reads (`sd["optimizer"]["state"]`)."""

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        return {"optimizer": super().sharded_state_dict(model_sharded_state_dict, is_loading, metadata)}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict["optimizer"])


@contextlib.contextmanager
def _layer_wise_fp32():
    """See the module docstring: FP32Optimizer around LayerWise's base optimizers in fp32 runs."""
    base = mcore_optimizer.LayerWiseDistributedOptimizer

    class LayerWiseFP32(base):
        def __init__(
            self, optimizers, config, pg_collection=None, init_state_fn_list=None, model_chunks=None
        ):  # noqa: E501
            if not config.bf16:
                fns = init_state_fn_list or [None] * len(optimizers)
                optimizers = [_LayerWiseFP32Optimizer(o, config, f) for o, f in zip(optimizers, fns)]
            super().__init__(optimizers, config, pg_collection, init_state_fn_list, model_chunks)

        def shard_params(self, optimizers, full_param_layouts=None):
            dp, edp = get_pg_size(self.dp_cp), get_pg_size(self.expt_dp)
            if dp == 1 and edp > 1 and full_param_layouts is not None:
                # base skips sharding whenever dense DP is 1, but DDP still reduce-scatters expert
                # gradients over expert-DP (e.g. TP=2, ETP=1): shard the experts as DDP did
                self._shard_params_from_layout(optimizers, full_param_layouts, dp, edp)
                return
            super().shard_params(optimizers, full_param_layouts)

    mcore_optimizer.LayerWiseDistributedOptimizer = LayerWiseFP32
    try:
        yield
    finally:
        mcore_optimizer.LayerWiseDistributedOptimizer = base


# ---------------------------------------------------------------------------------------------
# the factory
# ---------------------------------------------------------------------------------------------
def optimizer_config(o, bf16: bool) -> StepOptimizerConfig:
    """Megatron-Core's config from our `OptimConfig` (megatron_step.config.run)."""
    import torch

    matrix = o.optimizer in MATRIX_OPTIMIZERS
    return StepOptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        use_distributed_optimizer=o.use_distributed_optimizer,
        use_layer_wise_distributed_optimizer=matrix and o.use_distributed_optimizer,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        muon_momentum=o.matrix_momentum,
        muon_nesterov=o.nesterov,
        muon_num_ns_steps=o.ns_steps,
        muon_coefficient_type=o.ns_coefficients,
        muon_fp32_matmul_prec="highest",
        # Megatron-Core's "spectral" Muon scale is sqrt(max(out, in)); x0.2 matches AdamW's update
        # RMS (Moonlight), the same rule as MACRO's default scale_mode, so one LR serves both groups
        muon_extra_scale_factor=0.2,
        macro_momentum=o.matrix_momentum,
        macro_nesterov=o.nesterov,
        macro_manifold=o.manifold,
        macro_radius_mode=o.radius_mode,
        macro_radius=o.radius,
        macro_oblique_dim=o.oblique_dim,
        macro_num_ns_steps=o.ns_steps,
        macro_coefficient_type=o.ns_coefficients,
        macro_power_iters=o.power_iters,
        macro_scale_mode=o.scale_mode,
        macro_tp_mode=o.tp_mode,
    )


def build_optimizer(o, chunks, bf16: bool):
    """Megatron-Core optimizer for DDP-wrapped `chunks` from our `OptimConfig` `o`."""
    config = optimizer_config(o, bf16)
    overrides = mcore_optimizer.get_standard_config_overrides(config)
    if o.optimizer in MATRIX_OPTIMIZERS and o.scalar_lr is not None:
        matrix = is_macro_matrix if o.optimizer == "macro" else is_muon_matrix
        key = ParamKey(predicate=ParamPredicate(name="scalar_lr", fn=lambda p: not matrix(p)))
        overrides[key] = {"max_lr": o.scalar_lr, "min_lr": o.scalar_min_lr}
    if o.optimizer not in MATRIX_OPTIMIZERS:
        return get_megatron_optimizer(config, chunks, config_overrides=overrides)
    with _layer_wise_fp32():
        return get_megatron_optimizer(copy.copy(config), chunks, config_overrides=overrides)


def leaf_optimizers(optimizer):
    """The Megatron optimizers (each wrapping one torch optimizer) inside nested chains."""
    children = getattr(optimizer, "chained_optimizers", None)
    if children is None:
        return [optimizer]
    return [leaf for c in children for leaf in leaf_optimizers(c)]

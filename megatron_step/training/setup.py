"""Model chunks, optimizer and LR schedule of a training stage, built the same way everywhere.

    chunks, optimizer, scheduler = build_model_and_optimizer(model_cfg, parallel, optim_cfg, steps=300)

`build(vp_stage)` makes one (virtual) pipeline chunk; the default is the Step 3.5 Flash GPTModel of
`model_cfg` (the image-text model of MMRPT passes its own builder).
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_step.models.step_flash import StepFlashConfig, build_step_flash, freeze_norm_gains
from megatron_step.optim.config import OptimConfig
from megatron_step.optim.factory import build_optimizer, matrix_predicate, tag_routers
from megatron_step.platform import ParallelConfig
from megatron_step.training.step import wrap_ddp

__all__ = ["build_model_and_optimizer", "build_scheduler"]


def build_scheduler(optimizer, o: OptimConfig, steps: int) -> OptimizerParamScheduler:
    """Megatron-Core's LR / weight-decay schedule over `steps` optimizer steps."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=min(o.warmup_steps, steps - 1),
        lr_decay_steps=steps,
        lr_decay_style=o.lr_schedule,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        wsd_decay_steps=o.wsd_decay_steps,
        lr_wsd_decay_style="cosine" if o.lr_schedule == "WSD" else None,
    )


def build_model_and_optimizer(
    model_cfg: StepFlashConfig, parallel: ParallelConfig, o: OptimConfig, steps: int, build=None
):
    """(DDP-wrapped chunks, optimizer, scheduler): one chunk per virtual pipeline stage, routers
    tagged for the AdamW group, norm gains frozen when `optim.freeze_norm_gains`, DDP with the buffer
    layout the optimizer needs."""
    stages = range(parallel.vpp) if parallel.vpp else [None]
    chunks = []
    for vp_stage in stages:
        model = build(vp_stage) if build else build_step_flash(model_cfg, parallel, vp_stage=vp_stage)
        tag_routers(model, o.routers_to_adam)
        if o.freeze_norm_gains:
            freeze_norm_gains(model)
        chunks.append(wrap_ddp(model, o.use_distributed_optimizer, layer_wise_params=matrix_predicate(o)))
    optimizer = build_optimizer(o, chunks, bf16=model_cfg.bf16)
    return chunks, optimizer, build_scheduler(optimizer, o, steps)

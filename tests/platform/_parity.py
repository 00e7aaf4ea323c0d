"""Bodies for the parallel-parity tests: run one training step of a small Megatron-Core MoE GPT under
a given layout and export loss + gradients in a layout-independent form.

Gradients cross layouts through Megatron-Core's own dist-checkpointing: after the step each rank
copies its (DDP-reduced, TP-all-reduced) `main_grad` into the parameter and saves the model's sharded
state dict; a 1-process model then loads it, so Megatron-Core does the gathering / resharding
(including the SwiGLU fc1 interleave under TP) and the comparison is name-by-name on full tensors.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_step import platform
from megatron_step.config import ParallelConfig
from megatron_step.models.gpt_local import LocalGPTConfig, build_local_gpt

GLOBAL_BATCH = 4  # sequences per step; microbatch size 1
SEED = 1234


def global_batch(cfg: LocalGPTConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_length + 1), generator=g)


def build(cfg: LocalGPTConfig, parallel: ParallelConfig):
    model = build_local_gpt(cfg, parallel)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    return ddp


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    out = model(tokens, pos, None, labels=labels)  # (B, S) per-token loss on the last stage

    def loss_func(per_token):
        loss = per_token.float().mean()
        # clone: the schedule divides the returned loss in place by num_microbatches
        return loss, {"lm loss": loss.detach().clone()}

    return out, loss_func


def train_step(model, cfg: LocalGPTConfig) -> float | None:
    """One fwd/bwd over this rank's DP slice of the global batch; returns the DP-mean loss (last
    pipeline stage) or None (other stages)."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    data = global_batch(cfg)
    local = data[dp_rank * GLOBAL_BATCH // dp : (dp_rank + 1) * GLOBAL_BATCH // dp]
    micro = [(row[None, :-1], row[None, 1:]) for row in local]
    model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=cfg.seq_length,
        micro_batch_size=1,
        forward_only=False,
    )
    finalize_model_grads([model])
    if not ps.is_pipeline_last_stage():
        return None
    loss = torch.stack([d["lm loss"] for d in losses]).mean()
    torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
    return (loss / dp).item()


def grads_into_params(model) -> None:
    for p in model.module.parameters():
        g = getattr(p, "main_grad", None)
        p.data.copy_(g if g is not None else torch.zeros_like(p))


def run_layout(rank, world_size, parallel_kw, cfg, weights_dir, grads_dir, save_weights):
    parallel = ParallelConfig(**parallel_kw)
    platform.setup(parallel, seed=SEED)
    model = build(cfg, parallel)
    os.makedirs(weights_dir, exist_ok=True)
    os.makedirs(grads_dir, exist_ok=True)
    if save_weights:
        dist_checkpointing.save(model.module.sharded_state_dict(), weights_dir)
    else:
        state = dist_checkpointing.load(model.module.sharded_state_dict(), weights_dir)
        model.module.load_state_dict(state)
    loss = train_step(model, cfg)
    grads_into_params(model)
    dist_checkpointing.save(model.module.sharded_state_dict(), grads_dir)
    return loss


def load_full(rank, world_size, cfg, ckpt_dirs):
    """Load each (grads) checkpoint into a 1-process model; return full tensors by name."""
    platform.setup(ParallelConfig(), seed=SEED)
    out = []
    for d in ckpt_dirs:
        model = build_local_gpt(cfg, ParallelConfig())
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), d))
        out.append({k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k})
    return out


__all__ = ["load_full", "partial", "run_layout"]

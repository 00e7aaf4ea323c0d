"""The pretraining loop: Megatron-Core's forward-backward schedule over microbatches, its DDP and
distributed optimizer, its LR scheduler, dist-checkpointing; TensorBoard and a progress bar.

    cfg = load_run_config("examples/tiny/tiny.yaml", ["train.steps=50"])
    result = pretrain(cfg)        # under torchrun, or as one process

Data order is a pure function of (seed, step): step s, data-parallel rank r and microbatch m read
global samples s*GBS + r*GBS/dp + m*MBS ... so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_step import platform
from megatron_step.config.run import RunConfig
from megatron_step.models.param_count import step_flash_flops_per_token
from megatron_step.models.step_flash import build_step_flash, freeze_norm_gains
from megatron_step.optim.factory import build_optimizer, matrix_predicate, tag_routers
from megatron_step.training import checkpoint
from megatron_step.training.monitor import Monitor, git_hash, is_logging_rank, versions
from megatron_step.training.step import lm_forward_step, wrap_ddp

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def microbatches(dataset, step: int, gbs: int, mbs: int, dp: int, dp_rank: int) -> list[dict]:
    """This rank's microbatches of global batch `step` (see module docstring)."""
    per_rank = gbs // dp
    base = step * gbs + dp_rank * per_rank
    n = len(dataset)
    return [_collate([dataset[(base + m * mbs + j) % n] for j in range(mbs)]) for m in range(per_rank // mbs)]


# ---------------------------------------------------------------------------------------------
# model + optimizer
# ---------------------------------------------------------------------------------------------
def build_model_and_optimizer(cfg: RunConfig, build=None):
    """DDP-wrapped chunks, optimizer and LR schedule for `cfg`. `build(vp_stage)` makes one chunk
    (default: the Step model of cfg.model_config(); the image-text model passes its own)."""
    mcfg = cfg.model_config()
    o = cfg.optim
    vpp = cfg.parallel.vpp
    stages = range(vpp) if vpp else [None]
    chunks = []
    for vp_stage in stages:
        model = build(vp_stage) if build else build_step_flash(mcfg, cfg.parallel, vp_stage=vp_stage)
        tag_routers(model, o.routers_to_adam)
        if o.freeze_norm_gains:
            freeze_norm_gains(model)
        chunks.append(wrap_ddp(model, o.use_distributed_optimizer, layer_wise_params=matrix_predicate(o)))
    optimizer = build_optimizer(o, chunks, bf16=mcfg.bf16)
    steps = cfg.train.steps
    scheduler = OptimizerParamScheduler(
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
    return mcfg, chunks, optimizer, scheduler


def _routers(chunks):
    for c in chunks:
        for m in c.module.modules():
            if hasattr(m, "local_tokens_per_expert") and hasattr(m, "expert_bias"):
                yield m


def _expert_load_scalars(chunks, topk: int) -> dict:
    """Per MoE layer: max and min expert load relative to a uniform split, and dropped tokens."""
    out, dropped = {}, 0.0
    group = ps.get_data_parallel_group(with_context_parallel=True)
    for r in _routers(chunks):
        counts = r.local_tokens_per_expert.detach().float().clone()
        dist.all_reduce(counts, group=group)
        total = counts.sum()
        if total <= 0:
            continue
        mean = total / counts.numel()
        out[f"expert_load/max/layer_{r.layer_number:02d}"] = (counts.max() / mean).item()
        out[f"expert_load/min/layer_{r.layer_number:02d}"] = (counts.min() / mean).item()
        # tokens routed = tokens * topk when nothing is dropped (no capacity factor is set)
        tokens = total / topk
        dropped += (tokens * topk - total).item()
    out["moe/dropped_tokens"] = dropped
    return out


# ---------------------------------------------------------------------------------------------
# loop
# ---------------------------------------------------------------------------------------------
def _run_microbatches(chunks, mbatches, seq, mbs, forward_only):
    fwd_bwd = get_forward_backward_func()
    iters = [iter(mbatches) for _ in chunks] if len(chunks) > 1 else iter(mbatches)
    return fwd_bwd(
        forward_step_func=lm_forward_step,
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(mbatches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def _dp_mean(values: list[torch.Tensor]) -> float | None:
    """Mean over microbatches and DP ranks of a per-microbatch scalar (last stage only)."""
    if not values:
        return None
    t = torch.stack(values).float().mean()
    dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
    return t.item() / ps.get_data_parallel_world_size(with_context_parallel=True)


def _broadcast_from_last_stage(value: float | None) -> float:
    # on the compute device: NCCL moves only CUDA tensors
    t = torch.tensor(
        [value if value is not None else 0.0], dtype=torch.float64, device=platform.compute_device()
    )
    src = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(t, src=src, group=ps.get_pipeline_model_parallel_group())
    return t.item()


def evaluate(chunks, dataset, cfg: RunConfig) -> float:
    for c in chunks:
        c.eval()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    t = cfg.train
    losses = []
    with torch.no_grad():
        for s in range(t.eval_steps):
            mb = microbatches(dataset, s, t.global_batch_size, t.micro_batch_size, dp, dp_rank)
            out = _run_microbatches(chunks, mb, cfg.data.seq_length, t.micro_batch_size, True)
            losses += [d["lm loss"] for d in out] if out else []
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    for c in chunks:
        c.train()
    return _broadcast_from_last_stage(_dp_mean(losses))


def pretrain(cfg: RunConfig, datasets=None) -> dict:
    """Train per `cfg`; returns {"losses": [...], "val_loss", "val_curve": [(step, loss)],
    "optimizer_step_ms", "step_ms" (per step), "steps", "start", "run_dir", "params"}.
    `datasets` = (train, valid) overrides the data pipeline (tests)."""
    t = cfg.train
    env = platform.setup(cfg.parallel, seed=t.seed)
    cfg.validate(env.world_size)
    if datasets is None:
        from megatron_step.data.pipeline import prepare_datasets

        datasets = prepare_datasets(cfg)
    train_ds, valid_ds, data_info = (*datasets, {})[:3]
    mcfg, chunks, optimizer, scheduler = build_model_and_optimizer(cfg)

    start = 0
    if t.resume and checkpoint.latest_step(t.run_dir) is not None:
        start = checkpoint.load_checkpoint(t.run_dir, chunks, optimizer, scheduler)["step"]

    monitor = Monitor(t.run_dir, t.steps, start, enabled=is_logging_rank())
    monitor.banner(
        {
            "git": git_hash(),
            "versions": versions(),
            "world_size": env.world_size,
            "layout": cfg.parallel.describe(env.world_size),
            "device": str(env.device),
            "cpu_patched": env.cpu_patched,
            "resumed_from_step": start,
            "data": data_info,
            "config": cfg.to_dict(),
            "model": mcfg.__dict__,
        }
    )
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    seq, gbs, mbs = cfg.data.seq_length, t.global_batch_size, t.micro_batch_size
    flops_per_step = 3 * step_flash_flops_per_token(mcfg, seq) * gbs * seq
    losses, val_loss, val_curve, opt_ms, step_ms = [], None, [], [], []
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        mb = microbatches(train_ds, step, gbs, mbs, dp, dp_rank)
        out = _run_microbatches(chunks, mb, seq, mbs, False)
        load = _expert_load_scalars(chunks, mcfg.moe_topk) if (step + 1) % t.log_interval == 0 else {}
        finalize_model_grads(chunks)  # DP/TP/PP grad reductions + aux-loss-free expert-bias update
        t_opt = time.perf_counter()
        ok, grad_norm, _ = optimizer.step()
        opt_ms.append((time.perf_counter() - t_opt) * 1e3)
        scheduler.step(1)
        loss = _broadcast_from_last_stage(_dp_mean([d["lm loss"] for d in out] if out else []))
        mtp = MTPLossLoggingHelper.tracker.get("loss_values")
        mtp_losses = (mtp / len(mb)).tolist() if mtp is not None else []
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: loss is {loss}; stopping (last checkpoint kept)")
        losses.append(loss)
        step_ms.append(dt * 1e3)
        scalars = {
            "lm loss": loss,
            "lr": optimizer.param_groups[0]["lr"],
            "grad norm": float(grad_norm or 0.0),
            "tokens per sec": gbs * seq / dt,
            "optimizer step ms": opt_ms[-1],
        }
        tflops = flops_per_step / dt / env.world_size / 1e12
        scalars.update({"TFLOPs per device": tflops, "MFU": tflops / t.peak_tflops})
        for k, v in enumerate(mtp_losses):
            scalars[f"mtp_{k + 1} loss"] = v
        scalars.update(load)
        monitor.scalars(step + 1, scalars)
        monitor.progress(1, {"loss": loss, "lr": scalars["lr"]})
        if (step + 1) % t.log_interval == 0:
            monitor.message(
                f"step {step + 1}/{t.steps} loss {loss:.4f} lr {scalars['lr']:.3g} "
                f"grad_norm {scalars['grad norm']:.3f} tok/s {scalars['tokens per sec']:.0f} "
                f"MFU {scalars['MFU']:.2%}"
            )
        last = step + 1 == t.steps
        exiting = t.exit_after is not None and step + 1 >= t.exit_after
        if (t.eval_interval and (step + 1) % t.eval_interval == 0) or last:
            val_loss = evaluate(chunks, valid_ds, cfg)
            val_curve.append((step + 1, val_loss))
            monitor.scalars(step + 1, {"val loss": val_loss})
            monitor.message(f"step {step + 1}: validation loss {val_loss:.4f}")
        if (t.save_interval and (step + 1) % t.save_interval == 0) or last or exiting:
            checkpoint.save_checkpoint(
                t.run_dir, step + 1, chunks, optimizer, scheduler, {"consumed_samples": (step + 1) * gbs}
            )
        if exiting:
            monitor.message(f"exit_after={t.exit_after}: stopping at step {step + 1} (checkpoint saved)")
            break
    monitor.close()
    params = {n: p.detach().clone() for c in chunks for n, p in c.module.named_parameters()}
    return {
        "losses": losses,
        "val_loss": val_loss,
        "val_curve": val_curve,
        "optimizer_step_ms": opt_ms,
        "step_ms": step_ms,
        "steps": t.steps,
        "start": start,
        "run_dir": t.run_dir,
        "params": params,
    }


__all__ = ["evaluate", "microbatches", "pretrain"]

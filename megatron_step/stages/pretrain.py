"""Text pretraining: Megatron-Core's forward-backward schedule over microbatches, its DDP and
distributed optimizer, its LR scheduler, dist-checkpointing; TensorBoard and a progress bar.

    cfg = load_run_config("examples/tiny/tiny.yaml", ["train.steps=50"])
    result = pretrain(cfg)        # under torchrun, or as one process

The pieces: megatron_step.data.pipeline (datasets), megatron_step.training.setup (model, optimizer,
schedule), megatron_step.training.lm (the step, its metrics, validation, data order),
megatron_step.training.checkpoint (atomic saves, resume), megatron_step.training.monitor.
"""

from __future__ import annotations

import torch

from megatron_step import platform
from megatron_step.config.run import PretrainConfig
from megatron_step.data.pipeline import prepare_datasets
from megatron_step.models.step_flash.layers import copy_first_mtp_module
from megatron_step.training import checkpoint
from megatron_step.training.config import TrainConfig
from megatron_step.training.dry_run import memory_estimate
from megatron_step.training.lm import LMTrainer
from megatron_step.training.monitor import Monitor, is_logging_rank, run_banner
from megatron_step.training.setup import build_model_and_optimizer
from megatron_step.training.step import dp_sum

__all__ = ["dry_run", "due", "pretrain", "start_state", "text_datasets"]


def due(interval: int | None, step: int) -> bool:
    """Whether `step` (1-based) is a multiple of a positive `interval` (0/None: never)."""
    return bool(interval) and step % interval == 0


def text_datasets(cfg: PretrainConfig):
    """(train, valid, info) for the run: steps x global batch training sequences."""
    t = cfg.train
    return prepare_datasets(
        cfg.data,
        seed=t.seed,
        train_samples=t.steps * t.global_batch_size,
        valid_samples=max(1, t.eval_steps) * t.global_batch_size,
        model_vocab_size=cfg.model_config().vocab_size,
        vocab_multiple=128 * cfg.parallel.tp,
    )


def _log(monitor: Monitor, step: int, steps: int, m: dict, log_interval: int) -> None:
    monitor.scalars(step, m)
    monitor.progress(1, {"loss": m["train/lm_loss"], "lr": m["train/lr"]})
    if step % log_interval == 0:
        monitor.message(
            f"step {step}/{steps} loss {m['train/lm_loss']:.4f} lr {m['train/lr']:.3g} "
            f"grad_norm {m['train/grad_norm']:.3f} tok/s {m['train/tokens_per_sec']:.0f} "
            f"MFU {m['train/mfu']:.2%}"
        )
    if "val/lm_loss" in m:
        monitor.message(f"step {step}: validation loss {m['val/lm_loss']:.4f}")


_ASK = object()  # start_state: look for the run's own checkpoint (resume_step) itself


def start_state(t: TrainConfig, chunks, optimizer, scheduler, resume=_ASK) -> tuple[int, dict]:
    """Where a pretraining run starts: (the step, what it loaded, for run_info.json). `resume` (auto /
    required) with a checkpoint of the run's own continues it (optimizer, schedule, data position;
    resume=never refuses a run directory that holds one, unless `overwrite`); else `init_from`
    loads another run's model weights (a new phase, step 0), and `mtp_init_from_first` then copies
    MTP module 1 into modules 2..K (the report's MTP staging); else nothing (step 0, initial weights)."""
    # `resume`: the step `checkpoint.resume_step(t)` gave (train.resume / train.overwrite; it refuses
    # to start over a run), when the caller asked before building anything
    step = checkpoint.resume_step(t) if resume is _ASK else resume
    if step is not None:
        return checkpoint.load_checkpoint(t.run_dir, chunks, optimizer, scheduler, step=step)["step"], {}
    if not t.init_from:
        return 0, {}
    init = {"init_from": f"{t.init_from} step {checkpoint.load_model_weights(t.init_from, chunks)}"}
    if t.mtp_init_from_first:
        # collective: the world -- the tensors copied on every rank (the MTP stage's ranks hold them)
        (n,) = dp_sum([copy_first_mtp_module(chunks)], group=torch.distributed.group.WORLD)
        init["mtp_init_from_first"] = f"{int(n)} tensors of MTP modules 2..K copied from module 1"
    optimizer.reload_model_params()  # the optimizer's main copies follow the loaded weights
    return 0, init


def pretrain(cfg: PretrainConfig, datasets=None) -> dict:
    """Train per `cfg`; returns {"losses": [...], "val_loss", "val_curve": [(step, loss)],
    "optimizer_step_ms", "step_ms" (per step), "steps", "start", "run_dir"}. The weights are in the
    run's checkpoints. `datasets` = (train, valid) replaces the data pipeline (the SFT warm-up, tests)."""
    t = cfg.train
    env = platform.setup(cfg.parallel, seed=t.seed)
    cfg.validate(env.world_size)
    resume = checkpoint.resume_step(t)  # before any work: a run directory holding a run is refused
    model = cfg.model_config()
    train_ds, valid_ds, data_info = (*(datasets or text_datasets(cfg)), {})[:3]
    chunks, optimizer, scheduler = build_model_and_optimizer(model, cfg.parallel, cfg.optim, t.steps)
    start, init = start_state(t, chunks, optimizer, scheduler, resume)
    monitor = Monitor(t.run_dir, t.steps, start, enabled=is_logging_rank())
    info = dict(resumed_from_step=start, **init, data=data_info, model=model.__dict__)
    monitor.banner(run_banner(env, cfg.to_dict(), **info))
    lm = LMTrainer(chunks, optimizer, scheduler, model, t, cfg.data.seq_length, env.world_size)
    out = {"losses": [], "val_loss": None, "val_curve": [], "optimizer_step_ms": [], "step_ms": []}
    for step in range(start, t.steps):
        m = lm.step(train_ds, step)
        last, exiting = step + 1 == t.steps, t.exit_after is not None and step + 1 >= t.exit_after
        if due(t.eval_interval, step + 1) or last:
            m["val/lm_loss"] = out["val_loss"] = lm.evaluate(valid_ds)
            out["val_curve"].append((step + 1, m["val/lm_loss"]))
        _log(monitor, step + 1, t.steps, m, t.log_interval)
        out["losses"].append(m["train/lm_loss"])
        out["optimizer_step_ms"].append(m["train/optimizer_step_ms"])
        out["step_ms"].append(m["train/step_ms"])
        if due(t.save_interval, step + 1) or last or exiting:
            extra = {"consumed_samples": (step + 1) * t.global_batch_size}
            checkpoint.save_checkpoint(
                t.run_dir, step + 1, chunks, optimizer, scheduler, extra, keep_last=t.keep_last
            )
        if exiting:
            monitor.message(f"exit_after={t.exit_after}: stopping at step {step + 1} (checkpoint saved)")
            break
    monitor.close()
    return {**out, "steps": t.steps, "start": start, "run_dir": t.run_dir}


def dry_run(cfg: PretrainConfig, world_size: int) -> dict:
    """`--dry-run`: validate the run's layout and batch split against `world_size` ranks (raises with
    the numbers) and estimate per-GPU memory, without GPUs (megatron_step.training.dry_run)."""
    cfg.validate(world_size)
    return memory_estimate(cfg.model_config(), cfg.parallel, cfg.train, cfg.data.seq_length, world_size)

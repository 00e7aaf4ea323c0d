"""Process bodies for the pretraining tests (module-level so they pickle into spawned ranks)."""

from __future__ import annotations

import torch

from megatron_step.config.run import load_run_config

# A small, quick run of the tiny preset on the embedded corpus.
BASE = [
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "data.seq_length=64",
    "model.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.log_interval=2",
    "train.eval_interval=0",
    "train.eval_steps=2",
    "train.save_interval=0",
    "optim.warmup_steps=2",
]


def config(data_dir: str, run_dir: str, *extra: str):
    return load_run_config(
        "examples/tiny/tiny.yaml", [*BASE, f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", *extra]
    )


def train(rank, world_size, data_dir, run_dir, extra=()):
    from megatron_step.training.loop import pretrain

    out = pretrain(config(data_dir, run_dir, *extra))
    params = {k: v for k, v in out["params"].items()} if world_size == 1 else None
    return {"losses": out["losses"], "val_loss": out["val_loss"], "start": out["start"], "params": params}


def load_latest(rank, world_size, data_dir, run_dir, extra=()):
    """Build model + optimizer as a run would and load the latest checkpoint; returns its step."""
    from megatron_step import platform
    from megatron_step.training import checkpoint
    from megatron_step.training.loop import build_model_and_optimizer

    cfg = config(data_dir, run_dir, *extra)
    platform.setup(cfg.parallel, seed=cfg.train.seed)
    _, chunks, opt, sched = build_model_and_optimizer(cfg)
    info = checkpoint.load_checkpoint(run_dir, chunks, opt, sched)
    total = sum(float(p.detach().double().sum()) for c in chunks for p in c.module.parameters())
    return {"step": info["step"], "finite": bool(torch.isfinite(torch.tensor(total)))}

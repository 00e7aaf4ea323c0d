"""`make demo` — the platform demo: train a small Megatron-Core MoE GPT on CPU under three layouts
and show that they follow the same loss curve.

    python -m benchmarks.demo            # 1 process, TP=2+SP, DP=2 (distributed optimizer)
    python -m benchmarks.demo --steps 50

Every layout runs the trainer step (megatron_step.training.step.train_step: Megatron-Core's
forward-backward schedule, its DDP wrapper and its distributed optimizer, Adam) in processes joined
by gloo. The main demo is `make demo` (text pretraining of the Step 3.5 Flash tiny preset).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from megatron.core import parallel_state as ps

from megatron_step import platform
from megatron_step.models.gpt_local import LocalGPTConfig, build_local_gpt
from megatron_step.optim.config import OptimConfig
from megatron_step.optim.factory import build_optimizer
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed
from megatron_step.training.step import dp_mean, train_step, wrap_ddp

GLOBAL_BATCH = 4  # sequences per step, micro-batch size 1: 4 microbatches on 1 rank, 2 per rank at DP=2


def train(
    rank, world_size, parallel_kw: dict, steps: int, seed: int = 1234, clip_grad: float = 1.0
) -> dict[str, list[float]]:
    """Train `steps` steps under one layout; returns per-step DP-mean loss and the grad norm the
    optimizer measured before clipping (both the same on all ranks)."""
    logging.getLogger("megatron").setLevel(logging.ERROR)
    cfg = LocalGPTConfig()
    parallel = ParallelConfig(**parallel_kw)
    platform.setup(parallel, seed=seed)
    model = wrap_ddp(build_local_gpt(cfg, parallel))
    # Adam at a constant 3e-3, betas (0.9, 0.999), no weight decay: the demo shows layouts agree
    o = OptimConfig(
        lr=3e-3, min_lr=3e-3, weight_decay=0.0, adam_beta2=0.999, clip_grad=clip_grad, lr_schedule="constant"
    )
    opt = build_optimizer(o, [model], bf16=False)
    # A fixed batch of random sequences: learning it shows up as a falling loss within a few steps.
    data = torch.randint(
        0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_length + 1), generator=torch.Generator().manual_seed(seed)
    )
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = data[dp_rank * GLOBAL_BATCH // dp : (dp_rank + 1) * GLOBAL_BATCH // dp]
    micro = [(row[None, :-1], row[None, 1:]) for row in local]
    curve, norms = [], []
    for _ in range(steps):
        result = train_step([model], opt, None, micro, seq_length=cfg.seq_length, micro_batch_size=1)
        norms.append(float(result.grad_norm))
        curve.append(dp_mean({"loss": result.mean("lm_loss")})["loss"])
    return {"loss": curve, "grad_norm": norms}


def main(argv=None):
    # The demo's output is for people: hide Megatron-Core's import-time notices about missing
    # apex/TE (expected on CPU) in this process and in the spawned ranks.
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    layouts = [("1 process", 1, {}), ("TP=2 + SP", 2, {"tp": 2}), ("DP=2 dist-opt", 2, {})]
    curves = {}
    for name, ws, kw in layouts:
        t0 = time.perf_counter()
        curves[name] = run_distributed(train, ws, kw, args.steps)[0]["loss"]
        print(f"{name:>14}: {args.steps} steps in {time.perf_counter() - t0:5.1f}s", flush=True)
    print("\n step | " + " | ".join(f"{n:>14}" for n in curves))
    for i in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{i + 1:5d} | " + " | ".join(f"{c[i]:14.6f}" for c in curves.values()))
    ref = curves["1 process"]
    for name, c in list(curves.items())[1:]:
        diff = max(abs(a - b) for a, b in zip(c, ref))
        print(f"max |loss - 1 process| over the curve, {name}: {diff:.2e}")
    assert ref[-1] < ref[0] - 1.0, "loss did not fall"


if __name__ == "__main__":
    main()

"""`make demo` — the platform demo: train a small Megatron-Core MoE GPT on CPU under three layouts
and show that they follow the same loss curve.

    python -m megatron_step.demo            # 1 process, TP=2+SP, DP=2 (distributed optimizer)
    python -m megatron_step.demo --steps 50

Every layout runs Megatron-Core's forward-backward schedule, its DDP wrapper and its distributed
optimizer (Adam) in processes joined by gloo. The text-pretraining pipeline (tokenizer -> indexed
data -> Step 3.5 Flash tiny preset -> TensorBoard/checkpoints) replaces this demo when it lands.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_step import platform
from megatron_step.models.gpt_local import LocalGPTConfig, build_local_gpt
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed
from megatron_step.training.step import lm_forward_step, wrap_ddp

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
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-3,
            weight_decay=0.0,
            clip_grad=clip_grad,
            use_distributed_optimizer=True,
            bf16=False,
            params_dtype=torch.float32,
        ),
        [model],
    )
    # A fixed batch of random sequences: learning it shows up as a falling loss within a few steps.
    data = torch.randint(
        0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_length + 1), generator=torch.Generator().manual_seed(seed)
    )
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = data[dp_rank * GLOBAL_BATCH // dp : (dp_rank + 1) * GLOBAL_BATCH // dp]
    curve, norms = [], []
    for _ in range(steps):
        micro = [(row[None, :-1], row[None, 1:]) for row in local]
        model.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=lm_forward_step,
            data_iterator=iter(micro),
            model=[model],
            num_microbatches=len(micro),
            seq_length=cfg.seq_length,
            micro_batch_size=1,
            forward_only=False,
        )
        finalize_model_grads([model])
        _, grad_norm, _ = opt.step()
        norms.append(float(grad_norm))
        loss = torch.stack([d["lm loss"] for d in out]).mean()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        curve.append(loss.item() / dp)
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

"""`make bench` — CPU benchmarks, each a ratio measured in one run:
  1. the tiny Step 3.5 Flash training step vs the same-shaped `transformers` Step3p7TextModel
     (benchmarks/hf_compare.py), tokens/s and MFU vs this machine's matmul peak;
  2. platform-layer overhead: our CPU patches vs a global TorchFunctionMode (below);
  3. the tiny preset's forward+backward time with MTP-3;
  4. optimizer.step() time of Muon and MACRO (each manifold) relative to AdamW on the tiny preset
     (the loss comparison with an LR sweep is benchmarks/optim_compare.py);
  5. greedy generation tokens/s of our RL engine vs transformers' generate() on the same weights;
  6. E3RL erasable rollouts vs plain generation, wall time at equal final tokens;
  7. MMRPT image-text readers: DALI on the CPU vs the webdataset reference, images/s
     (benchmarks/wds_throughput.py; 500 scenes, 2 epochs here).

    python -m benchmarks.bench [--iters 10]

Runs one training step (forward, backward, DDP grad sync, distributed-optimizer Adam step) of the
small Megatron-Core MoE GPT in one process, alternating between:
  ours:      the CPU patches of megatron_step/platform/cpu_patches.py (module-scoped torch view for
             hard-coded `device="cuda"` factories; every other op untouched);
  reference: the same plus a global `TorchFunctionMode` that rewrites CUDA devices on *every* torch
             call — the approach a feasibility run used, which the patch module replaced.
Prints median step times and the ratio reference / ours (> 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform as pyplatform
import statistics
import time

import torch
from torch.overrides import TorchFunctionMode

from benchmarks import e3rl_overhead, gen_compare, rollout_compare, wds_throughput
from benchmarks.hf_compare import compare, format_table
from megatron_step import platform
from megatron_step.models.gpt_local import LocalGPTConfig, build_local_gpt
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.optim.config import OptimConfig
from megatron_step.optim.factory import build_optimizer, matrix_predicate, tag_routers
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed
from megatron_step.testing.parity import global_batch
from megatron_step.training.step import train_step, wrap_ddp


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device=cuda` on every torch call (the reference approach)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _bench(rank, world_size, iters: int, cfg_kw: dict):
    logging.getLogger("megatron").setLevel(logging.ERROR)
    cfg = LocalGPTConfig(**cfg_kw)
    platform.setup(ParallelConfig(), seed=0)
    model = wrap_ddp(m := build_local_gpt(cfg, ParallelConfig()))
    opt = build_optimizer(OptimConfig(lr=1e-4, min_lr=1e-5, weight_decay=0.0), [model], bf16=False)
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_length + 1))
    micro = [(tokens[:, :-1], tokens[:, 1:])]  # one microbatch of 4 sequences

    def step():
        train_step([model], opt, None, micro, seq_length=cfg.seq_length, micro_batch_size=4)

    step()  # warm-up
    times = {"ours": [], "reference": []}
    for _ in range(iters):
        for name in times:
            t0 = time.perf_counter()
            if name == "reference":
                with _CudaToCpuMode():
                    step()
            else:
                step()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, sum(p.numel() for p in m.parameters())


def _step_tiny_fwd_bwd(rank, world_size, iters: int, batch: int, seq: int):
    """Median forward+backward time of the Step 3.5 Flash tiny preset (1 process, fp32)."""
    logging.getLogger("megatron").setLevel(logging.ERROR)

    cfg = tiny()
    platform.setup(ParallelConfig(), seed=0)
    model = build_step_flash(cfg, ParallelConfig())
    tok = torch.randint(0, cfg.vocab_size, (batch, seq))
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        model(tok, pos, None, labels=tok).mean().backward()
        if i:  # first call is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(p.numel() for p in model.parameters())


def _optimizer_step_time(rank, world_size, iters: int, optim_kw: dict):
    """Median `optimizer.step()` time (ms) of the tiny preset under `OptimConfig(**optim_kw)`
    (1 process, fp32; Megatron-Core's optimizer factory, gradients from one real backward)."""
    logging.getLogger("megatron").setLevel(logging.ERROR)

    platform.setup(ParallelConfig(), seed=0)
    o = OptimConfig(**optim_kw)
    model = build_step_flash(tiny(), ParallelConfig())
    tag_routers(model, o.routers_to_adam)
    ddp = wrap_ddp(model, o.use_distributed_optimizer, layer_wise_params=matrix_predicate(o))
    opt = build_optimizer(o, [ddp], bf16=False)
    data = global_batch(tiny().vocab_size, 32)
    micro = [(row[None, :-1], row[None, 1:]) for row in data]
    times = []
    for i in range(iters + 1):
        result = train_step([ddp], opt, None, micro, seq_length=32, micro_batch_size=1)
        if i:
            times.append(result.seconds["optimizer"])
    return statistics.median(times) * 1e3


def optimizer_table(iters: int) -> str:
    """Optimizer step time of AdamW, Megatron-Core's Muon and MACRO per manifold, ratio vs AdamW."""

    runs = {
        "adamw": {"optimizer": "adam"},
        "muon": {"optimizer": "muon"},
        "macro-frobenius": {"optimizer": "macro", "manifold": "frobenius"},
        "macro-spectral": {"optimizer": "macro", "manifold": "spectral"},
        "macro-oblique": {"optimizer": "macro", "manifold": "oblique"},
    }
    ms = {k: run_distributed(_optimizer_step_time, 1, iters, kw)[0] for k, kw in runs.items()}
    lines = [
        "optimizer.step() on the tiny preset (fp32, 1 process, layer-wise dist-opt for muon/macro)",
        f"{'optimizer':<18} {'ms':>8} {'vs adamw':>9}",
    ]
    lines += [f"{k:<18} {v:8.1f} {v / ms['adamw']:8.2f}x" for k, v in ms.items()]
    return "\n".join(lines)


def main(argv=None):
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)

    for threads in (os.cpu_count() or 1, 1):
        print(format_table(compare(iters=args.iters, threads=threads)), end="\n\n", flush=True)

    models = {
        # the parity-test model: small ops, so per-call overhead dominates
        "test model (h64, 4 experts, seq 32)": {},
        "larger (h128, 8 experts, seq 128)": dict(
            num_layers=4,
            hidden_size=128,
            num_attention_heads=8,
            num_query_groups=4,
            ffn_hidden_size=256,
            num_experts=8,
            moe_ffn_hidden_size=128,
            vocab_size=1024,
            seq_length=128,
        ),
    }
    print(
        f"machine: {pyplatform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        "one step = fwd + bwd + grad sync + dist-optimizer Adam, batch 4 sequences"
    )
    print(f"{'model':<38} {'params':>8} {'ours (ms)':>10} {'reference (ms)':>15} {'ref / ours':>11}")
    for label, cfg_kw in models.items():
        med, n_params = run_distributed(_bench, 1, args.iters, cfg_kw)[0]
        print(
            f"{label:<38} {n_params / 1e6:7.2f}M {med['ours'] * 1e3:10.1f} "
            f"{med['reference'] * 1e3:15.1f} {med['reference'] / med['ours']:11.2f}"
        )
    batch, seq = 4, 64
    t, n = run_distributed(_step_tiny_fwd_bwd, 1, args.iters, batch, seq)[0]
    print(
        f"\nStep 3.5 Flash tiny preset ({n / 1e6:.2f}M params incl. MTP-3), fwd+bwd, "
        f"batch {batch} x {seq} tokens: {t * 1e3:.1f} ms ({batch * seq / t:,.0f} tokens/s)"
    )
    print("\n" + optimizer_table(args.iters))

    print("\n" + gen_compare.format_table(run_distributed(gen_compare.body, 1, {"runs": 3})[0]))

    r = run_distributed(e3rl_overhead.body, 1, dict(e3rl_overhead.DEFAULTS))[0]
    print("\n" + e3rl_overhead.format_table(r))

    print("\n" + rollout_compare.format_table(run_distributed(rollout_compare.body, 1)[0]))

    print("\n" + wds_throughput.format_table(wds_throughput.run(samples=500, epochs=2)))


if __name__ == "__main__":
    main()

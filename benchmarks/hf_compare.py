"""Training-step throughput: our Megatron-Core Step 3.5 Flash stack vs `transformers` on the same shape.

    from benchmarks.hf_compare import compare, format_table
    print(format_table(compare()))            # tiny preset, batch 4 x 128 tokens, 10 timed steps

What is compared (one process tree, each side in its own spawned process so they share no state,
same torch intra-op thread count set explicitly on both; by default the two processes take turns
step by step -- `compare(alternate=True)` -- so load from other jobs on a shared box hits both):

- **ours**: `build_step_flash(tiny().replace(mtp_num_layers=0, mtp_loss_weights=[]))` wrapped in
  Megatron-Core DDP (`grad_reduce_in_fp32`, distributed optimizer) + `get_megatron_optimizer`
  (Adam, which on a machine without TE/apex is `torch.optim.AdamW`), stepped through
  `get_forward_backward_func()` + `finalize_model_grads` + `optimizer.step()` -- the pattern of
  `megatron_step/testing/parity.py` and `demo.py`. One microbatch holding the whole batch by default,
  so both sides run the same matmul shapes.
- **hf**: `transformers`' `Step3p7TextModel` (model_type "step3p5") with the same shape (see
  `hf_text_config`), eager attention, fp32, plus an untied LM head `hidden @ lm_head.weight.T`
  (transformers has no text-only CausalLM class for this model), `F.cross_entropy`, backward,
  `clip_grad_norm_` and `torch.optim.AdamW`.

Same on both sides: batch, sequence length, tokens (same seed), fp32, lr 1e-4, betas (0.9, 0.999),
eps 1e-8, weight decay 0.01 on >= 2-D parameters only (Megatron-Core's default rule), grad clip 1.0.
MTP is off on our side because `Step3p7TextModel` has no MTP in its training forward.

Model FLOPs per step (`model_flops_per_step`), read off the instantiated model with
`megatron_step.models.param_count`:

    per token, forward = 2 * (active backbone params + LM head)            # matmul-like params
                       + attention_flops_per_token(...)                     # QK^T and PV, window-aware
                       + sum over MTP modules of 2 * (module params + LM head)   # 0 here
    per step           = 3 * forward * batch * seq                          # backward = 2x forward

"Active backbone params" counts routed experts at top-k / E and everything else (attention incl. the
head gate, dense FFN, shared expert, router, norms) in full; the input embedding is a lookup and is
not counted. MFU = model FLOPs per step / step time / measured fp32 matmul peak of this machine
(`measure_matmul_peak`, same thread count).

What is not equal (by construction of the two code bases, not chosen here): ours fuses QKV into one
linear and stores each routed expert as its own pair of linears (SequentialMLP; 177 parameter
tensors vs 117), so the optimizer loops over more tensors; ours runs the aux-loss-free expert-bias
update in `finalize_model_grads` (transformers has no bias update) and the router in fp32 (the
weights are fp32 here anyway); ours goes through DDP's contiguous grad buffer and the distributed
optimizer (grad copies, all-gather of parameters, on 1 rank too); the CE loss is Megatron-Core's
vocab-parallel CE vs `F.cross_entropy`. Weights are initialised independently (same std 0.02, not
the same numbers), so the routing, and with it the per-expert token counts, differ.

Where we are slower, `profile_ours` / `profile_hf` (torch.profiler, ops by self CPU time and the
time per phase) say where the time goes.

Threads: `compare()` uses all cores (`os.cpu_count()`, as `platform.setup` does for a 1-rank run).
This benchmark found that at 2 threads our step was slower than at 1 thread (an OpenMP team created
on gloo's worker thread); `platform.setup` now warms those threads at 1 thread, which fixed it.
`first_step_1_thread=True` (the diagnostic that located it) is kept; `compare(threads=1)` gives the
comparison without OpenMP effects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
import warnings

import torch
import torch.multiprocessing as mp

from megatron_step import platform
from megatron_step.models.param_count import attention_flops_per_token, count_parameters
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.models.step_flash.hf_config import hf_text_config
from megatron_step.optim.config import OptimConfig
from megatron_step.optim.factory import build_optimizer
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed
from megatron_step.training.step import train_step, wrap_ddp

# Optimizer settings shared by both sides (Megatron-Core's OptimizerConfig defaults, lr explicit).
LR = 1e-4
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
CLIP_GRAD = 1.0
SEED = 1234


# ---------------------------------------------------------------------------------------------
# Machine peak
# ---------------------------------------------------------------------------------------------
def measure_matmul_peak(seconds: float = 2.0, sizes: tuple[int, ...] = (1024, 2048)) -> float:
    """Best fp32 `torch.matmul` rate on this CPU in GFLOP/s (2 n^3 FLOPs per n x n product), over
    repeated square products of each size within about `seconds`, at torch's current thread count."""
    best = 0.0
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        c = torch.empty(n, n)
        torch.matmul(a, b, out=c)  # warm-up (allocations, packing buffers)
        deadline = time.perf_counter() + seconds / len(sizes)
        runs = 0
        while runs < 3 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            dt = time.perf_counter() - t0
            best = max(best, 2.0 * n**3 / dt)
            runs += 1
    return best / 1e9


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
def _cfg(cfg_kwargs: dict, seq: int):

    base = tiny()
    kw = {"seq_length": seq, "max_position_embeddings": max(base.max_position_embeddings, seq)}
    kw.update(cfg_kwargs)
    return base.replace(**kw)


def model_flops_per_step(cfg, report, batch: int, seq: int) -> float:
    """Training FLOPs of one step (formula in the module docstring)."""

    layers = [
        (cfg.full_attention_heads, None)
        if cfg.is_full_attention(i)
        else (cfg.sliding_attention_heads, cfg.sliding_window)
        for i in range(cfg.num_layers)
    ]
    mtp_layers = [(cfg.sliding_attention_heads, cfg.sliding_window)] * len(report.mtp_modules)
    attn = attention_flops_per_token(layers + mtp_layers, cfg.head_dim, seq)
    dense = 2 * (report.active_no_embedding + report.output_layer)
    dense += sum(2 * (m + report.output_layer) for m in report.mtp_modules)
    return 3.0 * (dense + attn) * batch * seq


def _tokens(vocab_size: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """(batch, seq + 1) ids: inputs [:, :-1], labels [:, 1:]. Same on both sides."""
    return torch.randint(0, vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def _quiet():
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


@contextlib.contextmanager
def _no_phase(name):
    yield


# ---------------------------------------------------------------------------------------------
# Ours: Megatron-Core
# ---------------------------------------------------------------------------------------------
def _ours_build(cfg_kwargs, batch, seq, threads, seed, micro_batch=None, first_step_1_thread=False):
    """Returns (step(phase) -> (loss, fwd_bwd_s, grads_s, opt_s), info dict).

    `first_step_1_thread` (diagnostic, off by default): run one extra untimed step at 1 thread
    before anything else. The first step's collectives run on gloo worker threads; the first
    parallel ATen op on such a thread fixes that thread's OpenMP team size at the global thread
    count of that moment. Taken at 2 threads, the process then holds two OpenMP teams (4 threads)
    on 2 CPUs, and libgomp throttles the spin-wait of idle workers, so the main team's worker sleeps
    between parallel regions and every region pays a wake-up; taken at 1 thread, the gloo thread
    stays serial. Measured: ~330 -> ~200 ms per step at 2 threads; no effect at 1 thread."""
    _quiet()
    parallel = ParallelConfig()
    platform.setup(parallel, seed=seed)
    torch.set_num_threads(threads)  # after setup(), which picks its own count
    cfg = _cfg(cfg_kwargs, seq)
    module = build_step_flash(cfg, parallel)
    report = count_parameters(module, cfg.moe_topk, cfg.num_experts)
    model = wrap_ddp(module)
    o = OptimConfig(
        lr=LR, min_lr=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS, weight_decay=WEIGHT_DECAY,
        clip_grad=CLIP_GRAD,
    )  # fmt: skip
    opt = build_optimizer(o, [model], bf16=False)
    data = _tokens(cfg.vocab_size, batch, seq, seed)
    mbs = micro_batch or batch
    if batch % mbs:
        raise ValueError(f"batch={batch} is not a multiple of micro_batch={mbs}")
    labels = {
        "forward_backward": "ours: forward+backward",
        "finalize": "ours: finalize_model_grads",
        "optimizer": "ours: optimizer (clip + AdamW)",
    }

    def step(phase=_no_phase):
        micro = [(data[i : i + mbs, :-1], data[i : i + mbs, 1:]) for i in range(0, batch, mbs)]
        r = train_step(
            [model], opt, None, micro, seq_length=seq, micro_batch_size=mbs, phase=lambda n: phase(labels[n])
        )
        t = r.seconds
        return r.mean("lm_loss"), t["forward_backward"], t["finalize"], t["optimizer"]

    if first_step_1_thread:
        torch.set_num_threads(1)
        step()
        torch.set_num_threads(threads)
    info = {
        "first_step_1_thread": first_step_1_thread,
        "params": report.total,
        "active_params": report.active_no_embedding + report.output_layer,
        "flops_per_step": model_flops_per_step(cfg, report, batch, seq),
        "micro_batch": mbs,
        "mtp_num_layers": cfg.mtp_num_layers,
    }
    return step, info


# ---------------------------------------------------------------------------------------------
# Reference: transformers Step3p7TextModel
# ---------------------------------------------------------------------------------------------
def _hf_build(cfg_kwargs, batch, seq, threads, seed):
    _quiet()
    import torch.nn.functional as F
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = _cfg(cfg_kwargs, seq)
    if cfg.mtp_num_layers:
        raise ValueError("Step3p7TextModel has no MTP in its forward; use mtp_num_layers=0")
    model = Step3p7TextModel(hf_text_config(cfg)).train()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    # HF's embedding has padding_idx = pad_token_id (1; the strict config refuses None), whose row
    # gets no gradient; ours has no padding row, so every row gets one here too.
    model.embed_tokens.padding_idx = None
    lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    torch.nn.init.normal_(lm_head.weight, std=cfg.init_std)
    params = [*model.parameters(), *lm_head.parameters()]
    assert all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )
    data = _tokens(cfg.vocab_size, batch, seq, seed)
    inputs, labels = data[:, :-1], data[:, 1:]
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)

    def step(phase=_no_phase):
        t0 = time.perf_counter()
        with phase("hf: forward (model + head + CE)"):
            opt.zero_grad(set_to_none=True)
            hidden = model(input_ids=inputs, position_ids=pos, use_cache=False).last_hidden_state
            logits = hidden @ lm_head.weight.T
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), labels.reshape(-1))
        with phase("hf: backward"):
            loss.backward()
        t1 = time.perf_counter()
        with phase("hf: optimizer (clip + AdamW)"):
            torch.nn.utils.clip_grad_norm_(params, CLIP_GRAD)
            opt.step()
        t2 = time.perf_counter()
        return loss.item(), t1 - t0, 0.0, t2 - t1

    info = {"params": sum(p.numel() for p in params)}
    return step, info


# ---------------------------------------------------------------------------------------------
# Timing / profiling workers (module-level: usable with run_distributed)
# ---------------------------------------------------------------------------------------------
def _time(step, info, batch, seq, iters, warmup, threads, pre=None, post=None) -> dict:
    """`pre` / `post` run around every step, outside the timed region (the lockstep barrier)."""
    losses, rows = [], []
    for i in range(warmup + iters):
        if pre:
            pre()
        loss, *phases = step()
        if post:
            post()
        losses.append(loss)
        if i >= warmup:
            rows.append(phases)
    totals = [sum(r) for r in rows]
    step_s = statistics.median(totals)
    return {
        **info,
        "step_s": step_s,
        "step_s_min": min(totals),
        "step_times_s": totals,
        "fwd_bwd_s": statistics.median(r[0] for r in rows),
        "grads_s": statistics.median(r[1] for r in rows),
        "optimizer_s": statistics.median(r[2] for r in rows),
        "tokens_per_s": batch * seq / step_s,
        "losses": losses,
        "threads": torch.get_num_threads(),
        "requested_threads": threads,
    }


def ours_step_time(
    rank,
    world_size,
    cfg_kwargs,
    batch,
    seq,
    iters,
    threads=None,
    warmup=2,
    seed=SEED,
    micro_batch=None,
    first_step_1_thread=False,
) -> dict:
    """Median full training-step time of our stack (1 rank; see the module docstring)."""
    threads = threads or os.cpu_count() or 1
    step, info = _ours_build(cfg_kwargs, batch, seq, threads, seed, micro_batch, first_step_1_thread)
    return _time(step, info, batch, seq, iters, warmup, threads)


def hf_step_time(rank, world_size, cfg_kwargs, batch, seq, iters, threads=None, warmup=2, seed=SEED) -> dict:
    """Median full training-step time of transformers' Step3p7TextModel + LM head + AdamW."""
    threads = threads or os.cpu_count() or 1
    step, info = _hf_build(cfg_kwargs, batch, seq, threads, seed)
    return _time(step, info, batch, seq, iters, warmup, threads)


def _alternating_worker(
    rank,
    world_size,
    barrier,
    cfg_kwargs,
    batch,
    seq,
    iters,
    threads,
    warmup,
    micro_batch,
    first_step_1_thread,
):
    """Rank 0 times ours, rank 1 transformers, in lockstep: one step of ours, then one of
    transformers, never both at once, so load from other processes on a shared machine falls on
    both sides alike. Rank 0 runs its own 1-process group (ours is a 1-rank training run)."""

    def turn():
        barrier.wait(600)

    def two_turns():  # transformers goes second: wait for the start of ours' turn and its end
        turn()
        turn()

    if rank == 0:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        step, info = _ours_build(cfg_kwargs, batch, seq, threads, SEED, micro_batch, first_step_1_thread)
        pre, post = turn, turn
    else:
        step, info = _hf_build(cfg_kwargs, batch, seq, threads, SEED)
        pre, post = two_turns, None
    turn()  # both built
    out = _time(step, info, batch, seq, iters, warmup, threads, pre, post)
    turn()  # the other side's last step is not overlapped by this side's exit
    return out


def _profile_worker(rank, world_size, which, cfg_kwargs, batch, seq, iters, threads, warmup, row_limit):
    from torch.profiler import ProfilerActivity, profile, record_function

    if which == "ours":
        step, _ = _ours_build(cfg_kwargs, batch, seq, threads, SEED)
    else:
        step, _ = _hf_build(cfg_kwargs, batch, seq, threads, SEED)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step(record_function)
    wall = (time.perf_counter() - t0) / iters
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / iters / 1e3 for e in events if e.key.startswith(f"{which}: ")}
    ops = sorted(
        (e for e in events if not e.key.startswith(f"{which}: ")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    top = [(e.key, e.self_cpu_time_total / iters / 1e3, e.count // iters) for e in ops[:row_limit]]
    return {
        "which": which,
        "step_ms_profiled": wall * 1e3,
        "phases_ms": phases,
        "top_self_cpu": top,  # (op, self CPU ms per step, calls per step)
        "ops_per_step": sum(e.count for e in ops) // iters,
        "table": events.table(sort_by="self_cpu_time_total", row_limit=row_limit),
    }


def _comparison_kwargs(cfg_kwargs):
    return {"mtp_num_layers": 0, "mtp_loss_weights": [], **(cfg_kwargs or {})}


def profile_ours(batch=4, seq=128, iters=3, threads=1, warmup=2, cfg_kwargs=None, row_limit=25) -> dict:
    """torch.profiler over `iters` steps of our stack (comparison shape, MTP off): time per phase and
    the top ops by self CPU time (ms per step). 1 thread by default: on the shared 2-core box,
    2-thread profiles are dominated by OpenMP wake-ups and other jobs' load, not by the ops."""

    kw = _comparison_kwargs(cfg_kwargs)
    return run_distributed(_profile_worker, 1, "ours", kw, batch, seq, iters, threads, warmup, row_limit)[0]


def profile_hf(batch=4, seq=128, iters=3, threads=1, warmup=2, cfg_kwargs=None, row_limit=25) -> dict:
    """Same as `profile_ours` for the transformers side (for a side-by-side reading)."""

    kw = _comparison_kwargs(cfg_kwargs)
    return run_distributed(_profile_worker, 1, "hf", kw, batch, seq, iters, threads, warmup, row_limit)[0]


def format_profile(prof: dict, top: int = 15) -> str:
    lines = [f"{prof['which']}: {prof['step_ms_profiled']:.1f} ms/step under the profiler"]
    lines += [f"  {k:<36} {v:8.1f} ms" for k, v in prof["phases_ms"].items()]
    lines.append(f"  top ops by self CPU time ({prof['ops_per_step']} op calls per step):")
    lines += [f"    {name:<44} {ms:8.2f} ms  x{n}" for name, ms, n in prof["top_self_cpu"][:top]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------
def compare(
    batch: int = 4,
    seq: int = 128,
    iters: int = 10,
    threads: int | None = None,
    warmup: int = 2,
    cfg_kwargs: dict | None = None,
    peak_seconds: float = 2.0,
    micro_batch: int | None = None,
    first_step_1_thread: bool = False,
    rounds: int = 1,
    alternate: bool = True,
) -> dict:
    """Tiny preset with MTP off: ours vs transformers, each in its own spawned process, then the
    matmul peak in this process at the same thread count. Returns tokens/s, ratio and MFU.

    `alternate=True` (default): both processes start together (`run_distributed` with 2 ranks:
    rank 0 ours, rank 1 transformers) and take turns step by step, never computing at the same
    time; each side's time is the median over its own steps. `alternate=False`: one process after
    the other (`ours_step_time`, then `hf_step_time`). `rounds` > 1 repeats the measurement with
    fresh processes and keeps, per side, the round with the lowest median step time."""

    threads = threads or os.cpu_count() or 1
    kw = _comparison_kwargs(cfg_kwargs)
    runs = {"ours": [], "hf": []}
    for _ in range(rounds):
        if alternate:
            barrier = mp.get_context("spawn").Barrier(2)
            o, h = run_distributed(
                _alternating_worker,
                2,
                barrier,
                kw,
                batch,
                seq,
                iters,
                threads,
                warmup,
                micro_batch,
                first_step_1_thread,
            )
            runs["ours"].append(o)
            runs["hf"].append(h)
        else:
            runs["ours"] += run_distributed(
                ours_step_time,
                1,
                kw,
                batch,
                seq,
                iters,
                threads,
                warmup,
                SEED,
                micro_batch,
                first_step_1_thread,
            )
            runs["hf"] += run_distributed(hf_step_time, 1, kw, batch, seq, iters, threads, warmup, SEED)
    ours, hf = (min(runs[k], key=lambda d: d["step_s"]) for k in ("ours", "hf"))
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = measure_matmul_peak(peak_seconds)
    finally:
        torch.set_num_threads(prev)
    flops = ours["flops_per_step"]  # same shape on both sides (checked through the param counts)
    return {
        "batch": batch,
        "seq": seq,
        "iters": iters,
        "warmup": warmup,
        "rounds": rounds,
        "alternate": alternate,
        "round_step_ms": {k: [d["step_s"] * 1e3 for d in v] for k, v in runs.items()},
        "threads": threads,
        "cfg_kwargs": kw,
        "ours_tokens_per_s": ours["tokens_per_s"],
        "hf_tokens_per_s": hf["tokens_per_s"],
        "ratio": ours["tokens_per_s"] / hf["tokens_per_s"],
        "ours_step_ms": ours["step_s"] * 1e3,
        "hf_step_ms": hf["step_s"] * 1e3,
        "flops_per_step": flops,
        "peak_gflops": peak,
        "ours_mfu": flops / ours["step_s"] / (peak * 1e9),
        "hf_mfu": flops / hf["step_s"] / (peak * 1e9),
        "ours_params": ours["params"],
        "hf_params": hf["params"],
        "same_param_count": ours["params"] == hf["params"],
        "ours": ours,
        "hf": hf,
    }


def format_table(result: dict) -> str:
    r = result
    o, h = r["ours"], r["hf"]
    lines = [
        f"Step 3.5 Flash tiny preset, MTP off, {r['ours_params'] / 1e6:.2f}M params "
        f"(transformers: {r['hf_params'] / 1e6:.2f}M), fp32, batch {r['batch']} x {r['seq']} tokens, "
        f"{r['threads']} threads, median of {r['iters']} steps after {r['warmup']} warm-up"
        + (", the two processes taking turns step by step" if r.get("alternate") else ", one after the other")
        + (f", best of {r['rounds']} rounds" if r.get("rounds", 1) > 1 else ""),
        "one step = forward + CE loss + backward + grad clip 1.0 + AdamW",
        f"{'implementation':<34} {'step (ms)':>10} {'fwd+bwd (ms)':>13} {'optim (ms)':>11} "
        f"{'tokens/s':>10} {'MFU':>7}",
    ]
    for name, d, mfu in (
        (
            f"ours (Megatron-Core, mbs {o['micro_batch']}){'*' if o['first_step_1_thread'] else ''}",
            o,
            r["ours_mfu"],
        ),
        ("transformers Step3p7TextModel", h, r["hf_mfu"]),
    ):
        lines.append(
            f"{name:<34} {d['step_s'] * 1e3:10.1f} {(d['fwd_bwd_s'] + d['grads_s']) * 1e3:13.1f} "
            f"{d['optimizer_s'] * 1e3:11.1f} {d['tokens_per_s']:10,.0f} {mfu:7.2%}"
        )
    lines.append(
        f"ours / transformers tokens/s: {r['ratio']:.2f}; model FLOPs/step {r['flops_per_step'] / 1e9:.3f} "
        f"GFLOP; fp32 matmul peak {r['peak_gflops']:.1f} GFLOP/s"
    )
    if o.get("first_step_1_thread"):
        lines.append("* first (untimed) step of ours run at 1 thread: see `_ours_build(first_step_1_thread)`")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(compare()))

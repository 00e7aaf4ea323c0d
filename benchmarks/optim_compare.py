"""AdamW vs Megatron-Core's Muon vs MACRO (each manifold) on the tiny preset: same data, same steps,
same schedule; the matrix learning rate of each optimizer tuned over a small sweep; validation-loss
curves, final validation loss, and the optimizer step time relative to AdamW.

    python -m benchmarks.optim_compare                  # full sweep (~40 min, 2 cores)
    python -m benchmarks.optim_compare --steps 40 --quick   # smoke run

What is held fixed: the tiny preset and data of `examples/tiny/tiny.yaml` (embedded corpus, 8 x 128
tokens per step), cosine schedule with 20 warm-up steps and min_lr = lr / 10, gradient clipping 1.0,
seed. AdamW's own LR is swept; for Muon and MACRO the sweep is over the matrix LR while the AdamW
parameters they leave (embeddings, output layer, norms, routers) stay at `--scalar-lr` (AdamW's
default 3e-3), so the comparison isolates the matrix optimizer. Weight decay 0.1 on AdamW
parameters (a no-op on MACRO's matrices). Two extra runs test the paper's claim that the
constraint makes norm gains and weight decay optional: MACRO (best manifold and LR) with weight
decay 0 and frozen norm gains (`macro-nonorm-nowd-<manifold>`), and AdamW (best LR) with frozen gains
as the control (`adamw-frozen-gains`).

Runs go two at a time (one per core, one thread each) as separate processes; the step times in the
table come from those runs (median over steps, contention from the sibling run included for all
optimizers alike). Writes <out>/results.json, <out>/optim_compare.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from benchmarks.jobs import run_jobs
from megatron_step.config.run import load_run_config
from megatron_step.stages.pretrain import pretrain, text_datasets

SWEEP = {
    "adamw": ("adam", {}, [1e-3, 3e-3, 1e-2]),
    # the matrix optimizers' first sweep (3e-3, 1e-2, 3e-2) was best at its low end, so lower LRs
    # were added until the optimum was bracketed (spectral: at 3e-3; the others went to 3e-4)
    "muon": ("muon", {}, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
    "macro-frobenius": ("macro", {"optim.manifold": "frobenius"}, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
    "macro-spectral": ("macro", {"optim.manifold": "spectral"}, [1e-3, 3e-3, 1e-2, 3e-2]),
    "macro-oblique": ("macro", {"optim.manifold": "oblique"}, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
}


def _overrides(optimizer: str, extra: dict, lr: float, args) -> list[str]:
    out = {
        "optim.optimizer": optimizer,
        "optim.lr": lr,
        "optim.min_lr": lr / 10,
        "train.steps": args.steps,
        "train.eval_interval": args.eval_interval,
        "train.eval_steps": args.eval_steps,
        "train.save_interval": 0,
        "train.log_interval": args.steps,
        "data.data_dir": args.data_dir,
    }
    if optimizer != "adam":
        out["optim.scalar_lr"] = args.scalar_lr
        out["optim.scalar_min_lr"] = args.scalar_lr / 10
    out.update(extra)
    return [f"{k}={v}" for k, v in out.items()]


def run_one(overrides: list[str], run_dir: str, result_path: str) -> None:
    """One training run in this process (1 thread); writes its curve and timings as JSON."""
    torch.set_num_threads(1)
    # the benchmark owns its run directories: a rerun starts each run over
    cfg = load_run_config(
        "examples/tiny/tiny.yaml", [*overrides, f"train.run_dir={run_dir}", "train.overwrite=true"]
    )
    out = pretrain(cfg)
    res = {
        "overrides": overrides,
        "losses": out["losses"],
        "val_curve": out["val_curve"],
        "val_loss": out["val_loss"],
        # the first steps warm up (allocations, the gloo threads): left out when there are others
        "optimizer_step_ms": statistics.median(out["optimizer_step_ms"][5:] or out["optimizer_step_ms"]),
        "step_ms": statistics.median(out["step_ms"][5:] or out["step_ms"]),
    }
    with open(result_path, "w") as f:
        json.dump(res, f)


def _run_all(jobs: dict[str, list[str]], args) -> dict[str, dict]:
    """Run `jobs` (name -> overrides) `args.parallel` at a time; skip those already done."""
    return run_jobs(
        jobs,
        args.out,
        args.parallel,
        "benchmarks.optim_compare",
        summary=lambda r: f"val {r['val_loss']:.4f}",
        extra=lambda name: ["--run-dir", os.path.join(args.out, "runs", name)],
    )


def _best(results: dict, prefix: str) -> str | None:
    done = {k: v for k, v in results.items() if k.startswith(prefix + "@") and not v.get("failed")}
    finite = {k: v for k, v in done.items() if v["val_loss"] == v["val_loss"]}
    return min(finite, key=lambda k: finite[k]["val_loss"]) if finite else None


def table(results: dict) -> str:
    base = results.get(_best(results, "adamw") or "", {}).get("optimizer_step_ms")
    lines = [
        "| run | LR sweep (val loss) | best LR | final val loss | optimizer step ms | vs AdamW |",
        "|---|---|---|---:|---:|---:|",
    ]
    extras = sorted({k.split("@")[0] for k in results if k.split("@")[0] not in SWEEP})
    for name in [*SWEEP, *extras]:
        runs = {k: v for k, v in results.items() if k.split("@")[0] == name and not v.get("failed")}
        if not runs:
            continue
        sweep = ", ".join(f"{k.split('@')[1]}: {v['val_loss']:.3f}" for k, v in sorted(runs.items()))
        best = min(
            runs, key=lambda k: runs[k]["val_loss"] if runs[k]["val_loss"] == runs[k]["val_loss"] else 1e9
        )
        r = runs[best]
        ratio = f"{r['optimizer_step_ms'] / base:.2f}x" if base else "-"
        ms = r["optimizer_step_ms"]
        lines.append(
            f"| {name} | {sweep} | {best.split('@')[1]} | {r['val_loss']:.4f} | {ms:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib  # plotting only: not imported by the runs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    extras = sorted({k.split("@")[0] for k in results if k.split("@")[0] not in SWEEP})
    for name in [*SWEEP, *extras]:
        best = _best(results, name)
        if best is None:
            continue
        steps, vals = zip(*results[best]["val_curve"])
        ax.plot(steps, vals, marker="o", ms=3, label=f"{name} (lr {best.split('@')[1]})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("tiny Step 3.5 Flash preset, best LR per optimizer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-interval", type=int, default=25)
    ap.add_argument("--eval-steps", type=int, default=4)
    ap.add_argument("--scalar-lr", type=float, default=3e-3)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default="runs/optim_compare")
    ap.add_argument("--data-dir", default="runs/data")
    ap.add_argument("--plot", default="docs/img/optim_compare.png")
    ap.add_argument("--quick", action="store_true", help="one LR per optimizer (the middle one)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        run_one(json.loads(args.one), args.run_dir, args.result)
        return 0
    os.makedirs(args.out, exist_ok=True)
    # the data pipeline once, before the parallel runs (they would race to build it)
    text_datasets(load_run_config("examples/tiny/tiny.yaml", [f"data.data_dir={args.data_dir}"]))
    jobs = {}
    for name, (opt, extra, lrs) in SWEEP.items():
        for lr in lrs[len(lrs) // 2 : len(lrs) // 2 + 1] if args.quick else lrs:
            jobs[f"{name}@{lr:g}"] = _overrides(opt, extra, lr, args)
    results = _run_all(jobs, args)
    # the norm-free / weight-decay-free claim, at the best MACRO manifold + LR, and its AdamW control
    macro_best = min(
        (b for b in (_best(results, n) for n in SWEEP if n.startswith("macro")) if b),
        key=lambda k: results[k]["val_loss"],
    )
    adam_best = _best(results, "adamw")
    extra_jobs = {}
    if macro_best:
        name, lr = macro_best.split("@")
        opt, extra, _ = SWEEP[name]
        ov = _overrides(
            opt, {**extra, "optim.weight_decay": 0.0, "optim.freeze_norm_gains": True}, float(lr), args
        )
        extra_jobs[f"macro-nonorm-nowd-{name.split('-')[1]}@{lr}"] = ov
    if adam_best:
        lr = adam_best.split("@")[1]
        extra_jobs[f"adamw-frozen-gains@{lr}"] = _overrides(
            "adam", {"optim.freeze_norm_gains": True}, float(lr), args
        )
    results.update(_run_all(extra_jobs, args))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    plot(results, args.plot)
    print(table(results))
    print(f"\nplot: {args.plot}; per-run curves: {args.out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

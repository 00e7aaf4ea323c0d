"""MMRPT vs caption imitation from one caption warm-up checkpoint, same optimizer steps.

    python -m benchmarks.mmrpt_compare                     # examples/mmrpt/mmrpt_tiny.yaml
    python -m benchmarks.mmrpt_compare --steps 60 --seeds 2 --set mmrpt.warmup_steps=2000

First the caption warm-up (a 1-step caption run that writes <out>/warmup), then, per seed, MMRPT
(`mmrpt.objective=rl`) and the imitation baseline (`mmrpt.objective=caption`) as separate processes,
two at a time. Both are evaluated on the same held-out scenes with the same masked sentences (one
visual sentence per caption, the generator's truth): greedy reconstruction attribute accuracy, exact
match, D(s) ROC-AUC, caption loss with the caption's own image and with another image. Prints a table
and writes <out>/results.json and a PNG of the curves (attribute accuracy; MMRPT's mean reward).
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.jobs import run_jobs
from megatron_step import platform
from megatron_step.config.run import MMRPTRunConfig, load_run_config
from megatron_step.stages.mmrpt import train_mmrpt
from megatron_step.training import checkpoint

CONFIG = "examples/mmrpt/mmrpt_tiny.yaml"
MODULE = "benchmarks.mmrpt_compare"


def run_one(overrides: list[str], result: str) -> None:
    try:
        out = train_mmrpt(load_run_config(CONFIG, overrides, MMRPTRunConfig))
    finally:
        platform.teardown()
    with open(result, "w") as f:
        json.dump(out, f, default=float)


def _metric(r: dict, when: str, key: str) -> float:
    return r[when].get(key, float("nan"))


def table(results: dict) -> str:
    keys = ("attribute_accuracy", "exact_match", "d_roc_auc", "caption_loss", "caption_loss_other_image")
    lines = [
        "| run | " + " | ".join(f"{k}: start -> end" for k in keys) + " | mean reward, last 10 steps |",
        "|---|" + "---:|" * (len(keys) + 1),
    ]
    for name, r in results.items():
        if r.get("failed"):
            lines.append(f"| {name} | failed |" + " |" * len(keys))
            continue
        cells = [f"{_metric(r, 'start', k):.3f} -> {_metric(r, 'end', k):.3f}" for k in keys]
        rewards = [h["mmrpt/reward_total"] for h in r["history"] if "mmrpt/reward_total" in h][-10:]
        reward = f"{sum(rewards) / len(rewards):.3f}" if rewards else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {reward} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib  # plotting only: not imported by the runs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, r) in enumerate(results.items()):
        if r.get("failed"):
            continue
        ls = "-" if name.startswith("mmrpt") else "--"
        ax.plot(
            [c["step"] for c in r["curve"]],
            [c.get("attribute_accuracy", float("nan")) for c in r["curve"]],
            marker="o",
            ls=ls,
            color=f"C{i}",
            label=name,
        )
        hist = [(h["step"], h["mmrpt/reward_total"]) for h in r["history"] if "mmrpt/reward_total" in h]
        if hist:
            bx.plot([s for s, _ in hist], [v for _, v in hist], color=f"C{i}", label=name)
    ax.set_xlabel("step after warm-up")
    ax.set_ylabel("held-out attribute accuracy (greedy)")
    bx.set_xlabel("MMRPT step")
    bx.set_ylabel("mean reward of the step's rollouts")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps after the warm-up, both runs")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default="runs/mmrpt_compare")
    ap.add_argument("--png", default=None, help="default <out>/mmrpt_compare.png")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run (repeat)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        run_one(json.loads(args.one), args.result)
        return
    out = args.out
    os.makedirs(out, exist_ok=True)
    common = [*args.set, f"mmrpt.init_from={out}/warmup", f"train.steps={args.steps}"]

    def summary(r):
        return f"attribute accuracy {_metric(r, 'start', 'attribute_accuracy'):.3f} -> " + (
            f"{_metric(r, 'end', 'attribute_accuracy'):.3f}"
        )

    common = [*common, "train.overwrite=true"]  # the benchmark owns its run directories: a rerun starts over
    if checkpoint.latest_step(f"{out}/warmup") is None:
        print("caption warm-up ...", flush=True)
        warm = [*common, "mmrpt.objective=caption", "train.steps=1", "mmrpt.eval_interval=0"]
        run_jobs({"warmup": [*warm, f"train.run_dir={out}/warmup_run"]}, out, 1, MODULE, summary)
    jobs = {}
    for k in range(args.seeds):
        seed = 1234 + k
        for name, objective in (("mmrpt", "rl"), ("caption", "caption")):
            jobs[f"{name}-seed{seed}"] = [
                *common,
                f"mmrpt.objective={objective}",
                f"train.seed={seed}",
                f"train.run_dir={out}/{name}-seed{seed}",
            ]
    results = run_jobs(jobs, out, args.parallel, MODULE, summary)
    for r in results.values():
        r.pop("history_full", None)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    png = args.png or os.path.join(out, "mmrpt_compare.png")
    plot(results, png)
    print(table(results))
    print(f"plot: {png}")


if __name__ == "__main__":
    main()

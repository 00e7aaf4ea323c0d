"""RL runs side by side from one warm-up checkpoint: held-out accuracy curves (vs step and vs sampled
tokens), a Markdown table and a PNG. Six suites:

    python -m benchmarks.rl_compare --suite demo       # issue 7: sync (3 seeds) + async cap 1
    python -m benchmarks.rl_compare --suite e3rl       # E3RL vs plain GRPO, equal token budget
    python -m benchmarks.rl_compare --suite staleness  # MIS-PO / TIS / GRPO at staleness 0, 2, 4
    python -m benchmarks.rl_compare --suite critic     # GRPO vs actor-critic (GAE), two truncation rules
    python -m benchmarks.rl_compare --suite spec       # MTP speculative rollouts: drafter refreshed or not
    python -m benchmarks.rl_compare --suite erl        # ERL vs plain tool rollouts, equal token budget

staleness: the demo task, async with rl.exact_staleness (batch b sampled with version b - k, so every
step from the k-th on trains on rollouts exactly k versions old, and thread timing plays no part),
for each loss (`--losses`), staleness (`--staleness`) and seed.

critic: the demo task, sync, MIS-PO; per seed the GRPO advantages vs GAE with a critic
(rl.advantage=gae, gamma = lam = 1) with the report's truncation-aware bootstrapping and with cut
responses scored as terminal (rl.critic.truncation=terminal): the same rollouts per step (equal
samples), the same steps.

spec: the demo task, sync, MTP trained in RL (rl.mtp_loss_weight=0.1), rollouts by MTP-3 speculative
decoding (rl.speculative.tokens=3, the rejection rule); per seed the policy's own heads draft (every
update refreshes the drafter) or a frozen copy of the starting heads does (rl.speculative.
refresh_drafter=false): acceptance per draft depth by step. Each run saves its final checkpoint (the
input of benchmarks.spec_decode).

erl: `examples/rl/rl_lookup.yaml` (2-hop lookup questions through the search tool); per seed plain
tool rollouts vs ERL rollouts (rl.rollout=erl, default rl.erl), same warm-up checkpoint, same loss,
both stopped at the same number of tokens the policy sampled (`--budget`, default 20k; rolled-back
tokens count, the tool's results do not), so ERL gets fewer steps. Curves: the success rate of the
training rollouts (the reward: exact final answer) and the held-out accuracy, by sampled tokens.

demo: `examples/rl/rl_tiny.yaml` as shipped (1-2 step arithmetic, operands <= 5), sync MIS-PO for three
seeds and async with staleness cap 1, every run `--steps` RL steps.
e3rl: the long task (2-3 steps, operands <= 5, 40 new tokens = 5 segments of 8), plain GRPO rollouts
vs E3RL rollouts for each seed, both stopped at the same number of sampled tokens
(`rl.max_tokens_sampled`; erased tokens count), same checkpoint, same loss (GRPO clip).

The warm-up runs once per suite (alone), then runs go two at a time, one thread each (so both arms of
a pair see the same contention). A run's train.seed sets its prompts, sampling and held-out set (the
held-out set is drawn from the seed), so compare arms within a seed. Results already in <out> are
reused; delete <out>/<name>.json to rerun one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.jobs import run_jobs
from megatron_step import platform
from megatron_step.config.run import RLRunConfig, load_run_config
from megatron_step.stages.rl import train_rl
from megatron_step.testing import golden
from megatron_step.training import checkpoint

DEMO_TASK: list[str] = []
LONG_TASK = [
    "rl.task_min_steps=2",
    "rl.task_max_steps=3",
    "rl.task_max_operand=5",
    "rl.max_new_tokens=40",
    "rl.e3rl.segment_len=8",
    "rl.e3rl.num_segments=5",
]


SUITES = ("demo", "e3rl", "staleness", "critic", "spec", "erl")
CONFIGS = {"erl": "examples/rl/rl_lookup.yaml"}  # a suite's run config (others: rl_tiny.yaml)
BUDGETS = {"e3rl": 120_000, "erl": 20_000}  # --budget's default per suite (tokens sampled per run)


def suite(name: str, args) -> tuple[list[str], dict[str, list[str]]]:
    """(common overrides, run name -> its own overrides)."""
    seeds = [1234, 1235, 1236][: args.seeds]
    if name == "demo":
        common = [*DEMO_TASK, f"train.steps={args.steps}", "train.eval_interval=10"]
        runs = {f"sync-seed{s}": [f"train.seed={s}"] for s in seeds}
        runs["async-cap1-seed1234"] = ["train.seed=1234", "rl.async_mode=true", "rl.max_staleness=1"]
        return common, runs
    if name == "e3rl":
        common = [
            *LONG_TASK,
            "rl.loss=grpo",
            f"train.steps={args.steps}",
            f"rl.max_tokens_sampled={args.budget or BUDGETS[name]}",
            "train.eval_interval=10",
        ]
        runs = {}
        for s in seeds:
            runs[f"grpo-seed{s}"] = [f"train.seed={s}"]
            runs[f"e3rl-seed{s}"] = [f"train.seed={s}", "rl.rollout=e3rl"]
        return common, runs
    if name == "staleness":
        common = [*DEMO_TASK, f"train.steps={args.steps}", "train.eval_interval=10", "rl.async_mode=true"]
        common.append("rl.exact_staleness=true")
        runs = {}
        for s in seeds:
            for k in (int(x) for x in args.staleness.split(",")):
                for loss in args.losses.split(","):
                    runs[f"{loss}-stale{k}-seed{s}"] = [
                        f"train.seed={s}",
                        f"rl.max_staleness={k}",
                        f"rl.loss={loss}",
                    ]
        return common, runs
    if name == "critic":
        common = [*DEMO_TASK, f"train.steps={args.steps}", "train.eval_interval=10"]
        runs = {}
        for s in seeds:
            runs[f"grpo-seed{s}"] = [f"train.seed={s}"]
            runs[f"gae_bootstrap-seed{s}"] = [f"train.seed={s}", "rl.advantage=gae"]
            runs[f"gae_terminal-seed{s}"] = [
                f"train.seed={s}",
                "rl.advantage=gae",
                "rl.critic.truncation=terminal",
            ]
        return common, runs
    if name == "spec":
        common = [
            *DEMO_TASK,
            f"train.steps={args.steps}",
            "train.eval_interval=10",
            f"train.save_interval={args.steps}",
            "rl.mtp_loss_weight=0.1",
            "rl.speculative.tokens=3",
        ]
        runs = {}
        for s in seeds:
            runs[f"refresh-seed{s}"] = [f"train.seed={s}"]
            runs[f"frozen-seed{s}"] = [f"train.seed={s}", "rl.speculative.refresh_drafter=false"]
        return common, runs
    if name == "erl":
        common = [
            f"train.steps={args.steps}",
            f"rl.max_tokens_sampled={args.budget or BUDGETS[name]}",
            "train.eval_interval=10",
            "rl.eval_problems=12",  # the world holds ~10 held-out 2-hop questions (drawn with replacement)
        ]
        runs = {}
        for s in seeds:
            runs[f"plain-seed{s}"] = [f"train.seed={s}"]
            runs[f"erl-seed{s}"] = [f"train.seed={s}", "rl.rollout=erl"]
        return common, runs
    raise ValueError(f"--suite {name!r}: one of {', '.join(SUITES)}")


def run_one(overrides: list[str], result_path: str, config: str = "examples/rl/rl_tiny.yaml") -> None:
    """One RL run in this process (1 thread); writes its curves as JSON."""
    torch.set_num_threads(1)
    cfg = load_run_config(config, overrides, RLRunConfig)
    t0 = time.time()
    try:
        out = train_rl(cfg)
    finally:
        platform.teardown()
    res = {
        "overrides": overrides,
        "accuracy": out["accuracy"],
        "accuracy_sampled": out["accuracy_sampled"],
        "tokens_sampled": out["tokens_sampled"],
        "reward": out["reward"],
        "max_staleness": max(out["staleness"], default=0),
        "seconds": time.time() - t0,
    }
    # what the loss kept or clipped, per step (the run's TensorBoard scalars)
    logged = golden.read_run(cfg.train.run_dir)
    keys = ("policy/keep_rate", "policy/clip_frac", "policy/staleness_kl", "policy/ppo_ratio_mean")
    keys += ("critic/value_error", "critic/explained_variance", "rl/response_length", "critic/truncated_rate")
    keys += ("spec/acceptance_1", "spec/acceptance_2", "spec/acceptance_3", "spec/tokens_per_draft_step")
    keys += ("rl/generation_tokens_per_sec", "rl/accuracy_train", "rl/tokens_sampled_cumulative")
    keys += ("erl/rollbacks_per_rollout", "erl/sampled_tokens", "erl/tool_calls")
    for key in keys:
        if key in logged:
            res[key.split("/")[1]] = sorted(logged[key].items())
    with open(result_path, "w") as f:
        json.dump(res, f)


def _run_all(jobs: dict[str, list[str]], out: str, parallel: int, config: str) -> dict[str, dict]:
    def summary(r):
        return f"{r['accuracy'][0][1]:.3f} -> {r['accuracy'][-1][1]:.3f}"

    return run_jobs(
        jobs, out, parallel, "benchmarks.rl_compare", summary=summary, extra=lambda n: ["--config", config]
    )


def table(results: dict) -> str:
    lines = [
        "| run | held-out greedy: start | end | best | sampled: start | end | steps | tokens sampled "
        "| max staleness | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if r.get("failed"):
            lines.append(f"| {name} | failed |" + " |" * 9)
            continue
        acc, smp = r["accuracy"], r.get("accuracy_sampled") or [(0, float("nan"))]
        best = max(a for _, a in acc)
        lines.append(
            f"| {name} | {acc[0][1]:.3f} | {acc[-1][1]:.3f} | {best:.3f} | {smp[0][1]:.3f} | "
            f"{smp[-1][1]:.3f} | {acc[-1][0]} | {r['tokens_sampled'][-1][1]} | {r['max_staleness']} | "
            f"{r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: str, x: str) -> None:
    import matplotlib  # plotting only: not imported by the runs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (name, r) in enumerate(results.items()):
        if r.get("failed"):
            continue
        color = f"C{i}"
        xs = [s for s, _ in r["accuracy"]] if x == "step" else [t for _, t in r["tokens_sampled"]]
        ax.plot(xs, [a for _, a in r["accuracy"]], marker="o", color=color, label=f"{name} (greedy)")
        if r.get("accuracy_sampled"):
            ax.plot(
                xs, [a for _, a in r["accuracy_sampled"]], ls="--", color=color, label=f"{name} (sampled)"
            )
    ax.set_xlabel("RL step" if x == "step" else "tokens sampled (erased included)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_staleness(results: dict, path: str) -> None:
    """One panel per staleness: the sampled held-out accuracy by step, per loss (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple[int, str], list[dict]] = {}
    for name, r in results.items():
        if not r.get("failed"):
            loss, stale, _ = name.split("-")
            cells.setdefault((int(stale.removeprefix("stale")), loss), []).append(r)
    stales = sorted({k for k, _ in cells})
    fig, axes = plt.subplots(1, len(stales), figsize=(4.2 * len(stales), 3.6), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], stales):
        for i, loss in enumerate(sorted({loss for kk, loss in cells if kk == k})):
            runs = cells[(k, loss)]
            steps = [st for st, _ in runs[0]["accuracy_sampled"]]
            mean = [sum(r["accuracy_sampled"][j][1] for r in runs) / len(runs) for j in range(len(steps))]
            ax.plot(steps, mean, marker="o", color=f"C{i}", label=f"{loss} ({len(runs)} seed(s))")
        ax.set_title(f"staleness {k}")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (sampled)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


CRITIC_PANELS = (
    ("accuracy", "held-out accuracy (greedy)"),
    ("accuracy_sampled", "held-out accuracy (sampled)"),
    ("response_length", "response length (tokens)"),
    ("value_error", "critic: 0.5 (V - G)^2, fresh rollouts"),
)
ERL_PANELS = (
    ("accuracy_train", "success rate of the training rollouts"),
    ("accuracy", "held-out accuracy (greedy)"),
    ("accuracy_sampled", "held-out accuracy (sampled)"),
    ("rollbacks_per_rollout", "rollbacks per rollout"),
)
SPEC_PANELS = (
    ("acceptance_1", "draft depth 1: accepted / proposed"),
    ("acceptance_2", "depth 2 (given depth 1 accepted)"),
    ("acceptance_3", "depth 3 (given depth 2 accepted)"),
    ("accuracy_sampled", "held-out accuracy (sampled)"),
)


def plot_arms(results: dict, path: str, panels=CRITIC_PANELS, x: str = "step") -> None:
    """Mean over seeds per arm (run name before '-seed'), one panel per (key, title) of `panels`
    (critic suite: held-out accuracy, response length, the critic's error on fresh rollouts; spec
    suite: draft acceptance per depth; erl suite: success rates and rollbacks), against the RL step
    or (x="tokens") the tokens sampled by then (the mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms: dict[str, list[dict]] = {}
    for name, r in results.items():
        if not r.get("failed"):
            arms.setdefault(name.split("-seed")[0], []).append(r)

    def at_tokens(r, step):  # tokens sampled by the end of `step` (0 before the first)
        return dict(r["tokens_sampled_cumulative"]).get(step, 0.0) if step else 0.0

    def mean(runs, key):
        n = min(len(r[key]) for r in runs)
        xs = [
            runs[0][key][j][0] if x == "step" else sum(at_tokens(r, r[key][j][0]) for r in runs) / len(runs)
            for j in range(n)
        ]
        return xs, [sum(r[key][j][1] for r in runs) / len(runs) for j in range(n)]

    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, (arm, runs) in enumerate(arms.items()):
            if all(r.get(key) for r in runs):
                xs, ys = mean(runs, key)
                ax.plot(
                    xs, ys, marker="o" if len(xs) < 12 else None, color=f"C{i}", label=f"{arm} ({len(runs)})"
                )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step" if x == "step" else "tokens sampled")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="demo", choices=SUITES)
    ap.add_argument("--staleness", default="0,2,4", help="staleness suite: the fixed staleness values")
    ap.add_argument("--losses", default="mispo,tis,grpo", help="staleness suite: rl.loss kinds")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument(
        "--budget", type=int, default=None, help="e3rl / erl suites: tokens sampled per run (120k / 20k)"
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default=None, help="default runs/rl_compare_<suite>")
    ap.add_argument("--png", default=None, help="default <out>/<suite>.png")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run (repeat)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        run_one(json.loads(args.one), args.result, args.config)
        return
    config = CONFIGS.get(args.suite, "examples/rl/rl_tiny.yaml")
    out = args.out or f"runs/rl_compare_{args.suite}"
    os.makedirs(out, exist_ok=True)
    common, runs = suite(args.suite, args)
    common = [*common, *args.set, f"rl.init_from={out}/sft", f"data.data_dir={out}/data"]
    common.append("train.overwrite=true")  # the benchmark owns its run directories: a rerun starts over
    # the warm-up alone first (every run then loads it), as a 1-step run of the first job
    first = next(iter(runs))
    if checkpoint.latest_step(f"{out}/sft") is None:
        print("supervised warm-up ...", flush=True)
        warm = [*common, *runs[first], "train.steps=1", f"train.run_dir={out}/warmup"]
        _run_all({"warmup": warm}, out, 1, config)
    jobs = {n: [*common, *ov, f"train.run_dir={out}/{n}"] for n, ov in runs.items()}
    results = _run_all(jobs, out, args.parallel, config)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    png = args.png or os.path.join(out, f"{args.suite}.png")
    if args.suite == "staleness":
        plot_staleness(results, png)
    elif args.suite in ("critic", "spec"):
        plot_arms(results, png, SPEC_PANELS if args.suite == "spec" else CRITIC_PANELS)
    elif args.suite == "erl":
        plot_arms(results, png, ERL_PANELS, x="tokens")
    else:
        plot(results, png, "tokens" if args.suite == "e3rl" else "step")
    print(table(results))
    print(f"plot: {png}")


if __name__ == "__main__":
    main()

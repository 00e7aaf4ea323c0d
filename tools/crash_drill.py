"""Crash drill: kill a training run with SIGKILL at random points, resume it each time, and check that
the per-step curve is the uninterrupted run's and that no complete checkpoint was lost.

    python tools/crash_drill.py --config examples/tiny/tiny.yaml --kills 4 --out runs/drill \\
        train.steps=12 train.eval_interval=0
    python tools/crash_drill.py --entry rl --config examples/rl/rl_tiny.yaml --kills 3 --out runs/drill_rl \\
        rl.init_from=runs/rl_tiny/sft train.steps=6 rl.eval_problems=16

1. A reference run to the end (`<out>/reference`).
2. The drilled run (`<out>/drilled`), started `--kills` times with `train.resume=auto` and
   MEGATRON_STEP_CRASH=<point>:<n> (megatron_step.training.faults): a point drawn from mid-step,
   mid-save (shards written, nothing committed), mid-commit (committed, `latest` not replaced) and,
   for RL, mid-rollout, at a random count. After each kill the newest complete checkpoint must be the
   newest one any save committed (nothing lost) and verify.
3. A last start without a fault runs it to the end; then every logged scalar but the timings is
   compared with the reference, bit for bit (the drilled directory holds every process' events;
   TensorBoard keeps one value per step).
Both runs checkpoint every step (`train.save_interval=1`). Prints a table of the kills; exit code 0
when every check holds, 1 otherwise, 2 on bad input. One process per start (`--nproc N`: torchrun).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

from megatron_step.config.run import (
    MMRPTRunConfig,
    PretrainConfig,
    RLRunConfig,
    SFTRunConfig,
    load_run_config,
)
from megatron_step.testing import golden
from megatron_step.training import checkpoint
from megatron_step.training.faults import CRASH_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRIES = {  # --entry: (script, run config, crash points)
    "pretrain": ("pretrain/pretrain_step.py", PretrainConfig, ("step", "save", "commit")),
    "sft": ("posttrain/train_sft.py", SFTRunConfig, ("step", "save", "commit")),
    "rl": ("posttrain/train_rl.py", RLRunConfig, ("step", "save", "commit", "rollout")),
    "mmrpt": ("pretrain/pretrain_mmrpt.py", MMRPTRunConfig, ("step", "save", "commit", "rollout")),
}
TIMINGS = ("seconds", "per_sec", "_ms", "tflops", "mfu")


def _command(args, run_dir: str, *extra: str) -> list[str]:
    script = os.path.join(REPO, ENTRIES[args.entry][0])
    launch = [sys.executable, script]
    if args.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", script]
    return [
        *launch,
        "--config",
        args.config,
        *args.overrides,
        f"train.run_dir={run_dir}",
        "train.save_interval=1",
        *extra,
    ]


def _start(args, run_dir: str, fault: str | None, log: str, *extra: str) -> tuple[int, float, bool]:
    """One start of the run (its output to `log`): (exit code, seconds, whether the fault fired)."""
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    if fault:
        env[CRASH_ENV] = fault
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(
            _command(args, run_dir, *extra), env=env, stdout=f, stderr=subprocess.STDOUT
        ).returncode
    with open(log) as f:
        fired = "crash drill: SIGKILL" in f.read()
    return rc, time.perf_counter() - t0, fired


def _newest(run_dir: str) -> int | None:
    """The newest committed checkpoint that verifies (read only: nothing is moved)."""
    for step in reversed(checkpoint.saved_steps(run_dir)):
        if checkpoint.verify(checkpoint.checkpoint_dir(run_dir, step)) is None:
            return step
    return None


def drill(args) -> dict:
    steps = load_run_config(args.config, list(args.overrides), ENTRIES[args.entry][1]).train.steps
    os.makedirs(args.out, exist_ok=True)
    ref, run = os.path.join(args.out, "reference"), os.path.join(args.out, "drilled")
    rc, secs, _ = _start(args, ref, None, os.path.join(args.out, "reference.log"), "train.overwrite=true")
    if rc != 0:
        raise RuntimeError(f"the reference run failed (exit {rc}); see {args.out}/reference.log")
    rng = random.Random(args.seed)
    points = ENTRIES[args.entry][2]
    rows, ok = [], True
    for k in range(args.kills):
        fault = f"{rng.choice(points)}:{rng.randint(1, steps)}"
        before = _newest(run)
        first = ("train.overwrite=true",) if k == 0 else ("train.resume=auto",)
        rc, secs, fired = _start(args, run, fault, os.path.join(args.out, f"start{k}.log"), *first)
        after = _newest(run)
        committed = max(checkpoint.saved_steps(run), default=None)  # every save that got its rename
        kept = after == committed and (before is None or (after or 0) >= before)
        ok &= kept and (fired or rc == 0)
        rows.append((k, fault, "killed" if fired else f"exit {rc}", before, after, kept, secs))
    rc, secs, _ = _start(args, run, None, os.path.join(args.out, "final.log"), "train.resume=auto")
    rows.append((args.kills, "-", f"exit {rc}", _newest(run), _newest(run), rc == 0, secs))
    ok &= rc == 0
    a, b = golden.read_run(ref), golden.read_run(run)
    keys = sorted(k for k in a if not any(t in k for t in TIMINGS))
    diff = [k for k in keys if a[k] != b.get(k)]
    return {"rows": rows, "keys": len(keys), "steps": steps, "differ": diff, "ok": ok and not diff}


def format_table(result: dict) -> str:
    head = ("start", "fault", "ended", "newest ckpt before", "after", "nothing lost", "s")
    lines = ["{:>5} {:<12} {:<8} {:>18} {:>6} {:>12} {:>6}".format(*head)]
    for k, fault, ended, before, after, kept, secs in result["rows"]:
        cells = (k, fault, ended, str(before), str(after), "yes" if kept else "NO", f"{secs:.1f}")
        lines.append("{:>5} {:<12} {:<8} {:>18} {:>6} {:>12} {:>6}".format(*cells))
    same = "identical" if not result["differ"] else f"DIFFERENT in {result['differ'][:5]}"
    lines.append(
        f"curves: {result['keys']} scalar series over {result['steps']} steps, drilled vs reference: {same}"
    )
    lines.append("drill passed" if result["ok"] else "drill FAILED")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entry", choices=sorted(ENTRIES), default="pretrain")
    ap.add_argument("--config", required=True, help="the run's YAML")
    ap.add_argument("--kills", type=int, default=3, help="starts that get a fault (default 3)")
    ap.add_argument("--out", required=True, help="directory for the two runs and the logs")
    ap.add_argument("--seed", type=int, default=0, help="draws the faults")
    ap.add_argument("--nproc", type=int, default=1, help="processes per start (torchrun when > 1)")
    ap.add_argument("overrides", nargs="*", help="section.field=value, for both runs")
    args = ap.parse_args(argv)
    try:
        result = drill(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"crash_drill: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

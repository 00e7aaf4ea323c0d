"""Run benchmark jobs as separate processes, a few at a time, one thread each, results as JSON.

    results = run_jobs({"a": [...overrides], "b": [...]}, out="runs/x", parallel=2,
                       module="benchmarks.rl_compare", summary=lambda r: f"{r['x']:.3f}")

Each job runs `python -m <module> --one <json overrides> --result <out>/<name>.json [extra(name)]`
with OMP_NUM_THREADS=1 and its log in <out>/<name>.log; a job whose JSON already exists is not run
again (delete the file to rerun it). A job that fails is reported and recorded as {"failed": True}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable


def run_jobs(
    jobs: dict[str, list[str]],
    out: str,
    parallel: int,
    module: str,
    summary: Callable[[dict], str] = lambda r: "ok",
    extra: Callable[[str], list[str]] = lambda name: [],
) -> dict[str, dict]:
    results, pending, running = {}, [], []
    for name, ov in jobs.items():
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name] = json.load(f)
        else:
            pending.append((name, ov))
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < parallel:
            name, ov = pending.pop(0)
            path = os.path.join(out, f"{name}.json")
            cmd = [sys.executable, "-m", module, "--one", json.dumps(ov), "--result", path, *extra(name)]
            with open(os.path.join(out, f"{name}.log"), "w") as log:  # the child keeps its own handle
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((name, proc, path))
            print(f"[{time.time() - t0:6.0f}s] start {name}", flush=True)
        time.sleep(2)
        for item in list(running):
            name, proc, path = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0 or not os.path.exists(path):
                print(f"[{time.time() - t0:6.0f}s] FAILED {name} (see {out}/{name}.log)", flush=True)
                results[name] = {"failed": True, "overrides": jobs[name]}
                continue
            with open(path) as f:
                results[name] = json.load(f)
            print(f"[{time.time() - t0:6.0f}s] done {name}: {summary(results[name])}", flush=True)
    return results


__all__ = ["run_jobs"]

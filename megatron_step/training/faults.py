"""Fault injection for crash drills and tests, driven by environment variables (read at every call,
so a test or `tools/crash_drill.py` sets them per process; unset, nothing happens):

    MEGATRON_STEP_CRASH=step:3       SIGKILL this process at the 3rd optimizer step (after its
                                     forward-backward, before the update)
    MEGATRON_STEP_CRASH=save:2       ... in the 2nd checkpoint save, after every shard is written and
                                     before the manifest and the commit
    MEGATRON_STEP_CRASH=commit:2     ... in the 2nd save, after the rename, before `latest` is replaced
    MEGATRON_STEP_CRASH=rollout:4    ... in the 4th generation call, after the prefill, mid-decode
    MEGATRON_STEP_INJECT_NAN=grad:3,5   a NaN in rank 0's reduced gradients at optimizer steps 3 and 5
    MEGATRON_STEP_INJECT_NAN=loss:3     the 3rd optimizer step's loss is NaN (so every gradient is)

Counts are per process and per point (the Nth time the point is reached). Every rank reaches the
same points, so every rank of a job dies at the same place, as when a node takes the job down.
The code calls `crash_point(name)` at each point and `nan_fault()` once per optimizer step.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

CRASH_ENV = "MEGATRON_STEP_CRASH"
NAN_ENV = "MEGATRON_STEP_INJECT_NAN"
CRASH_POINTS = ("step", "save", "commit", "rollout")

_reached: Counter = Counter()

__all__ = ["CRASH_ENV", "CRASH_POINTS", "NAN_ENV", "crash_point", "nan_fault"]


def _parse(env: str, kinds: tuple[str, ...]) -> tuple[str, set[int]] | None:
    spec = os.environ.get(env, "")
    if not spec:
        return None
    kind, _, at = spec.partition(":")
    numbers = [x.strip() for x in at.split(",")]
    if kind not in kinds or not all(x.isdigit() for x in numbers):
        raise ValueError(f"{env}={spec!r}: expected <{'|'.join(kinds)}>:N[,N...]")
    return kind, {int(x) for x in numbers}


def crash_point(name: str) -> None:
    """Count this arrival at point `name`; SIGKILL the process when MEGATRON_STEP_CRASH names it."""
    _reached[name] += 1
    want = _parse(CRASH_ENV, CRASH_POINTS)
    if want is not None and want[0] == name and _reached[name] in want[1]:
        print(
            f"crash drill: SIGKILL at {name} #{_reached[name]} (pid {os.getpid()})",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGKILL)


def nan_fault() -> str | None:
    """Called once per optimizer step: the fault MEGATRON_STEP_INJECT_NAN asks for at this step
    ("grad" / "loss"), None for none."""
    _reached["nan"] += 1
    want = _parse(NAN_ENV, ("grad", "loss"))
    return want[0] if want is not None and _reached["nan"] in want[1] else None

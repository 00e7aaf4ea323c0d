"""Run a function in N spawned processes joined by a `gloo` (CPU) or `nccl` (GPU) process group.

    def body(rank, world_size, tmp_path):       # module-level, so it pickles
        env = platform.setup(ParallelConfig(tp=2), seed=0)
        ...
        return {"loss": loss.item()}            # any picklable value

    results = run_distributed(body, 2, tmp_path)  # [result of rank 0, result of rank 1]

Each call gets a free port, each rank gets torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). When a rank raises, its traceback is re-raised in the
caller (as `DistributedTestError`, naming the rank) and the other ranks — which may be blocked in a
collective — are terminated by pid. Process groups are torn down on the way out.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from megatron_step.platform import free_port, teardown


class DistributedTestError(RuntimeError):
    pass


def _worker(fn, rank, world_size, port, args, kwargs, results):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        out = fn(rank, world_size, *args, **kwargs)
        # Plain pickle (bytes): torch's queue reductions would pass tensors as shared-memory file
        # descriptors that vanish when this process exits before the parent reads them.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - surfaced to the parent verbatim
        results.put((rank, False, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            teardown()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout_s: float = 600.0,
    exit_timeout_s: float = 120.0,
    **kwargs,
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` ranks; return per-rank results.

    `timeout_s` bounds the wait for each result; `exit_timeout_s` bounds how long ranks that have all
    reported may take to tear down and exit (interpreter shutdown after a Megatron import can take
    tens of seconds on a loaded 2-core CI box, so a short grace here made passing runs fail).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, args, kwargs, results),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    failure: tuple[int, str] | None = None
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=timeout_s)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise DistributedTestError(
                    f"ranks {missing} produced no result within {timeout_s:.0f}s "
                    f"(exit codes: {[p.exitcode for p in procs]})"
                ) from None
            if not ok:
                failure = (rank, payload)
                break
            outputs[rank] = pickle.loads(payload)
    finally:
        grace = exit_timeout_s if failure is None and len(outputs) == world_size else 1.0
        deadline = time.monotonic() + grace
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:  # only our own children, by handle (never by name)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    if failure is not None:
        rank, tb = failure
        raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{tb}")
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise DistributedTestError(f"processes exited abnormally after reporting: {bad}")
    return [outputs[r] for r in range(world_size)]

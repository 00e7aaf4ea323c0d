"""The multi-process test harness itself: results in rank order, a failing rank's traceback
surfaced, a hang turned into an error."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_step.testing import DistributedTestError, run_distributed
from megatron_step.testing.distributed import default_start_method

pytestmark = pytest.mark.distributed


def _allreduce(rank, world_size, base):
    dist.init_process_group("gloo")
    t = torch.tensor([float(base + rank)])
    dist.all_reduce(t)
    return rank, t.item()


def _fail_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.init_process_group("gloo")
    dist.barrier()  # blocks forever: rank 1 never joins


def _sleep(rank, world_size):
    time.sleep(60)


def test_results_come_back_in_rank_order():
    assert run_distributed(_allreduce, 2, 10) == [(0, 21.0), (1, 21.0)]


def test_failing_rank_traceback_is_surfaced_and_others_are_ended():
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2 failed.*ValueError: boom on purpose"):
        run_distributed(_fail_on_rank1, 2, timeout_s=60)


def test_hang_becomes_an_error():
    with pytest.raises(DistributedTestError, match="produced no result within 3s"):
        run_distributed(_sleep, 1, timeout_s=3)


def _crash(rank, world_size):
    os._exit(3)  # no traceback, no result: as a segfault or an OOM kill would


def _env(rank, world_size, name):
    return os.environ.get(name), os.environ["RANK"]


def test_a_rank_that_dies_is_reported_at_once_with_its_exit_code():
    t0 = time.monotonic()
    with pytest.raises(
        DistributedTestError, match=r"ranks \[0\] of 1 died without reporting \(exit codes \[3\]"
    ):
        run_distributed(_crash, 1, timeout_s=300)
    assert time.monotonic() - t0 < 60  # not the 300 s timeout


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_ranks_see_the_callers_environment_at_the_call(monkeypatch, start_method):
    monkeypatch.setenv("MEGATRON_STEP_TEST_VALUE", "set after the server started")
    got = run_distributed(_env, 2, "MEGATRON_STEP_TEST_VALUE", start_method=start_method)
    assert got == [("set after the server started", "0"), ("set after the server started", "1")]


def test_cpu_runs_start_ranks_from_a_forkserver():
    assert default_start_method() == ("spawn" if torch.cuda.is_available() else "forkserver")

"""The multi-process test harness itself: results in rank order, a failing rank's traceback
surfaced, a hang turned into an error."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from megatron_step.testing import DistributedTestError, run_distributed

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

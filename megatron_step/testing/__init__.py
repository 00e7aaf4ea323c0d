"""Test harness shared by the test suite and benchmarks."""

from megatron_step.testing.distributed import DistributedTestError, run_distributed

__all__ = ["DistributedTestError", "run_distributed"]

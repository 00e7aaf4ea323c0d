"""The platform layer: one call sets up torch.distributed, Megatron-Core's parallel state, RNG and
(only on machines without CUDA) the CPU compatibility patches.

    from megatron_step.platform import ParallelConfig
    from megatron_step import platform
    env = platform.setup(ParallelConfig(tp=2), seed=1234)   # under torchrun, or 1 process
    ...
    platform.teardown()
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_step.platform import cpu_patches
from megatron_step.platform.capabilities import Capabilities, detect
from megatron_step.platform.parallel import ParallelConfig

__all__ = [
    "Capabilities",
    "DistEnv",
    "ParallelConfig",
    "compute_device",
    "detect",
    "free_port",
    "seed_everything",
    "setup",
    "teardown",
    "to_device",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl" or "gloo"
    parallel: ParallelConfig
    caps: Capabilities
    cpu_patched: bool  # True when cpu_patches were applied (never on a CUDA machine)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_torch_distributed(timeout_s: int = 600) -> tuple[int, int, int]:
    """Start the default process group from torchrun's env vars, or as a 1-rank group when they are
    absent (a plain `python script.py` run). Returns (rank, world_size, local_rank)."""
    caps = detect()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if caps.cuda:
            torch.cuda.set_device(local_rank % caps.device_count)
        dist.init_process_group(
            backend=caps.backend,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def seed_everything(seed: int) -> None:
    """Same seed on every rank for python/numpy/torch; Megatron-Core's RNG tracker then derives the
    per-TP-rank and per-expert-rank streams from it.

    On CPU the tracker is the *inference* tracker (it saves/restores the CPU generator instead of
    CUDA RNG states). Consequence: dropout masks are not decorrelated across TP ranks on CPU, which is
    harmless for the dropout-0 configs we test with and is documented in docs/architecture.md.
    """
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not detect().cuda, force_reset_rng=True)


def _warm_gloo_threads() -> None:
    """Run each kind of collective the training step uses once, with 1 intra-op thread.

    Why: gloo runs collectives on its own worker threads, and the first parallel ATen op on such a
    thread (the copies inside reduce-scatter / all-gather of the distributed optimizer) creates an
    OpenMP team of the global thread count there. With 2 cores that leaves two busy-waiting teams
    competing for the cores, and every later parallel region pays for it: a tiny-preset step took
    ~320 ms at 2 threads vs ~240 ms at 1 (measured with benchmarks/hf_compare.py).
    Letting the worker thread's first parallel op run at 1 thread avoids the second team.
    A/B on `make demo`'s config (40 steps): 1,109 / 1,127 tokens/s with it, 1,003 / 905 without.
    MEGATRON_STEP_NO_GLOO_WARMUP=1 turns it off (to re-measure)."""
    from megatron.core import parallel_state as ps

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        groups = {None, ps.get_data_parallel_group(with_context_parallel=True)}
        for group in groups:
            n = dist.get_world_size(group)
            big = torch.ones(n * (1 << 18))  # large enough for ATen to parallelise its copies
            out = torch.empty(1 << 18)
            dist.all_reduce(big, group=group)
            dist.reduce_scatter_tensor(out, big, group=group)
            dist.all_gather_into_tensor(big, out, group=group)
    finally:
        torch.set_num_threads(threads)


def setup(parallel: ParallelConfig, seed: int = 1234, timeout_s: int = 600) -> DistEnv:
    """Initialise everything a Megatron-Core run needs, in the right order."""
    from megatron.core import parallel_state

    caps = detect()
    patched = False
    if not caps.cuda:
        cpu_patches.apply_cpu_patches()
        patched = True
        # 2 cores per box: intra-op threads per rank = cores / local ranks, at least 1; an explicit
        # OMP_NUM_THREADS wins (benchmark jobs run several processes side by side with 1 thread each:
        # a second thread per process then spins on an occupied core and slows every process down)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        threads = max(1, (os.cpu_count() or 1) // max(1, local))
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
        torch.set_num_threads(threads)
    rank, world_size, local_rank = init_torch_distributed(timeout_s)
    parallel.validate(world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**parallel.initialize_kwargs())
    seed_everything(seed)
    if not caps.cuda and os.environ.get("MEGATRON_STEP_NO_GLOO_WARMUP", "0") != "1":
        _warm_gloo_threads()
    device = torch.device("cuda", torch.cuda.current_device()) if caps.cuda else torch.device("cpu")
    return DistEnv(rank, world_size, local_rank, device, caps.backend, parallel, caps, patched)


def compute_device() -> torch.device:
    """Where models live and batches must go: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if detect().cuda else torch.device("cpu")


def to_device(obj, device: torch.device | None = None):
    """`obj` with every tensor inside (dicts, lists, tuples, nested) moved to `device` (default:
    `compute_device()`). Data pipelines build batches on the CPU; on a CUDA machine the forward step
    moves them here. A no-op for tensors already there (the CPU path)."""
    device = device or compute_device()
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def teardown() -> None:
    """Destroy Megatron-Core's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

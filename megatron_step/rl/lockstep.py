"""What keeps ranks in step while they generate and update, and what makes a rollout independent of
the layout that sampled it.

Lockstep. A forward pass of a TP / EP / PP model is a sequence of collectives (TP all-reduces, MoE
all-to-alls, pipeline sends): every rank joined by them must make the same number of forward calls,
whatever its own data needs. With `parallel.ep > 1` the expert-parallel group spans data-parallel
ranks, which hold different prompts, so "my sequences are done" is not a rank-local decision.

    step = Lockstep.for_model()            # the group below, or None when no collective joins ranks
    while step.any(not all(done)): ...     # one 1-element all-reduce (MAX) per decode step
    n = step.max(len(micro))               # pad to the longest rank's count

Which group: the default (world) group whenever the model is model-parallel (tp, pp, ep or cp > 1).
It is wider than needed (only the closure of the TP, PP and EP groups is joined), but it is correct
for every layout Megatron-Core builds, including EP spanning DP, and it costs one small all-reduce per
decode step. With tp = pp = ep = cp = 1 no collective happens inside a forward and ranks run free.

Keyed randomness. The uniform behind each sampled token is a hash of (run seed, policy version,
prompt id, sample index, position, attempt) -- splitmix64 chains, 53-bit uniforms -- and the token is
drawn by inverse CDF from the (filtered) sampling distribution. No generator state is carried, so the
same prompts give the same tokens under any layout and any batching, while data-parallel ranks (which
hold different prompt ids) are decorrelated. We hash in Python rather than use torch.Generator: one
generator per row and token would cost more than the hash, and torch's Philox offsets depend on how
many numbers earlier calls drew, which is the batching dependence this removes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_step.platform import compute_device

__all__ = ["Lockstep", "keyed_uniforms", "mix_seed"]

_M64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """One 64-bit value from integers (run seed, policy version, ...): order matters, any int is fine."""
    h = _splitmix(0x5EED)
    for p in parts:
        h = _splitmix(h ^ (int(p) & _M64))
    return h


def keyed_uniforms(seed: int, keys: Sequence[Sequence[int]]) -> torch.Tensor:
    """(len(keys),) float64 uniforms in [0, 1), one per key: a pure function of (seed, key)."""
    return torch.tensor([(mix_seed(seed, *k) >> 11) * 2.0**-53 for k in keys], dtype=torch.float64)


class Lockstep:
    """Agreement among the ranks of `group` (None: this rank alone). Every rank of the group must make
    the same calls in the same order."""

    def __init__(self, group=None):
        self.group = group

    @classmethod
    def for_model(cls) -> Lockstep:
        """The world group when the model is model-parallel (see the module docstring), else None."""
        if not dist.is_initialized() or not ps.model_parallel_is_initialized():
            return cls(None)
        size = (
            ps.get_tensor_model_parallel_world_size()
            * ps.get_pipeline_model_parallel_world_size()
            * ps.get_expert_model_parallel_world_size()
            * ps.get_context_parallel_world_size()
        )
        return cls(dist.group.WORLD if size > 1 else None)

    @classmethod
    def world(cls) -> Lockstep:
        """Every rank (for what must not depend on how prompts are spread over DP ranks)."""
        return cls(dist.group.WORLD if dist.is_initialized() else None)

    @property
    def active(self) -> bool:
        return self.group is not None and dist.get_world_size(self.group) > 1

    def max(self, n: int) -> int:
        """The largest `n` over the group."""
        if not self.active:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=compute_device())  # NCCL moves CUDA tensors
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True when `flag` holds on some rank of the group."""
        return self.max(int(bool(flag))) > 0

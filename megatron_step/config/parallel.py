"""Parallel layout: how a world of ranks is split into TP/PP/CP/EP/DP groups."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Megatron-Core's layout. The dense part uses world = tp * cp * pp * dp; the expert part uses
    world = etp * ep * pp * edp (expert data parallel), so EP folds into DP x CP x TP of the dense part.
    """

    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B); None = off
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel
    etp: int = 1  # expert tensor parallel
    sequence_parallel: bool | None = None  # None: on exactly when tp > 1
    world_size: int | None = None  # None: taken from torch.distributed at setup

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "ep", "etp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 1:
                raise ValueError(f"parallel.vpp must be None or a positive integer, got {self.vpp!r}")
            if self.vpp > 1 and self.pp < 2:
                raise ValueError(f"parallel.vpp={self.vpp} needs pp >= 2, got pp={self.pp}")
        if self.sequence_parallel is None:
            self.sequence_parallel = self.tp > 1
        elif self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=True needs tp > 1 (got tp=1)")
        if self.world_size is not None:
            self.validate(self.world_size)

    def validate(self, world_size: int) -> None:
        """Raise with the numbers when this layout does not fit `world_size` ranks."""
        dense = self.tp * self.pp * self.cp
        if world_size % dense:
            raise ValueError(
                f"tp({self.tp}) * pp({self.pp}) * cp({self.cp}) = {dense} does not divide "
                f"world size {world_size}"
            )
        expert = self.etp * self.ep * self.pp
        if world_size % expert:
            raise ValueError(
                f"etp({self.etp}) * ep({self.ep}) * pp({self.pp}) = {expert} does not divide "
                f"world size {world_size}"
            )

    def dp(self, world_size: int | None = None) -> int:
        """Data-parallel size of the dense part."""
        ws = world_size or self.world_size
        if ws is None:
            raise ValueError("world size unknown: pass world_size or set ParallelConfig.world_size")
        self.validate(ws)
        return ws // (self.tp * self.pp * self.cp)

    def expert_dp(self, world_size: int | None = None) -> int:
        ws = world_size or self.world_size
        if ws is None:
            raise ValueError("world size unknown: pass world_size or set ParallelConfig.world_size")
        self.validate(ws)
        return ws // (self.etp * self.ep * self.pp)

    def describe(self, world_size: int) -> str:
        return (
            f"world={world_size} tp={self.tp} pp={self.pp} vpp={self.vpp} cp={self.cp} "
            f"dp={self.dp(world_size)} ep={self.ep} etp={self.etp} "
            f"edp={self.expert_dp(world_size)} sp={self.sequence_parallel}"
        )

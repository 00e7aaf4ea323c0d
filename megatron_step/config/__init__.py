"""Typed configs. One dataclass per component; presets are Python functions."""

from megatron_step.config.parallel import ParallelConfig

__all__ = ["ParallelConfig"]

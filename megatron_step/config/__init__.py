"""Typed configs. One dataclass per component; presets are Python functions."""

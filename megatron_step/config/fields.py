"""Typed dataclasses from YAML mappings and `a.b.c=value` overrides, driven by the field annotations.

    cfg = build(TrainConfig, {"steps": 20, "run_dir": "runs/x"}, "train")
    raw = {}
    set_path(raw, RLRunConfig, "rl.loss.clip_eps", "0.3")      # raw["rl"]["loss"]["clip_eps"] = 0.3
    build(RLRunConfig, raw)

One rule set for both sources (a YAML file and the command line), applied by walking the annotations:
- a nested dataclass field takes a mapping (its own fields), or a scalar for its first field
  (`loss: grpo` sets `rl.loss.kind`);
- `float` takes ints and numeric strings (YAML 1.1 reads `1e-3` -- no dot -- as a string);
  `int` takes ints only (`steps: 3.5` is refused), `bool` only true/false, `str` only strings;
- `X | None` takes null/None or an X; `list[X]` / `tuple[X, ...]` a sequence of X;
- `dict[str, Any]` is kept as given (the `model:` overrides are checked against StepFlashConfig by
  the run config).
Every error names the dotted field, the value and what was expected; a dataclass's own
`__post_init__` checks (ranges, choices) run as it is built.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

import yaml

__all__ = ["build", "field_types", "parse_scalar", "set_path"]


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML reads it: `3` -> 3, `true` -> True, `[1, 2]` -> [1, 2], `x` -> 'x'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp, where: str) -> Any:
    """`value` as annotation `tp`; ValueError naming `where` when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arm, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}={value!r}: expected {_describe(tp)}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):  # a scalar sets the section's first field
            value = {dataclasses.fields(tp)[0].name: value}
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r}: expected a list")
        item = args[0] if args else Any
        out = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}={value!r}: expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}={value!r}: expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}={value!r}: expected a string")
    return value


def build(cls, raw: dict | None, where: str = ""):
    """An instance of dataclass `cls` from the mapping `raw` (missing fields take their defaults)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping of {cls.__name__} fields, got {raw!r}")
    types_ = field_types(cls)
    unknown = [k for k in raw if k not in types_]
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"{name}: unknown field of {cls.__name__} (fields: {', '.join(types_)})")
    kwargs = {k: coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def set_path(raw: dict, cls, key: str, text: str) -> None:
    """Record the override `key=text` (e.g. `rl.e3rl.segment_len=5`) in the raw mapping of `cls`,
    checking each step of the path against the annotations; `build` coerces the value later."""
    parts = key.split(".")
    node, tp, done = raw, cls, []
    for i, name in enumerate(parts):
        types_ = field_types(tp)
        if name not in types_:
            raise ValueError(f"override {key}: {tp.__name__} has no field {name!r}")
        sub = types_[name]
        done.append(name)
        last = i == len(parts) - 1
        if last:
            value = parse_scalar(text)
            if _is_dataclass_type(sub) and isinstance(node.get(name), dict) and not isinstance(value, dict):
                # a scalar for a nested section sets its first field, keeping the section's others
                node[name][dataclasses.fields(sub)[0].name] = value
            else:
                node[name] = value
            return
        if typing.get_origin(sub) is dict or sub is dict:  # a free mapping (model: overrides)
            node.setdefault(name, {})[".".join(parts[i + 1 :])] = parse_scalar(text)
            return
        if not _is_dataclass_type(sub):
            raise ValueError(f"override {key}: {'.'.join(done)} is not a nested section")
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        elif not isinstance(child, dict):  # `loss: grpo` in YAML, then rl.loss.clip_eps=...
            child = node[name] = {dataclasses.fields(sub)[0].name: child}
        node, tp = child, sub

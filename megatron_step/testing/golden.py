"""Golden loss files: the per-step scalars of a deterministic run as a text table, and the comparison a
change must pass -- bit-identical for a refactor, within a relative tolerance where that is stated.

    curves = read_run("runs/tiny", ["train/lm_loss", "train/grad_norm"])   # from TensorBoard
    write_table("tests/golden/pretrain_tiny.txt", curves, header=["how it was made ..."])
    rows = compare(read_table("tests/golden/pretrain_tiny.txt")[1], curves, rtol=1e-5)
    print(format_rows(rows))

File format (tests/golden/*.txt): `#` header lines (what run, how to regenerate it, when that is
legitimate), then one whitespace-separated table: a `step` column and one column per scalar, values
written with 9 significant digits (a float32 -- what TensorBoard stores -- round-trips exactly), `-`
where the run logged nothing at that step.

A "run" is a run directory: its `<run_dir>/tensorboard` event files, read with TensorBoard's own
EventAccumulator (the last value logged at a step wins, as TensorBoard shows it).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

Curves = dict[str, dict[int, float]]  # scalar name -> {step: value}

__all__ = [
    "Curves",
    "Row",
    "compare",
    "format_rows",
    "load",
    "read_run",
    "read_table",
    "write_table",
]


def _f32(v: float) -> float:
    """`v` rounded to float32, what TensorBoard stores: a table's 9-digit value reads back exactly."""
    return struct.unpack("f", struct.pack("f", v))[0]


def read_run(run_dir: str, keys: list[str] | None = None) -> Curves:
    """The TensorBoard scalars of a run directory (all of them, or `keys`; a missing key raises,
    naming what the run has)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = os.path.join(run_dir, "tensorboard")
    if not os.path.isdir(tb):
        raise FileNotFoundError(f"{run_dir}: no tensorboard/ directory (is it a run directory?)")
    ea = EventAccumulator(tb, size_guidance={"scalars": 0})  # 0: keep every event
    ea.Reload()
    tags = ea.Tags()["scalars"]
    wanted = list(tags) if keys is None else list(keys)
    missing = [k for k in wanted if k not in tags]
    if missing:
        raise KeyError(f"{run_dir}: no scalar {missing[0]!r}; it has {sorted(tags)}")
    return {k: {e.step: float(e.value) for e in ea.Scalars(k)} for k in wanted}


def read_table(path: str) -> tuple[list[str], Curves]:
    """(header lines without '# ', curves) of a golden file."""
    header, curves, columns = [], {}, None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.startswith("#"):
                header.append(line[1:].removeprefix(" "))
                continue
            if not line.strip():
                continue
            cells = line.split()
            if columns is None:
                if cells[0] != "step":
                    raise ValueError(
                        f"{path}:{n}: the table must start with a 'step' column, got {cells[0]!r}"
                    )
                columns = cells[1:]
                curves = {c: {} for c in columns}
                continue
            if len(cells) != len(columns) + 1:
                raise ValueError(f"{path}:{n}: {len(cells)} cells, the header has {len(columns) + 1}")
            step = int(cells[0])
            for c, v in zip(columns, cells[1:]):
                if v != "-":
                    curves[c][step] = _f32(float(v))
    if columns is None:
        raise ValueError(f"{path}: no table (a 'step ...' header line) found")
    return header, curves


def write_table(path: str, curves: Curves, header: list[str]) -> None:
    """Write `curves` as a golden file with `header` lines (each written after '# ')."""
    steps = sorted({s for c in curves.values() for s in c})
    keys = list(curves)
    width = max(12, *(len(k) for k in keys))
    lines = [f"# {h}".rstrip() for h in header]
    lines.append("step  " + "  ".join(f"{k:>{width}}" for k in keys))
    for s in steps:
        cells = [f"{curves[k][s]:.9g}" if s in curves[k] else "-" for k in keys]
        lines.append(f"{s:<4}  " + "  ".join(f"{c:>{width}}" for c in cells))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def load(source: str, keys: list[str] | None = None) -> Curves:
    """Curves of a golden file or of a run directory."""
    if os.path.isdir(source):
        return read_run(source, keys)
    curves = read_table(source)[1]
    if keys is not None:
        missing = [k for k in keys if k not in curves]
        if missing:
            raise KeyError(f"{source}: no column {missing[0]!r}; it has {sorted(curves)}")
        curves = {k: curves[k] for k in keys}
    return curves


@dataclass
class Row:
    key: str
    step: int
    a: float | None  # None: absent in A
    b: float | None
    ok: bool

    @property
    def rel(self) -> float:
        if self.a is None or self.b is None:
            return math.inf
        if self.a == self.b:
            return 0.0
        return abs(self.a - self.b) / max(abs(self.a), abs(self.b), 1e-30)


def compare(a: Curves, b: Curves, rtol: float = 0.0, keys: list[str] | None = None) -> list[Row]:
    """Row per (key, step) of `keys` (default: A's keys): equal within `rtol` (0: bit-identical; nan
    equals nan). A step present on one side only is a mismatch."""
    rows = []
    for k in keys or list(a):
        ca, cb = a.get(k, {}), b.get(k, {})
        for s in sorted(set(ca) | set(cb)):
            va, vb = ca.get(s), cb.get(s)
            if va is None or vb is None:
                ok = False
            elif math.isnan(va) or math.isnan(vb):
                ok = math.isnan(va) and math.isnan(vb)
            else:
                ok = va == vb or abs(va - vb) <= rtol * max(abs(va), abs(vb))
            rows.append(Row(k, s, va, vb, ok))
    return rows


def format_rows(rows: list[Row], names: tuple[str, str] = ("A", "B"), only_bad: bool = False) -> str:
    """A table of the comparison and a one-line summary."""
    shown = [r for r in rows if not r.ok] if only_bad else rows
    width = max([len("key"), *(len(r.key) for r in shown)])
    out = [f"{'key':<{width}}  {'step':>5}  {names[0]:>15}  {names[1]:>15}  {'rel diff':>9}  "]
    for r in shown:
        fa = "-" if r.a is None else f"{r.a:.9g}"
        fb = "-" if r.b is None else f"{r.b:.9g}"
        out.append(
            f"{r.key:<{width}}  {r.step:>5}  {fa:>15}  {fb:>15}  {r.rel:>9.2e}  {'' if r.ok else 'MISMATCH'}"
        )
    bad = sum(not r.ok for r in rows)
    worst = max((r.rel for r in rows if r.a is not None and r.b is not None), default=0.0)
    out.append(f"{len(rows)} values, {bad} mismatched, worst relative difference {worst:.3e}")
    return "\n".join(out)

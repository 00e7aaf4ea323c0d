"""The golden-file format and comparison (megatron_step.testing.golden) and tools/loss_compare.py."""

from __future__ import annotations

import math
import struct
import subprocess
import sys

import pytest

from megatron_step.testing import golden
from tools.loss_compare import main as loss_compare

REPO = __file__.rsplit("/tests/", 1)[0]


def _f32(v):
    return struct.unpack("f", struct.pack("f", v))[0]


def _next_f32(v):  # the float32 just above v
    return struct.unpack("f", struct.pack("I", struct.unpack("I", struct.pack("f", v))[0] + 1))[0]


CURVES = {
    "train/lm_loss": {1: _f32(6.248093605041504), 2: _f32(5.1), 3: _f32(1e-8)},
    "val/lm_loss": {3: _f32(4.858408927917480)},
    "rl/x": {1: math.nan},
}


def test_write_read_round_trips_float32_exactly(tmp_path):
    path = str(tmp_path / "g.txt")
    golden.write_table(path, CURVES, ["made by a test", "second line"])
    header, back = golden.read_table(path)
    assert header == ["made by a test", "second line"]
    assert back.keys() == CURVES.keys() and back["val/lm_loss"] == CURVES["val/lm_loss"]
    assert back["train/lm_loss"] == CURVES["train/lm_loss"]  # bit-identical, not approximately
    assert all(r.ok for r in golden.compare(CURVES, back))  # nan == nan
    with open(path) as f:
        assert any(line.split()[:1] == ["1"] and line.split()[2] == "-" for line in f)  # '-': not logged


def test_compare_catches_one_ulp_and_missing_steps():
    moved = {k: dict(v) for k, v in CURVES.items()}
    moved["train/lm_loss"][2] = _next_f32(CURVES["train/lm_loss"][2])
    del moved["val/lm_loss"][3]
    rows = golden.compare(CURVES, moved)
    bad = {(r.key, r.step) for r in rows if not r.ok}
    assert bad == {("train/lm_loss", 2), ("val/lm_loss", 3)}
    # within a tolerance the ulp passes, the missing value still fails
    rows = golden.compare(CURVES, moved, rtol=1e-5)
    assert {(r.key, r.step) for r in rows if not r.ok} == {("val/lm_loss", 3)}
    assert "MISMATCH" in golden.format_rows(rows, only_bad=True)


def test_loss_compare_cli_exit_codes(tmp_path, capsys):
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    golden.write_table(a, CURVES, ["a"])
    moved = {k: dict(v) for k, v in CURVES.items()}
    moved["train/lm_loss"][1] *= 1.001
    golden.write_table(b, moved, ["b"])
    assert loss_compare([a, a, "--assert-equal"]) == 0
    assert loss_compare([a, b, "--rtol", "1e-5"]) == 1 and "MISMATCH" in capsys.readouterr().out
    assert loss_compare([a, b, "--rtol", "1e-2"]) == 0
    assert loss_compare([a, b]) == 0  # no tolerance given: a table, not a verdict
    assert loss_compare([a, str(tmp_path / "nope")]) == 2 and "nope" in capsys.readouterr().err
    # as a user runs it: the exit code reaches the shell
    cli = subprocess.run(
        [sys.executable, "tools/loss_compare.py", a, b, "--assert-equal"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1 and "MISMATCH" in cli.stdout, cli.stderr


def test_read_run_names_the_missing_scalar(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "run" / "tensorboard"))
    for step in (1, 2):
        w.add_scalar("train/lm_loss", 3.0 / step, step)
    w.close()
    curves = golden.read_run(str(tmp_path / "run"))
    assert curves == {"train/lm_loss": {1: 3.0, 2: 1.5}}
    # a run against a golden file: the file's columns are compared, not everything the run logged
    w = SummaryWriter(str(tmp_path / "run" / "tensorboard"))
    w.add_scalar("train/lr", 0.1, 1)
    w.close()
    golden.write_table(str(tmp_path / "g.txt"), curves, ["from the run"])
    assert loss_compare([str(tmp_path / "run"), str(tmp_path / "g.txt"), "--assert-equal"]) == 0
    with pytest.raises(KeyError, match="no scalar 'train/grad_norm'"):
        golden.read_run(str(tmp_path / "run"), ["train/grad_norm"])

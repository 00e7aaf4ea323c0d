"""tools/crash_drill.py: a tiny pretraining run killed (SIGKILL) at random points -- mid-step, mid-save,
mid-commit -- and resumed each time ends with the uninterrupted run's curve, and no kill costs a
committed checkpoint."""

from __future__ import annotations

import os

import pytest

from tools.crash_drill import main

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # make test-all: 5 starts of the entry point (~2 min); the pieces are tested by default
def test_a_pretraining_run_killed_at_random_points_gives_the_uninterrupted_curve(
    embedded_data, tmp_path, capsys
):
    argv = ["--config", os.path.join(REPO, "examples/tiny/tiny.yaml"), "--kills", "3", "--seed", "2"]
    argv += ["--out", str(tmp_path), f"data.data_dir={embedded_data}", "model.vocab_size=512"]
    argv += [
        "data.tokenizer_vocab_size=512",
        "train.steps=6",
        "train.eval_interval=3",
        "train.log_interval=1",
    ]
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "drilled vs reference: identical" in out and "drill passed" in out, out
    assert out.count(" killed ") >= 2, out  # the drill did kill (seed 2 draws faults within 6 steps)

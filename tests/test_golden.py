"""Golden loss curves: the real entry points, run as a user runs them (tests/golden/runs.py), must
reproduce every per-step scalar of tests/golden/*.txt within rtol 1e-5 (the files say how they were
made and when regenerating them is legitimate)."""

from __future__ import annotations

import os

import pytest

from megatron_step.testing import golden
from tests.golden import runs

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", [r.name for r in runs.RUNS])
def test_run_reproduces_its_golden_files(name, golden_run):
    run = runs.BY_NAME[name]
    work = golden_run(name)  # run once per session (tests/conftest.py); other tests read it too
    for file in run.outputs:
        path = os.path.join(runs.GOLDEN_DIR, file + ".txt")
        want = golden.read_table(path)[1]
        got = runs.curves_of(work, file)
        rows = golden.compare(want, got, rtol=runs.RTOL)
        assert rows and all(r.ok for r in rows), (
            f"{path} not reproduced (rtol {runs.RTOL}):\n"
            + golden.format_rows(rows, ("golden", "this run"), only_bad=True)
        )

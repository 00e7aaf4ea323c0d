"""Golden loss curves: the real entry points, run as a user runs them (tests/golden/runs.py), must
reproduce every per-step scalar of one variant of each tests/golden/*.txt within rtol 1e-5 (the files
say how they were made and when regenerating them is legitimate; runs.py why there can be a variant
per machine class)."""

from __future__ import annotations

import pytest

from tests.golden import runs

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", [r.name for r in runs.RUNS])
def test_run_reproduces_its_golden_files(name, golden_run):
    run = runs.BY_NAME[name]
    work = golden_run(name)  # run once per session (tests/conftest.py); other tests read it too
    for file in run.outputs:
        ok, report = runs.check(work, file)
        assert ok, report

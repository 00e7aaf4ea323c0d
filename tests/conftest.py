"""Session-wide fixtures and the GPU skip.

`golden_run(name)` runs one of the golden runs (tests/golden/runs.py: the real entry points, fixed
seeds) once per session and returns the scratch directory holding its run directories; the golden
test compares them with tests/golden/*.txt, and the stage tests read their TensorBoard scalars and
checkpoints instead of training the same thing again. `embedded_data` is the embedded corpus,
tokenizer and indexed data at the golden runs' vocabulary (512), shared by every test that trains on
it (built once, ~5 s)."""

import os

import pytest
import torch

from megatron_step.data.config import DataConfig
from megatron_step.data.pipeline import run_tokenizer
from tests.golden import runs


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def golden_work(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="session")
def embedded_data(golden_work) -> str:
    """The data directory of the golden runs (`data.data_dir={work}/data`, vocabulary 512)."""
    path = os.path.join(golden_work, "data")
    run_tokenizer(DataConfig(tokenizer_vocab_size=512, data_dir=path))  # builds corpus, tokenizer, .bin/.idx
    return path


@pytest.fixture(scope="session")
def golden_run(golden_work, embedded_data):
    done: set[str] = set()

    def run(name: str) -> str:
        if name not in done:
            runs.execute(runs.BY_NAME[name], golden_work, log=lambda _: None)
            done.add(name)
        return golden_work

    return run

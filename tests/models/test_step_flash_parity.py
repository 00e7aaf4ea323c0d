"""Step 3.5 Flash (tiny preset, every feature on: per-type heads/RoPE, sliding window, head gate,
QK norm, zero-centred norms, dense-then-MoE with sigmoid router + expert bias + shared expert,
clamps, MTP-3) under TP / EP / PP / TPxEP matches 1 process: loss and every gradient, fp32."""

from __future__ import annotations

from functools import partial

import pytest

from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.testing.parity import compare_layout, global_batch, make_reference

pytestmark = pytest.mark.distributed

CFG = tiny()
BUILD = partial(build_step_flash, CFG)
SEQ = 32  # > sliding window (8): the window really cuts
DATA = global_batch(CFG.vocab_size, SEQ)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return make_reference(BUILD, DATA, str(tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize(
    "layout",
    [{"tp": 2, "sequence_parallel": True}, {"ep": 2}, {"pp": 2}],
    ids=["tp2-sp", "ep2", "pp2"],
)
def test_two_rank_layout_matches_1proc(reference, tmp_path, layout):
    compare_layout(BUILD, layout, DATA, reference, str(tmp_path))


@pytest.mark.slow  # 4 processes on a 2-core CI box; tp2-sp and ep2 alone stay in `make test`
def test_tp2_x_ep2_four_ranks_matches_1proc(reference, tmp_path):
    compare_layout(BUILD, {"tp": 2, "ep": 2}, DATA, reference, str(tmp_path), world_size=4)

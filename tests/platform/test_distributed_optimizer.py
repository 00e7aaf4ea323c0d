"""Megatron-Core's distributed optimizer (Adam, ZeRO-1 sharded state, grad clipping) on CPU/gloo:
DP=2 and TP=2 follow the 1-process loss curve step for step."""

from __future__ import annotations

import pytest

from benchmarks.demo import train
from megatron_step.testing import run_distributed

pytestmark = pytest.mark.distributed

STEPS = 4
CLIP = 0.05  # small, so that clipping engages (checked below)


@pytest.fixture(scope="module")
def reference_curve():
    return run_distributed(train, 1, {}, STEPS, clip_grad=CLIP)[0]


@pytest.mark.parametrize("layout", [{}, {"tp": 2}], ids=["dp2", "tp2"])
def test_two_ranks_follow_the_1proc_curve(reference_curve, layout):
    runs = run_distributed(train, 2, layout, STEPS, clip_grad=CLIP)
    assert runs[0] == runs[1]
    ref = reference_curve
    assert min(ref["grad_norm"]) > CLIP  # every step was clipped
    assert ref["loss"][-1] < ref["loss"][0]  # the optimizer really moved the weights
    for key in ("loss", "grad_norm"):
        for got, want in zip(runs[0][key], ref[key]):
            assert abs(got - want) <= 1e-5 * abs(want), (key, runs[0][key], ref[key])

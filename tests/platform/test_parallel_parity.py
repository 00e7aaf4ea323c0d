"""The platform layer's main promise: Megatron-Core's TP / EP / PP run on CPU with gloo and give the
single-process numbers (loss and every gradient, fp32, 1e-5 relative).
Model: Megatron-Core GPTModel with MoE on the local spec."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest

from megatron_step.models.gpt_local import LocalGPTConfig, build_local_gpt
from megatron_step.testing.parity import compare_layout, global_batch, make_reference

pytestmark = pytest.mark.distributed

CFG = LocalGPTConfig()
BUILD = partial(build_local_gpt, CFG)
DATA = global_batch(CFG.vocab_size, CFG.seq_length)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = make_reference(BUILD, DATA, str(tmp_path_factory.mktemp("ref")))
    assert ref["loss"] > 0
    return ref


def test_tp2_with_sequence_parallel_matches_1proc(reference, tmp_path):
    compare_layout(BUILD, {"tp": 2, "sequence_parallel": True}, DATA, reference, str(tmp_path))


def test_ep2_alltoall_matches_1proc(reference, tmp_path):
    compare_layout(BUILD, {"ep": 2}, DATA, reference, str(tmp_path))


def test_ep2_allgather_matches_1proc(reference, tmp_path):
    build = partial(build_local_gpt, dataclasses.replace(CFG, dispatcher="allgather"))
    compare_layout(build, {"ep": 2}, DATA, reference, str(tmp_path))


def test_pp2_1f1b_matches_1proc(reference, tmp_path):
    compare_layout(BUILD, {"pp": 2}, DATA, reference, str(tmp_path))

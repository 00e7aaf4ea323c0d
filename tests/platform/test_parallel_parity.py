"""The platform layer's main promise: Megatron-Core's TP / EP / PP run on CPU with gloo and give the
single-process numbers. Model: Megatron-Core GPTModel with MoE on the local spec (fp32)."""

from __future__ import annotations

import pytest
import torch

from megatron_step.models.gpt_local import LocalGPTConfig
from megatron_step.testing import run_distributed
from tests.platform._parity import load_full, run_layout

pytestmark = pytest.mark.distributed

CFG = LocalGPTConfig()
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    weights, grads = str(root / "weights"), str(root / "grads")
    (loss,) = run_distributed(run_layout, 1, {}, CFG, weights, grads, True)
    return {"loss": loss, "weights": weights, "grads": grads, "root": root}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _check_layout(reference, tmp_path, parallel_kw, cfg=CFG):
    grads = str(tmp_path / "grads")
    losses = run_distributed(run_layout, 2, parallel_kw, cfg, reference["weights"], grads, False)
    loss = next(x for x in losses if x is not None)
    assert abs(loss - reference["loss"]) <= RTOL * abs(reference["loss"]), (loss, reference["loss"])
    ref, got = run_distributed(load_full, 1, cfg, [reference["grads"], grads])[0]
    assert ref.keys() == got.keys()
    errors = {k: _rel_err(got[k], ref[k]) for k in ref}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{worst}: relative grad error {errors[worst]:.3e}"
    assert all(ref[k].abs().sum() > 0 for k in ref), "a reference gradient is all zero"


def test_tp2_with_sequence_parallel_matches_1proc(reference, tmp_path):
    _check_layout(reference, tmp_path, {"tp": 2, "sequence_parallel": True})


def test_ep2_alltoall_matches_1proc(reference, tmp_path):
    _check_layout(reference, tmp_path, {"ep": 2})


def test_pp2_1f1b_matches_1proc(reference, tmp_path):
    _check_layout(reference, tmp_path, {"pp": 2})


def test_ep2_allgather_matches_1proc(reference, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(CFG, dispatcher="allgather")
    _check_layout(reference, tmp_path, {"ep": 2}, cfg)

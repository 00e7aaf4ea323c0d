"""Independent check of the Megatron -> transformers mapping: the exported tiny model loads into
transformers' own `Step3p7TextModel` with no missing/unexpected keys and gives the same logits."""

from __future__ import annotations

import pytest

from megatron_step.testing import run_distributed
from tests.convert import _bodies


@pytest.mark.parametrize("seq", [6, 40], ids=["within-window", "longer-than-window"])
def test_exported_tiny_model_matches_transformers_logits(seq):
    r = run_distributed(_bodies.logits_vs_transformers, 1, seq)[0]
    assert r["missing"] == [] and r["unexpected"] == []
    assert r["max_abs_diff"] <= 1e-4, r


def test_random_transformers_model_imports_into_megatron_with_matching_logits():
    r = run_distributed(_bodies.transformers_model_into_megatron, 1, 24)[0]
    assert r["missing"] == [] and r["unexpected"] == []
    assert (r["window"], r["period"]) == (4, 2)  # HF window 5 counts the query itself
    assert r["max_abs_diff"] <= 1e-4, r

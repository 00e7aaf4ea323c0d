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


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tp2") / "ckpt")
    run_distributed(_bodies.save_layout, 2, {"tp": 2}, d)
    return d


@pytest.mark.distributed
def test_round_trip_from_tp2_through_hf_is_bit_identical(tp2_checkpoint, tmp_path):
    r = run_distributed(_bodies.round_trip, 1, tp2_checkpoint, str(tmp_path / "hf"), str(tmp_path / "back"))[
        0
    ]
    assert r["keys_equal"] and r["n"] > 100 and r["not_identical"] == []
    keys = r["hf_keys"]
    assert "model.layers.2.moe.router_bias" in keys and "model.layers.2.moe.gate_proj.weight" in keys
    assert "model.layers.8.transformer.shared_head.output.weight" in keys  # MTP 1 of 3, own head copy
    assert "model.layers.10.eh_proj.weight" in keys and "lm_head.weight" in keys
    c = r["config"]
    assert c["model_type"] == "step3p5" and c["num_nextn_predict_layers"] == 3
    assert c["sliding_window"] == 9 and len(c["layer_types"]) == 11  # 8 layers + 3 MTP


@pytest.mark.distributed
def test_native_export_loads_with_from_pretrained(tp2_checkpoint, tmp_path):
    r = run_distributed(
        _bodies.native_export_loads_in_transformers, 1, tp2_checkpoint, str(tmp_path / "hf"), 40
    )[0]
    # Step3p7TextModel is the backbone: the LM head in the same directory is its only unused key
    assert r["missing"] == [] and r["unexpected"] == ["lm_head.weight"]
    assert r["max_abs_diff"] <= 1e-4, r


def test_save_pretrained_directory_imports_with_matching_logits(tmp_path):
    r = run_distributed(_bodies.save_pretrained_imports, 1, str(tmp_path / "hf"), str(tmp_path / "ckpt"), 24)[
        0
    ]
    assert r["dialect"] == "native"
    assert r["max_abs_diff"] <= 1e-4, r


def test_mismatched_config_is_refused_naming_the_field(tmp_path):
    msg = run_distributed(_bodies.mismatched_config, 1, str(tmp_path / "hf"), str(tmp_path / "ckpt"))[0]
    assert msg.startswith("model.vocab_size=512 but") and "config.json has 384" in msg, msg

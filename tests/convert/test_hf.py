"""The HF adapter (megatron_step/models/step_flash/hf.py) and the file converter
(megatron_step/convert/hf_checkpoint.py), checked independently against transformers' own
`Step3p7TextModel`: exported weights load with no missing/unexpected keys and give the same logits,
models transformers creates import with the same logits, and TP2 -> HF -> TP1 is bit-identical.

    python -m pytest tests/convert

The process bodies are module-level functions here, beside their assertions, so they pickle into
the spawned ranks.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from megatron.core import dist_checkpointing
from safetensors.torch import load_file, save_file

from megatron_step import platform
from megatron_step.convert.hf_checkpoint import HFReader, export_to_hf, import_from_hf
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.models.step_flash.hf import hf_native_to_mcore, mcore_to_hf_native
from megatron_step.models.step_flash.hf_config import hf_text_config, step_config_from_hf
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed


# ---------------------------------------------------------------------------------------------
# process bodies
# ---------------------------------------------------------------------------------------------
def _perturb(model):
    """Non-trivial norm weights and expert biases, so their mapping is tested."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n or n.endswith("norm.weight"):
                p.normal_(0, 0.1)
        for mod in model.modules():
            if getattr(mod, "expert_bias", None) is not None:
                mod.expert_bias.normal_(0, 0.05)


def logits_vs_transformers(rank, ws, seq: int):
    """Our tiny model's logits vs transformers' Step3p7TextModel loaded with the exported weights."""
    # transformers takes seconds to import; only the bodies that build its models need it
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    cfg = tiny()
    platform.setup(ParallelConfig(), seed=5)
    ours = build_step_flash(cfg, ParallelConfig()).eval()
    _perturb(ours)
    state = {k: v for k, v in ours.state_dict().items() if "_extra_state" not in k}
    hf_state = mcore_to_hf_native(state, cfg)
    head = hf_state.pop("lm_head.weight")
    hf = Step3p7TextModel(hf_text_config(cfg)).eval()
    result = hf.load_state_dict(hf_state, strict=False)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.vocab_size, (2, seq), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand(2, seq)
    with torch.no_grad():
        a = ours(tok, pos, None)  # (B, S, V) logits
        b = hf(input_ids=tok).last_hidden_state @ head.T
    return {
        "missing": list(result.missing_keys),
        "unexpected": list(result.unexpected_keys),
        "max_abs_diff": (a.float() - b.float()).abs().max().item(),
        "scale": a.abs().max().item(),
    }


def _random_transformers_model():
    """A Step3p7TextModel that transformers creates, with settings unlike our presets."""
    # transformers takes seconds to import; only the bodies that build its models need it
    from transformers import Step3p7TextConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    torch.manual_seed(1)
    hf_cfg = Step3p7TextConfig(
        vocab_size=384,
        hidden_size=96,
        num_hidden_layers=5,
        head_dim=16,
        num_key_value_heads=2,
        num_attention_heads=4,
        num_sliding_attention_heads=8,
        intermediate_size=160,
        layer_types=["full_attention", "sliding_attention"] * 2 + ["full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse", "sparse"],
        n_routed_experts=6,
        num_experts_per_tok=3,
        moe_intermediate_size=48,
        share_expert_dim=40,
        moe_router_scaling_factor=2.5,
        sliding_window=5,
        rope_theta=[2e5, 5e3, 2e5, 5e3, 2e5],
        partial_rotary_factors=[0.25, 1, 0.25, 1, 0.25],
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 32,
        },
        swiglu_limits=[0, 0, 0, 3, 2],
        swiglu_limits_shared=[1.5, 0, 0, 0, 5],
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = Step3p7TextModel(hf_cfg).eval()
    with torch.no_grad():  # transformers initialises norms and expert biases to zero: make them count
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.2)
        for n, b in hf.named_buffers():
            if "e_score_correction_bias" in n:
                b.normal_(0, 0.05)
    return hf, hf_cfg


def transformers_model_into_megatron(rank, ws, seq: int):
    """A random Step3p7TextModel that transformers creates (settings unlike our presets) -> Megatron."""
    hf, hf_cfg = _random_transformers_model()
    head = torch.randn(hf_cfg.vocab_size, hf_cfg.hidden_size) * 0.05
    hf_state = {**hf.state_dict(), "lm_head.weight": head}

    cfg = step_config_from_hf(hf_cfg)
    platform.setup(ParallelConfig(), seed=9)
    ours = build_step_flash(cfg, ParallelConfig()).eval()
    result = ours.load_state_dict(hf_native_to_mcore(hf_state, cfg), strict=False)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.vocab_size, (2, seq), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand(2, seq)
    with torch.no_grad():
        a = ours(tok, pos, None)
        b = hf(input_ids=tok).last_hidden_state @ head.T
    return {
        "missing": [k for k in result.missing_keys if "_extra_state" not in k],
        "unexpected": list(result.unexpected_keys),
        "max_abs_diff": (a - b).abs().max().item(),
        "scale": b.abs().max().item(),
        "window": cfg.sliding_window,
        "period": cfg.full_attention_period,
    }


def save_layout(rank, ws, parallel_kw: dict, ckpt_dir: str):
    """Save the tiny model as a dist-checkpoint under the given layout."""
    parallel = ParallelConfig(**parallel_kw)
    platform.setup(parallel, seed=21)
    model = build_step_flash(tiny(), parallel)
    _perturb(model)
    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, ckpt_dir)


def _load_tp1(ckpt_dir, cfg):
    model = build_step_flash(cfg, ParallelConfig())
    sharded = {k: v for k, v in model.sharded_state_dict().items() if "_extra_state" not in k}
    sd = dist_checkpointing.load({"model": sharded}, ckpt_dir)["model"]
    model.load_state_dict(sd, strict=False)
    return model


def _rename_keys(src: str, dst: str, old: str, new: str):
    """Copy an HF directory with `old` replaced by `new` in every tensor name."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            tensors = {k.replace(old, new): t for k, t in load_file(os.path.join(src, f)).items()}
            save_file(tensors, os.path.join(dst, f))
    with open(os.path.join(src, "config.json")) as f_in, open(os.path.join(dst, "config.json"), "w") as f_out:
        f_out.write(f_in.read())


def round_trip(rank, ws, ckpt_dir: str, hf_dir: str, back_dir: str):
    """dist-checkpoint (any layout) -> HF (hub, fp32) -> dist-checkpoint (TP=1): compare tensors. Also
    imports the same files with the MTP norms under their other published name, shared_head.norm."""
    cfg = tiny()
    platform.setup(ParallelConfig(), seed=0)
    export_to_hf(ckpt_dir, hf_dir, cfg, dtype=torch.float32, progress=False)
    info = import_from_hf(hf_dir, back_dir, cfg, progress=False)
    alias_dir = hf_dir + "_alias"
    _rename_keys(hf_dir, alias_dir, "transformer.shared_head.norm.", "shared_head.norm.")
    import_from_hf(alias_dir, back_dir + "_alias", cfg, progress=False)
    stored = HFReader(alias_dir).keys()
    a = {k: v for k, v in _load_tp1(ckpt_dir, cfg).state_dict().items() if "_extra_state" not in k}
    b = {k: v for k, v in _load_tp1(back_dir, cfg).state_dict().items() if "_extra_state" not in k}
    c = {k: v for k, v in _load_tp1(back_dir + "_alias", cfg).state_dict().items() if "_extra_state" not in k}
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    return {
        "keys_equal": a.keys() == b.keys() == c.keys(),
        "n": len(a),
        "not_identical": [k for k in a if not torch.equal(a[k], b[k])],
        "alias_not_identical": [k for k in a if not torch.equal(a[k], c[k])],
        "alias_keys": {k for k in stored if "shared_head.norm" in k},
        "hf_keys": sorted(index["weight_map"]),
        "dialect": info["dialect"],
        "config": config,
    }


def native_export_loads_in_transformers(rank, ws, ckpt_dir: str, hf_dir: str, seq: int):
    # transformers takes seconds to import; only the bodies that build its models need it
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    cfg = tiny()
    platform.setup(ParallelConfig(), seed=0)
    export_to_hf(ckpt_dir, hf_dir, cfg, dtype=torch.float32, progress=False, dialect="native")
    hf, info = Step3p7TextModel.from_pretrained(hf_dir, output_loading_info=True, attn_implementation="eager")
    head = HFReader(hf_dir).get("lm_head.weight")
    ours = _load_tp1(ckpt_dir, cfg).eval()
    tok = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(seq).unsqueeze(0).expand(2, seq)
    with torch.no_grad():
        a = ours(tok, pos, None)
        b = hf.eval()(input_ids=tok).last_hidden_state @ head.T
    return {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "max_abs_diff": (a - b).abs().max().item(),
    }


def save_pretrained_imports(rank, ws, hf_dir: str, ckpt_dir: str, seq: int):
    """transformers creates a random model and writes it with save_pretrained (native dialect, the
    LM head in a separate file); import_from_hf turns the directory into a Megatron checkpoint."""
    hf_model, hf_cfg = _random_transformers_model()
    hf_model.save_pretrained(hf_dir)
    head = torch.randn(hf_cfg.vocab_size, hf_cfg.hidden_size) * 0.05
    save_file({"lm_head.weight": head}, os.path.join(hf_dir, "lm_head.safetensors"))
    platform.setup(ParallelConfig(), seed=0)
    info = import_from_hf(hf_dir, ckpt_dir, progress=False)
    cfg = info["config"]
    ours = _load_tp1(ckpt_dir, cfg).eval()
    tok = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(seq).unsqueeze(0).expand(2, seq)
    with torch.no_grad():
        a = ours(tok, pos, None)
        b = hf_model(input_ids=tok).last_hidden_state @ head.T
    return {"dialect": info["dialect"], "max_abs_diff": (a - b).abs().max().item()}


def mismatched_config(rank, ws, hf_dir: str, ckpt_dir: str):
    hf_model, _ = _random_transformers_model()
    hf_model.save_pretrained(hf_dir)
    platform.setup(ParallelConfig(), seed=0)
    try:
        import_from_hf(hf_dir, ckpt_dir, tiny(), progress=False)
    except ValueError as e:
        return str(e)
    return "accepted"


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq", [6, 40], ids=["within-window", "longer-than-window"])
def test_exported_tiny_model_matches_transformers_logits(seq):
    r = run_distributed(logits_vs_transformers, 1, seq)[0]
    assert r["missing"] == [] and r["unexpected"] == []
    assert r["max_abs_diff"] <= 1e-4, r


def test_random_transformers_model_imports_into_megatron_with_matching_logits():
    r = run_distributed(transformers_model_into_megatron, 1, 24)[0]
    assert r["missing"] == [] and r["unexpected"] == []
    assert (r["window"], r["period"]) == (4, 2)  # HF window 5 counts the query itself
    assert r["max_abs_diff"] <= 1e-4, r


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tp2") / "ckpt")
    run_distributed(save_layout, 2, {"tp": 2}, d)
    return d


@pytest.mark.distributed
def test_round_trip_from_tp2_through_hf_is_bit_identical(tp2_checkpoint, tmp_path):
    r = run_distributed(round_trip, 1, tp2_checkpoint, str(tmp_path / "hf"), str(tmp_path / "back"))[0]
    assert r["keys_equal"] and r["n"] > 100 and r["not_identical"] == []
    keys = r["hf_keys"]
    assert "model.layers.2.moe.router_bias" in keys and "model.layers.2.moe.gate_proj.weight" in keys
    assert "model.layers.8.transformer.shared_head.output.weight" in keys  # MTP 1 of 3, own head copy
    assert "model.layers.10.eh_proj.weight" in keys and "lm_head.weight" in keys
    c = r["config"]
    assert c["model_type"] == "step3p5" and c["num_nextn_predict_layers"] == 3
    assert c["sliding_window"] == 9 and len(c["layer_types"]) == 11  # 8 layers + 3 MTP
    # the MTP norm under its other published name reads the same
    assert r["alias_keys"] == {f"model.layers.{i}.shared_head.norm.weight" for i in (8, 9, 10)}
    assert r["alias_not_identical"] == []


@pytest.mark.distributed
def test_native_export_loads_with_from_pretrained(tp2_checkpoint, tmp_path):
    r = run_distributed(native_export_loads_in_transformers, 1, tp2_checkpoint, str(tmp_path / "hf"), 40)[0]
    # Step3p7TextModel is the backbone: the LM head in the same directory is its only unused key
    assert r["missing"] == [] and r["unexpected"] == ["lm_head.weight"]
    assert r["max_abs_diff"] <= 1e-4, r


def test_save_pretrained_directory_imports_with_matching_logits(tmp_path):
    r = run_distributed(save_pretrained_imports, 1, str(tmp_path / "hf"), str(tmp_path / "ckpt"), 24)[0]
    assert r["dialect"] == "native"
    assert r["max_abs_diff"] <= 1e-4, r


def test_mismatched_config_is_refused_naming_the_field(tmp_path):
    msg = run_distributed(mismatched_config, 1, str(tmp_path / "hf"), str(tmp_path / "ckpt"))[0]
    assert msg.startswith("model.vocab_size=512 but") and "config.json has 384" in msg, msg

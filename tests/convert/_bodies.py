"""Process bodies for the conversion tests."""

from __future__ import annotations

import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig


def logits_vs_transformers(rank, ws, seq: int):
    """Our tiny model's logits vs transformers' Step3p7TextModel loaded with the exported weights."""
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    from megatron_step.models.step_flash.hf import hf_text_config, mcore_to_hf_native

    cfg = tiny()
    platform.setup(ParallelConfig(), seed=5)
    ours = build_step_flash(cfg, ParallelConfig()).eval()
    with torch.no_grad():  # non-trivial norm weights and expert biases, so their mapping is tested
        for n, p in ours.named_parameters():
            if "layernorm" in n or n.endswith("norm.weight"):
                p.normal_(0, 0.1)
        for mod in ours.modules():
            if hasattr(mod, "expert_bias") and mod.expert_bias is not None:
                mod.expert_bias.normal_(0, 0.05)
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
    from megatron_step.models.step_flash.hf import hf_native_to_mcore, step_config_from_hf

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


def _perturb(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n or n.endswith("norm.weight"):
                p.normal_(0, 0.1)
        for mod in model.modules():
            if getattr(mod, "expert_bias", None) is not None:
                mod.expert_bias.normal_(0, 0.05)


def save_layout(rank, ws, parallel_kw: dict, ckpt_dir: str):
    """Save the tiny model as a dist-checkpoint under the given layout."""
    import os

    from megatron.core import dist_checkpointing

    parallel = ParallelConfig(**parallel_kw)
    platform.setup(parallel, seed=21)
    model = build_step_flash(tiny(), parallel)
    _perturb(model)
    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, ckpt_dir)


def _load_tp1(ckpt_dir, cfg):
    from megatron.core import dist_checkpointing

    model = build_step_flash(cfg, ParallelConfig())
    sharded = {k: v for k, v in model.sharded_state_dict().items() if "_extra_state" not in k}
    sd = dist_checkpointing.load({"model": sharded}, ckpt_dir)["model"]
    model.load_state_dict(sd, strict=False)
    return model


def round_trip(rank, ws, ckpt_dir: str, hf_dir: str, back_dir: str):
    """dist-checkpoint (any layout) -> HF (hub, fp32) -> dist-checkpoint (TP=1): compare tensors."""
    import json
    import os

    from megatron_step.convert.hf_checkpoint import export_to_hf, import_from_hf

    cfg = tiny()
    platform.setup(ParallelConfig(), seed=0)
    export_to_hf(ckpt_dir, hf_dir, cfg, dtype=torch.float32, progress=False)
    info = import_from_hf(hf_dir, back_dir, cfg, progress=False)
    a = {k: v for k, v in _load_tp1(ckpt_dir, cfg).state_dict().items() if "_extra_state" not in k}
    b = {k: v for k, v in _load_tp1(back_dir, cfg).state_dict().items() if "_extra_state" not in k}
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    return {
        "keys_equal": a.keys() == b.keys(),
        "n": len(a),
        "not_identical": [k for k in a if not torch.equal(a[k], b[k])],
        "hf_keys": sorted(index["weight_map"]),
        "dialect": info["dialect"],
        "config": config,
    }


def native_export_loads_in_transformers(rank, ws, ckpt_dir: str, hf_dir: str, seq: int):
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    from megatron_step.convert.hf_checkpoint import HFReader, export_to_hf

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
    import os

    from safetensors.torch import save_file

    from megatron_step.convert.hf_checkpoint import import_from_hf

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
    from megatron_step.convert.hf_checkpoint import import_from_hf

    hf_model, _ = _random_transformers_model()
    hf_model.save_pretrained(hf_dir)
    platform.setup(ParallelConfig(), seed=0)
    try:
        import_from_hf(hf_dir, ckpt_dir, tiny(), progress=False)
    except ValueError as e:
        return str(e)
    return "accepted"

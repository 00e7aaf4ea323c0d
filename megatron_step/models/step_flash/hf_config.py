"""Step 3.5 Flash <-> Hugging Face configs: `StepFlashConfig` to transformers' `Step3p7TextConfig`
(the reference model every conversion is checked against) and back, and the published hub
`config.json` (model_type step3p5) written beside exported weights and read from an HF directory.

    text_cfg = hf_text_config(tiny())                  # transformers' Step3p7TextConfig
    cfg = config_from_hf_dir("runs/tiny/hf")           # StepFlashConfig of an HF directory (either dialect)

Translations (docs/design.md §4.2): our window W (query + W previous keys) is HF's
`sliding_window = W + 1`; per-layer RoPE theta / rotary fractions are per-layer lists; llama3 scaling
applies to full-attention layers only; dense layers are the first `first_k_dense`. The weights' key
table is megatron_step.models.step_flash.hf.
"""

from __future__ import annotations

import json
import os

from megatron_step.models.step_flash.config import StepFlashConfig

__all__ = ["config_from_hf_dir", "hf_text_config", "hub_config", "step_config_from_hf"]


def hf_text_config(cfg: StepFlashConfig, attn_implementation: str = "eager"):
    """`Step3p7TextConfig` with the shape and semantics of our `StepFlashConfig` (no MTP).

    Translations: our window W is HF's `sliding_window = W + 1`; per-layer RoPE theta / rotary
    fraction go in as per-layer lists, llama3 scaling as `rope_scaling` (HF applies it to
    full-attention layers only, as we do); dense layers are the first `first_k_dense`
    (`mlp_layer_types`); the sliding head count is `num_sliding_attention_heads`.
    """
    from transformers import Step3p7TextConfig  # transformers takes seconds to import; only needed here

    missing = [
        name
        for name, ok in (
            ("qk_norm", cfg.qk_norm),
            ("head_gate", cfg.head_gate),
            ("zero_centered_gamma", cfg.zero_centered_gamma),
            ("num_experts", cfg.num_experts > 0),
            ("shared_expert_ffn_hidden_size", cfg.shared_expert_ffn_hidden_size > 0),
        )
        if not ok
    ]
    if missing:
        raise ValueError(f"Step3p7TextModel always has these; cannot switch them off: {missing}")
    n = cfg.num_layers
    full = [cfg.is_full_attention(i) for i in range(n)]
    rope_scaling = None
    if cfg.rope_scaling_factor:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_scaling_low_freq_factor,
            "high_freq_factor": cfg.rope_scaling_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_scaling_original_max_position,
        }
    return Step3p7TextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=n,
        num_attention_heads=cfg.full_attention_heads,
        num_sliding_attention_heads=cfg.sliding_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.dense_ffn_hidden_size,
        layer_types=cfg.layer_types(),
        mlp_layer_types=["sparse" if cfg.is_moe(i) else "dense" for i in range(n)],
        n_routed_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_topk,
        moe_intermediate_size=cfg.moe_ffn_hidden_size,
        share_expert_dim=cfg.shared_expert_ffn_hidden_size,
        moe_router_scaling_factor=cfg.router_scaling_factor,
        swiglu_limits=list(cfg.swiglu_limits) or None,
        swiglu_limits_shared=list(cfg.swiglu_limits_shared) or None,
        sliding_window=cfg.sliding_window + 1,
        rope_theta=[cfg.rope_theta_full if f else cfg.rope_theta_sliding for f in full],
        partial_rotary_factors=[cfg.rotary_fraction_full if f else cfg.rotary_fraction_sliding for f in full],
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation=attn_implementation,
    )


def step_config_from_hf(hf_cfg, **overrides) -> StepFlashConfig:
    """`StepFlashConfig` from a `Step3p7TextConfig` (or its dict). Refuses what the Megatron model
    cannot express, naming the field: our layer pattern is "full every `period` layers from 0"."""
    c = hf_cfg if isinstance(hf_cfg, dict) else hf_cfg.to_dict()
    n = c["num_hidden_layers"]
    types = c["layer_types"]
    full_idx = [i for i, t in enumerate(types) if t == "full_attention"]
    period = full_idx[1] - full_idx[0] if len(full_idx) > 1 else n
    if (
        not full_idx
        or full_idx[0] != 0
        or types != ["full_attention" if i % period == 0 else "sliding_attention" for i in range(n)]
    ):
        raise ValueError(f"layer_types={types}: need full attention every k layers starting at layer 0")
    mlp = c["mlp_layer_types"]
    first_k = mlp.index("sparse") if "sparse" in mlp else n
    if any(t != "sparse" for t in mlp[first_k:]):
        raise ValueError(f"mlp_layer_types={mlp}: need dense layers first, then only sparse layers")
    rp = c["rope_parameters"]
    full, sliding = rp.get("full_attention", {}), rp.get("sliding_attention", rp.get("full_attention", {}))
    scaling = full.get("rope_type") == "llama3"
    if sliding.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.sliding_attention={sliding}: only default RoPE on sliding layers")
    kw = dict(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_layers=n,
        head_dim=c["head_dim"],
        num_query_groups=c["num_key_value_heads"],
        full_attention_heads=c["num_attention_heads"],
        sliding_attention_heads=c.get("num_sliding_attention_heads") or c["num_attention_heads"],
        full_attention_period=period,
        sliding_window=(c.get("sliding_window") or 2) - 1,
        max_position_embeddings=c["max_position_embeddings"],
        rope_theta_full=full.get("rope_theta", 1e4),
        rope_theta_sliding=sliding.get("rope_theta", 1e4),
        rotary_fraction_full=full.get("partial_rotary_factor", 1.0),
        rotary_fraction_sliding=sliding.get("partial_rotary_factor", 1.0),
        rope_scaling_factor=full["factor"] if scaling else None,
        rope_scaling_low_freq_factor=full.get("low_freq_factor", 1.0),
        rope_scaling_high_freq_factor=full.get("high_freq_factor", 4.0),
        rope_scaling_original_max_position=full.get("original_max_position_embeddings", 8192),
        norm_eps=c["rms_norm_eps"],
        first_k_dense=first_k,
        dense_ffn_hidden_size=c["intermediate_size"],
        num_experts=c["n_routed_experts"],
        moe_topk=c["num_experts_per_tok"],
        moe_ffn_hidden_size=c["moe_intermediate_size"],
        shared_expert_ffn_hidden_size=c["share_expert_dim"],
        router_scaling_factor=c["moe_router_scaling_factor"],
        swiglu_limits=[float(v or 0) for v in (c.get("swiglu_limits") or [])],
        swiglu_limits_shared=[float(v or 0) for v in (c.get("swiglu_limits_shared") or [])],
        mtp_num_layers=0,
        mtp_loss_weights=[],
        init_std=c.get("initializer_range", 0.02),
        bf16=False,
    )
    kw.update(overrides)
    return StepFlashConfig(**kw)


def hub_config(
    cfg: StepFlashConfig, dtype: str = "bfloat16", bos: int | None = None, eos: int | None = None
) -> dict:
    """config.json in the published step3p5 format (per-layer lists padded with the MTP layers).
    Written for both dialects: transformers' Step3p7TextConfig parses these legacy fields."""
    n, k = cfg.num_layers, cfg.mtp_num_layers
    full = [cfg.is_full_attention(i) for i in range(n)] + [False] * k
    routed = list(cfg.swiglu_limits) or [0.0] * n
    shared = list(cfg.swiglu_limits_shared) or [0.0] * n
    out = {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "torch_dtype": dtype,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_ffn_hidden_size,
        "num_hidden_layers": n,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.full_attention_heads,
        "num_attention_groups": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "use_qk_norm": cfg.qk_norm,
        "use_head_wise_attn_gate": cfg.head_gate,
        "attention_other_setting": {
            "attention_type": "sliding_attention",
            "num_attention_heads": cfg.sliding_attention_heads,
            "num_attention_groups": cfg.num_query_groups,
            "head_dim": cfg.head_dim,
            "true_head_dim": cfg.head_dim,
        },
        "layer_types": ["full_attention" if f else "sliding_attention" for f in full],
        "sliding_window": cfg.sliding_window + 1,
        "rope_theta": [cfg.rope_theta_full if f else cfg.rope_theta_sliding for f in full],
        "partial_rotary_factors": [
            cfg.rotary_fraction_full if f else cfg.rotary_fraction_sliding for f in full
        ],
        "use_moe": cfg.num_experts > 0,
        "moe_num_experts": cfg.num_experts,
        "moe_top_k": cfg.moe_topk,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "share_expert_dim": cfg.shared_expert_ffn_hidden_size,
        "moe_layers_enum": ",".join(str(i) for i in range(n) if cfg.is_moe(i)),
        "moe_router_activation": "sigmoid",
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "norm_expert_weight": True,
        "moe_router_scaling_factor": cfg.router_scaling_factor,
        "swiglu_limits": routed + [0.0] * k,
        "swiglu_limits_shared": shared + [0.0] * k,
        "rms_norm_eps": cfg.norm_eps,
        "zero_centered": cfg.zero_centered_gamma,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": k,
    }
    if cfg.rope_scaling_factor:
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "original_max_position_embeddings": cfg.rope_scaling_original_max_position,
            "low_freq_factor": cfg.rope_scaling_low_freq_factor,
            "high_freq_factor": cfg.rope_scaling_high_freq_factor,
        }
        out["yarn_only_types"] = ["full_attention"]
    if bos is not None:
        out["bos_token_id"] = bos
    if eos is not None:
        out["eos_token_id"] = eos
    return out


def config_from_hf_dir(path: str) -> StepFlashConfig:
    """StepFlashConfig from an HF directory's config.json (either dialect, with its MTP depth), via
    transformers' own Step3p7TextConfig parsing of the legacy hub fields."""
    from transformers import Step3p7TextConfig  # transformers takes seconds to import; only needed here

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") not in ("step3p5", None):
        raise ValueError(f"{path}/config.json: model_type={raw.get('model_type')!r}, expected 'step3p5'")
    keep = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "model_type")}
    hf_cfg = Step3p7TextConfig(**keep)
    k = getattr(hf_cfg, "num_nextn_predict_layers", 0) or 0
    weights = [1.0 / k] * k if k else []
    return step_config_from_hf(hf_cfg, mtp_num_layers=k, mtp_loss_weights=weights)

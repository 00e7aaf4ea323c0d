"""Step 3.5 Flash <-> Hugging Face `transformers` (`Step3p7TextModel`, config type `step3p5`).

Status: the config translation and the Megatron -> transformers-native weight mapping for a
1-process (TP=1, EP=1, PP=1) model, checked by loading into `Step3p7TextModel` and comparing logits.
Not yet: the published hub key dialect, the reverse direction, sharded/streamed files, MTP export.

Weight layout facts (transformers 5.23 `modeling_step3p7.py`; Megatron-Core 0.19.2):
- Megatron `linear_qkv.weight` is grouped by KV head: for each of G groups, [q rows of its
  r = heads/G query heads (r*D), k (D), v (D)]; HF has separate q/k/v_proj with heads in order.
- Megatron gated `linear_fc1.weight` is [gate (F); up (F)]; HF dense/shared MLPs have gate_proj and
  up_proj, HF routed experts a stacked `gate_up_proj` [E, 2F, H] with gate first -- the same order.
- Router: Megatron `router.weight` [E, H] / `router.expert_bias` [E] -> HF `mlp.gate.weight` /
  `mlp.gate.e_score_correction_bias`. Head gate `head_gate.weight` [heads, H] -> `g_proj.weight`.
- Norms are zero-centred on both sides (x_hat * (1 + w)), stored as w: copied as is.
"""

from __future__ import annotations

import torch


def hf_text_config(cfg, attn_implementation: str = "eager"):
    """`Step3p7TextConfig` with the shape and semantics of our `StepFlashConfig` (no MTP).

    Translations: our window W (query + W previous keys) is HF's `sliding_window = W + 1` (HF counts
    the query); per-layer RoPE theta / rotary fraction go in as per-layer lists, llama3 scaling as
    `rope_scaling` (HF applies it to full-attention layers only, as we do); dense layers are the
    first `first_k_dense` (`mlp_layer_types`); the sliding head count is `num_sliding_attention_heads`.
    """
    from transformers import Step3p7TextConfig

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


def _split_qkv(w: torch.Tensor, heads: int, groups: int, d: int):
    r = heads // groups
    w = w.view(groups, (r + 2) * d, -1)
    q = w[:, : r * d].reshape(heads * d, -1)
    k = w[:, r * d : (r + 1) * d].reshape(groups * d, -1)
    v = w[:, (r + 1) * d :].reshape(groups * d, -1)
    return q, k, v


def mcore_to_hf_native(state: dict, cfg) -> dict[str, torch.Tensor]:
    """Full (TP=1) Megatron state dict -> transformers-native keys of `Step3p7TextModel` plus
    `lm_head.weight`, in memory (e.g. for the RL stage). Same per-layer mapping as the file
    exporter (hf_checkpoint.py); MTP modules are not part of that model and are dropped."""
    from megatron_step.convert.hf_checkpoint import _groups, hub_group_to_native, mcore_group_to_hub

    out: dict[str, torch.Tensor] = {}
    head = state["output_layer.weight"]
    for prefix, _ in _groups(cfg):
        out.update(hub_group_to_native(dict(mcore_group_to_hub(prefix, state, cfg, head)), cfg.num_layers))
    return out


def step_config_from_hf(hf_cfg, **overrides):
    """`StepFlashConfig` from a `Step3p7TextConfig` (or its dict). Refuses what the Megatron model
    cannot express, naming the field: our layer pattern is "full every `period` layers from 0"."""
    from megatron_step.models.step_flash.config import StepFlashConfig

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


def hf_native_to_mcore(hf: dict, cfg) -> dict[str, torch.Tensor]:
    """Inverse of `mcore_to_hf_native`: transformers-native keys (+ `lm_head.weight`) -> the full
    (TP=1) Megatron state dict of the backbone (no MTP), in memory."""
    from megatron_step.convert.hf_checkpoint import hub_names, hub_to_mcore

    names = hub_names(hf.keys())

    def get(*keys):
        for key in keys:
            if key in names:
                stored, part = names[key]
                t = hf[stored]
                return t if part is None else t.chunk(2, dim=1)[0 if part == "gate" else 1].contiguous()
        raise KeyError(keys[0])

    return dict(hub_to_mcore(get, cfg.replace(mtp_num_layers=0, mtp_loss_weights=[])))

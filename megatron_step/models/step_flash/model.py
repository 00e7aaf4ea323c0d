"""Build the Step 3.5 Flash model (one pipeline chunk) on Megatron-Core's GPTModel, and the single
mapping from `StepFlashConfig` + `ParallelConfig` to Megatron-Core's `TransformerConfig`.

    cfg = presets.tiny()
    env = platform.setup(ParallelConfig(tp=2), seed=1)
    model = build_step_flash(cfg, env.parallel)          # GPTModel chunk for this rank
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.multi_token_prediction import get_mtp_num_layers_to_build
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_step.models.norm import RMSNorm
from megatron_step.models.step_flash.config import StepFlashConfig
from megatron_step.models.step_flash.layers import weight_mtp_depths
from megatron_step.models.step_flash.spec import get_mtp_block_spec, get_step_flash_layer_spec
from megatron_step.platform.capabilities import detect
from megatron_step.platform.parallel import ParallelConfig


def transformer_config(
    cfg: StepFlashConfig, parallel: ParallelConfig, use_te: bool | None = None
) -> TransformerConfig:
    """Every StepFlashConfig field that Megatron-Core reads itself goes through here. Fields that
    vary per layer (heads, window, RoPE, clamps, dense/MoE) live in the layer specs instead."""
    caps = detect()
    use_te = caps.transformer_engine if use_te is None else use_te
    fp8 = {}
    if cfg.fp8:
        if not caps.fp8:
            raise RuntimeError(
                "model.fp8=True needs Transformer Engine and an sm_89+/Hopper GPU "
                f"(cuda={caps.cuda}, transformer_engine={caps.transformer_engine}, "
                f"compute_capability={caps.compute_capability}); set model.fp8=False on this machine"
            )
        fp8 = dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    moe = {}
    if cfg.num_experts:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_layer_freq=[int(cfg.is_moe(i)) for i in range(cfg.num_layers)],
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size or None,
            moe_router_topk=cfg.moe_topk,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=cfg.router_bias_update_rate,
            moe_router_topk_scaling_factor=cfg.router_scaling_factor,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type=cfg.router_load_balancing,
            moe_aux_loss_coeff=cfg.router_aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
            moe_enable_routing_replay=cfg.routing_replay,
            moe_grouped_gemm=use_te,  # grouped GEMM kernels come with TE
        )
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.full_attention_heads,  # per-layer value set by StepSelfAttention
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.dense_ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        layernorm_zero_centered_gamma=cfg.zero_centered_gamma,
        qk_layernorm=cfg.qk_norm,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        use_te_activation_func=True,  # enables the MLP's activation-module slot (ClampedSwiGLU)
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.bf16,
        mtp_num_layers=cfg.mtp_num_layers or None,
        # per-depth weights applied by weight_mtp_depths; all weights 0 (RL): the MTP losses scaled to
        # exactly 0, so they train nothing -- not even the output layer they share with the main head
        mtp_loss_scaling_factor=1.0 if any(cfg.mtp_loss_weights) else 0.0,
        use_cpu_initialization=not caps.cuda,
        **parallel.transformer_kwargs(),
        **moe,
        **fp8,
    )


def layer_specs_for_stage(cfg: StepFlashConfig, tcfg: TransformerConfig, vp_stage, use_te):
    """Per-layer specs of this rank's (virtual) pipeline stage, indexed by global layer."""
    from megatron.core import parallel_state as ps

    n_local = get_num_layers_to_build(tcfg, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(tcfg, vp_stage, ps.get_pipeline_model_parallel_rank())
    return TransformerBlockSubmodules(
        layer_specs=[get_step_flash_layer_spec(cfg, offset + i, use_te) for i in range(n_local)],
        layer_norm=RMSNorm,
    )


def build_step_flash(
    cfg: StepFlashConfig,
    parallel: ParallelConfig,
    vp_stage: int | None = None,
    use_te: bool | None = None,
    initialize: bool = True,
) -> GPTModel:
    """This rank's chunk of the model. Why GPTModel and not HybridModel: see models/gpt_local.py.

    `initialize=False` skips weight init; with `torch.device("meta")` active the model is then built
    without memory (tools/param_count.py counts the 196B preset that way).
    """
    from megatron.core import parallel_state as ps

    use_te = detect().transformer_engine if use_te is None else use_te
    tcfg = transformer_config(cfg, parallel, use_te)
    tcfg.perform_initialization = initialize
    n_mtp = get_mtp_num_layers_to_build(tcfg, vp_stage=vp_stage) if cfg.mtp_num_layers else 0
    model = GPTModel(
        tcfg,
        layer_specs_for_stage(cfg, tcfg, vp_stage, use_te),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        # The model-level RoPE table only tells each layer the sequence length; every attention
        # layer applies its own per-layer-type RoPE (StepSelfAttention).
        position_embedding_type="rope",
        rotary_percent=1.0,
        share_embeddings_and_output_weights=False,
        mtp_block_spec=get_mtp_block_spec(cfg, n_mtp, use_te),
        vp_stage=vp_stage,
    )
    if getattr(model, "mtp_process", False) and any(cfg.mtp_loss_weights):
        weight_mtp_depths(model.mtp, cfg.mtp_loss_weights, base_scale=1.0 / cfg.mtp_num_layers)
    if torch.cuda.is_available() and not any(p.is_meta for p in model.parameters()):
        # Megatron-Core's own layers allocate on the current device, but some parameters are made
        # on the CPU (our norms, per-layer RoPE tables): one model, one device. Megatron-Core's DDP
        # would move them when it builds its buffers; inference/reward models are not wrapped.
        model.cuda(torch.cuda.current_device())
    return model


def freeze_norm_gains(model) -> list[str]:
    """Keep every RMSNorm gain at its initial value (requires_grad False): the "norms become
    optional under MACRO" experiment (optim.freeze_norm_gains). Zero-centred gains stay at 0, i.e.
    a plain RMS normalisation. Returns the frozen parameter names. Covers our RMSNorm, TE norms and
    TE's fused layernorm-linear (`layer_norm_weight`)."""
    frozen = []
    norm_modules = {id(m) for m in model.modules() if "Norm" in type(m).__name__}
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(module) in norm_modules or name.startswith("layer_norm_"):
                p.requires_grad_(False)
                frozen.append(f"{mod_name}.{name}")
    return frozen

"""The one place where the Step 3.5 Flash architecture meets Megatron-Core specs.

`get_step_flash_layer_spec(cfg, layer)` returns a typed `ModuleSpec` for decoder layer `layer`
(0-indexed): Megatron-Core's `TransformerLayer` with our RMSNorm, `StepSelfAttention` configured for
the layer's type, and a dense MLP or a `MoELayer` (Megatron-Core's router, dispatcher, experts and
shared expert) whose SwiGLU is `ClampedSwiGLU` with the layer's limit. Linear layers and core
attention come from Megatron-Core's backend providers: Transformer Engine when it imports (GPU),
the local implementation otherwise.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import _build_shared_experts
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_step.models.norm import RMSNorm
from megatron_step.models.step_flash.config import StepFlashConfig
from megatron_step.models.step_flash.layers import ClampedSwiGLU, StepCoreAttention, StepSelfAttention


def backend_for(use_te: bool) -> BackendSpecProvider:
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def _attention_spec(cfg: StepFlashConfig, full: bool, backend: BackendSpecProvider) -> ModuleSpec:
    rope_scaling = None
    if full and cfg.rope_scaling_factor:
        rope_scaling = dict(
            factor=cfg.rope_scaling_factor,
            low_freq_factor=cfg.rope_scaling_low_freq_factor,
            high_freq_factor=cfg.rope_scaling_high_freq_factor,
            original_max_position_embeddings=cfg.rope_scaling_original_max_position,
        )
    qk_norm = RMSNorm if cfg.qk_norm else IdentityOp
    return ModuleSpec(
        module=StepSelfAttention,
        params=dict(
            attn_mask_type=AttnMaskType.causal,
            num_heads=cfg.full_attention_heads if full else cfg.sliding_attention_heads,
            window=None if full else cfg.sliding_window,
            rope_theta=cfg.rope_theta_full if full else cfg.rope_theta_sliding,
            rotary_fraction=cfg.rotary_fraction_full if full else cfg.rotary_fraction_sliding,
            rope_scaling=rope_scaling,
            head_gate=cfg.head_gate,
        ),
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            # the local spec's core attention keeps a given mask on window layers (packed sequences)
            core_attention=StepCoreAttention
            if isinstance(backend, LocalSpecProvider)
            else backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _mlp_submodules(backend: BackendSpecProvider, limit: float) -> MLPSubmodules:
    return MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=backend.row_parallel_linear(),
        activation_func=partial(ClampedSwiGLU, limit=limit),
    )


def _dense_mlp_spec(cfg: StepFlashConfig, layer: int, backend) -> ModuleSpec:
    # The published checkpoint clamps dense FFNs with the *shared* limits (one list for both).
    limit = cfg.shared_limit(layer) if layer < cfg.num_layers else 0.0
    return ModuleSpec(module=MLP, submodules=_mlp_submodules(backend, limit))


def _moe_spec(cfg: StepFlashConfig, layer: int, backend, grouped_gemm: bool):
    experts = backend.grouped_mlp_modules(grouped_gemm)  # partial(SequentialMLP | TEGroupedMLP, ...)
    expert_sub = dataclasses.replace(
        experts.keywords["submodules"],
        activation_func=partial(ClampedSwiGLU, limit=cfg.routed_limit(layer)),
    )
    experts = partial(experts.func, submodules=expert_sub)
    shared = None
    if cfg.shared_expert_ffn_hidden_size:
        shared = partial(_build_shared_experts, submodules=_mlp_submodules(backend, cfg.shared_limit(layer)))
    return partial(MoELayer, submodules=MoESubmodules(experts=experts, shared_experts=shared))


def get_step_flash_layer_spec(
    cfg: StepFlashConfig, layer: int, use_te: bool = False, mtp: bool = False
) -> ModuleSpec:
    """Spec of decoder layer `layer` (0-indexed), or of an MTP module's inner layer (`mtp=True`:
    sliding attention + dense FFN)."""
    backend = backend_for(use_te)
    full = (not mtp) and cfg.is_full_attention(layer)
    if (not mtp) and cfg.is_moe(layer):
        mlp = _moe_spec(cfg, layer, backend, grouped_gemm=use_te)
    else:
        mlp = _dense_mlp_spec(cfg, layer, backend)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=_attention_spec(cfg, full, backend),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_mtp_block_spec(cfg: StepFlashConfig, num_to_build: int, use_te: bool = False):
    """MTP modules: eh_proj(cat[enorm(embed), hnorm(h)]) -> sliding layer with dense FFN -> norm;
    the output head and the embedding are the main model's (Megatron-Core shares them)."""
    if num_to_build == 0:
        return None
    backend = backend_for(use_te)
    layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=RMSNorm,
            hnorm=RMSNorm,
            eh_proj=backend.column_parallel_linear(),
            mtp_model_layer=get_step_flash_layer_spec(cfg, cfg.num_layers, use_te, mtp=True),
            layer_norm=RMSNorm,
        ),
    )
    return MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * num_to_build)

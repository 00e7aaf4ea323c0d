"""A plain Megatron-Core GPT (optionally MoE) on the *local* (non-TE) spec with the project's RMSNorm.

It is the smallest real Megatron-Core model the platform layer is proven with (tests/platform), and
the reference the Step 3.5 Flash spec is compared against. Everything is Megatron-Core's own code:
`GPTModel`, `TransformerLayer`, `SelfAttention`, `MoELayer` with its token dispatchers; only the
norm is ours (see megatron_step/models/norm.py for why).

Why `GPTModel` and not `HybridModel`: 0.19.2 logs GPTModel as deprecated (bug fixes only), but
`HybridStack` hard-codes `TENorm` for its final norm (needs Transformer Engine, i.e. a GPU), while
`GPTModel`'s `TransformerBlock` takes the final norm and a *per-layer* spec list from the spec. We
pin megatron-core exactly, so the deprecation costs nothing now; revisit when HybridModel accepts a
final-norm spec.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_step.models.norm import RMSNorm
from megatron_step.platform.parallel import ParallelConfig


@dataclass
class LocalGPTConfig:
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    num_experts: int | None = 4  # None: dense
    moe_ffn_hidden_size: int = 64
    topk: int = 2
    dispatcher: str = "alltoall"  # or "allgather"
    vocab_size: int = 256
    seq_length: int = 32
    qk_layernorm: bool = True
    params_dtype: torch.dtype = torch.float32


def transformer_config(cfg: LocalGPTConfig, parallel: ParallelConfig) -> TransformerConfig:
    """The mapping to Megatron-Core's TransformerConfig, with the CPU-safe choices spelled out."""
    moe = {}
    if cfg.num_experts:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
            moe_router_topk=cfg.topk,
            moe_token_dispatcher_type=cfg.dispatcher,
            moe_grouped_gemm=False,  # grouped GEMM needs TE / CUTLASS kernels
            moe_router_load_balancing_type="none",  # aux losses differ with the token split
            moe_router_dtype="fp32",
        )
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        qk_layernorm=cfg.qk_layernorm,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=cfg.params_dtype,
        bf16=cfg.params_dtype == torch.bfloat16,
        # Initialise full weights on CPU from the one seed and slice them per rank, so every
        # TP/EP/PP layout starts from the same function (also what makes CPU runs reproducible).
        use_cpu_initialization=True,
        **parallel.transformer_kwargs(),
        pipeline_dtype=cfg.params_dtype,
        **moe,
    )


def local_layer_spec(num_experts: int | None, qk_layernorm: bool) -> ModuleSpec:
    """Megatron-Core's local GPT layer spec with our RMSNorm in every norm slot."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=num_experts, normalization="RMSNorm"))
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    if qk_layernorm:
        sub.self_attention.submodules.q_layernorm = RMSNorm
        sub.self_attention.submodules.k_layernorm = RMSNorm
    return spec


def build_local_gpt(
    cfg: LocalGPTConfig,
    parallel: ParallelConfig,
    vp_stage: int | None = None,
) -> GPTModel:
    """One model chunk for this rank's pipeline stage (and virtual stage, if any)."""
    from megatron.core import parallel_state as ps

    tcfg = transformer_config(cfg, parallel)
    n_local = get_num_layers_to_build(tcfg, vp_stage=vp_stage)
    # A block spec (not a layer spec), so the final norm is ours: TransformerBlock would otherwise
    # pick TENorm / apex / WrappedTorchNorm for it.
    block = TransformerBlockSubmodules(
        layer_specs=[local_layer_spec(cfg.num_experts, cfg.qk_layernorm)] * n_local,
        layer_norm=RMSNorm,
    )
    pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        tcfg,
        block,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=pre,
        post_process=post,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        vp_stage=vp_stage,
    )

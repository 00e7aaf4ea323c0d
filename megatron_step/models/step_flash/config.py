"""Step 3.5 Flash model config: one typed record, presets as functions.

Facts of the full preset come from the published HF config (`model_type: step3p5`) and the report
(docs/design.md §4). Conventions used here:

- Layers are 0-indexed. Layer i is full attention when `i % full_attention_period == 0`
  (0, 4, ..., 44), sliding-window otherwise; MTP layers are sliding.
- `sliding_window = W` means a query sees itself and the W previous keys (flash-attn window
  (W, 0), Megatron-Core `window_size=(W, 0)`), which is how the model was trained. HF's
  `sliding_window` counts the query itself (W+1 keys for our W); the HF converter translates.
- SwiGLU clamp limits are per layer, 0 = none. As in the published checkpoint, routed experts use
  `swiglu_limits` and the shared expert *and the dense FFN* use `swiglu_limits_shared`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# shape fields that must be >= 1
POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "head_dim",
    "num_query_groups",
    "full_attention_heads",
    "sliding_attention_heads",
    "full_attention_period",
    "dense_ffn_hidden_size",
)
# every field that decides a tensor's shape (a checkpoint fits a config when these agree)
SHAPE_FIELDS = (
    *POSITIVE_FIELDS,
    "sliding_window",
    "first_k_dense",
    "num_experts",
    "moe_topk",
    "moe_ffn_hidden_size",
    "shared_expert_ffn_hidden_size",
    "mtp_num_layers",
)


@dataclass
class StepFlashConfig:
    # --- shape -------------------------------------------------------------------------------
    vocab_size: int = 128896
    hidden_size: int = 4096
    num_layers: int = 45
    head_dim: int = 128
    num_query_groups: int = 8  # KV heads, both layer types
    full_attention_heads: int = 64
    sliding_attention_heads: int = 96
    full_attention_period: int = 4  # full attention on layers 0, 4, 8, ...
    sliding_window: int = 512
    max_position_embeddings: int = 262144
    seq_length: int = 4096  # training sequence length (RoPE tables, FLOP estimates)
    # --- RoPE, per layer type ----------------------------------------------------------------
    rope_theta_full: float = 5e6
    rope_theta_sliding: float = 1e4
    rotary_fraction_full: float = 0.5  # 64 of 128 dims rotate
    rotary_fraction_sliding: float = 1.0
    # llama3-style scaling on full-attention layers (published: factor 2, low 1, high 32, orig 131072)
    rope_scaling_factor: float | None = 2.0  # None: no scaling
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 32.0
    rope_scaling_original_max_position: int = 131072
    # --- attention extras --------------------------------------------------------------------
    qk_norm: bool = True
    head_gate: bool = True  # sigmoid(g_proj(x)) scalar per head, before o_proj
    # --- norms -------------------------------------------------------------------------------
    norm_eps: float = 1e-5
    zero_centered_gamma: bool = True  # x_hat * (1 + w)
    # --- FFN / MoE ---------------------------------------------------------------------------
    first_k_dense: int = 3
    dense_ffn_hidden_size: int = 11264
    num_experts: int = 288
    moe_topk: int = 8
    moe_ffn_hidden_size: int = 1280
    shared_expert_ffn_hidden_size: int = 1280  # 0: no shared expert
    router_scaling_factor: float = 3.0  # routed weights (un-biased, renormalised) x this
    router_bias_update_rate: float = 1e-3  # aux-loss-free expert bias
    router_load_balancing: str = "none"  # Megatron-Core moe_router_load_balancing_type
    router_aux_loss_coeff: float = 0.0
    # Megatron-Core's RouterReplay on every router: record the experts chosen in one forward and
    # replay them in another (RL's routing replay, R3). Off for pretraining.
    routing_replay: bool = False
    swiglu_limits: list[float] = field(default_factory=list)  # routed experts; [] = none
    swiglu_limits_shared: list[float] = field(default_factory=list)  # shared expert + dense FFN
    # --- MTP ---------------------------------------------------------------------------------
    mtp_num_layers: int = 3
    # Loss weight per MTP depth. Pretraining trained only MTP-1 (0.3, later 0.1); a weight of 0
    # keeps the module in the graph (its loss is still logged) but sends it no gradient.
    mtp_loss_weights: list[float] = field(default_factory=lambda: [0.3, 0.0, 0.0])
    # --- numerics / init ---------------------------------------------------------------------
    init_std: float = 0.02
    bf16: bool = True
    fp8: bool = False  # TE FP8 (hybrid e4m3/e5m2, delayed scaling); needs TE + Hopper

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"model.{name}={getattr(self, name)!r}: {why}")

        for name in POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("full_attention_heads", "sliding_attention_heads"):
            if getattr(self, name) % self.num_query_groups:
                bad(name, f"must be a multiple of num_query_groups={self.num_query_groups}")
        if self.sliding_window < 1:
            bad("sliding_window", "must be >= 1 (keys before the query)")
        if not 0 <= self.first_k_dense <= self.num_layers:
            bad("first_k_dense", f"must be in [0, num_layers={self.num_layers}]")
        if self.num_experts and not 1 <= self.moe_topk <= self.num_experts:
            bad("moe_topk", f"must be in [1, num_experts={self.num_experts}]")
        for name in ("swiglu_limits", "swiglu_limits_shared"):
            limits = getattr(self, name)
            if limits and len(limits) != self.num_layers:
                bad(name, f"needs one entry per layer ({self.num_layers}) or be empty, got {len(limits)}")
            if any(v < 0 for v in limits):
                bad(name, "limits must be >= 0 (0 = no clamp)")
        if len(self.mtp_loss_weights) != self.mtp_num_layers:
            bad("mtp_loss_weights", f"needs mtp_num_layers={self.mtp_num_layers} entries")
        for name in ("rotary_fraction_full", "rotary_fraction_sliding"):
            frac = getattr(self, name)
            if not 0 < frac <= 1 or int(self.head_dim * frac) % 2:
                bad(name, f"must be in (0, 1] with head_dim*fraction even (head_dim={self.head_dim})")
        if self.router_load_balancing not in ("none", "aux_loss", "seq_aux_loss", "global_aux_loss"):
            bad("router_load_balancing", "one of none, aux_loss, seq_aux_loss, global_aux_loss")

    # --- derived -----------------------------------------------------------------------------
    def is_full_attention(self, layer: int) -> bool:
        """0-indexed decoder layer; MTP layers are always sliding."""
        return layer < self.num_layers and layer % self.full_attention_period == 0

    def is_moe(self, layer: int) -> bool:
        return bool(self.num_experts) and layer >= self.first_k_dense

    def routed_limit(self, layer: int) -> float:
        return self.swiglu_limits[layer] if self.swiglu_limits else 0.0

    def shared_limit(self, layer: int) -> float:
        return self.swiglu_limits_shared[layer] if self.swiglu_limits_shared else 0.0

    def layer_types(self) -> list[str]:
        return [
            "full_attention" if self.is_full_attention(i) else "sliding_attention"
            for i in range(self.num_layers)
        ]

    def replace(self, **changes) -> StepFlashConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
def step35_flash() -> StepFlashConfig:
    """The published 196B / ~11B-active shape (HF config of stepfun-ai/Step-3.5-Flash)."""
    n = 45
    routed = [0.0] * n
    shared = [0.0] * n
    routed[43] = routed[44] = 7.0  # last two layers clamp routed experts at 7
    shared[44] = 16.0  # last layer clamps the shared expert at 16
    return StepFlashConfig(swiglu_limits=routed, swiglu_limits_shared=shared)


def tiny() -> StepFlashConfig:
    """CPU preset: every feature at toy size. 8 layers so the full/sliding pattern repeats twice
    (full at 0 and 4), 2 dense layers first, 8 experts top-2 + a shared expert, MTP-3, a window of 8
    tokens (shorter than the 32-token test sequences), clamps on the last layers."""
    n = 8
    return StepFlashConfig(
        vocab_size=512,
        hidden_size=128,
        num_layers=n,
        head_dim=32,
        num_query_groups=2,
        full_attention_heads=4,
        sliding_attention_heads=6,
        sliding_window=8,
        max_position_embeddings=512,
        seq_length=64,
        rope_scaling_original_max_position=64,  # so the llama3 band falls inside the test lengths
        first_k_dense=2,
        dense_ffn_hidden_size=256,
        num_experts=8,
        moe_topk=2,
        moe_ffn_hidden_size=64,
        shared_expert_ffn_hidden_size=64,
        swiglu_limits=[0.0] * (n - 2) + [7.0, 7.0],
        swiglu_limits_shared=[0.0] * (n - 1) + [16.0],
        mtp_loss_weights=[0.3, 0.1, 0.1],
        bf16=False,
    )


def small() -> StepFlashConfig:
    """A single-node GPU proxy (~4B total / ~0.6B active): same pattern, scaled down."""
    n = 16
    return StepFlashConfig(
        vocab_size=128896,
        hidden_size=1536,
        num_layers=n,
        head_dim=128,
        num_query_groups=4,
        full_attention_heads=16,
        sliding_attention_heads=24,
        first_k_dense=2,
        dense_ffn_hidden_size=4096,
        num_experts=64,
        moe_topk=8,
        moe_ffn_hidden_size=512,
        shared_expert_ffn_hidden_size=512,
        swiglu_limits=[0.0] * (n - 2) + [7.0, 7.0],
        swiglu_limits_shared=[0.0] * (n - 1) + [16.0],
    )


PRESETS = {"step35_flash": step35_flash, "tiny": tiny, "small": small}


def preset(name: str) -> StepFlashConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"model.preset={name!r}: unknown; choose one of {sorted(PRESETS)}") from None

"""Parameter and FLOP accounting read off an instantiated Megatron-Core GPT model (any preset,
typically built on the meta device), not from a formula.

Categories by module path: `embedding.` (input embedding), `output_layer.` (LM head),
`mtp.layers.K.` (MTP module K), `mlp.experts.` (routed experts), `mlp.router.`,
`mlp.shared_experts.`, everything else in `decoder.` (attention, dense FFN, norms).
"Backbone" = the decoder (all layers + final norm), without embedding, LM head and MTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass
class ParamReport:
    embedding: int = 0
    output_layer: int = 0
    attention: int = 0
    dense_ffn: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    router: int = 0
    norms: int = 0
    other: int = 0
    mtp_modules: list[int] = field(default_factory=list)  # per module, without the shared head
    topk: int = 1
    num_experts: int = 1

    @property
    def backbone(self) -> int:
        return (
            self.attention
            + self.dense_ffn
            + self.routed_experts
            + self.shared_experts
            + self.router
            + self.norms
            + self.other
        )

    @property
    def total(self) -> int:
        return self.backbone + self.embedding + self.output_layer + sum(self.mtp_modules)

    @property
    def active_no_embedding(self) -> int:
        """Parameters one token touches in the backbone (routed experts scaled by top-k / E)."""
        routed_active = self.routed_experts * self.topk // max(self.num_experts, 1)
        return self.backbone - self.routed_experts + routed_active


_MTP = re.compile(r"^mtp\.layers\.(\d+)\.")


def count_parameters(model: torch.nn.Module, topk: int, num_experts: int) -> ParamReport:
    r = ParamReport(topk=topk, num_experts=num_experts)
    mtp: dict[int, int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        if m := _MTP.match(name):
            mtp[int(m.group(1))] = mtp.get(int(m.group(1)), 0) + n
        elif name.startswith("embedding."):
            r.embedding += n
        elif name.startswith("output_layer."):
            r.output_layer += n
        elif ".mlp.experts." in name:
            r.routed_experts += n
        elif ".mlp.router." in name:
            r.router += n
        elif ".mlp.shared_experts." in name:
            r.shared_experts += n
        elif ".self_attention." in name and "layernorm" not in name:
            r.attention += n
        elif ".mlp." in name:
            r.dense_ffn += n
        elif "layernorm" in name or name.endswith("norm.weight"):
            r.norms += n
        else:
            r.other += n
    r.mtp_modules = [mtp[k] for k in sorted(mtp)]
    return r


def attention_flops_per_token(layer_heads_windows, head_dim: int, seq_len: int) -> float:
    """Forward FLOPs of QK^T and PV per token, averaged over a causal sequence of `seq_len`:
    2 matmuls x 2 FLOPs x heads x head_dim x (keys seen). Full layers see (seq_len + 1) / 2 keys on
    average; a sliding layer with window W sees min(i, W) + 1 keys at position i."""
    total = 0.0
    for heads, window in layer_heads_windows:
        if window is None:
            keys = (seq_len + 1) / 2
        else:
            w = min(window, seq_len - 1)
            # positions 0..w-1 see i+1 keys; the rest see w+1
            keys = (w * (w + 1) / 2 + (seq_len - w) * (w + 1)) / seq_len
        total += 4 * heads * head_dim * keys
    return total


def step_flash_flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs per token of a StepFlashConfig model (matmuls x 2 + attention scores), counting
    the MTP modules (they run every step). Used for TFLOP/s and MFU; training costs ~3x this."""
    h, d, kv = cfg.hidden_size, cfg.head_dim, cfg.num_query_groups

    def attn_params(heads):
        return h * heads * d * 2 + 2 * h * kv * d + (h * heads if cfg.head_gate else 0)

    def ffn_params(layer):
        if cfg.is_moe(layer):
            return (
                cfg.moe_topk * 3 * h * cfg.moe_ffn_hidden_size
                + 3 * h * cfg.shared_expert_ffn_hidden_size
                + h * cfg.num_experts
            )
        return 3 * h * cfg.dense_ffn_hidden_size

    matmul = 0
    windows = []
    for i in range(cfg.num_layers):
        heads = cfg.full_attention_heads if cfg.is_full_attention(i) else cfg.sliding_attention_heads
        matmul += attn_params(heads) + ffn_params(i)
        windows.append((heads, None if cfg.is_full_attention(i) else cfg.sliding_window))
    mtp_layer = 2 * h * h + attn_params(cfg.sliding_attention_heads) + 3 * h * cfg.dense_ffn_hidden_size
    matmul += cfg.mtp_num_layers * (mtp_layer + h * cfg.vocab_size)
    windows += [(cfg.sliding_attention_heads, cfg.sliding_window)] * cfg.mtp_num_layers
    matmul += h * cfg.vocab_size  # LM head
    return 2 * matmul + attention_flops_per_token(windows, d, seq_len)

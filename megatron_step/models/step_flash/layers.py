"""The Step 3.5 Flash pieces Megatron-Core 0.19.2 does not have, as small subclasses / modules that
plug into its layer spec. Everything else (QKV projection, GQA, QK norm slots, sliding-window core
attention, MoE router with sigmoid scores + expert bias, token dispatch, shared expert, MTP) is
Megatron-Core's own code.

Shape legend: S sequence (local to the rank under sequence parallelism), B batch, H hidden,
N attention heads on this TP rank, D head_dim, F FFN width on this TP rank.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_config import TransformerConfig


class StepSelfAttention(SelfAttention):
    """Megatron-Core `SelfAttention` with what Step 3.5 Flash adds per layer type.

    Why a subclass: Megatron-Core has one `num_attention_heads`, one window and one RoPE per config,
    and its `attention_output_gate` is element-wise (one gate per channel, fused into linear_qkv);
    Step 3.5 Flash has per-layer-type head counts (64 full / 96 sliding), per-layer-type RoPE
    (theta, partial rotary, llama3 scaling on full layers only) and a *head-wise* gate.

    - Per-layer config: a shallow copy of the model config with this layer type's head count and
      window (`window_size=(W, 0)`: the query plus W previous keys; None on full layers). Megatron-Core's
      core attention (local or TE) reads the window from it.
    - RoPE: this layer's own `RotaryEmbedding`; the model-level table passed in is only used for its
      length (which already accounts for inference offsets / context parallelism).
    - Head gate: `head_gate` (column-parallel, H -> heads, split by head like q) computes one
      sigmoid scalar per head and token from the same normed input as q/k/v; it multiplies that
      head's output before `linear_proj` (a forward pre-hook on linear_proj, so the state-dict keys
      of linear_proj stay Megatron-Core's).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules,
        layer_number: int,
        *,
        num_heads: int,
        window: int | None,
        rope_theta: float,
        rotary_fraction: float,
        rope_scaling: dict | None = None,  # llama3: factor, low_freq_factor, high_freq_factor, orig
        head_gate: bool = True,
        **kwargs,
    ):
        layer_config = copy.copy(config)
        layer_config.num_attention_heads = num_heads
        layer_config.window_size = (window, 0) if window is not None else None
        layer_config.window_attn_skip_freq = None
        layer_config.attention_output_gate = False
        super().__init__(layer_config, submodules, layer_number, **kwargs)
        self.window = window

        self.rotary = RotaryEmbedding(
            kv_channels=layer_config.kv_channels,
            rotary_percent=rotary_fraction,
            rotary_base=rope_theta,
            use_cpu_initialization=True,  # a few floats; moved on first use like Megatron-Core's
        )
        if rope_scaling:
            # Megatron-Core's constructor hard-codes llama3's (1, 4, 8192) band; Step 3.5 Flash
            # publishes (1, 32, 131072), so call its scaling function with the real numbers.
            self.rotary.inv_freq = self.rotary._apply_scaling(
                self.rotary.inv_freq,
                factor=rope_scaling["factor"],
                low_freq_factor=rope_scaling["low_freq_factor"],
                high_freq_factor=rope_scaling["high_freq_factor"],
                original_max_position_embeddings=rope_scaling["original_max_position_embeddings"],
            )

        self.head_gate = None
        if head_gate:
            self.head_gate = ColumnParallelLinear(
                layer_config.hidden_size,
                num_heads,
                config=layer_config,
                init_method=layer_config.init_method,
                gather_output=False,
                bias=False,
                skip_bias_add=False,
                is_expert=False,
                tp_group=self.pg_collection.tp,
            )
            self._gate_logits = None
            self.linear_proj.register_forward_pre_hook(self._apply_head_gate)

    def _apply_head_gate(self, module, args):
        (x_SBND,) = args[:1]  # core attention output, (S, B, N*D) full sequence
        gate_SBN = self._gate_logits
        self._gate_logits = None
        s, b, _ = x_SBND.shape
        n = gate_SBN.shape[-1]
        gated = x_SBND.view(s, b, n, -1) * torch.sigmoid(gate_SBN.float()).to(x_SBND.dtype).unsqueeze(-1)
        return (gated.view(s, b, -1), *args[1:])

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if rotary_pos_emb is not None:
            table = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            cp = self.pg_collection.cp.size() if self.pg_collection.cp is not None else 1
            rotary_pos_emb = self.rotary(table.shape[0] * cp)
        if self.head_gate is not None:
            self._gate_logits, _ = self.head_gate(hidden_states)  # (S_full, B, N)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


class _WindowWithMask(torch.nn.Module):
    """Megatron-Core's masked softmax (`inner`, a FusedScaleMaskSoftmax) where a given mask is kept on
    sliding-window layers: the mask is OR-ed with the window (query i, keys [i - W, i], aligned to the
    end of the keys as Megatron-Core aligns it) instead of being replaced by the window. The window
    mask contains any causal mask, so a causal mask gives Megatron-Core's result bit for bit."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None, softmax_offset=None) -> torch.Tensor:
        inner = self.inner
        if mask is None or inner.window_size is None:
            return inner(scores, mask, softmax_offset)
        sq, sk = scores.shape[-2:]
        back, ahead = inner.window_size
        q = torch.arange(sq, device=scores.device)[:, None] + (sk - sq)
        k = torch.arange(sk, device=scores.device)[None, :]
        outside = (k < q - back) | (k > q + ahead)
        saved, inner.window_size = inner.window_size, None  # the window is in the mask now
        try:
            return inner(scores, mask | outside, softmax_offset)
        finally:
            inner.window_size = saved


class StepCoreAttention(DotProductAttention):
    """Megatron-Core's local core attention, except on sliding-window layers: there its softmax
    replaces any given attention mask with the window mask, so a block-diagonal mask (packed
    sequences, megatron_step.data.sft) would hold on the full-attention layers only and samples would
    see each other through the window. Here the given mask and the window are combined
    (`_WindowWithMask`). Without a mask (training, prefill) and with the engine's causal cache masks
    the numbers are Megatron-Core's own. `scale_mask_softmax` stays the module whose output is the
    attention probabilities (MMRPT's D(s) and E3RL's credit hook it)."""

    # Reaches into Megatron-Core 0.19.2's FusedScaleMaskSoftmax: its `window_size` attribute, which
    # `forward_torch_softmax` reads to build the window mask in place of the given one.
    WRITTEN_FOR_MCORE = "0.19.2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self.scale_mask_softmax, "window_size"):
            from megatron.core.package_info import __shortversion__ as version

            raise RuntimeError(
                f"StepCoreAttention was written for megatron-core {self.WRITTEN_FOR_MCORE}'s "
                f"FusedScaleMaskSoftmax.window_size; megatron-core {version} has none: re-check "
                "megatron_step/models/step_flash/layers.py"
            )
        self.scale_mask_softmax = _WindowWithMask(self.scale_mask_softmax)


class ClampedSwiGLU(torch.nn.Module):
    """Step 3.5 Flash's SwiGLU with an optional clamp L (0/None = none):
        silu(gate).clamp(max=L) * up.clamp(-L, L)
    Input is linear_fc1's output on this rank, (..., 2F) laid out [gate | up] as Megatron-Core's
    gated MLP expects; output (..., F).

    Why: Megatron-Core's `activation_func_clamp_value` clamps the gate *before* silu (and is one
    value per config); Step clamps after it, with per-layer limits. Plugged in through the MLP's
    activation-module slot (`MLPSubmodules.activation_func`, active when
    `use_te_activation_func=True` -- the slot is generic despite its name).
    """

    def __init__(self, config: TransformerConfig | None = None, limit: float | None = None):
        super().__init__()
        self.limit = float(limit) if limit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        act = F.silu(gate)
        if self.limit is not None:
            act = act.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        return act * up

    def extra_repr(self) -> str:
        return f"limit={self.limit}"


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


_MTP_PARAM = re.compile(r"(^|\.)mtp\.layers\.(\d+)\.(.+)$")


def copy_first_mtp_module(chunks) -> int:
    """Copy MTP module 1's parameters into modules 2..K, in place, on every rank that holds them (the
    report's MTP staging: MTP-2/3 start from a trained MTP-1). Megatron-Core builds every MTP module
    on one pipeline stage (the last) with the same TP shards, so the copy is local. Returns the
    number of tensors copied (0 on ranks without MTP modules)."""
    n = 0
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        first = {}
        for name, p in params.items():
            m = _MTP_PARAM.search(name)
            if m and m.group(2) == "0":
                first[m.group(3)] = p
        for name, p in params.items():
            m = _MTP_PARAM.search(name)
            if m and m.group(2) != "0":
                src = first.get(m.group(3))
                if src is None or src.shape != p.shape:
                    raise ValueError(f"MTP staging: {name} has no counterpart of its shape in MTP module 1")
                with torch.no_grad():
                    p.copy_(src)
                n += 1
    return n


def weight_mtp_depths(mtp_block: torch.nn.Module, weights: list[float], base_scale: float) -> None:
    """Per-depth MTP loss weights on top of Megatron-Core's uniform `mtp_loss_scaling_factor /
    mtp_num_layers` (= `base_scale`).

    The MTP block returns cat([h_main, h_1, ..., h_K]) along the sequence dim and depth k's loss is
    computed from chunk k alone (the chain to depth k+1 uses the tensor before the concat), so
    scaling the gradient of chunk k by w_k / base_scale re-weights exactly loss k. Forward values
    (and the logged MTP losses) are unchanged.
    """
    from megatron.core.transformer.multi_token_prediction import get_mtp_layer_offset

    factors = [w / base_scale for w in weights]
    if all(abs(f - 1.0) < 1e-12 for f in factors):
        return
    offset = get_mtp_layer_offset(mtp_block.config, mtp_block.vp_stage)  # depths on earlier stages

    def hook(module, args, kwargs, output_KSBH):
        s = kwargs["hidden_states"].shape[0] // (1 + offset)  # one chunk per depth, S rows each
        chunks = list(torch.split(output_KSBH, s, dim=0))
        for i in range(1 + offset, len(chunks)):
            depth = i - 1  # chunk 0 is the main model's hidden states
            chunks[i] = _ScaleGrad.apply(chunks[i], factors[depth])
        return torch.cat(chunks, dim=0)

    mtp_block.register_forward_hook(hook, with_kwargs=True)

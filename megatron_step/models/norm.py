"""RMSNorm owned by the project, usable in any Megatron-Core layer spec on CPU and GPU.

Why our own: Megatron-Core's local spec picks `WrappedTorchNorm` (refuses sequence parallel and
zero-centred gamma) or apex's FusedLayerNorm, and `TENorm` needs Transformer Engine. This module
runs everywhere, supports zero-centred gamma (`x_hat * (1 + w)`, Step 3.5 Flash) and tags its
weight `sequence_parallel` so `finalize_model_grads` all-reduces its grad across TP ranks when
sequence parallelism is on (each TP rank then sees a different slice of the sequence).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = x / rms(x) * g, with g = (1 + w) when `config.layernorm_zero_centered_gamma`.

    Computed in fp32 and cast back, like TE's RMSNorm. Shapes: (..., hidden_size) -> same.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        **kwargs,  # Megatron passes persist_layer_norm / normalization etc. to every norm
    ):
        super().__init__()
        self.config = config
        self.eps = eps
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        # Read by finalize_model_grads: sum this grad over TP ranks under sequence parallelism.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        if self.zero_centered_gamma:
            w = w + 1.0
        return (y * w).to(x.dtype)

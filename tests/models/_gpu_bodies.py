"""GPU-only bodies (run by tests marked `gpu`)."""

from __future__ import annotations

import torch

from megatron_step import platform
from megatron_step.config import ParallelConfig
from megatron_step.models.step_flash import build_step_flash, tiny


def fp8_step(rank, ws):
    from megatron.core.fp8_utils import get_fp8_context

    # FP8 GEMMs need dims that are multiples of 16: the tiny preset's are.
    cfg = tiny().replace(fp8=True, bf16=True)
    platform.setup(ParallelConfig(), seed=0)
    model = build_step_flash(cfg, ParallelConfig()).cuda()
    tok = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, 64)
    with get_fp8_context(model.config):
        loss = model(tok, pos, None, labels=tok).float().mean()
    loss.backward()
    return {"loss": loss.item(), "fp8": bool(model.config.fp8)}

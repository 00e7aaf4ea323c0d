"""GPU-only bodies (run by tests marked `gpu`)."""

from __future__ import annotations

import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig


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


def local_vs_te_attention(rank, ws):
    """The same sliding-window layer through Megatron-Core's local core attention and through TE's
    (flash/fused) one, with identical weights: outputs must agree (the window means the same)."""
    from megatron_step.models.step_flash.config import tiny as tiny_cfg

    cfg = tiny_cfg().replace(bf16=False)
    platform.setup(ParallelConfig(), seed=0)
    torch.manual_seed(0)
    local = build_step_flash(cfg, ParallelConfig(), use_te=False).cuda().eval()
    te = build_step_flash(cfg, ParallelConfig(), use_te=True).cuda().eval()
    sd = {k: v for k, v in local.state_dict().items() if "_extra_state" not in k}
    te.load_state_dict(sd, strict=False)
    seq = 128  # > window
    x = torch.randn(seq, 2, cfg.hidden_size, device="cuda")
    table = local.rotary_pos_emb(seq)
    with torch.no_grad():
        a, _ = local.decoder.layers[1].self_attention(x, None, rotary_pos_emb=table)
        b, _ = te.decoder.layers[1].self_attention(x, None, rotary_pos_emb=table)
    return {"max_abs_diff": (a - b).abs().max().item(), "scale": a.abs().max().item()}

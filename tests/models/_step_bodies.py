"""Process bodies for tests/models/test_step_flash.py (module-level so they pickle into ranks)."""

from __future__ import annotations

import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig

SEQ = 32


def _model(cfg=None, seed=3):
    platform.setup(ParallelConfig(), seed=seed)
    return build_step_flash(cfg or tiny(), ParallelConfig())


def _tokens(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, cfg.vocab_size, (b, SEQ), generator=g)
    return tok, torch.arange(SEQ).unsqueeze(0).expand(b, SEQ)


def forward_backward(rank, ws):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    cfg = tiny()
    model = _model(cfg)
    tok, pos = _tokens(cfg)
    loss = model(tok, pos, None, labels=tok)
    loss.mean().backward()
    mtp = MTPLossLoggingHelper.tracker["loss_values"].tolist()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    return tuple(loss.shape), loss.mean().item(), mtp, no_grad


def window_probe(rank, ws):
    """Output change at query t when one earlier position p is perturbed, per attention kind."""
    cfg = tiny()
    model = _model(cfg).eval()
    w, t = cfg.sliding_window, SEQ - 1
    table = model.rotary_pos_emb(SEQ)
    x = torch.randn(SEQ, 1, cfg.hidden_size)

    def delta(attn, p):
        y0, _ = attn(x, None, rotary_pos_emb=table)
        x2 = x.clone()
        x2[p] += 1.0
        y1, _ = attn(x2, None, rotary_pos_emb=table)
        return (y1[t] - y0[t]).abs().max().item()

    sliding = model.decoder.layers[1].self_attention
    full = model.decoder.layers[0].self_attention
    mtp = model.mtp.layers[0].mtp_model_layer.self_attention
    with torch.no_grad():
        return {
            "window": w,
            "sliding_outside": max(delta(sliding, p) for p in range(0, t - w)),  # p <= t-W-1
            "sliding_edge": delta(sliding, t - w),  # the W-th previous key
            "sliding_self": delta(sliding, t),
            "full_far": delta(full, 0),
            "mtp_outside": max(delta(mtp, p) for p in range(0, t - w)),
            "mtp_edge": delta(mtp, t - w),
            "heads": (full.num_attention_heads_per_partition, sliding.num_attention_heads_per_partition),
        }


def head_gate_probe(rank, ws):
    cfg = tiny()
    model = _model(cfg).eval()
    attn = model.decoder.layers[1].self_attention
    seen = {}
    attn.linear_proj.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("pre", a[0].clone()), prepend=True
    )
    attn.linear_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("post", a[0].clone()))
    x = torch.randn(SEQ, 2, cfg.hidden_size)
    table = model.rotary_pos_emb(SEQ)
    with torch.no_grad():
        attn(x, None, rotary_pos_emb=table)
        gate_SBN = torch.sigmoid(attn.head_gate(x)[0])
        s, b, n = gate_SBN.shape
        expected = (seen["pre"].view(s, b, n, -1) * gate_SBN.unsqueeze(-1)).view(s, b, -1)
        err = (seen["post"] - expected).abs().max().item()
        attn.head_gate.weight.zero_()
        attn(x, None, rotary_pos_emb=table)
        half_err = (seen["post"] - 0.5 * seen["pre"]).abs().max().item()
    return {
        "err": err,
        "half_err": half_err,
        "gate_shape": list(attn.head_gate.weight.shape),
        "n_heads": cfg.sliding_attention_heads,
    }


def clamp_layout(rank, ws):
    from megatron_step.models.step_flash.layers import ClampedSwiGLU

    model = _model()
    limits = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ClampedSwiGLU):
            limits[name] = mod.limit
    return limits


def router_probe(rank, ws):
    cfg = tiny()
    model = _model(cfg).eval()
    router = model.decoder.layers[cfg.first_k_dense].mlp.router
    x = torch.randn(10, cfg.hidden_size)
    with torch.no_grad():
        router.expert_bias.zero_()
        router.expert_bias[5] = 10.0  # forces expert 5 into every token's top-k
        probs, routing_map = router(x)
        scores = torch.sigmoid(x.float() @ router.weight.float().t())
        idx = torch.topk(scores + router.expert_bias, cfg.moe_topk, dim=-1).indices
        w = torch.gather(scores, 1, idx)
        w = w / w.sum(-1, keepdim=True) * cfg.router_scaling_factor
        expected = torch.zeros_like(scores).scatter(1, idx, w)
        unbiased_idx = torch.topk(scores, cfg.moe_topk, dim=-1).indices
    return {
        "expert5_always": bool(routing_map[:, 5].all()),
        "map_matches": bool((routing_map == (expected > 0)).all()),
        "prob_err": (probs.float() - expected).abs().max().item(),
        "bias_changed_choice": bool((torch.sort(idx).values != torch.sort(unbiased_idx).values).any()),
        "bias_dtype": str(router.expert_bias.dtype),
    }


def mtp_depth_grads(rank, ws, weights):
    cfg = tiny().replace(mtp_loss_weights=list(weights))
    model = _model(cfg, seed=11)
    tok, pos = _tokens(cfg)
    model(tok, pos, None, labels=tok).mean().backward()
    return {
        k: torch.cat(
            [p.grad.flatten() for n, p in model.named_parameters() if n.startswith(f"mtp.layers.{k}.")]
        )
        for k in range(cfg.mtp_num_layers)
    }


def fp8_on_this_machine(rank, ws):
    cfg = tiny().replace(fp8=True, bf16=True)
    try:
        _model(cfg)
    except RuntimeError as e:
        return str(e)
    return "built"


def param_count(rank, ws, preset_name):
    import sys

    sys.argv = ["param_count"]
    from tools.param_count import main

    out = main(["--preset", preset_name])
    r = out["report"]
    return {
        "backbone": r.backbone,
        "routed": r.routed_experts,
        "active": r.active_no_embedding,
        "mtp": out["mtp_with_head"],
        "embedding": r.embedding,
        "head": r.output_layer,
    }

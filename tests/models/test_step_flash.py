"""Step 3.5 Flash architecture: each feature has a focused check (1 process, CPU, fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, step35_flash, tiny
from megatron_step.models.step_flash.config import tiny as tiny_cfg
from megatron_step.models.step_flash.layers import ClampedSwiGLU
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed
from tools.param_count import main


def test_forward_backward_with_three_mtp_losses():
    shape, loss, mtp, no_grad = run_distributed(forward_backward, 1)[0]
    assert shape == (2, SEQ)
    assert abs(loss - math.log(tiny().vocab_size)) < 0.5
    assert len(mtp) == 3 and all(abs(v - math.log(tiny().vocab_size)) < 0.5 for v in mtp)
    assert no_grad == []


def test_sliding_window_is_exact():
    r = run_distributed(window_probe, 1)[0]
    # W = 8: query t sees itself and keys t-8..t-1; nothing earlier
    assert r["sliding_outside"] == 0.0
    assert r["sliding_edge"] > 1e-6 and r["sliding_self"] > 1e-6
    assert r["mtp_outside"] == 0.0 and r["mtp_edge"] > 1e-6
    assert r["full_far"] > 1e-6  # full attention reaches position 0
    assert r["heads"] == (tiny().full_attention_heads, tiny().sliding_attention_heads)


def test_head_gate_scales_each_head_by_its_sigmoid():
    r = run_distributed(head_gate_probe, 1)[0]
    assert r["gate_shape"] == [r["n_heads"], tiny().hidden_size]  # one scalar per head
    assert r["err"] < 1e-6
    assert r["half_err"] < 1e-6  # zero gate weights -> sigmoid(0) = 0.5 on every head


def test_clamped_swiglu_formula():
    g = torch.linspace(-30, 30, 101)
    u = torch.linspace(-40, 40, 101).flip(0)
    x = torch.cat([g, u]).unsqueeze(0)
    out = ClampedSwiGLU(limit=7.0)(x)
    expect = torch.nn.functional.silu(g).clamp(max=7.0) * u.clamp(-7.0, 7.0)
    torch.testing.assert_close(out[0], expect, rtol=0, atol=0)
    # post-activation clamp, unlike Megatron-Core's pre-activation one
    assert out.max() <= 49.0 and not torch.allclose(
        out[0], torch.nn.functional.silu(g.clamp(max=7)) * u.clamp(-7, 7)
    )
    plain = ClampedSwiGLU(limit=0.0)(x)
    torch.testing.assert_close(plain[0], torch.nn.functional.silu(g) * u)


def test_clamps_sit_on_the_configured_layers():
    limits = run_distributed(clamp_layout, 1)[0]
    cfg = tiny()
    for name, limit in limits.items():
        if name.startswith("mtp."):
            assert limit is None, name
            continue
        layer = int(name.split(".")[2])
        if ".experts." in name:
            want = cfg.swiglu_limits[layer] or None
        else:  # shared expert and dense FFN share one list, as in the published checkpoint
            want = cfg.swiglu_limits_shared[layer] or None
        assert limit == want, (name, limit, want)
    assert any(v == 7.0 for v in limits.values()) and any(v == 16.0 for v in limits.values())


def test_router_picks_on_biased_scores_and_weights_unbiased_ones():
    r = run_distributed(router_probe, 1)[0]
    assert r["expert5_always"] and r["bias_changed_choice"]
    assert r["map_matches"]
    assert r["prob_err"] < 1e-6  # renormalised un-biased sigmoid scores x 3.0
    assert r["bias_dtype"] == "torch.float32"


def test_mtp_depth_weights_scale_exactly_their_depth():
    base = run_distributed(mtp_depth_grads, 1, (0.3, 0.1, 0.1))[0]
    other = run_distributed(mtp_depth_grads, 1, (0.3, 0.1, 0.2))[0]
    off = run_distributed(mtp_depth_grads, 1, (0.3, 0.0, 0.0))[0]
    # depth 3's module only receives its own loss: doubling its weight doubles its grads
    torch.testing.assert_close(other[2], 2 * base[2], rtol=1e-5, atol=1e-9)
    assert off[1].abs().sum() == 0 and off[2].abs().sum() == 0 and off[0].abs().sum() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_is_refused_without_te_hopper():
    msg = run_distributed(fp8_on_this_machine, 1)[0]
    assert "model.fp8=True needs Transformer Engine" in msg and "set model.fp8=False" in msg


def test_config_validation_names_field_and_value():
    with pytest.raises(
        ValueError, match=r"model.sliding_attention_heads=7: must be a multiple of num_query_groups=8"
    ):
        step35_flash().replace(sliding_attention_heads=7)
    with pytest.raises(ValueError, match=r"model.swiglu_limits=.*needs one entry per layer \(45\)"):
        step35_flash().replace(swiglu_limits=[7.0])
    with pytest.raises(ValueError, match=r"model.mtp_loss_weights=\[0.3\]: needs mtp_num_layers=3"):
        step35_flash().replace(mtp_loss_weights=[0.3])


def test_full_preset_matches_published_sizes():
    r = run_distributed(param_count, 1, "step35_flash")[0]
    assert abs(r["backbone"] / 196.0e9 - 1) <= 0.005, r["backbone"]
    assert abs(r["routed"] / 190.25e9 - 1) <= 0.001, r["routed"]
    assert abs(r["active"] / 10.9e9 - 1) <= 0.005, r["active"]
    assert len(r["mtp"]) == 3 and all(abs(m / 0.81e9 - 1) <= 0.01 for m in r["mtp"]), r["mtp"]
    assert r["embedding"] == r["head"] == 128896 * 4096  # untied


@pytest.mark.gpu
def test_fp8_forward_backward_on_hopper():
    pytest.importorskip("transformer_engine", reason="FP8 needs Transformer Engine (requirements-gpu.txt)")

    out = run_distributed(fp8_step, 1)[0]
    assert math.isfinite(out["loss"]) and out["fp8"]


@pytest.mark.gpu
def test_sliding_window_local_path_matches_te_path():
    pytest.importorskip("transformer_engine", reason="the TE path needs Transformer Engine")

    r = run_distributed(local_vs_te_attention, 1)[0]
    assert r["max_abs_diff"] <= 1e-3 * max(r["scale"], 1.0), r  # TE kernels may use TF32/bf16 inside


# ---------------------------------------------------------------------------------------------
# process bodies (module-level so they pickle into spawned ranks)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# process bodies (module-level so they pickle into spawned ranks)
# ---------------------------------------------------------------------------------------------
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

"""Step 3.5 Flash architecture: each feature has a focused check (1 process, CPU, fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_step.models.step_flash import step35_flash, tiny
from megatron_step.models.step_flash.layers import ClampedSwiGLU
from megatron_step.testing import run_distributed
from tests.models import _step_bodies as bodies


def test_forward_backward_with_three_mtp_losses():
    shape, loss, mtp, no_grad = run_distributed(bodies.forward_backward, 1)[0]
    assert shape == (2, bodies.SEQ)
    assert abs(loss - math.log(tiny().vocab_size)) < 0.5
    assert len(mtp) == 3 and all(abs(v - math.log(tiny().vocab_size)) < 0.5 for v in mtp)
    assert no_grad == []


def test_sliding_window_is_exact():
    r = run_distributed(bodies.window_probe, 1)[0]
    # W = 8: query t sees itself and keys t-8..t-1; nothing earlier
    assert r["sliding_outside"] == 0.0
    assert r["sliding_edge"] > 1e-6 and r["sliding_self"] > 1e-6
    assert r["mtp_outside"] == 0.0 and r["mtp_edge"] > 1e-6
    assert r["full_far"] > 1e-6  # full attention reaches position 0
    assert r["heads"] == (tiny().full_attention_heads, tiny().sliding_attention_heads)


def test_head_gate_scales_each_head_by_its_sigmoid():
    r = run_distributed(bodies.head_gate_probe, 1)[0]
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
    limits = run_distributed(bodies.clamp_layout, 1)[0]
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
    r = run_distributed(bodies.router_probe, 1)[0]
    assert r["expert5_always"] and r["bias_changed_choice"]
    assert r["map_matches"]
    assert r["prob_err"] < 1e-6  # renormalised un-biased sigmoid scores x 3.0
    assert r["bias_dtype"] == "torch.float32"


def test_mtp_depth_weights_scale_exactly_their_depth():
    base = run_distributed(bodies.mtp_depth_grads, 1, (0.3, 0.1, 0.1))[0]
    other = run_distributed(bodies.mtp_depth_grads, 1, (0.3, 0.1, 0.2))[0]
    off = run_distributed(bodies.mtp_depth_grads, 1, (0.3, 0.0, 0.0))[0]
    # depth 3's module only receives its own loss: doubling its weight doubles its grads
    torch.testing.assert_close(other[2], 2 * base[2], rtol=1e-5, atol=1e-9)
    assert off[1].abs().sum() == 0 and off[2].abs().sum() == 0 and off[0].abs().sum() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_is_refused_without_te_hopper():
    msg = run_distributed(bodies.fp8_on_this_machine, 1)[0]
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
    r = run_distributed(bodies.param_count, 1, "step35_flash")[0]
    assert abs(r["backbone"] / 196.0e9 - 1) <= 0.005, r["backbone"]
    assert abs(r["routed"] / 190.25e9 - 1) <= 0.001, r["routed"]
    assert abs(r["active"] / 10.9e9 - 1) <= 0.005, r["active"]
    assert len(r["mtp"]) == 3 and all(abs(m / 0.81e9 - 1) <= 0.01 for m in r["mtp"]), r["mtp"]
    assert r["embedding"] == r["head"] == 128896 * 4096  # untied


@pytest.mark.gpu
def test_fp8_forward_backward_on_hopper():
    pytest.importorskip("transformer_engine", reason="FP8 needs Transformer Engine (requirements-gpu.txt)")
    from tests.models._gpu_bodies import fp8_step

    out = run_distributed(fp8_step, 1)[0]
    assert math.isfinite(out["loss"]) and out["fp8"]


@pytest.mark.gpu
def test_sliding_window_local_path_matches_te_path():
    pytest.importorskip("transformer_engine", reason="the TE path needs Transformer Engine")
    from tests.models._gpu_bodies import local_vs_te_attention

    r = run_distributed(local_vs_te_attention, 1)[0]
    assert r["max_abs_diff"] <= 1e-3 * max(r["scale"], 1.0), r  # TE kernels may use TF32/bf16 inside

"""MACRO core: iterates stay on their manifold, the Riemannian gradient is tangent, msign matches
the SVD polar factor, and its state survives a state_dict round trip."""

from __future__ import annotations

import io

import pytest
import torch
from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

from megatron_step.optim import MACRO, riemannian_grad
from megatron_step.optim.macro import manifold_norm


def _train(manifold: str, steps: int, seed: int = 0, opt_state=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(32, 16, generator=g) * 0.3)
    x = torch.randn(64, 16, generator=g)
    y = torch.randn(64, 32, generator=g)
    opt = MACRO([w], lr=0.05, manifold=manifold)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((x @ w.T - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return w, opt, losses


@pytest.mark.parametrize("manifold", ["frobenius", "spectral", "oblique"])
def test_iterates_stay_on_the_manifold_for_200_steps(manifold):
    w, opt, losses = _train(manifold, 200)
    r = opt.state[w]["radius"]
    wd = w.detach()
    if manifold == "frobenius":
        err = abs(wd.norm() / r - 1)
    elif manifold == "spectral":
        err = abs(torch.linalg.matrix_norm(wd, ord=2) / r - 1)
    else:
        err = (wd.norm(dim=1, keepdim=True) / r - 1).abs().max()
    assert float(err) <= 1e-5, (manifold, float(err))
    assert losses[-1] < losses[0]  # it optimises, within the constraint


@pytest.mark.parametrize("manifold", ["frobenius", "spectral", "oblique"])
def test_riemannian_gradient_is_orthogonal_to_the_normal(manifold):
    g = torch.Generator().manual_seed(1)
    w, grad = torch.randn(24, 12, generator=g), torch.randn(24, 12, generator=g)
    if manifold == "frobenius":
        p = riemannian_grad(grad, w, manifold)
        assert abs(float((p * w).sum())) <= 1e-5 * float(grad.norm() * w.norm())
    elif manifold == "spectral":
        u_, s_, vh = torch.linalg.svd(w)
        u, v = u_[:, 0], vh[0]
        p = riemannian_grad(grad, w, manifold, (u, v))
        assert abs(float(u @ p @ v)) <= 1e-5 * float(grad.norm())
    else:
        p = riemannian_grad(grad, w, manifold, oblique_dim=1)
        assert float((p * w).sum(dim=1).abs().max()) <= 1e-5 * float(grad.norm() * w.norm())


@pytest.mark.parametrize("shape", [(16, 16), (32, 8), (8, 48), (64, 24)])
def test_newton_schulz_msign_matches_the_polar_factor(shape):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    polar = u @ vh
    # Polar Express coefficients converge to the polar factor; 10 steps in fp32 reach ~1e-2 relative
    # error on Gaussian matrices (its known tolerance is set by the smallest singular value).
    approx = newton_schulz(x, steps=10, coefficient_type="polar_express")
    rel = float((approx - polar).norm() / polar.norm())
    assert rel <= 0.05, rel
    # Muon's quintic set trades accuracy for speed: singular values land roughly in [0.7, 1.2]
    quick = newton_schulz(x, steps=5, coefficient_type="quintic")
    s = torch.linalg.svdvals(quick)
    assert float(s.min()) >= 0.6 and float(s.max()) <= 1.25, s


@pytest.mark.parametrize("manifold", ["frobenius", "spectral", "oblique"])
def test_state_round_trips_through_a_saved_state_dict(manifold):
    w1, opt1, _ = _train(manifold, 20)
    sd = opt1.state_dict()
    # only parameter-shaped state is saved (what Megatron-Core's dist-checkpointing can shard)
    assert all(t.shape == w1.shape for s in sd["state"].values() for t in s.values() if torch.is_tensor(t))
    buf = io.BytesIO()  # through bytes, as a checkpoint would: no tensor shared between the two
    torch.save({"w": w1.detach(), "opt": sd}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    w2 = torch.nn.Parameter(saved["w"])
    opt2 = MACRO([w2], lr=1.0, manifold="spectral")  # hyper-parameters come from the checkpoint
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 0.05 and opt2.param_groups[0]["manifold"] == manifold
    assert opt2.param_groups[0]["scale_mode"] == "shape"
    assert torch.equal(opt1.state[w1]["momentum_buffer"], opt2.state[w2]["momentum_buffer"])
    for w, opt in ((w1, opt1), (w2, opt2)):  # one more step on both
        w.grad = torch.linspace(-0.01, 0.01, w.numel()).view_as(w)
        opt.step()
    # radius re-read from W (on the manifold to fp32 rounding): 1e-6. Spectral: the power iteration
    # cold-starts (30 iterations) where the uninterrupted run warm-starts (2 per step); the two top
    # singular pairs differ by the warm start's own lag, ~5e-5 relative in the new W.
    rel = float((w1.detach() - w2.detach()).norm() / w1.detach().norm())
    assert rel <= (2e-4 if manifold == "spectral" else 1e-6), rel


def test_rejects_non_matrices_and_unknown_settings():
    with pytest.raises(ValueError, match="2-D matrices only"):
        MACRO([torch.nn.Parameter(torch.ones(4))])
    with pytest.raises(ValueError, match="optim.macro_manifold='sphere'"):
        MACRO([torch.nn.Parameter(torch.ones(4, 4))], manifold="sphere")
    with pytest.raises(ValueError, match="zero-initialised"):
        w = torch.nn.Parameter(torch.zeros(4, 4))
        w.grad = torch.ones(4, 4)
        MACRO([w]).step()


@pytest.mark.parametrize("manifold", ["frobenius", "spectral", "oblique"])
def test_fixed_and_mup_radius_put_w_on_the_manifold(manifold):
    g = torch.Generator().manual_seed(3)
    for mode, want in (("fixed", 2.0), ("mup", None)):
        w = torch.nn.Parameter(torch.randn(32, 8, generator=g))
        opt = MACRO([w], lr=0.01, manifold=manifold, radius_mode=mode, radius=2.0)
        for _ in range(3):
            w.grad = torch.randn(32, 8, generator=g)
            opt.step()
        r = opt.state[w]["radius"]
        if want is not None:
            assert torch.allclose(r, torch.full_like(r, want))
        err = (manifold_norm(w.detach(), manifold) / r - 1).abs().max()
        assert float(err) <= 1e-5


def test_weight_decay_would_be_a_no_op_on_the_manifold():
    """Why MACRO has no weight-decay term: shrink-then-retract returns the same matrix."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 8, generator=g)
    for manifold in ("frobenius", "spectral", "oblique"):
        r = manifold_norm(w, manifold)
        shrunk = w * (1 - 0.01 * 0.1)
        back = shrunk * (r / manifold_norm(shrunk, manifold))
        assert torch.allclose(back, w, rtol=1e-6, atol=1e-7)

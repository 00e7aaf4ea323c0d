"""MACRO core: iterates stay on their manifold, the Riemannian gradient is tangent, msign matches
the SVD polar factor, and its state survives a state_dict round trip."""

from __future__ import annotations

import io

import pytest
import torch
from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

from megatron_step.optim import MACRO, riemannian_grad


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
        r = w.norm()
        p = riemannian_grad(grad, w, manifold, r)
        assert abs(float((p * w).sum())) <= 1e-5 * float(grad.norm() * w.norm())
    elif manifold == "spectral":
        u_, s_, vh = torch.linalg.svd(w)
        u, v = u_[:, 0], vh[0]
        p = riemannian_grad(grad, w, manifold, s_[0], (u, v))
        assert abs(float(u @ p @ v)) <= 1e-5 * float(grad.norm())
    else:
        r = w.norm(dim=1, keepdim=True)
        p = riemannian_grad(grad, w, manifold, r, oblique_dim=1)
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


def test_state_round_trips_through_a_saved_state_dict():
    w1, opt1, _ = _train("spectral", 20)
    buf = io.BytesIO()  # through bytes, as a checkpoint would: no tensor shared between the two
    torch.save({"w": w1.detach(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    state = saved["opt"]
    w2 = torch.nn.Parameter(saved["w"])
    opt2 = MACRO([w2], lr=0.05, manifold="spectral")
    opt2.load_state_dict(state)
    for w, opt in ((w1, opt1), (w2, opt2)):  # one more identical step on both
        w.grad = torch.ones_like(w) * 0.01
        opt.step()
    assert torch.equal(w1.detach(), w2.detach())
    assert torch.equal(opt1.state[w1]["v"], opt2.state[w2]["v"])


def test_rejects_non_matrices_and_unknown_manifolds():
    with pytest.raises(ValueError, match="2-D matrices only"):
        MACRO([torch.nn.Parameter(torch.ones(4))])
    with pytest.raises(ValueError, match="optim.manifold='sphere'"):
        MACRO([torch.nn.Parameter(torch.ones(4, 4))], manifold="sphere")

"""Policy losses against values worked out by hand (the arithmetic is in the comments).

Shape legend: B sequences, T response positions.
"""

import math

import pytest
import torch

from megatron_step.rl.losses import (
    POLICY_LOSSES,
    PolicyLossConfig,
    group_advantages,
    policy_loss,
    register_policy_loss,
)

LN2 = math.log(2.0)


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def t32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    # torch.allclose, not torch.testing.assert_close: the latter's first call imports torch.distributed.tensor
    # (seconds on a loaded CPU box).
    assert actual.shape == expected.shape and torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{actual.tolist()} != {expected.tolist()} (atol={atol}, rtol={rtol})"
    )


# -- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "foo"}, r"rl.loss.kind='foo': one of grpo, tis, mispo"),
        ({"clip_eps": 0.0}, r"rl.loss.clip_eps=0.0"),
        ({"clip_eps_high": -0.1}, r"rl.loss.clip_eps_high=-0.1"),
        ({"kl_coef": -1.0}, r"rl.loss.kl_coef=-1.0"),
        ({"tis_cap": 0.0}, r"rl.loss.tis_cap=0.0"),
        ({"mispo_token_low": 1.5}, r"rl.loss.mispo_token_low=1.5"),
        ({"mispo_traj_high": 0.999}, r"rl.loss.mispo_traj_high=0.999"),
    ],
)
def test_config_validation_names_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kwargs)


def test_config_eps_high_defaults_to_clip_eps():
    assert PolicyLossConfig(clip_eps=0.1).eps_high == 0.1
    assert PolicyLossConfig(clip_eps=0.1, clip_eps_high=0.28).eps_high == 0.28


def test_kl_coef_without_ref_is_an_error():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(z, z, z, torch.ones(1), torch.ones(1, 2), PolicyLossConfig(kl_coef=0.1))


def test_shape_mismatch_is_an_error():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rollout_logp has shape \(2, 2\)"):
        policy_loss(z, z, torch.zeros(2, 2), torch.ones(2), torch.ones(2, 3), PolicyLossConfig())
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(z, z, z, torch.ones(3), torch.ones(2, 3), PolicyLossConfig())


# -- group advantages -----------------------------------------------------------------------------------


def test_group_advantages_population_std():
    rewards = t32(
        [
            [1.0, 0.0, 0.0, 1.0],  # mean 0.5; population std sqrt(mean((+-0.5)^2)) = 0.5 -> +-1
            [0.0, 0.0, 0.0, 3.0],  # mean 0.75; deviations -0.75 x3, 2.25; var (3*0.5625+5.0625)/4 = 1.6875
            [2.0, 2.0, 2.0, 2.0],  # no spread -> 0 (0 / (0 + eps))
        ]
    )
    adv = group_advantages(rewards)
    s = math.sqrt(1.6875)  # 1.299038
    expected = t32([[1, -1, -1, 1], [-0.75 / s, -0.75 / s, -0.75 / s, 2.25 / s], [0, 0, 0, 0]])
    assert_close(adv, expected, atol=1e-5, rtol=0)
    # The sample std (G - 1) would give 0.5 * sqrt(4/3) = 0.57735 and advantages +-0.866: not ours.
    assert abs(adv[0, 0].item() - 0.866) > 0.1


def test_group_advantages_center_only_and_singleton_group():
    # normalize_std=False: [0, 3] - 1.5 = [-1.5, 1.5]
    assert_close(group_advantages(t32([[0.0, 3.0]]), normalize_std=False), t32([[-1.5, 1.5]]), atol=1e-7)
    # G = 1: the population std is 0, the centred reward is 0 -> 0, not nan (the sample std would be nan).
    assert group_advantages(t32([[5.0], [-2.0]])).tolist() == [[0.0], [0.0]]
    with pytest.raises(ValueError, match="N_groups, G"):
        group_advantages(t32([1.0, 2.0]))


def test_a_failed_reward_is_out_of_its_groups_baseline():
    # group 0: [1, 0, <failed>, 1] -> the statistics of [1, 0, 1]: mean 2/3, std sqrt(2/9)
    rewards = t32([[1.0, 0.0, 0.0, 1.0], [0.0, 3.0, 1.0, 2.0]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    adv = group_advantages(rewards, valid=valid)
    alone = group_advantages(t32([[1.0, 0.0, 1.0]]))[0]
    assert_close(adv[0, [0, 1, 3]], alone, atol=1e-6, rtol=0)
    assert adv[0, 2].item() == 0.0
    assert_close(adv[1], group_advantages(rewards[1:])[0], atol=1e-6, rtol=0)  # all valid: as before
    # counting the failed call as a 0 would move the baseline: not what we do
    assert abs(adv[0, 0].item() - group_advantages(rewards)[0, 0].item()) > 0.1


# -- grpo -----------------------------------------------------------------------------------------------


def test_grpo_clipping_both_sides_both_signs():
    # Ratios r = exp(logp - old) chosen directly; eps = 0.2 -> clip range [0.8, 1.2].
    # seq 0, A = +1: per-token -min(r, clip(r))
    #   r = 1.5: min(1.5, 1.2) = 1.2 -> -1.2 (clipped, no grad)
    #   r = 1.1: -1.1 (inside)
    #   r = 0.5: min(0.5, 0.8) = 0.5 -> -0.5 (the clip does not help a falling ratio with A > 0: grad kept)
    # seq 1, A = -1: per-token -min(-r, -clip(r)) = max(r, clip(r))
    #   r = 1.5: max(1.5, 1.2) = 1.5 (not clipped: pessimistic side, grad kept)
    #   r = 0.9: 0.9 (inside)
    #   r = 0.5: max(0.5, 0.8) = 0.8 (clipped, no grad)
    # token mean = (-1.2 - 1.1 - 0.5 + 1.5 + 0.9 + 0.8) / 6 = 0.4 / 6 = 0.0666667; clip_frac = 2/6.
    # Gradient on logp where not clipped: d(-r A)/d logp = -r A, / 6 for the mean:
    #   seq 0: [0, -1.1, -0.5] / 6; seq 1: [1.5, 0.9, 0] / 6.
    old = t32([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.5]])
    r = t32([[1.5, 1.1, 0.5], [1.5, 0.9, 0.5]])
    logp = (old + r.log()).detach().requires_grad_()
    mask = torch.ones(2, 3)
    loss, m = policy_loss(logp, old, old, t32([1.0, -1.0]), mask, PolicyLossConfig(kind="grpo"))
    assert loss.item() == pytest.approx(0.4 / 6, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(2 / 6)
    loss.backward()
    expected = t32([[0.0, -1.1, -0.5], [1.5, 0.9, 0.0]]) / 6
    assert_close(logp.grad, expected, atol=1e-6, rtol=0)


def test_grpo_asymmetric_upper_clip():
    # eps_high = 0.28, A = +1, r = 1.5: -min(1.5, 1.28) = -1.28; r = 0.5: lower bound still 0.8 -> -0.5.
    # mean = (-1.28 - 0.5) / 2 = -0.89
    old = t32([[-1.0, -1.0]])
    logp = old + t32([[math.log(1.5), math.log(0.5)]])
    cfg = PolicyLossConfig(kind="grpo", clip_eps=0.2, clip_eps_high=0.28)
    loss, m = policy_loss(logp, old, old, t32([1.0]), torch.ones(1, 2), cfg)
    assert loss.item() == pytest.approx(-0.89, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.5)


def test_reduction_token_vs_sequence_mean():
    # r = 1 everywhere, so per-token grpo loss = -A. seq 0: A = 1 on 3 tokens; seq 1: A = -2, 1 token kept.
    # token-level:  (-1 -1 -1 + 2) / 4 = -0.25
    # per-sequence: mean(-1, +2) = (-1 + 2) / 2 = 0.5
    logp = torch.full((2, 3), -1.0)
    mask = t32([[1, 1, 1], [1, 0, 0]])
    adv = t32([1.0, -2.0])
    tok, _ = policy_loss(logp, logp, logp, adv, mask, PolicyLossConfig(kind="grpo"))
    seq, _ = policy_loss(logp, logp, logp, adv, mask, PolicyLossConfig(kind="grpo", token_level_mean=False))
    assert tok.item() == pytest.approx(-0.25)
    assert seq.item() == pytest.approx(0.5)


# -- tis ------------------------------------------------------------------------------------------------


def test_tis_weight_is_truncated_and_detached():
    # logp = old, so r = 1 and the grpo per-token loss is -A = -1 (A = 1, no clipping).
    # x = old/rollout = [1.5, 3.0, 0.5] -> w = min(x, 2) = [1.5, 2.0, 0.5]
    # loss = -(1.5 + 2.0 + 0.5) / 3 = -4/3; d/dlogp of -w r A = -w r A = -w -> grad = -w / 3.
    old = t32([[-1.0, -0.5, -2.0]])
    rollout = old - t32([[math.log(1.5), math.log(3.0), math.log(0.5)]])
    logp = old.clone().requires_grad_()
    loss, m = policy_loss(logp, old, rollout, t32([1.0]), torch.ones(1, 3), PolicyLossConfig(kind="tis"))
    assert loss.item() == pytest.approx(-4 / 3, abs=1e-6)
    loss.backward()
    assert_close(logp.grad, t32([[-0.5, -2 / 3, -0.5 / 3]]), atol=1e-6, rtol=0)
    assert m["tis_trunc_frac"] == pytest.approx(1 / 3)
    assert m["tis_weight_mean"] == pytest.approx(4 / 3, abs=1e-6)
    assert m["clip_frac"] == 0.0


# -- mispo ----------------------------------------------------------------------------------------------


def test_mispo_token_mask_boundaries_inclusive():
    # x = old/rollout built with exact fp32 differences (one side 0): [0.5, 2, 0.49, 2.01, 1].
    # Token mask [0.5 <= x <= 2] keeps [1, 1, 0, 0, 1]. Trajectory bounds are opened wide so only the
    # token mask acts. A = 1.5, logp = [-0.1, -0.2, -0.3, -0.4, -0.5]:
    # loss = -A (-0.1 - 0.2 - 0.5) / 5 = 1.5 * 0.8 / 5 = 0.24; grad = -m A / 5 = [-0.3, -0.3, 0, 0, -0.3].
    old = t32([[-LN2, 0.0, math.log(0.49), 0.0, -0.7]])
    rollout = t32([[0.0, -LN2, 0.0, -math.log(2.01), -0.7]])
    logp = leaf([[-0.1, -0.2, -0.3, -0.4, -0.5]])
    cfg = PolicyLossConfig(kind="mispo", mispo_traj_low=1e-3, mispo_traj_high=1e3)
    loss, m = policy_loss(logp, old, rollout, t32([1.5]), torch.ones(1, 5), cfg)
    assert loss.item() == pytest.approx(0.24, abs=1e-6)
    loss.backward()
    assert_close(logp.grad, t32([[-0.3, -0.3, 0.0, 0.0, -0.3]]), atol=1e-7, rtol=0)
    assert m["token_mask_rate"] == pytest.approx(0.6)
    assert m["ratio_min"] == pytest.approx(0.49, abs=1e-6)
    assert m["ratio_max"] == pytest.approx(2.01, abs=1e-6)


def test_mispo_trajectory_mask_one_in_one_out():
    # log x per token; geometric mean = exp(mean log x), bounds [0.996, 1.001]:
    #   seq 0: [0.001, -0.001, 0]   mean 0        -> 1.0      kept
    #   seq 1: [0.01, 0, 0]         mean 0.00333  -> 1.00334  > 1.001 dropped
    #   seq 2: [-0.01, -0.01, 0]    mean -0.00667 -> 0.99335  < 0.996 dropped
    # Every x_t is in [0.5, 2], so the token mask keeps all. Only seq 0 counts:
    # loss = -A0 * sum(logp0) / 9 = -2 * (-0.5 - 1.0 - 1.5) / 9 = 6/9; grad seq 0 = -2/9, others 0.
    rollout = torch.full((3, 3), -1.0)
    log_x = t32([[0.001, -0.001, 0.0], [0.01, 0.0, 0.0], [-0.01, -0.01, 0.0]])
    logp = leaf([[-0.5, -1.0, -1.5], [-0.2, -0.2, -0.2], [-0.3, -0.3, -0.3]])
    loss, m = policy_loss(
        logp, rollout + log_x, rollout, t32([2.0, 3.0, -1.0]), torch.ones(3, 3), PolicyLossConfig()
    )
    assert loss.item() == pytest.approx(6 / 9, abs=1e-6)
    assert m["traj_mask_rate"] == pytest.approx(1 / 3)
    assert m["token_mask_rate"] == 1.0
    assert m["keep_rate"] == pytest.approx(1 / 3)
    loss.backward()
    expected = torch.zeros(3, 3)
    expected[0] = -2 / 9
    assert_close(logp.grad, expected, atol=1e-7, rtol=0)


def test_mispo_gradient_is_minus_mask_times_advantage_over_count():
    # Random inputs; the masks are recomputed here in exp space, the gradient must be -m M A / count.
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    rollout = -torch.rand(B, T, generator=g) * 3
    # Half of the sequences tiny mismatch (trajectory kept), half larger (token mask alone decides).
    scale = t32([0.001, 0.001, 0.001, 1.0, 1.0, 1.0])[:, None]
    old = rollout + torch.randn(B, T, generator=g) * scale
    logp = leaf((-torch.rand(B, T, generator=g) * 3).tolist())
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    adv = torch.randn(B, T, generator=g)
    loss, _ = policy_loss(logp, old, rollout, adv, mask, PolicyLossConfig())
    loss.backward()
    x = torch.exp(old - rollout)
    m = (x >= 0.5) & (x <= 2.0) & (mask > 0)
    geo = torch.exp(((old - rollout) * mask).sum(1) / mask.sum(1))
    M = (geo >= 0.996) & (geo <= 1.001)
    assert 0 < M.sum() < B and (~m & (mask > 0)).sum() > 0  # both masks actually act in this draw
    expected = -(m & M[:, None]).float() * adv / mask.sum()
    assert_close(logp.grad, expected, atol=1e-7, rtol=1e-5)


# -- masked positions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["grpo", "tis", "mispo"])
@pytest.mark.parametrize("token_level_mean", [True, False])
def test_masked_inf_nan_contribute_exactly_zero(kind, token_level_mean):
    # Same inputs twice: once with garbage (-inf, nan) at masked positions, once with those positions
    # cut off. Loss, metrics and the gradient on kept tokens must match; masked gradients must be 0.
    cfg = PolicyLossConfig(kind=kind, kl_coef=0.05, token_level_mean=token_level_mean)
    clean = dict(
        logp=[[-0.9, -1.1], [-0.4, -0.6]],
        old=[[-1.0, -1.0], [-0.5, -0.5]],
        rollout=[[-1.0, -1.0005], [-0.5, -0.499]],
        ref=[[-1.2, -0.8], [-0.5, -0.7]],
        adv=[[1.0, 1.0], [-0.5, -0.5]],
    )
    nan, inf = math.nan, math.inf
    garbage = dict(logp=[-inf, nan], old=[nan, -inf], rollout=[-inf, -inf], ref=[nan, nan], adv=[nan, inf])
    padded = {k: [row + garbage[k] for row in v] for k, v in clean.items()}
    mask = t32([[1, 1, 0, 0], [1, 1, 0, 0]])

    logp_c, logp_p = leaf(clean["logp"]), leaf(padded["logp"])
    loss_c, m_c = policy_loss(
        logp_c,
        t32(clean["old"]),
        t32(clean["rollout"]),
        t32(clean["adv"]),
        torch.ones(2, 2),
        cfg,
        ref_logp=t32(clean["ref"]),
    )
    loss_p, m_p = policy_loss(
        logp_p,
        t32(padded["old"]),
        t32(padded["rollout"]),
        t32(padded["adv"]),
        mask,
        cfg,
        ref_logp=t32(padded["ref"]),
    )
    assert torch.isfinite(loss_p)
    assert loss_p.item() == loss_c.item()
    assert m_p == m_c
    loss_c.backward()
    loss_p.backward()
    assert torch.isfinite(logp_p.grad).all()
    assert (logp_p.grad[:, 2:] == 0).all()
    assert torch.equal(logp_p.grad[:, :2], logp_c.grad)
    assert logp_c.grad.abs().sum() > 0  # the test would be vacuous with no gradient at all


def test_empty_mask_gives_zero_loss_and_neutral_metrics():
    logp = leaf([[math.nan, -math.inf]])
    loss, m = policy_loss(
        logp, logp.detach(), logp.detach(), t32([1.0]), torch.zeros(1, 2), PolicyLossConfig()
    )
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad.tolist() == [[0.0, 0.0]]
    assert (
        m["tokens"] == 0.0 and m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0 and m["traj_mask_rate"] == 0.0
    )


# -- KL terms and mismatch metrics ----------------------------------------------------------------------


def test_k3_kl_to_reference_value_and_gradient():
    # A = 0, so only the KL term acts. d = ref - logp:
    #   token 0: logp = ln 0.5, ref = ln 0.25 -> d = -ln 2: k3 = 0.5 + 0.693147 - 1 = 0.193147
    #   token 1: logp = ln 0.25, ref = ln 0.5 -> d = +ln 2: k3 = 2 - 0.693147 - 1 = 0.306853
    # kl_ref = (0.193147 + 0.306853) / 2 = 0.25; loss = 0.1 * 0.25 = 0.025.
    # d k3 / d logp = 1 - exp(d) = [0.5, -1]; grad = 0.1 * [0.5, -1] / 2 = [0.025, -0.05].
    logp = leaf([[math.log(0.5), math.log(0.25)]])
    ref = t32([[math.log(0.25), math.log(0.5)]])
    old = logp.detach()
    cfg = PolicyLossConfig(kind="grpo", kl_coef=0.1)
    loss, m = policy_loss(logp, old, old, t32([0.0]), torch.ones(1, 2), cfg, ref_logp=ref)
    assert m["kl_ref"] == pytest.approx(0.25, abs=1e-6)
    assert loss.item() == pytest.approx(0.025, abs=1e-7)
    loss.backward()
    assert_close(logp.grad, t32([[0.025, -0.05]]), atol=1e-7, rtol=0)
    # kl_coef = 0: the metric is still reported, the loss has no KL term.
    loss0, m0 = policy_loss(logp, old, old, t32([0.0]), torch.ones(1, 2), PolicyLossConfig(), ref_logp=ref)
    assert loss0.item() == 0.0 and m0["kl_ref"] == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "tis", "mispo"])
def test_mismatch_metrics(kind):
    # x = [2, 0.5] (log x = [+ln 2, -ln 2]):
    #   mismatch_kl (k1) = mean(-log x) = 0
    #   mismatch_k3 = mean(x - 1 - log x) = ((2 - 1 - 0.693147) + (0.5 - 1 + 0.693147)) / 2 = 0.5 / 2 = 0.25
    #   ratio mean/min/max = 1.25 / 0.5 / 2; both tokens at the (inclusive) token bounds -> rate 1.
    #   geometric mean = exp(0) = 1 -> trajectory kept. The MIS-PO masks are reported for every kind.
    old = t32([[0.0, -LN2]])
    rollout = t32([[-LN2, 0.0]])
    _, m = policy_loss(old, old, rollout, t32([1.0]), torch.ones(1, 2), PolicyLossConfig(kind=kind))
    assert m["mismatch_kl"] == pytest.approx(0.0, abs=1e-7)
    assert m["mismatch_k3"] == pytest.approx(0.25, abs=1e-6)
    assert (m["ratio_mean"], m["ratio_min"], m["ratio_max"]) == pytest.approx((1.25, 0.5, 2.0))
    assert m["token_mask_rate"] == 1.0 and m["traj_mask_rate"] == 1.0 and m["tokens"] == 2.0
    assert ("clip_frac" in m) == (kind != "mispo")
    assert "kl_ref" not in m and "entropy" not in m
    assert all(isinstance(v, float) for v in m.values())
    # One token x = 1.5: k1 = -ln 1.5 = -0.405465 (k1 can be negative), k3 = 0.5 - 0.405465 = 0.094535.
    _, m1 = policy_loss(
        old[:, :1],
        old[:, :1],
        old[:, :1] - math.log(1.5),
        t32([1.0]),
        torch.ones(1, 1),
        PolicyLossConfig(kind=kind),
    )
    assert m1["mismatch_kl"] == pytest.approx(-0.405465, abs=1e-6)
    assert m1["mismatch_k3"] == pytest.approx(0.094535, abs=1e-6)


def test_fp32_compute_from_bf16_inputs():
    logp = leaf([[-1.0, -2.0]]).to(torch.bfloat16)
    loss, _ = policy_loss(
        logp, logp.detach(), logp.detach(), t32([1.0]), torch.ones(1, 2), PolicyLossConfig()
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1.5)  # -(1)(-1 - 2)/2


def test_register_custom_loss():
    def plain_pg(t, cfg):  # REINFORCE without any mismatch handling
        return -t.logp * t.adv, {}

    register_policy_loss("test_plain_pg", plain_pg)
    try:
        logp = leaf([[-1.0, -3.0]])
        loss, _ = policy_loss(
            logp,
            logp.detach(),
            logp.detach(),
            t32([2.0]),
            torch.ones(1, 2),
            PolicyLossConfig(kind="test_plain_pg"),
        )
        assert loss.item() == pytest.approx(4.0)  # -2 * (-1 - 3) / 2
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("grpo", plain_pg)
    finally:
        POLICY_LOSSES.pop("test_plain_pg")


def test_a_given_normalizer_replaces_the_call_s_own_count():
    """`normalizer` (the step's count, as PolicyUpdate passes it): the loss is the plain sum over it, for
    the token and the sequence reduction, and the default is the call's own count."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([1.0, -2.0, 0.5])
    per_token = (-logp * adv[:, None]) * mask  # MIS-PO with no mismatch: every token kept
    for token_level, units, own in (
        (True, per_token.sum(), 5.0),
        (False, (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum(), 2.0),
    ):
        cfg = PolicyLossConfig("mispo", token_level_mean=token_level)
        default, _ = policy_loss(logp, logp, logp, adv, mask, cfg)
        scaled, m = policy_loss(logp, logp, logp, adv, mask, cfg, normalizer=40.0)
        assert torch.allclose(default, units / own, rtol=1e-6, atol=0)
        assert torch.allclose(scaled, units / 40.0, rtol=1e-6, atol=0)
        assert m["tokens"] == 5.0

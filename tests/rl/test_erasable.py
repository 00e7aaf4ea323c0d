"""Erasable rollouts (E3RL): erasure reuses the prefix's KV cache (no prefix position recomputed, the
regenerated tokens' logits equal a from-scratch forward), memory stays that of a plain rollout, and
the erasure policy's uncertainty / threshold rules."""

from __future__ import annotations

import pytest

from megatron_step.rl.engine import Generation
from megatron_step.rl.erasable import E3RLConfig, E3RLPolicy, segment_advantages
from megatron_step.testing import run_distributed
from tests.rl import _erasable_bodies


@pytest.mark.distributed
def test_erasure_reuses_the_prefix_cache_and_matches_a_fresh_forward():
    out = run_distributed(_erasable_bodies.erase_and_reuse, 1)[0]
    assert out["erasures"] == [0, 0, 0, 2, 2, 2, 0, 0], out
    assert out["erased_segments"][3:6] == [[1, 1]] * 3
    assert out["regenerated"][3:6] == [10, 10, 10] and out["regenerated"][0] == 0
    assert out["prefix_reused"][3] == 2 * (7 + 5)  # two rollbacks to position 12 of the cache
    assert out["lengths"] == [20] * 8 and out["segments"][3] == [0, 5, 10, 15]
    # the 4-token prompt's rows sample 3 tokens while the 7-token prompts are still fed
    assert out["lead_in"] == [0] * 6 + [3, 3] and out["segments"][6] == [0, 8, 13, 18]
    assert out["prefix_recomputed"] == 0  # nothing before the erased segment went through the model again
    assert out["regen_fed"] == [1, 1, 1, 3, 3, 3]  # the erased segment's positions: fed 1 + 2 times
    assert out["max_logp_diff"] <= 1e-4 and out["max_entropy_diff"] <= 1e-4, out
    assert out["routing_rows"] == out["expected_routing_rows"]
    assert out["replay_logp_diff"] <= 1e-4, out


@pytest.mark.distributed
def test_scattered_erasures_regenerate_as_one_slice_after_moving_cache_rows():
    out = run_distributed(_erasable_bodies.scattered_erasures, 1)[0]
    assert out["erasures"] == [0, 1, 0, 0, 1, 0]
    assert out["rows_moved"] == 2  # row 4 swapped next to row 1 (or the other way round)
    assert out["prefix_recomputed"] == 0
    assert out["max_logp_diff"] <= 1e-4, out


@pytest.mark.distributed
def test_kv_bytes_after_erasures_equal_a_plain_rollout():
    out = run_distributed(_erasable_bodies.memory_after_erasures, 1)[0]
    assert out["erasures"] == [3, 3, 3, 3]
    assert out["lengths"] == out["plain_lengths"] == [20] * 4
    rows_moved = out["erasable"].pop("rows_moved")
    assert rows_moved == 0  # the whole group erases: already one slice
    assert out["erasable"] == out["plain"], out


def _policy(**kw):
    return E3RLPolicy(E3RLConfig(**kw))


def test_uncertainty_is_the_weighted_smoothed_mean_max_and_rise():
    p = _policy(smooth_window=2, w_mean=1.0, w_max=0.5, w_rate=2.0)
    x = [1.0, 3.0, 2.0]  # sliding means of 2: 2.0, 2.5 -> 2.25; max 3; mean 2
    assert p.uncertainty(x, None) == pytest.approx(2.25 + 0.5 * 3.0)
    assert p.uncertainty(x, 1.5) == pytest.approx(2.25 + 1.5 + 2.0 * 0.5)
    assert p.uncertainty(x, 2.5) == pytest.approx(2.25 + 1.5)  # a fall is not a rise
    assert _policy(smooth_window=8).uncertainty([2.0], None) == pytest.approx(2.0 + 0.25 * 2.0)


def test_signal_is_cross_entropy_or_entropy():
    assert _policy().token_signal([-0.5, -2.0], [1.0, 1.0]) == [0.5, 2.0]
    assert _policy(signal="entropy").token_signal([-0.5, -2.0], [1.0, 3.0]) == [1.0, 3.0]


def test_threshold_uses_group_stats_penalty_and_history():
    p = _policy(threshold_std=1.0, penalty_growth=0.5, history_power=1.0, max_erasures=2)
    u = [1.0, 1.0, 1.0, 3.0, 5.0, 5.0]
    groups = [0, 0, 0, 0, 1, 1]
    erase, th, stats = p.decide(u, groups, [0, 0, 0, 0, 0, 0], [[]] * 6)
    mu, sd = 1.5, (0.75) ** 0.5  # group 0: population std of 1, 1, 1, 3
    assert stats[0] == pytest.approx((mu, sd)) and th[3] == pytest.approx(mu + sd)
    assert erase == [False, False, False, True, False, False]  # group 1 has no spread: nothing erased
    # each erasure multiplies the bar by 1.5; at K no more erasures
    _, th1, _ = p.decide(u, groups, [0, 0, 0, 1, 0, 0], [[]] * 6, stats=stats)
    assert th1[3] == pytest.approx((mu + sd) * 1.5)
    e2, _, _ = p.decide([1, 1, 1, 100.0, 5, 5], groups, [0, 0, 0, 2, 0, 0], [[]] * 6, stats=stats)
    assert not e2[3]
    # history: a rollout twice as uncertain as its group so far gets a bar ~ (2 / 1.25) higher
    hist = [[1.0], [1.0], [1.0], [2.0], [], []]
    _, th2, _ = p.decide(u, groups, [0] * 6, hist, stats=stats)
    assert th2[3] == pytest.approx((mu + sd) * 2.0 / 1.25) and th2[0] == pytest.approx((mu + sd) / 1.25)


def test_segment_advantages_uniform_and_attention():
    g = Generation([1], [5, 6, 7, 8, 9], [0.0] * 5, [0.0] * 5, "length", info={"segments": [0, 2, 4]})
    assert segment_advantages([2.0], [g], E3RLConfig()) == [[2.0] * 5]
    got = segment_advantages([2.0], [g], E3RLConfig(advantage_rule="attention"), shares=[[0.5, 0.25, 0.25]])
    assert got == [[3.0, 3.0, 1.5, 1.5, 1.5]]  # scales 1.5, 0.75, 0.75 (mean 1)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rl.e3rl.segment_len=0"):
        E3RLConfig(segment_len=0)
    with pytest.raises(ValueError, match="rl.e3rl.signal='x'"):
        E3RLConfig(signal="x")


@pytest.mark.distributed
def test_attention_shares_per_kept_segment():
    out = run_distributed(_erasable_bodies.shares, 1)[0]
    assert out["layers"] >= 1
    assert all(len(s) == 3 for s in out["got"])
    assert all(0 <= x <= 1 for s in out["got"] for x in s) and all(sum(s) <= 1 + 1e-6 for s in out["got"])
    assert out["got"][0] == pytest.approx(out["want"], abs=1e-6)

"""MTP speculative decoding in the engine (megatron_step/rl/engine.py, `_generate_chunk_spec`): greedy
and coupled sampling are plain decoding token for token; the standard rejection rule samples the
policy's distribution (chi-square on a 16-token vocabulary, with the power to tell the drafts' own
distribution apart); the recorded log-probs equal a training forward's."""

from __future__ import annotations

import pytest

from megatron_step.testing import run_distributed
from megatron_step.testing.distributed import DistributedTestError
from tests.rl import _engine_bodies

pytestmark = pytest.mark.distributed  # spawned processes (platform setup)


@pytest.fixture(scope="module")
def spec_vs_plain():
    return run_distributed(_engine_bodies.spec_vs_plain, 1)[0]


@pytest.mark.parametrize("mode", ["greedy", "coupled", "greedy_single", "coupled_single", "greedy_unmasked"])
def test_greedy_and_coupled_speculation_equal_plain_decoding(spec_vs_plain, mode):
    out = spec_vs_plain[mode]
    assert all(out["same"]) and len(out["same"]) == 6, out
    assert out["max_logprob_diff"] <= 1e-5 and out["routing_equal"], out
    assert out["forward_logp_diff"] <= 1e-4, out
    assert out["proposed"][0] > 0  # drafts were made and checked (few accepted: random weights)


def test_rejection_sampling_logprobs_equal_a_training_forward(spec_vs_plain):
    out = spec_vs_plain["rejection"]
    assert out["forward_logp_diff"] <= 1e-4, out
    # drafts were accepted at every depth, and the decode took fewer forwards than plain decoding
    assert all(a > 0 for a in out["accepted"]) and out["forwards"][0] < out["forwards"][1], out
    assert not all(out["same"])  # its own random stream: not plain decoding's tokens


def test_rejection_rule_samples_the_policy_distribution():
    out = run_distributed(_engine_bodies.spec_distribution, 1)[0]
    # both paths of the rule ran: some drafts accepted, some rejected (residual resampled)
    assert 0.1 < out["accepted"][0] / out["proposed"][0] < 0.9, out
    assert out["accepted"][1] > 0 and out["n_second"] > 300 and out["n_third"] > 100, out
    assert out["second_vs_p"][1] > 1e-3 and out["third_vs_p"][1] > 1e-3, out
    # the test can tell: the drafts' own distribution is far from p, and rejected outright
    assert out["tv_p_q"] > 0.2 and out["second_vs_q"][1] < 1e-6, out


def test_speculation_needs_mtp_heads():
    with pytest.raises(DistributedTestError, match=r"(?s)ValueError: rl.speculative.tokens=4"):
        run_distributed(_engine_bodies.spec_bad_depth, 1)


def test_cached_mtp_drafter_computes_the_training_forwards_mtp_states():
    out = run_distributed(_engine_bodies.mtp_cache_vs_training, 1)[0]
    assert out["depths"] == 3 and max(out["max_abs_diff"]) <= 1e-5, out

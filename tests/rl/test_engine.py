"""The colocated engine: KV-cached greedy decoding equals full re-forward decoding (window cut
included), and log-probs recorded while sampling equal a training forward's with routing replay."""

from __future__ import annotations

import pytest

from megatron_step.testing import run_distributed
from tests.rl import _engine_bodies

pytestmark = pytest.mark.distributed  # spawned processes (platform setup)


def test_greedy_with_kv_cache_equals_full_reforward():
    out = run_distributed(_engine_bodies.greedy_cache_vs_reforward, 1)[0]
    assert out["cached"] == out["reforward"]
    assert max(out["lens"]) > 3 * out["window"]  # the sliding window really cuts
    assert out["max_logprob_diff"] <= 1e-4, out["max_logprob_diff"]


def test_sampling_logprobs_equal_training_forward_with_routing_replay():
    out = run_distributed(_engine_bodies.logprobs_vs_training_forward, 1)[0]
    assert out["layers"] == 6 and out["tokens"] > 20
    assert out["max_abs_logp_diff"] <= 1e-4, out
    assert out["free_tokens_rerouted"] > 0  # the perturbed routers would route differently...
    assert out["replay_equals_rollout"]  # ...but the replayed forward uses the rollout's experts


def test_cache_truncates_and_continues_without_recomputing_the_prefix():
    out = run_distributed(_engine_bodies.truncate_and_continue, 1)[0]
    assert out["positions_fed_after_truncate"] == 6  # only the new tokens went through the model
    assert out["length"] == 18
    assert out["max_abs_diff"] <= 1e-4, out
    assert (
        out["used_bytes_18"] == 18 * out["bytes_per_position"]
        and out["used_bytes_20"] == 20 * out["bytes_per_position"]
    )

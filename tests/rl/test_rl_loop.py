"""The RL loop end to end at toy size (supervised warm-up, then RL): it runs, logs what the issue
asks for to TensorBoard, async mode never trains on rollouts staler than the cap, and a reward that
raises or hangs marks its samples failed (counted) while the run goes on."""

from __future__ import annotations

import json
import os

import pytest

from megatron_step.testing import run_distributed
from tests.rl import _loop_bodies

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _scalars(run_dir):
    """The run's TensorBoard scalars (an EventAccumulator, loaded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    return {"data": str(root / "data"), "sft": str(root / "sft"), "root": root}


def test_sync_run_logs_the_rl_scalars(dirs):
    run_dir = str(dirs["root"] / "sync")
    out = run_distributed(_loop_bodies.run, 1, dirs["data"], run_dir, dirs["sft"])[0]
    assert [s for s, _ in out["accuracy"]] == [0, 3]
    assert out["staleness"] == [0] * 6  # sync: every group is from the current version
    ea = _scalars(run_dir)
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "reward/mean",
        "reward/std",
        "accuracy/train",
        "accuracy/heldout",
        "response length",
        "entropy",
        "loss/mismatch_kl",
        "loss/token_mask_rate",
        "loss/traj_mask_rate",
        "staleness/max",
        "generation tokens per sec",
        "training tokens per sec",
        "weight sync seconds",
    ):
        assert tag in tags, (tag, sorted(tags))


def test_async_with_a_flaky_reward_respects_the_staleness_cap(dirs):
    run_dir = str(dirs["root"] / "async")
    extra = (
        "rl.async_mode=true",
        "rl.max_staleness=1",
        "rl.reward_fn=tests.rl._rewards_fixtures:flaky_reward",
        "rl.reward_timeout_s=1.0",
        "train.steps=4",
    )
    out = run_distributed(_loop_bodies.run, 1, dirs["data"], run_dir, dirs["sft"], extra)[0]
    assert len(out["staleness"]) == 4 * 2 and max(out["staleness"]) <= 1
    assert out["reward_failures"] > 0  # raised or timed out, counted, and the run finished


def test_reward_model_tool_trains_and_scores(dirs, tmp_path):
    """Bradley-Terry training lowers its loss; the saved RM loads; the win-rate reward of the
    reference against itself is 0.5, and padding the same answer costs the length penalty."""
    if not os.path.exists(os.path.join(dirs["sft"], "checkpoints", "latest")):
        pytest.skip("needs the warm-up checkpoint of test_sync_run_logs_the_rl_scalars")
    out = run_distributed(_loop_bodies.reward_model, 1, dirs["data"], dirs["sft"], str(tmp_path))[0]
    losses = out["losses"]
    assert len(losses) == 12 and sum(losses[-4:]) / 4 < losses[0]
    same, padded = out["scores"]
    assert same == pytest.approx(0.5, abs=1e-6)
    assert padded < same - 0.05  # longer than the reference: penalised (and no better on the RM)


def test_e3rl_rollouts_train_and_log_erasure_metrics(dirs):
    run_dir = str(dirs["root"] / "e3rl")
    extra = (
        "rl.rollout=e3rl",
        "rl.e3rl.segment_len=5",
        "rl.e3rl.num_segments=2",
        "rl.e3rl.advantage_rule=attention",
        "rl.e3rl.threshold_std=0.0",  # erase whatever is above its group's mean: erasures happen
    )
    out = run_distributed(_loop_bodies.run, 1, dirs["data"], run_dir, dirs["sft"], extra)[0]
    assert [s for s, _ in out["tokens_sampled"]] == [0, 3] and out["tokens_sampled"][-1][1] > 0
    ea = _scalars(run_dir)
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "e3rl/erasures per rollout",
        "e3rl/tokens regenerated",
        "e3rl/prefix tokens not recomputed",
        "e3rl/accuracy with erasure",
        "e3rl/accuracy without erasure",
        "tokens sampled",
    ):
        assert tag in tags, (tag, sorted(tags))
    erasures = [e.value for e in ea.Scalars("e3rl/erasures per rollout")]
    assert sum(erasures) > 0
    with open(os.path.join(run_dir, "erasures.rank0.jsonl")) as f:  # erased text is logged, not trained
        logged = [json.loads(line) for line in f]
    assert logged and {"erased", "u", "theta", "kept_correct"} <= set(logged[0])

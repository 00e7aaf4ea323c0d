"""The RL stage end to end at toy size (supervised warm-up, then RL): it runs, logs its scalars to
TensorBoard, async mode never trains on rollouts staler than the cap, a reward that raises or hangs
marks its samples failed (counted) while the run goes on, and E3RL rollouts train and log their
erasures."""

from __future__ import annotations

import json
import os

import pytest

from megatron_step import platform
from megatron_step.config.run import RLRunConfig, load_run_config
from megatron_step.data.pipeline import run_tokenizer
from megatron_step.rl.reward_model import PreferenceReward, RewardModel
from megatron_step.stages.rl import train_rl
from megatron_step.testing import run_distributed
from megatron_step.testing.golden import compare, format_rows, read_run
from tools.train_reward_model import main as train_reward_model

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASE = [
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "train.steps=3",
    "train.micro_batch_size=4",
    "train.log_interval=1",
    "train.eval_interval=3",
    "rl.sft_steps=8",
    "rl.sft_global_batch_size=4",
    "rl.prompts_per_step=2",
    "rl.group_size=3",
    "rl.max_new_tokens=10",
    "rl.eval_problems=6",
]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, embedded_data, golden_run):
    """The data and the supervised warm-up checkpoint of the golden RL run (tests/golden/runs.py),
    which also serves test_sync_run_logs_the_rl_scalars."""
    work = golden_run("rl_sync")
    root = tmp_path_factory.mktemp("rl")
    return {
        "data": embedded_data,
        "sft": os.path.join(work, "rl_sft"),
        "sync": os.path.join(work, "rl_sync"),
        "root": root,
    }


def test_sync_run_logs_the_rl_scalars(dirs):
    """The golden sync run (posttrain/train_rl.py, 6 steps, eval at 0 and 6) logged the RL scalars."""
    curves = read_run(dirs["sync"])
    assert sorted(curves["rl/accuracy_heldout"]) == [0, 6]
    assert set(curves["staleness/max"].values()) == {0.0}  # sync: every group is from the current version
    tags = set(curves)
    for tag in (
        "rl/reward_mean",
        "rl/reward_std",
        "rl/accuracy_train",
        "rl/accuracy_heldout",
        "rl/response_length",
        "rl/entropy",
        "policy/loss",
        "policy/mismatch_kl",
        "policy/token_mask_rate",
        "policy/traj_mask_rate",
        "staleness/max",
        "rl/generation_tokens_per_sec",
        "train/tokens_per_sec",
        "train/grad_norm",
        "train/skipped_iterations",
        "rl/weight_sync_seconds",
        "rl/step_seconds",
        "routing/confidence_rollout",
        "routing/confidence_train",
        "routing/confidence_gap",
        "routing/confidence_train/layer_03",
    ):
        assert tag in tags, (tag, sorted(tags))
    # sync, routing replayed: the engine and the training forward measure the same weights on the
    # same tokens and experts (KV-cache decode vs one full forward: fp32 rounding only)
    gap = curves["routing/confidence_gap"].values()
    assert max(abs(v) for v in gap) < 1e-4, curves["routing/confidence_gap"]
    assert 0 < min(curves["routing/confidence_train"].values()) <= 1


@pytest.mark.slow  # make test-all; the cap: test_rollouts_beyond_max_staleness_are_dropped_and_counted
def test_async_with_a_flaky_reward_respects_the_staleness_cap(dirs):
    run_dir = str(dirs["root"] / "async")
    extra = (
        "rl.async_mode=true",
        "rl.max_staleness=1",
        "rl.reward_fn=tests.rl._rewards_fixtures:flaky_reward",
        "rl.reward_timeout_s=1.0",
        "train.steps=4",
    )
    out = run_distributed(run, 1, dirs["data"], run_dir, dirs["sft"], extra)[0]
    assert len(out["staleness"]) == 4 * 2 and max(out["staleness"]) <= 1
    assert out["reward_failures"] > 0  # raised or timed out, counted, and the run finished
    logged = read_run(run_dir, ["staleness/max"])["staleness/max"]
    assert max(logged.values()) == max(out["staleness"])  # the logged max is the max, not a mean


def test_a_slow_trainer_lets_the_generator_run_max_staleness_versions_ahead(dirs):
    """A trainer slowed by 2 s per update: the generator runs ahead until rollouts are trained k = 2
    versions after they were sampled, never more; nothing is dropped; the stale rollouts' PPO ratio
    (GRPO) starts away from 1, as their pi_old is the sampling version's."""
    run_dir = str(dirs["root"] / "async_ahead")
    extra = ("rl.async_mode=true", "rl.max_staleness=2", "rl.loss=grpo", "optim.lr=1e-3", "train.steps=5")
    extra += ("rl.reward_fn=tests.rl._rewards_fixtures:length_reward",)  # groups with a signal: weights move
    out = run_distributed(run_slowed, 1, dirs["data"], run_dir, dirs["sft"], extra, 2.0)[0]
    assert max(out["staleness"]) == 2, out["staleness"]
    curves = read_run(
        run_dir, ["staleness/max", "rl/dropped_groups", "policy/ppo_ratio_mean", "policy/staleness_kl"]
    )
    assert set(curves["rl/dropped_groups"].values()) == {0.0}
    stale = [s for s, v in curves["staleness/max"].items() if v > 0 and s >= 2]  # after the weights moved
    assert stale, curves["staleness/max"]
    for s in stale:
        assert abs(curves["policy/ppo_ratio_mean"][s] - 1.0) > 1e-5, curves["policy/ppo_ratio_mean"]
        assert curves["policy/staleness_kl"][s] != 0.0
    assert abs(curves["policy/ppo_ratio_mean"][1] - 1.0) < 1e-6  # step 1: sampled by the current weights


def test_rollouts_beyond_max_staleness_are_dropped_and_counted(dirs):
    """rl.max_ahead = 3 > rl.max_staleness = 1 with a slow trainer: the generator queues rollouts that
    go stale before their turn; the buffer drops and counts them and trains on nothing staler than 1."""
    run_dir = str(dirs["root"] / "async_drop")
    extra = ("rl.async_mode=true", "rl.max_staleness=1", "rl.max_ahead=3", "train.steps=4")
    out = run_distributed(run_slowed, 1, dirs["data"], run_dir, dirs["sft"], extra, 2.0)[0]
    assert max(out["staleness"]) <= 1, out["staleness"]
    dropped = read_run(run_dir, ["rl/dropped_groups"])["rl/dropped_groups"]
    assert dropped[max(dropped)] >= 2, dropped  # a whole batch (2 groups) at least


@pytest.mark.slow  # make test-all (two async runs, ~1 min); the default suite: slowed-trainer and drop tests
def test_exact_staleness_fixes_each_step_s_staleness_whatever_the_timing(dirs):
    """rl.exact_staleness: batch b is sampled with version b - 2, so the steps' staleness is 0, 1, 2, 2;
    a run with a slowed trainer gives the same numbers bit for bit (thread timing plays no part)."""
    extra = ("rl.async_mode=true", "rl.max_staleness=2", "rl.exact_staleness=true", "train.steps=4")
    extra += ("rl.reward_fn=tests.rl._rewards_fixtures:length_reward", "optim.lr=1e-3")
    keys = ["rl/reward_mean", "policy/loss", "policy/staleness_kl", "train/grad_norm", "rl/accuracy_heldout"]
    keys.append("routing/confidence_gap")
    curves = []
    for name, delay in (("exact", 0.0), ("exact_slowed", 1.5)):
        run_dir = str(dirs["root"] / name)
        out = run_distributed(run_slowed, 1, dirs["data"], run_dir, dirs["sft"], extra, delay)[0]
        assert out["staleness"] == [0, 0, 1, 1, 2, 2, 2, 2], out["staleness"]  # 2 groups per step
        curves.append(read_run(run_dir, keys))
    assert curves[0] == curves[1]
    assert curves[0]["policy/staleness_kl"][4] != 0.0  # the policy moved between sampling and training
    # Sigma_k: the replica's rollouts vs the trainer's forward agree at staleness 0 (step 1), not at 2
    gap = curves[0]["routing/confidence_gap"]
    assert abs(gap[1]) < 1e-4 and abs(gap[4]) > 10 * abs(gap[1]) and abs(gap[4]) > 1e-5, gap


@pytest.mark.slow  # make test-all; the default suite checks exact staleness in one process
def test_exact_staleness_under_two_dp_ranks_matches_one_process(dirs):
    """Async RL with rl.exact_staleness (k = 1) on two DP ranks -- a replica and a generation thread
    per rank, the step-global loss mean across them -- follows the 1-process run step for step."""
    extra = ("rl.async_mode=true", "rl.max_staleness=1", "rl.exact_staleness=true", "train.steps=4")
    extra += ("rl.reward_fn=tests.rl._rewards_fixtures:length_reward", "optim.lr=1e-3")
    keys = ["rl/reward_mean", "policy/loss", "policy/staleness_kl", "train/grad_norm", "rl/accuracy_heldout"]
    curves = {}
    for world in (1, 2):
        run_dir = str(dirs["root"] / f"exact_dp{world}")
        outs = run_distributed(run, world, dirs["data"], run_dir, dirs["sft"], extra)
        assert outs[0]["staleness"] == [0] * (2 // world) + [1] * (6 // world), outs[0]["staleness"]
        curves[world] = read_run(run_dir, keys)
    rows = compare(curves[1], curves[2], rtol=1e-4)
    assert rows and all(r.ok for r in rows), format_rows(rows, ("1 process", "DP2"), only_bad=True)
    assert curves[1]["policy/staleness_kl"][4] != 0.0


_TIMINGS = ("seconds", "per_sec", "_ms", "tokens_per_sec")


def _resumed_equals_straight(dirs, name: str, extra: tuple, steps: int, stop: int, world: int = 1):
    """`steps` RL steps straight vs `stop` steps (train.exit_after) + a resumed run to `steps`: every
    logged scalar but the timings, step for step (the resumed run directory holds both processes'
    events; TensorBoard keeps one value per step)."""
    straight, cut = str(dirs["root"] / f"{name}_straight"), str(dirs["root"] / f"{name}_cut")
    extra = (*extra, f"train.steps={steps}")
    run_distributed(run, world, dirs["data"], straight, dirs["sft"], extra)
    first = run_distributed(run, world, dirs["data"], cut, dirs["sft"], (*extra, f"train.exit_after={stop}"))[
        0
    ]
    assert [s for s, _ in first["reward"]] == list(range(1, stop + 1))  # it stopped there
    with pytest.raises(Exception, match="holds a run"):  # a rerun without resume is refused
        run_distributed(run, world, dirs["data"], cut, dirs["sft"], extra)
    second = run_distributed(run, world, dirs["data"], cut, dirs["sft"], (*extra, "train.resume=auto"))[0]
    assert [s for s, _ in second["reward"]] == list(range(stop + 1, steps + 1))  # it went on from there
    a, b = read_run(straight), read_run(cut)
    keys = sorted(k for k in a if not any(t in k for t in _TIMINGS))
    assert set(keys) <= set(b), sorted(set(keys) - set(b))
    differ = {k: (a[k], b[k]) for k in keys if a[k] != b[k]}
    assert not differ, differ
    return a


def test_a_resumed_actor_critic_run_equals_the_uninterrupted_one(dirs):
    """Sync RL with the critic (GAE): 3 steps straight vs 1 step, stop, resume to 3 -- the policy,
    its optimizer and schedule, the critic and its optimizer, the policy version, the prompt stream and
    the sampling counters come back, so every scalar is bit-identical (one process is deterministic)."""
    extra = ("rl.advantage=gae", "rl.critic.truncation=terminal", "optim.lr=1e-3", "rl.eval_problems=4")
    extra += ("rl.reward_fn=tests.rl._rewards_fixtures:length_reward",)  # groups with a signal: weights move
    curves = _resumed_equals_straight(dirs, "resume_gae", extra, steps=3, stop=1)
    assert sorted(curves["critic/value_loss"]) == [1, 2, 3]
    assert len(set(curves["policy/loss"].values())) > 1 and sorted(curves["rl/accuracy_heldout"]) == [0, 3]


def test_a_resumed_async_actor_critic_run_equals_the_uninterrupted_one(dirs):
    """Async RL at exact staleness 2 with the critic: 3 steps straight vs 1, stop, resume to 3. The
    checkpoint of step 1 holds the queue -- batches 1 and 2, both sampled with version 0 -- so the
    resumed run trains on the same stale rollouts (and their pi_old) as the uninterrupted one."""
    extra = ("rl.async_mode=true", "rl.max_staleness=2", "rl.exact_staleness=true", "rl.advantage=gae")
    extra += ("rl.critic.truncation=terminal", "optim.lr=1e-3", "rl.eval_problems=4")
    extra += ("rl.reward_fn=tests.rl._rewards_fixtures:length_reward",)
    curves = _resumed_equals_straight(dirs, "resume_async", extra, steps=3, stop=1)
    assert curves["staleness/max"] == {1: 0, 2: 1, 3: 2}, curves["staleness/max"]
    assert curves["policy/staleness_kl"][3] != 0.0  # step 3 trains on version 0's rollouts: stale


@pytest.mark.slow  # make test-all: 4 runs of 2 processes (~3 min)
def test_a_resumed_async_run_on_two_dp_ranks_equals_the_uninterrupted_one(dirs):
    """The async exact-staleness resume on two DP ranks: each rank saves and restores its own queue."""
    extra = ("rl.async_mode=true", "rl.max_staleness=1", "rl.exact_staleness=true", "optim.lr=1e-3")
    extra += ("rl.eval_problems=4", "rl.reward_fn=tests.rl._rewards_fixtures:length_reward")
    curves = _resumed_equals_straight(dirs, "resume_async_dp2", extra, steps=3, stop=1, world=2)
    assert curves["staleness/max"] == {1: 0, 2: 1, 3: 1}, curves["staleness/max"]


def test_reward_model_tool_trains_and_scores(dirs, tmp_path):
    """Bradley-Terry training lowers its loss; the saved RM loads; the win-rate reward of the
    reference against itself is 0.5, and padding the same answer costs the length penalty."""
    out = run_distributed(reward_model, 1, dirs["data"], dirs["sft"], str(tmp_path))[0]
    losses = out["losses"]
    assert len(losses) == 12 and sum(losses[-4:]) / 4 < losses[0]
    same, padded = out["scores"]
    assert same == pytest.approx(0.5, abs=1e-6)
    assert padded < same - 0.05  # longer than the reference: penalised (and no better on the RM)


@pytest.mark.slow  # make test-all; E3RL in the stage: the rl_e3rl golden run (tests/test_golden.py)
def test_e3rl_rollouts_train_and_log_erasure_metrics(dirs):
    run_dir = str(dirs["root"] / "e3rl")
    extra = (
        "rl.rollout=e3rl",
        "rl.e3rl.segment_len=5",
        "rl.e3rl.num_segments=2",
        "rl.e3rl.advantage_rule=attention",
        "rl.e3rl.threshold_std=0.0",  # erase whatever is above its group's mean: erasures happen
    )
    out = run_distributed(run, 1, dirs["data"], run_dir, dirs["sft"], extra)[0]
    assert [s for s, _ in out["tokens_sampled"]] == [0, 3] and out["tokens_sampled"][-1][1] > 0
    curves = read_run(run_dir)
    for tag in (
        "e3rl/erasures_per_rollout",
        "e3rl/tokens_regenerated",
        "e3rl/prefix_tokens_reused",
        "e3rl/accuracy_with_erasure",
        "e3rl/accuracy_without_erasure",
        "rl/tokens_sampled",
    ):
        assert tag in curves, (tag, sorted(curves))
    assert sum(curves["e3rl/erasures_per_rollout"].values()) > 0
    with open(os.path.join(run_dir, "erasures.rank0.jsonl")) as f:  # erased text is logged, not trained
        logged = [json.loads(line) for line in f]
    assert logged and {"erased", "u", "theta", "kept_correct"} <= set(logged[0])


# ---------------------------------------------------------------------------------------------------
# process bodies (module-level so they pickle into spawned ranks)
# ---------------------------------------------------------------------------------------------------
def run(rank, world_size, data_dir, run_dir, init_from, extra=()):
    overrides = [*BASE, f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", f"rl.init_from={init_from}"]
    cfg = load_run_config("examples/rl/rl_tiny.yaml", [*overrides, *extra], RLRunConfig)
    try:
        return train_rl(cfg)
    finally:
        platform.teardown()


def run_slowed(rank, world_size, data_dir, run_dir, init_from, extra, delay):
    """`run` with every policy update `delay` seconds slower (the generator thread keeps going)."""
    import time

    from megatron_step.rl.policy import PolicyUpdate

    update = PolicyUpdate.__call__

    def slowed(self, groups):
        time.sleep(delay)
        return update(self, groups)

    PolicyUpdate.__call__ = slowed
    return run(rank, world_size, data_dir, run_dir, init_from, extra)


def reward_model(rank, world_size, data_dir, init_from, out_dir):
    """tools/train_reward_model.py end to end (few steps), then the saved RM as a preference reward."""
    pairs, path = os.path.join(out_dir, "pairs.jsonl"), os.path.join(out_dir, "rm")
    res = train_reward_model(
        [
            "--config", "examples/rl/rl_tiny.yaml", "--pairs", pairs, "--out", path, "--steps", "12",
            "--n-pairs", "80", "--batch", "8",
            *BASE, f"data.data_dir={data_dir}", f"rl.init_from={init_from}",
        ]
    )  # fmt: skip
    cfg = load_run_config("examples/rl/rl_tiny.yaml", [*BASE, f"data.data_dir={data_dir}"], RLRunConfig)
    platform.setup(cfg.parallel, seed=1)
    pref = PreferenceReward(RewardModel.load(path), run_tokenizer(cfg.data), length_penalty=0.1)
    ref = "2 + 3 = 5. <answer>5</answer>"
    padded = "2 + 3 = 5. 5 = 5. 5 = 5. 5 = 5. <answer>5</answer>"
    scores = pref.score_batch([("Q: What is 2 + 3?\nA:", ref, ref), ("Q: What is 2 + 3?\nA:", padded, ref)])
    platform.teardown()
    return {"losses": res["losses"], "scores": scores, "n_ref": len(pref.tokenizer.encode(ref))}


def test_a_kl_term_to_the_reference_model_runs_in_the_stage(dirs):
    """rl.loss.kl_coef > 0: the stage builds the frozen reference from rl.init_from; the KL starts at 0
    (the policy is the reference) and grows as the policy moves."""
    run_dir = str(dirs["root"] / "kl")
    # a reward that separates the responses of a group, so the policy moves from the first step
    extra = ("rl.loss.kl_coef=0.1", "optim.lr=1e-3", "rl.reward_fn=tests.rl._rewards_fixtures:length_reward")
    run_distributed(run, 1, dirs["data"], run_dir, dirs["sft"], extra)
    kl = read_run(run_dir, ["policy/kl_ref"])["policy/kl_ref"]
    assert sorted(kl) == [1, 2, 3], kl
    assert kl[1] < 1e-6 and kl[3] > kl[1] and kl[3] > 1e-7, kl

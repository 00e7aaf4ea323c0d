"""tools/crash_drill.py: tiny pretraining, SFT, RL (sync EP=2 and async DP=2, with the critic) and MMRPT
(DP=2) runs killed (SIGKILL) at random points -- mid-step, mid-save, mid-commit, mid-rollout -- and
resumed each time end with the uninterrupted run's curve, and no kill costs a committed checkpoint."""

from __future__ import annotations

import os

import pytest

from tools.crash_drill import main

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(1800)  # several starts of the entry point (the default limit is 600 s)
@pytest.mark.slow  # make test-all: 5 starts of the entry point (~2 min); the pieces are tested by default
@pytest.mark.parametrize("nproc", [1, 2])  # 2: DP=2 through torchrun
def test_a_pretraining_run_killed_at_random_points_gives_the_uninterrupted_curve(
    nproc, embedded_data, tmp_path, capsys
):
    argv = ["--config", os.path.join(REPO, "examples/tiny/tiny.yaml"), "--kills", "3", "--seed", "2"]
    argv += ["--nproc", str(nproc)]
    argv += ["--out", str(tmp_path), f"data.data_dir={embedded_data}", "model.vocab_size=512"]
    argv += [
        "data.tokenizer_vocab_size=512",
        "train.steps=6",
        "train.eval_interval=3",
        "train.log_interval=1",
    ]
    rc = main(argv)
    out = capsys.readouterr().out
    print(out)  # the drill's table, in the report of a passing run too (pytest -rA)
    assert rc == 0, out
    assert "drilled vs reference: identical" in out and "drill passed" in out, out
    assert out.count(" killed ") >= 2, out  # the drill did kill (seed 2 draws faults within 6 steps)


_RL = [
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "train.micro_batch_size=4",
    "train.steps=4",
    "train.eval_interval=4",
    "rl.prompts_per_step=2",
    "rl.group_size=3",
    "rl.max_new_tokens=10",
    "rl.eval_problems=4",
    "rl.reward_workers=1",
    "rl.advantage=gae",
    "rl.critic.truncation=terminal",
    "rl.reward_fn=tests.rl._rewards_fixtures:length_reward",
    "optim.lr=1e-3",
]
_RL_MODES = {  # 2 processes each: EP=2 (sync RL runs every layout), DP=2 (async RL is DP-only)
    "sync_ep2": ["parallel.ep=2"],
    "async_exact_dp2": ["rl.async_mode=true", "rl.exact_staleness=true", "rl.max_staleness=1"],
}


@pytest.mark.timeout(1800)  # several starts of the entry point (the default limit is 600 s)
@pytest.mark.slow  # make test-all: 4 starts of 2 processes each (~4 min per mode)
@pytest.mark.parametrize("mode", sorted(_RL_MODES))
def test_an_rl_run_with_the_critic_killed_at_random_points_gives_the_uninterrupted_curve(
    mode, embedded_data, golden_run, tmp_path, capsys
):
    """Actor-critic RL from the golden warm-up checkpoint, killed mid-step / mid-save / mid-commit /
    mid-rollout and resumed: the policy, the critic, the sampler and (async) the rollout queue come
    back, so the curves equal the uninterrupted run's bit for bit."""
    sft = os.path.join(golden_run("rl_sync"), "rl_sft")
    # the seeds draw kills after a committed step, so a start resumes mid-run: sync rollout:4 (in the
    # 4th generation call) then step:3; async commit:3 (step 2's critic committed, its policy not)
    # then step:4
    seed = {"sync_ep2": 0, "async_exact_dp2": 5}[mode]
    argv = ["--entry", "rl", "--config", os.path.join(REPO, "examples/rl/rl_tiny.yaml"), "--kills", "2"]
    argv += ["--nproc", "2", "--seed", str(seed), "--out", str(tmp_path), f"data.data_dir={embedded_data}"]
    argv += [f"rl.init_from={sft}", *_RL, *_RL_MODES[mode]]
    rc = main(argv)
    out = capsys.readouterr().out
    print(out)  # the drill's table, in the report of a passing run too (pytest -rA)
    assert rc == 0, out
    assert "drilled vs reference: identical" in out and "drill passed" in out, out
    assert out.count(" killed ") == 2, out


@pytest.mark.timeout(1800)  # several starts of the entry point (the default limit is 600 s)
@pytest.mark.slow  # make test-all: 4 starts of 2 processes (~6 min)
def test_an_mmrpt_run_killed_at_random_points_gives_the_uninterrupted_curve(tmp_path, capsys):
    """MMRPT on 2 data-parallel ranks (the caption warm-up inside the first starts until it has its
    checkpoint), killed and resumed: the MMRPT curve equals the uninterrupted run's bit for bit."""
    argv = ["--entry", "mmrpt", "--config", os.path.join(REPO, "examples/mmrpt/mmrpt_tiny.yaml")]
    # seed 0 draws rollout:4 (step 3's generation; steps 1-2 committed) then step:3
    argv += ["--kills", "2", "--nproc", "2", "--seed", "0", "--out", str(tmp_path / "drill")]
    argv += [
        "mmrpt.scenes=32",
        "mmrpt.heldout_scenes=8",
        f"mmrpt.data_dir={tmp_path / 'data'}",
        "mmrpt.warmup_steps=3",
        "mmrpt.batch_size=4",
        "mmrpt.prompts_per_step=2",
        "mmrpt.group_size=4",
        "mmrpt.max_new_tokens=6",
        "mmrpt.eval_interval=0",
        "train.steps=4",
        "train.micro_batch_size=4",
    ]
    rc = main(argv)
    out = capsys.readouterr().out
    print(out)  # the drill's table, in the report of a passing run too (pytest -rA)
    assert rc == 0, out
    assert "drilled vs reference: identical" in out and "drill passed" in out, out
    assert out.count(" killed ") == 2, out


@pytest.mark.timeout(1800)  # several starts of the entry point (the default limit is 600 s)
@pytest.mark.slow  # make test-all: 4 starts of 2 processes (~3 min)
def test_an_sft_run_killed_at_random_points_gives_the_uninterrupted_curve(embedded_data, tmp_path, capsys):
    """SFT on the embedded chats, 2 data-parallel ranks, killed and resumed: identical curves."""
    argv = ["--entry", "sft", "--config", os.path.join(REPO, "examples/sft/sft_tiny.yaml"), "--kills", "2"]
    # seed 0 draws save:4 (step 4's shards written, nothing committed) then step:3 of the next start
    argv += ["--nproc", "2", "--seed", "0", "--out", str(tmp_path), f"data.data_dir={embedded_data}"]
    argv += [
        "model.vocab_size=512",
        "data.tokenizer_vocab_size=512",
        "train.steps=6",
        "train.eval_interval=3",
    ]
    argv += ["train.eval_steps=2", "train.log_interval=1", "sft.embedded_train=128", "sft.embedded_valid=16"]
    rc = main(argv)
    out = capsys.readouterr().out
    print(out)  # the drill's table, in the report of a passing run too (pytest -rA)
    assert rc == 0, out
    assert "drilled vs reference: identical" in out and "drill passed" in out, out
    assert out.count(" killed ") == 2, out

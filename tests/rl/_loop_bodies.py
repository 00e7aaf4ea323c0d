"""Process bodies for tests/rl/test_rl_loop.py (module-level so they pickle into spawned ranks)."""

from __future__ import annotations

from megatron_step.config.run import load_run_config

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


def run(rank, world_size, data_dir, run_dir, init_from, extra=()):
    from megatron_step import platform
    from megatron_step.rl.loop import train_rl

    cfg = load_run_config(
        "examples/rl/rl_tiny.yaml",
        [*BASE, f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", f"rl.init_from={init_from}", *extra],
    )
    try:
        out = train_rl(cfg)
    finally:
        platform.teardown()
    return out


def reward_model(rank, world_size, data_dir, init_from, out_dir):
    """tools/train_reward_model.py end to end (few steps), then the saved RM as a preference reward."""
    import os

    from tools.train_reward_model import main

    pairs, path = os.path.join(out_dir, "pairs.jsonl"), os.path.join(out_dir, "rm.pt")
    res = main(
        [
            "--config", "examples/rl/rl_tiny.yaml", "--pairs", pairs, "--out", path, "--steps", "12",
            "--n-pairs", "80", "--batch", "8",
            *BASE, f"data.data_dir={data_dir}", f"rl.init_from={init_from}",
        ]
    )  # fmt: skip
    from megatron_step import platform
    from megatron_step.config.run import load_run_config
    from megatron_step.rl.loop import tokenizer_for
    from megatron_step.rl.reward_model import PreferenceReward, RewardModel

    cfg = load_run_config("examples/rl/rl_tiny.yaml", [*BASE, f"data.data_dir={data_dir}"])
    platform.setup(cfg.parallel, seed=1)
    rm = RewardModel.load(path)
    pref = PreferenceReward(rm, tokenizer_for(cfg), length_penalty=0.1)
    ref = "2 + 3 = 5. <answer>5</answer>"
    padded = "2 + 3 = 5. 5 = 5. 5 = 5. 5 = 5. <answer>5</answer>"
    scores = pref.score_batch([("Q: What is 2 + 3?\nA:", ref, ref), ("Q: What is 2 + 3?\nA:", padded, ref)])
    platform.teardown()
    return {"losses": res["losses"], "scores": scores, "n_ref": len(pref.tokenizer.encode(ref))}

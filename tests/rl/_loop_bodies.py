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

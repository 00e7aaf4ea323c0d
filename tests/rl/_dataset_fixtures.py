"""The embedded task's reward as a module-level RewardFn, for tests/rl/test_dataset.py: a dataset
record routed here is scored exactly as the embedded arithmetic task scores its problems."""

from megatron_step.rl.rewards import default_reward

embedded_reward = default_reward(0.1)  # rl.reward_format_weight's default

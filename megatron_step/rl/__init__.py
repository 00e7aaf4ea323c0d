"""Off-policy RL post-training: tasks, rollout generation and buffering, policy losses."""

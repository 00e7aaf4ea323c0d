"""The training stages, each one function over its run config (megatron_step.config.run):
`pretrain` (text), `train_rl` (off-policy RL), `train_mmrpt` (MMRPT and its caption baseline).
They sit above every component and below the entry points; components never import them."""

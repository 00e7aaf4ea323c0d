"""Training: the pretraining loop, checkpoints, monitoring, layout dry-run."""

"""megatron-step: a Megatron-Core pretraining-to-RL stack for the Step 3.5 Flash recipe."""

__version__ = "0.1.0"

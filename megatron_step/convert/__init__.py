"""Checkpoint conversion between Megatron-Core and Hugging Face formats (work in progress)."""

"""Model definitions on Megatron-Core."""

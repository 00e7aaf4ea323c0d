"""Checkpoint file conversion between Megatron-Core dist-checkpoints and Hugging Face directories
(streamed safetensors I/O, `hf_checkpoint`); the key table and config translations it uses are the
model record's adapter, megatron_step.models.step_flash.hf."""

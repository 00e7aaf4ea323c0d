"""Step 3.5 Flash: config + presets, layer spec, model builder and its Hugging Face adapter (`hf`):
one record for the model."""

from megatron_step.models.step_flash.config import (
    PRESETS,
    StepFlashConfig,
    preset,
    small,
    step35_flash,
    tiny,
)
from megatron_step.models.step_flash.model import build_step_flash, freeze_norm_gains, transformer_config
from megatron_step.models.step_flash.spec import get_step_flash_layer_spec

__all__ = [
    "freeze_norm_gains",
    "PRESETS",
    "StepFlashConfig",
    "build_step_flash",
    "get_step_flash_layer_spec",
    "preset",
    "small",
    "step35_flash",
    "tiny",
    "transformer_config",
]

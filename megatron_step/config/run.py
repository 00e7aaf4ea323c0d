"""The composition root: a run's config is typed sections owned by their components, assembled here;
a YAML file names a model preset and sets sections, `key=value` overrides come from the command line.

    # examples/tiny/tiny.yaml
    model_preset: tiny
    model: {vocab_size: 2048}
    parallel: {tp: 1}
    train: {steps: 300, global_batch_size: 8}

    cfg = load_run_config("examples/tiny/tiny.yaml", ["train.steps=20", "optim.lr=1e-3"])   # PretrainConfig
    cfg = load_run_config("examples/rl/rl_tiny.yaml", ["rl.loss=grpo"], RLRunConfig)

Run types (each entry point loads its own; a section another stage owns is refused, so a typo'd
`rl:` in a pretraining YAML cannot pass silently):
    PretrainConfig  model, parallel, data, optim, train             pretrain/pretrain_step.py
    RLRunConfig     + rl (the SFT warm-up reads data)               posttrain/train_rl.py
    SFTRunConfig    + sft (chat conversations; data: the tokenizer)  posttrain/train_sft.py
    MMRPTRunConfig  model, parallel, optim, train, mmrpt            pretrain/pretrain_mmrpt.py
Sections: ParallelConfig (megatron_step.platform), DataConfig (data), OptimConfig (optim),
TrainConfig (training), RLConfig (rl), SFTConfig (data.sft), MMRPTConfig (mmrpt); the model is a preset of
megatron_step.models.step_flash plus `model:` field overrides. Nothing in the library imports this
module: components take their own sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from megatron_step.config.fields import build, coerce, field_types, set_path
from megatron_step.data.config import DataConfig
from megatron_step.data.sft import SFTConfig
from megatron_step.mmrpt.config import MMRPTConfig
from megatron_step.models.step_flash.config import StepFlashConfig, preset
from megatron_step.optim.config import OptimConfig
from megatron_step.platform.parallel import ParallelConfig
from megatron_step.rl.config import RLConfig
from megatron_step.training.config import TrainConfig


@dataclass
class RunConfig:
    """What every training stage shares: the model (a preset + field overrides), the parallel layout,
    the optimizer and the run's bookkeeping."""

    model_preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # StepFlashConfig field overrides
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        types_ = field_types(StepFlashConfig)
        unknown = [k for k in self.model if k not in types_]
        if unknown:
            raise ValueError(f"model.{unknown[0]}: StepFlashConfig has no field {unknown[0]!r}")
        self.model = {k: coerce(v, types_[k], f"model.{k}") for k, v in self.model.items()}
        self.model_config()  # the model's own checks, early

    def model_config(self) -> StepFlashConfig:
        return preset(self.model_preset).replace(**self.model)

    def validate(self, world_size: int) -> None:
        """Checks that need the world size: the layout and the layer split over the pipeline."""
        self.parallel.validate(world_size)
        m = self.model_config()
        self.parallel.validate_layers(m.num_layers, m.mtp_num_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PretrainConfig(RunConfig):
    """Text pretraining (megatron_step.stages.pretrain)."""

    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.train.mtp_init_from_first and self.model_config().mtp_num_layers < 2:
            raise ValueError(
                f"train.mtp_init_from_first=true: model.mtp_num_layers={self.model_config().mtp_num_layers}, "
                "needs >= 2 MTP modules (module 1 is copied into modules 2..K)"
            )

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        dp = self.parallel.dp(world_size)
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(
                f"train.global_batch_size({t.global_batch_size}) is not divisible by "
                f"micro_batch_size({t.micro_batch_size}) * dp({dp})"
            )


@dataclass
class RLRunConfig(PretrainConfig):
    """Off-policy RL (megatron_step.stages.rl); `data` is the tokenizer and the SFT warm-up's
    sequence length."""

    rl: RLConfig = field(default_factory=RLConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.train.init_from:
            raise ValueError(
                f"train.init_from={self.train.init_from!r}: RL runs start from rl.init_from (train.init_from "
                "is pretraining's)"
            )


@dataclass
class SFTRunConfig(PretrainConfig):
    """Supervised fine-tuning on chat conversations (megatron_step.stages.sft); `data` is the
    tokenizer and the sequence length, `train.init_from` the checkpoint it starts from."""

    sft: SFTConfig = field(default_factory=SFTConfig)

    def model_config(self) -> StepFlashConfig:
        """The model with `sft.mtp_loss_weight` on every MTP depth (when set and the model has MTP)."""
        m = super().model_config()
        w = self.sft.mtp_loss_weight
        return m.replace(mtp_loss_weights=[w] * m.mtp_num_layers) if w is not None and m.mtp_num_layers else m


@dataclass
class MMRPTRunConfig(RunConfig):
    """MMRPT and its caption-imitation baseline (megatron_step.stages.mmrpt)."""

    mmrpt: MMRPTConfig = field(default_factory=MMRPTConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.train.init_from or self.train.mtp_init_from_first:
            raise ValueError(
                "train.init_from / train.mtp_init_from_first: MMRPT runs start from mmrpt.init_from "
                "(these fields are pretraining's)"
            )


# where a section belongs, for the error a misplaced one gets
_OWNERS = {
    "data": "pretraining and RL runs",
    "rl": "RL runs (posttrain/train_rl.py, RLRunConfig)",
    "sft": "SFT runs (posttrain/train_sft.py, SFTRunConfig)",
    "mmrpt": "MMRPT runs (pretrain/pretrain_mmrpt.py, MMRPTRunConfig)",
}


def _read_yaml(path: str | None) -> dict[str, Any]:
    """The mapping a run YAML holds ({} without a file)."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file (the run YAMLs live under examples/)")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def _check_top_level(cls, key: str, source: str) -> None:
    if key in field_types(cls):
        return
    owner = f"; {key}: belongs to {_OWNERS[key]}" if key in _OWNERS else ""
    raise ValueError(
        f"{source}: {key!r} is not a section of {cls.__name__} "
        f"(sections: {', '.join(field_types(cls))}){owner}"
    )


def load_run_config(path: str | None = None, overrides: list[str] | None = None, cls=PretrainConfig):
    """A `cls` run config from the YAML file at `path` (optional) and `section.field=value`
    overrides; ValueError names the field, the value and what is wrong."""
    raw = _read_yaml(path)
    for key in raw:
        _check_top_level(cls, key, path)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. train.steps=20")
        key, value = item.split("=", 1)
        key = key.strip()
        _check_top_level(cls, key.split(".")[0], f"override {key}")
        set_path(raw, cls, key, value)
    return build(cls, raw)


def load_model_config(path: str | None = None, overrides: list[str] | None = None) -> StepFlashConfig:
    """The model of any run YAML (`model_preset` + `model:`) and `model.*` / `model_preset` overrides;
    the file's other sections (which belong to its run) are not read. For tools that need the model
    only (checkpoint conversion)."""
    raw = _read_yaml(path)
    raw = {k: v for k, v in raw.items() if k in ("model_preset", "model")}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. model.vocab_size=512")
        key, value = item.split("=", 1)
        if key.strip().split(".")[0] not in ("model_preset", "model"):
            raise ValueError(f"override {key}: only model.* and model_preset set the model here")
        set_path(raw, RunConfig, key.strip(), value)
    return build(RunConfig, raw).model_config()


def cli_run_config(description: str, argv=None, cls=PretrainConfig, extra_args=None):
    """An entry point's command line: `--config FILE` and `section.field=value` overrides (plus what
    `extra_args(parser)` adds). Returns (config, parsed args). A bad config exits with
    `config error: ...` (the field, the value, what is wrong) instead of a traceback."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help=f"run YAML ({cls.__name__}: {', '.join(field_types(cls))})")
    if extra_args is not None:
        extra_args(ap)
    ap.add_argument("overrides", nargs="*", help="section.field=value")
    args = ap.parse_args(argv)
    try:
        return load_run_config(args.config, args.overrides, cls), args
    except ValueError as e:
        sys.exit(f"config error: {e}")


__all__ = [
    "MMRPTRunConfig",
    "PretrainConfig",
    "RLRunConfig",
    "RunConfig",
    "SFTRunConfig",
    "cli_run_config",
    "load_model_config",
    "load_run_config",
]

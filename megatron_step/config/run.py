"""A training run's config: typed sections, a YAML file naming a model preset, `key=value`
overrides from the command line.

    # examples/tiny/tiny.yaml
    model_preset: tiny
    model: {vocab_size: 2048}
    parallel: {tp: 1}
    train: {steps: 300, global_batch_size: 8}

    cfg = load_run_config("examples/tiny/tiny.yaml", ["train.steps=20", "optim.lr=1e-3"])
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from megatron_step.config.mmrpt import MMRPTConfig
from megatron_step.config.rl import RLConfig
from megatron_step.models.step_flash.config import StepFlashConfig, preset
from megatron_step.platform.parallel import ParallelConfig


@dataclass
class DataConfig:
    # "embedded": the corpus built from this machine's Python standard library (no download);
    # otherwise Megatron indexed-dataset prefixes in `data_path` ("weight prefix weight prefix ...").
    corpus: str = "embedded"
    data_path: list[str] = field(default_factory=list)
    tokenizer_model: str | None = None  # sentencepiece .model; None: train one for "embedded"
    tokenizer_vocab_size: int = 2048  # when the embedded tokenizer is trained
    split: str = "98,2,0"  # train, valid, test shares of each prefix
    seq_length: int = 128
    data_dir: str = "runs/data"  # where the embedded corpus, tokenizer and .bin/.idx are cached

    def __post_init__(self):
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length={self.seq_length}: must be >= 2")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ValueError(f"data.split={self.split!r}: expected three numbers 'train,valid,test'")
        if self.corpus != "embedded" and not self.data_path:
            raise ValueError(f"data.corpus={self.corpus!r} needs data.data_path (indexed-dataset prefixes)")


@dataclass
class OptimConfig:
    # adam (AdamW via weight_decay) | sgd | muon (Megatron-Core's) | macro (megatron_step.optim)
    optimizer: str = "adam"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1  # AdamW parameters; a no-op on MACRO's matrices (see optim/macro.py)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_schedule: str = "cosine"  # cosine | WSD | linear | constant (Megatron-Core's names)
    warmup_steps: int = 20
    wsd_decay_steps: int | None = None  # WSD: length of the final decay
    # adam/sgd: ZeRO-1 DistributedOptimizer. muon/macro: LayerWiseDistributedOptimizer (whole
    # matrices per DP rank) + DistributedOptimizer for the AdamW parameters. False: replicated.
    use_distributed_optimizer: bool = True
    # muon/macro: AdamW parameters (embeddings, output layer, norms, biases, routers) run at
    # scalar_lr / scalar_min_lr (None: lr / min_lr)
    scalar_lr: float | None = None
    scalar_min_lr: float | None = None
    # muon/macro matrix step (defaults: Muon practice; the MACRO paper's constants are not public)
    matrix_momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: str = "quintic"  # emerging_optimizers' Newton-Schulz coefficient sets
    # macro only
    manifold: str = "frobenius"  # frobenius | spectral | oblique
    radius_mode: str = "init"  # init (R from the initial weights) | fixed (R = radius) | mup
    radius: float = 1.0
    oblique_dim: int = 1  # oblique: 1 fixes row norms, 0 column norms
    power_iters: int = 2  # spectral: power iterations per step (warm-started)
    scale_mode: str = "spectral"  # spectral: 0.2*sqrt(max(out,in)) (AdamW-like RMS) | shape | none
    tp_mode: str = "duplicated"  # duplicated (= TP=1 result) | blockwise (each TP shard its own manifold)
    routers_to_adam: bool = True
    # The paper's claim that the constraint makes RMSNorm gains unnecessary: keep every norm gain
    # at its initial value (requires_grad False). Pair with weight_decay=0 for the wd claim.
    freeze_norm_gains: bool = False

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd", "muon", "macro"):
            raise ValueError(f"optim.optimizer={self.optimizer!r}: one of adam, sgd, muon, macro")
        if self.lr_schedule not in ("cosine", "WSD", "linear", "constant"):
            raise ValueError(f"optim.lr_schedule={self.lr_schedule!r}: one of cosine, WSD, linear, constant")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0"
            )
        if self.lr_schedule == "WSD" and not self.wsd_decay_steps:
            raise ValueError("optim.lr_schedule=WSD needs optim.wsd_decay_steps > 0")
        if self.scalar_lr is not None and self.scalar_min_lr is None:
            self.scalar_min_lr = self.min_lr * self.scalar_lr / self.lr
        for name, allowed in (
            ("manifold", ("frobenius", "spectral", "oblique")),
            ("radius_mode", ("init", "fixed", "mup")),
            ("scale_mode", ("spectral", "shape", "none")),
            ("tp_mode", ("duplicated", "blockwise")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"optim.{name}={getattr(self, name)!r}: one of {', '.join(allowed)}")
        if not 0.0 <= self.matrix_momentum < 1.0:
            raise ValueError(f"optim.matrix_momentum={self.matrix_momentum}: must be in [0, 1)")


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_steps: int = 4
    save_interval: int = 100
    run_dir: str = "runs/tiny"
    resume: bool = False  # continue from <run_dir>/checkpoints/latest when it exists
    # Stop (after saving) once this step is reached, as a preempted job would; the schedule still
    # spans `steps`, so a later `resume` run continues the same curve. None: run to `steps`.
    exit_after: int | None = None
    # MFU denominator: peak dense TFLOP/s of one device (989 for H100/H800 bf16; measure on CPU)
    peak_tflops: float = 989.0

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 1")


@dataclass
class RunConfig:
    model_preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # StepFlashConfig field overrides
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # posttrain/train_rl.py only
    mmrpt: MMRPTConfig = field(default_factory=MMRPTConfig)  # pretrain/pretrain_mmrpt.py only

    def model_config(self) -> StepFlashConfig:
        base = preset(self.model_preset)
        unknown = set(self.model) - {f.name for f in dataclasses.fields(StepFlashConfig)}
        if unknown:
            raise ValueError(f"model.{sorted(unknown)[0]}: not a StepFlashConfig field")
        return base.replace(**self.model)

    def validate(self, world_size: int) -> None:
        """Checks that need the world size: layout, batch divisibility."""
        self.parallel.validate(world_size)
        m = self.model_config()
        self.parallel.validate_layers(m.num_layers, m.mtp_num_layers)
        dp = self.parallel.dp(world_size)
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(
                f"train.global_batch_size({t.global_batch_size}) is not divisible by "
                f"micro_batch_size({t.micro_batch_size}) * dp({dp})"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "rl": RLConfig,
    "mmrpt": MMRPTConfig,
}


def _coerce(value: str, annotation) -> Any:
    """Parse a CLI string for a field of the given (string) annotation using YAML scalars."""
    parsed = yaml.safe_load(value)
    if "float" in str(annotation) and isinstance(parsed, int) and not isinstance(parsed, bool):
        return float(parsed)
    if "float" in str(annotation) and isinstance(parsed, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(parsed)
        except ValueError:
            pass
    return parsed


def load_run_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. train.steps=20")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] in _SECTIONS and len(parts) == 3:  # a nested section, e.g. rl.e3rl.segment_len
            sub = typing.get_type_hints(_SECTIONS[parts[0]]).get(parts[1])
            if sub is None or not dataclasses.is_dataclass(sub):
                raise ValueError(f"override {key}: {parts[0]}.{parts[1]} is not a nested section")
            hints = {f.name: f.type for f in dataclasses.fields(sub)}
            if parts[2] not in hints:
                raise ValueError(f"override {key}: {sub.__name__} has no field {parts[2]!r}")
            section = raw.setdefault(parts[0], {})
            if not isinstance(section.get(parts[1], {}), dict):  # `loss: grpo` then rl.loss.clip_eps=...
                section[parts[1]] = {dataclasses.fields(sub)[0].name: section[parts[1]]}
            section.setdefault(parts[1], {})[parts[2]] = _coerce(value, hints[parts[2]])
        elif parts[0] in _SECTIONS and len(parts) == 2:
            cls = _SECTIONS[parts[0]]
            hints = {f.name: f.type for f in dataclasses.fields(cls)}
            if parts[1] not in hints:
                raise ValueError(f"override {key}: {cls.__name__} has no field {parts[1]!r}")
            section = raw.setdefault(parts[0], {})
            sub = typing.get_type_hints(cls).get(parts[1])
            if dataclasses.is_dataclass(sub) and isinstance(section.get(parts[1]), dict):
                # a scalar for a nested section sets its first field, keeping the YAML's other fields
                first = dataclasses.fields(sub)[0]
                section[parts[1]][first.name] = _coerce(value, first.type)
            else:
                section[parts[1]] = _coerce(value, hints[parts[1]])
        elif parts[0] == "model" and len(parts) == 2:
            hints = {f.name: f.type for f in dataclasses.fields(StepFlashConfig)}
            if parts[1] not in hints:
                raise ValueError(f"override {key}: StepFlashConfig has no field {parts[1]!r}")
            raw.setdefault("model", {})[parts[1]] = _coerce(value, hints[parts[1]])
        elif parts == ["model_preset"]:
            raw["model_preset"] = value
        else:
            raise ValueError(f"override {key}: unknown key (sections: model, {', '.join(_SECTIONS)})")
    unknown = set(raw) - {"model_preset", "model", *_SECTIONS}
    if unknown:
        raise ValueError(f"{path or 'config'}: unknown top-level key {sorted(unknown)[0]!r}")
    kwargs: dict[str, Any] = {
        "model_preset": raw.get("model_preset", "tiny"),
        "model": raw.get("model") or {},
    }
    for name, cls in _SECTIONS.items():
        section = raw.get(name) or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = set(section) - fields
        if bad:
            raise ValueError(f"{name}.{sorted(bad)[0]}: unknown field of {cls.__name__}")
        kwargs[name] = cls(**section)
    cfg = RunConfig(**kwargs)
    cfg.model_config()  # validates model overrides early
    return cfg


def cli_run_config(description: str, argv=None, config_help: str = "run YAML (model_preset + sections)"):
    """An entry point's command line: `--config FILE` and `section.field=value` overrides. A bad
    config exits with `config error: ...` (the field, the value, what is wrong) instead of a traceback."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help=config_help)
    ap.add_argument("overrides", nargs="*", help="section.field=value")
    args = ap.parse_args(argv)
    try:
        return load_run_config(args.config, args.overrides)
    except ValueError as e:
        sys.exit(f"config error: {e}")


__all__ = ["DataConfig", "OptimConfig", "RunConfig", "TrainConfig", "cli_run_config", "load_run_config"]

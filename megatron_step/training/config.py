"""The `train:` section: steps, batch sizes, seed, logging / evaluation / checkpoint intervals, the
run directory and resume (every training stage reads it)."""

from __future__ import annotations

from dataclasses import dataclass


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
    # Pretraining only (RL and MMRPT start from rl.init_from / mmrpt.init_from): start a new phase from
    # the model weights of this run directory's latest checkpoint -- its own optimizer, schedule and
    # step 0. A run with a checkpoint of its own and `resume` continues that instead.
    init_from: str | None = None
    # With init_from: copy MTP module 1's weights into modules 2..K after loading -- the report's MTP
    # staging (MTP-1 trained alone, then MTP-2/3 initialised from it and trained jointly with
    # position-dependent `model.mtp_loss_weights`; docs/design.md, "MTP during training").
    mtp_init_from_first: bool = False
    # MFU denominator: peak dense TFLOP/s of one device (989 for H100/H800 bf16; measure on CPU)
    peak_tflops: float = 989.0

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 1")
        for name in ("eval_interval", "eval_steps", "save_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 0 (0: off)")
        if self.mtp_init_from_first and not self.init_from:
            raise ValueError(
                "train.mtp_init_from_first=true needs train.init_from (the run whose MTP-1 it copies)"
            )
        if self.exit_after is not None and self.exit_after < 1:
            raise ValueError(
                f"train.exit_after={self.exit_after}: must be >= 1 (or null: run to train.steps)"
            )


__all__ = ["TrainConfig"]

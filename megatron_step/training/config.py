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
    # What a run does with a checkpoint already in <run_dir> (megatron_step.training.checkpoint
    # `resume_step`): "never" (default) refuses to start over it unless `overwrite`; "auto" continues
    # from its newest complete checkpoint, or starts when there is none; "required" continues, and
    # fails when there is none. true / false are read as "auto" / "never".
    resume: str | bool = "never"
    # With resume=never: start the run over, deleting <run_dir>'s checkpoints, critic checkpoints and
    # TensorBoard events (a rerun into an existing run directory is refused without it)
    overwrite: bool = False
    # Keep the newest N complete checkpoints of <run_dir> (older ones are deleted after a save);
    # 0 keeps every one
    keep_last: int = 0
    # A checkpoint that fails verification against its manifest (a file missing, truncated or changed)
    # is reported and the next older one loaded; false: stop instead
    checkpoint_fallback: bool = True
    # How a checkpoint is verified before it is loaded: "crc32" (sizes and CRC-32s: one read of every
    # file, on rank 0) or "size" (sizes only: for checkpoints too large to read twice)
    checkpoint_verify: str = "crc32"
    # Stop (after saving) once this step is reached, as a preempted job would; the schedule still
    # spans `steps`, so a later `resume` run continues the same curve. None: run to `steps`.
    exit_after: int | None = None
    # An optimizer step whose gradients hold inf/nan is skipped (training/step.py); this many skipped
    # steps in a row stop the run (0: never stop)
    max_skipped_steps: int = 3
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
        modes = ("never", "auto", "required")
        if isinstance(self.resume, bool):
            self.resume = "auto" if self.resume else "never"
        if self.resume not in modes:
            raise ValueError(
                f"train.resume={self.resume!r}: one of {', '.join(modes)} (true means auto, false never)"
            )
        if self.checkpoint_verify not in ("crc32", "size"):
            raise ValueError(f"train.checkpoint_verify={self.checkpoint_verify!r}: one of crc32, size")
        if self.keep_last < 0:
            raise ValueError(f"train.keep_last={self.keep_last}: must be >= 0 (0: keep every checkpoint)")
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 1")
        for name in ("eval_interval", "eval_steps", "save_interval", "max_skipped_steps"):
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

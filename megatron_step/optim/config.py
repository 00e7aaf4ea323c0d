"""The `optim:` section: optimizer, LR schedule, clipping, and the Muon/MACRO matrix-step knobs
(megatron_step.optim.factory builds from it; the schedule is built by megatron_step.training)."""

from __future__ import annotations

from dataclasses import dataclass


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


__all__ = ["OptimConfig"]

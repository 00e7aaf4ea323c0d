"""The `mmrpt:` section of a run config (pretrain/pretrain_mmrpt.py): data, the vision tower, the caption
warm-up, visual dependency D(s) and masking, reconstruction rollouts and the semantic-visual reward.
The model (`model_preset`, `model:`), optimizer (`optim:`) and bookkeeping (`train:` steps, seed,
run_dir, micro_batch_size, log/eval intervals) come from the shared sections.

The MMRPT paper (docs/design.md §5.5) gives D(s) (attention mass on visual tokens over total, averaged over a
sentence's tokens and a set of upper-middle layers), masking above an adaptive threshold, a
semantic-visual reward (exact/prefix match + format) and a GRPO-style update. It does not publish the
layer set, the threshold rule or the reward weights: those are fields here, defaults ours (reasons
inline), sized for the tiny preset on generated scenes on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_step.models.vlm import VisionConfig
from megatron_step.rl.losses import PolicyLossConfig


@dataclass
class MMRPTConfig:
    # --- data ----------------------------------------------------------------------------------------
    # webdataset shards (a glob or brace pattern); None: generate `scenes` scenes under data_dir
    shards: str | None = None
    heldout_shards: str | None = None  # None: generate `heldout_scenes` with a different seed
    scenes: int = 4000
    heldout_scenes: int = 128
    scene_image_size: int = 64  # generated JPEG side; the pipeline resizes to vision.image_size
    data_seed: int = 0
    data_dir: str = "runs/mmrpt_data"
    reader: str = "auto"  # auto (DALI when importable) | dali | webdataset
    tokenizer_vocab_size: int = 384  # scene captions use ~60 words: a small vocabulary suffices
    vision: VisionConfig = field(default_factory=VisionConfig)
    # --- caption warm-up (when init_from has no checkpoint) --------------------------------------------
    init_from: str | None = None  # run dir with the warm-up checkpoint; None: <run_dir>/warmup
    warmup_steps: int = 300
    warmup_lr: float = 3e-3
    batch_size: int = 16  # captions per warm-up / imitation step
    # share of warm-up (and imitation) samples in the fill-in format with one random sentence masked;
    # ours: without it the reconstruction format would be new to the policy at the start of RL
    fill_in_fraction: float = 0.5
    # --- the phase after warm-up ----------------------------------------------------------------------
    objective: str = "rl"  # rl (MMRPT) | caption (the imitation baseline: next-token loss, same data)
    # --- visual dependency D(s) and masking -------------------------------------------------------------
    # decoder layers (0-based) whose attention defines D(s); None: the full-attention layers in the
    # upper-middle half [L/4, 3L/4). Ours: sliding-window layers cannot see the image from most caption
    # tokens (their window is shorter than the caption), so they would only dilute D
    dependency_layers: list[int] | None = None
    # adaptive threshold: the `mask_quantile` quantile of D over the step's sentences; in each caption the
    # sentence with the highest D is masked when it reaches the threshold (captions with none are left
    # out of the step). Ours: a per-batch quantile follows D's scale as the model trains
    mask_quantile: float = 0.5
    # --- reconstruction rollouts ------------------------------------------------------------------------
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 24
    temperature: float = 1.0
    response_format: str = (
        "answer"  # answer: "<answer>s</answer>" | think: "<think>..</think><answer>s</answer>"
    )
    # --- semantic-visual reward (ours: the attribute term dominates exact match, which is rare early) ---
    reward_exact: float = 1.0  # normalised exact match of the masked sentence
    reward_prefix: float = 0.5  # share of the masked sentence's words reproduced as a prefix
    reward_attribute: float = 1.0  # share of the sentence's stated attributes (generated scenes only)
    reward_format: float = 0.2  # the answer closed by </answer> (and think/answer tags in "think")
    loss: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig(kind="grpo"))
    # --- evaluation -------------------------------------------------------------------------------------
    eval_interval: int = 20

    def __post_init__(self):
        for name in ("scenes", "heldout_scenes", "batch_size", "prompts_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"mmrpt.{name}={getattr(self, name)}: must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"mmrpt.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.group_size < 2:
            raise ValueError(f"mmrpt.group_size={self.group_size}: GRPO needs >= 2 rollouts per prompt")
        if self.max_new_tokens < 2:
            raise ValueError(f"mmrpt.max_new_tokens={self.max_new_tokens}: must be >= 2")
        if self.reader not in ("auto", "dali", "webdataset"):
            raise ValueError(f"mmrpt.reader={self.reader!r}: one of auto, dali, webdataset")
        if self.objective not in ("rl", "caption"):
            raise ValueError(
                f"mmrpt.objective={self.objective!r}: rl (MMRPT) or caption (imitation baseline)"
            )
        if self.response_format not in ("answer", "think"):
            raise ValueError(f"mmrpt.response_format={self.response_format!r}: answer or think")
        if not 0.0 <= self.mask_quantile <= 1.0:
            raise ValueError(f"mmrpt.mask_quantile={self.mask_quantile}: must be in [0, 1]")
        if not 0.0 <= self.fill_in_fraction <= 1.0:
            raise ValueError(f"mmrpt.fill_in_fraction={self.fill_in_fraction}: must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"mmrpt.temperature={self.temperature}: must be > 0")
        if self.scene_image_size < 32:
            raise ValueError(f"mmrpt.scene_image_size={self.scene_image_size}: must be >= 32")


__all__ = ["MMRPTConfig"]

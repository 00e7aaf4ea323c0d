"""The image-text model MMRPT trains (models/vlm.py: CLIP ViT + projector + the Step GPTModel), its
optimizer and schedule, and the caption (next-token) step of the warm-up and the imitation baseline.

    model = vlm_model_config(cfg.model_config(), tokenizer)
    chunks, optimizer, scheduler = build_vlm(model, cfg.mmrpt.vision, cfg.parallel, optim, steps, image_id)
    metrics = caption_step(chunks, optimizer, scheduler, codec, samples, rng, fill_in=0.5, mbs=16)
"""

from __future__ import annotations

import dataclasses
import random

from megatron_step.data.tokenizer import StepTokenizer
from megatron_step.mmrpt.data import Sample, caption_sequences, images_of, lm_batch
from megatron_step.mmrpt.text import CaptionCodec
from megatron_step.models.step_flash import StepFlashConfig
from megatron_step.models.vlm import VisionConfig, build_step_vlm
from megatron_step.optim.config import OptimConfig
from megatron_step.platform import ParallelConfig, to_device
from megatron_step.training.setup import build_model_and_optimizer
from megatron_step.training.step import train_step

__all__ = ["build_vlm", "caption_step", "stage_optim", "vlm_model_config"]


def vlm_model_config(lm: StepFlashConfig, tok: StepTokenizer) -> StepFlashConfig:
    """The language model inside the image-text model: the caption tokenizer's vocabulary, MoE routing
    recorded/replayed, MTP off (models/vlm.py)."""
    return lm.replace(
        vocab_size=tok.padded_vocab_size(),
        routing_replay=bool(lm.num_experts),
        mtp_num_layers=0,
        mtp_loss_weights=[],
    )


def stage_optim(o: OptimConfig, lr: float, min_lr: float, steps: int, **changes) -> OptimConfig:
    """`o` with a stage's LR range, its LR warm-up cut to fit `steps`, and other `changes`."""
    return dataclasses.replace(
        o, lr=lr, min_lr=min_lr, warmup_steps=min(o.warmup_steps, max(steps - 1, 0)), **changes
    )


def build_vlm(
    model: StepFlashConfig,
    vision: VisionConfig,
    parallel: ParallelConfig,
    o: OptimConfig,
    steps: int,
    image_id: int,
):
    """(chunks, optimizer, scheduler) of the image-text model over `steps` (at least 1) optimizer steps."""

    def build(vp_stage):
        return build_step_vlm(model, vision, parallel, image_id)

    return build_model_and_optimizer(model, parallel, o, max(steps, 1), build)


def caption_step(
    chunks,
    optimizer,
    scheduler,
    codec: CaptionCodec,
    samples: list[Sample],
    rng: random.Random,
    fill_in: float,
    mbs: int,
    guard=None,
) -> dict:
    """One optimizer step of next-token loss on `samples` in the warm-up's mixture of formats
    (`guard`: training.step.SkipGuard, counts and limits steps skipped for inf/nan gradients)."""
    seqs = caption_sequences(codec, samples, rng, fill_in)
    batch = lm_batch(seqs, images_of(samples), codec.visual[1], codec.tok.pad)
    n = batch["tokens"].shape[0]
    micro = [to_device({k: v[i : i + mbs] for k, v in batch.items()}) for i in range(0, n, mbs)]
    result = train_step(
        chunks, optimizer, scheduler, micro, seq_length=batch["tokens"].shape[1], micro_batch_size=mbs,
        guard=guard,
    )  # fmt: skip
    out = {"train/lm_loss": result.mean("lm_loss"), "train/grad_norm": float(result.grad_norm or 0.0)}
    if guard is not None:
        out["train/skipped_iterations"] = float(guard.total)
    return out

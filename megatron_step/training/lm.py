"""Next-token training on token datasets: the data order, one optimizer step with its metrics, and
validation. Text pretraining runs it (megatron_step.stages.pretrain), and so does the RL stage's
supervised warm-up.

    lm = LMTrainer(chunks, optimizer, scheduler, model_cfg, cfg.train, seq_length=128, world_size=1)
    metrics = lm.step(train_ds, step)        # {"train/lm_loss": ..., "train/grad_norm": ..., ...}
    val = lm.evaluate(valid_ds)              # mean validation loss

Data order is a pure function of (seed, step): step s, data-parallel rank r and microbatch m read
global samples s*GBS + r*GBS/dp + m*MBS ..., so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_step.models.param_count import step_flash_flops_per_token
from megatron_step.models.step_flash import StepFlashConfig
from megatron_step.training.config import TrainConfig
from megatron_step.training.step import (
    SkipGuard,
    dp_mean,
    forward_backward,
    from_last_stage,
    moe_routers,
    train_step,
)

__all__ = ["LMTrainer", "collate", "expert_load_scalars", "microbatches"]


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def microbatches(dataset, step: int, gbs: int, mbs: int, dp: int, dp_rank: int) -> list[dict]:
    """This rank's microbatches of global batch `step` (see the module docstring)."""
    per_rank = gbs // dp
    base = step * gbs + dp_rank * per_rank
    n = len(dataset)
    return [collate([dataset[(base + m * mbs + j) % n] for j in range(mbs)]) for m in range(per_rank // mbs)]


def expert_load_scalars(chunks, topk: int) -> dict[str, float]:
    """Per MoE layer: the most and least loaded expert relative to a uniform split, and the dropped
    tokens. Reads the routers' token counts, so it must run before finalize_model_grads (whose
    expert-bias update resets them); all data-parallel ranks call it (an all-reduce)."""
    out, dropped = {}, 0.0
    group = ps.get_data_parallel_group(with_context_parallel=True)
    for r in moe_routers(chunks):
        counts = r.local_tokens_per_expert.detach().float().clone()
        dist.all_reduce(counts, group=group)
        total = counts.sum()
        if total <= 0:
            continue
        mean = total / counts.numel()
        out[f"moe/load_max/layer_{r.layer_number:02d}"] = (counts.max() / mean).item()
        out[f"moe/load_min/layer_{r.layer_number:02d}"] = (counts.min() / mean).item()
        # tokens routed = tokens * topk when nothing is dropped (no capacity factor is set)
        tokens = total / topk
        dropped += (tokens * topk - total).item()
    out["moe/dropped_tokens"] = dropped
    return out


class LMTrainer:
    """The next-token step and validation of one run (its chunks, optimizer and schedule)."""

    def __init__(
        self, chunks, optimizer, scheduler, model: StepFlashConfig, train: TrainConfig, seq_length: int,
        world_size: int,
    ):  # fmt: skip
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.model, self.t, self.seq, self.world_size = model, train, seq_length, world_size
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        # 3 x forward FLOPs (forward + backward) per token x tokens per step
        self.flops_per_step = (
            3 * step_flash_flops_per_token(model, seq_length) * train.global_batch_size * seq_length
        )
        self.guard = SkipGuard(train.max_skipped_steps, "pretraining")  # inf/nan steps skipped

    def _batches(self, dataset, step: int) -> list[dict]:
        t = self.t
        return microbatches(dataset, step, t.global_batch_size, t.micro_batch_size, self.dp, self.dp_rank)

    def step(self, dataset, step: int) -> dict[str, float]:
        """Optimizer step `step` (0-based) on global batch `step`; the step's metrics, the same on
                every rank. A step with inf/nan gradients is skipped (train/skipped_iterations counts them);
        train.max_skipped_steps of them in a row raise FloatingPointError."""
        t, t0 = self.t, time.perf_counter()
        mb = self._batches(dataset, step)
        with_load = (step + 1) % t.log_interval == 0
        observe = (lambda: expert_load_scalars(self.chunks, self.model.moe_topk)) if with_load else None
        result = train_step(
            self.chunks,
            self.optimizer,
            self.scheduler,
            mb,
            seq_length=self.seq,
            micro_batch_size=t.micro_batch_size,
            observe=observe,
            guard=self.guard,
        )
        local = {"train/lm_loss": result.mean("lm_loss")} if result.metrics else {}
        mtp = MTPLossLoggingHelper.tracker.get("loss_values")
        if mtp is not None and result.metrics:
            local.update({f"train/mtp_{k + 1}_loss": v for k, v in enumerate((mtp / len(mb)).tolist())})
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        metrics = from_last_stage(dp_mean(local))
        dt = time.perf_counter() - t0
        tflops = self.flops_per_step / dt / self.world_size / 1e12
        metrics.update(
            {
                "train/lr": self.optimizer.param_groups[0]["lr"],
                "train/grad_norm": float(result.grad_norm or 0.0),
                "train/tokens_per_sec": t.global_batch_size * self.seq / dt,
                "train/optimizer_step_ms": result.seconds["optimizer"] * 1e3,
                "train/step_ms": dt * 1e3,
                "train/tflops_per_device": tflops,
                "train/mfu": tflops / t.peak_tflops,
                "train/skipped_iterations": float(self.guard.total),
                **(result.observed or {}),
            }
        )
        return metrics

    @torch.no_grad()
    def evaluate(self, dataset) -> float:
        """Mean loss over `train.eval_steps` global batches of `dataset` (model in eval mode)."""
        for c in self.chunks:
            c.eval()
        t, values = self.t, []
        for s in range(t.eval_steps):
            out = forward_backward(
                self.chunks,
                self._batches(dataset, s),
                seq_length=self.seq,
                micro_batch_size=t.micro_batch_size,
                forward_only=True,
            )
            values += [d["lm_loss"] for d in out]
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        for c in self.chunks:
            c.train()
        local = {"val/lm_loss": float(torch.stack(values).float().mean())} if values else {}
        return from_last_stage(dp_mean(local))["val/lm_loss"]

"""MMRPT: masked multimodal RL pretraining on webdataset image-text shards, and its caption-imitation
baseline, on the image-text Step model (models/vlm.py).

    cfg = load_run_config("examples/mmrpt/mmrpt_tiny.yaml", ["mmrpt.objective=rl"], MMRPTRunConfig)
    result = train_mmrpt(cfg)      # under torchrun, or as one process

Stages:
 1. data: generated-scene shards unless `mmrpt.shards` is given; every sample read through the
    image-text pipeline (DALI / webdataset reader); a caption tokenizer (megatron_step.mmrpt.data).
 2. caption warm-up (when `mmrpt.init_from` has no checkpoint): next-token loss on captions, a share of
    them in the fill-in format with one random sentence masked; saved as the starting checkpoint.
 3. the phase, `train.steps` optimizer steps from that checkpoint:
    rl:      per step, D(s) of every sentence of `prompts_per_step` captions, the highest-D sentence of
             each caption masked when it reaches the adaptive threshold, `group_size` reconstruction
             rollouts per masked caption with the image in the engine's prefill, the semantic-visual
             reward, a GRPO / MIS-PO update (megatron_step.mmrpt.rollouts, megatron_step.rl.policy).
    caption: the same captions' next-token loss (the warm-up objective continued): the baseline.
 Evaluated every `mmrpt.eval_interval` steps on held-out scenes (megatron_step.mmrpt.evaluation).
TensorBoard (<run_dir>/tensorboard): mmrpt/*, policy/*, train/*, eval/*. Result: <run_dir>/result.json.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

from megatron.core import parallel_state as ps

from megatron_step import platform
from megatron_step.config.run import MMRPTRunConfig
from megatron_step.mmrpt.data import (
    Sample,
    caption_tokenizer,
    ensure_scene_shards,
    read_samples,
    step_samples,
)
from megatron_step.mmrpt.dependency import default_dependency_layers
from megatron_step.mmrpt.evaluation import caption_loss, dependency_auc, heldout_tasks, reconstruction_eval
from megatron_step.mmrpt.model import build_vlm, caption_step, stage_optim, vlm_model_config
from megatron_step.mmrpt.rollouts import mmrpt_rollouts
from megatron_step.mmrpt.text import CaptionCodec
from megatron_step.rl.engine import Engine
from megatron_step.rl.policy import PolicyUpdate
from megatron_step.stages.pretrain import due
from megatron_step.training import checkpoint
from megatron_step.training.monitor import Monitor, is_logging_rank, run_banner
from megatron_step.training.step import SkipGuard, dp_mean

__all__ = ["MMRPTData", "caption_warmup", "load_data", "train_mmrpt"]


def _rank_share(items: list) -> list:
    return items[ps.get_data_parallel_rank() :: ps.get_data_parallel_world_size()]


@dataclass
class MMRPTData:
    train: list[Sample]
    heldout: list[Sample]
    stats: dict  # reader statistics (skipped samples by reason) of both splits
    codec: CaptionCodec
    layers: list[int]  # the decoder layers D(s) reads
    tasks: list  # held-out (sample, masked sentence): the same for every run on this data


def load_data(cfg: MMRPTRunConfig) -> MMRPTData:
    m = cfg.mmrpt
    train_glob = m.shards or ensure_scene_shards(m, heldout=False)
    heldout_glob = m.heldout_shards or (None if m.shards else ensure_scene_shards(m, heldout=True))
    train, train_stats = read_samples(train_glob, m)
    heldout, heldout_stats = read_samples(heldout_glob, m) if heldout_glob else ([], {})
    codec = CaptionCodec(caption_tokenizer(m, train), m.vision.num_image_tokens, m.response_format)
    layers = m.dependency_layers or default_dependency_layers(cfg.model_config())
    stats = {"train": train_stats, "heldout": heldout_stats}
    return MMRPTData(train, heldout, stats, codec, layers, heldout_tasks(heldout, m.data_seed))


def caption_warmup(cfg: MMRPTRunConfig, data: MMRPTData, out_dir: str) -> dict:
    """Stage 2: next-token training on captions from scratch; saves the checkpoint to `out_dir`."""
    m, t = cfg.mmrpt, cfg.train
    model = vlm_model_config(cfg.model_config(), data.codec.tok)
    optim = stage_optim(cfg.optim, m.warmup_lr, m.warmup_lr / 10, m.warmup_steps, lr_schedule="cosine")
    vlm = build_vlm(model, m.vision, cfg.parallel, optim, m.warmup_steps, data.codec.image_id)
    order = random.Random(t.seed).sample(range(len(data.train)), len(data.train))
    rng = random.Random(t.seed + 1)
    monitor = Monitor(out_dir, m.warmup_steps, 0, enabled=is_logging_rank())
    guard = SkipGuard(t.max_skipped_steps, "the MMRPT caption warm-up")
    losses = []
    for step in range(m.warmup_steps):
        part = _rank_share(step_samples(data.train, order, step, m.batch_size))
        out = caption_step(*vlm, data.codec, part, rng, m.fill_in_fraction, t.micro_batch_size, guard)
        out = dp_mean(out)
        losses.append(out["train/lm_loss"])
        monitor.scalars(step + 1, out)
        monitor.progress(1, {"loss": out["train/lm_loss"]})
    monitor.close()
    checkpoint.save_checkpoint(out_dir, m.warmup_steps, *vlm, {"stage": "warmup"})
    return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


class _Phase:
    """Stage 3: the chunks, engine and update of the phase after the warm-up, and its evaluation."""

    def __init__(self, cfg: MMRPTRunConfig, data: MMRPTData, init_from: str, monitor: Monitor):
        m, t = cfg.mmrpt, cfg.train
        self.cfg, self.data, self.monitor, self.curve = cfg, data, monitor, []
        model = vlm_model_config(cfg.model_config(), data.codec.tok)
        optim = stage_optim(cfg.optim, cfg.optim.lr, cfg.optim.min_lr, t.steps)
        self.vlm = build_vlm(model, m.vision, cfg.parallel, optim, t.steps, data.codec.image_id)
        checkpoint.load_model_weights(init_from, self.vlm[0], optimizer=self.vlm[1])
        self.model = self.vlm[0][0].module
        self.engine = Engine(self.model, eos_id=data.codec.tok.eos, pad_id=data.codec.tok.pad)
        self.update = PolicyUpdate(
            *self.vlm,
            m.loss,
            t.micro_batch_size,
            replay=bool(model.num_experts),
            max_skipped=t.max_skipped_steps,
        )
        self.guard = SkipGuard(t.max_skipped_steps, "the MMRPT caption objective")
        self.order = random.Random(t.seed + 2).sample(range(len(data.train)), len(data.train))
        self.rng = random.Random(t.seed + 3)

    def save(self, step: int, start_eval: dict, history: list) -> None:
        """The phase's checkpoint at the end of step `step`, with what an exact resume needs: the
        evaluations and per-step history so far (for result.json) and each rank's caption RNG."""
        t = self.cfg.train
        # plain JSON values (the common state is read back with torch.load(weights_only=True))
        log = json.loads(
            json.dumps({"start": start_eval, "history": history, "curve": self.curve}, default=float)
        )
        extra = {"stage": self.cfg.mmrpt.objective, "log": log}
        own = {"caption_rng": self.rng.getstate()}
        checkpoint.save_checkpoint(t.run_dir, step, *self.vlm, extra, rank_state=own, keep_last=t.keep_last)

    def resume(self, step: int) -> tuple[dict, list]:
        """Continue from the run's checkpoint of `step`; (the start evaluation, the history so far)."""
        t = self.cfg.train
        loaded = checkpoint.load_checkpoint(t.run_dir, *self.vlm, step=step)
        log = loaded["extra"].get("log")
        if log is None or loaded["rank_state"] is None:
            raise ValueError(
                f"{loaded['path']}: not resumable here (written before MMRPT checkpointed its state, or "
                "under another world size); train.resume=never with train.overwrite=true starts over"
            )
        self.rng.setstate(checkpoint.py_rng_state(loaded["rank_state"]["caption_rng"]))
        self.curve = log["curve"]
        self.monitor.message(f"resumed from {loaded['path']}")
        return log["start"], log["history"]

    def evaluate(self, step: int) -> dict:
        d, codec = self.data, self.data.codec
        ev = reconstruction_eval(self.engine, codec, d.tasks, self.cfg.mmrpt) if d.tasks else {}
        if d.heldout:
            ev.update(dependency_auc(self.model, codec, d.heldout, d.layers))
            ev.update(caption_loss(self.model, codec, d.heldout))
        numbers = {k: v for k, v in ev.items() if isinstance(v, float)}
        self.monitor.scalars(step, {f"eval/{k}": v for k, v in numbers.items()})
        self.curve.append({"step": step, **{k: v for k, v in ev.items() if k != "examples"}})
        self.monitor.message(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items()))
        return ev

    def step(self, step: int) -> dict:
        """Optimizer step `step` (0-based) of the objective; this rank's metrics."""
        m, t, d, t0 = self.cfg.mmrpt, self.cfg.train, self.data, time.perf_counter()
        if m.objective == "rl":
            part = _rank_share(step_samples(d.train, self.order, step, m.prompts_per_step))
            seed = t.seed * 100_003 + step * 101 + ps.get_data_parallel_rank()
            groups, metrics = mmrpt_rollouts(self.engine, self.model, d.codec, part, m, step, d.layers, seed)
            # never empty on a rank with samples (the top sentence reaches any quantile of its own
            # batch), so every data-parallel rank takes part in the update's gradient all-reduce
            if groups:
                metrics.update(self.update(groups))
        else:
            part = _rank_share(step_samples(d.train, self.order, step, m.batch_size))
            metrics = caption_step(
                *self.vlm, d.codec, part, self.rng, m.fill_in_fraction, t.micro_batch_size, self.guard
            )
        metrics["mmrpt/step_seconds"] = time.perf_counter() - t0
        return metrics


def train_mmrpt(cfg: MMRPTRunConfig) -> dict:
    m, t = cfg.mmrpt, cfg.train
    env = platform.setup(cfg.parallel, seed=t.seed)
    if cfg.parallel.pp != 1:
        raise ValueError(f"parallel.pp={cfg.parallel.pp}: MMRPT runs the whole model per rank (pp=1)")
    dp = ps.get_data_parallel_world_size()
    if m.prompts_per_step % dp or m.batch_size % dp:
        raise ValueError(
            f"mmrpt.prompts_per_step({m.prompts_per_step}) and mmrpt.batch_size({m.batch_size}) must be "
            f"divisible by the data-parallel size ({dp})"
        )
    start = checkpoint.resume_step(t)  # before the warm-up: a run directory holding a run is refused
    data = load_data(cfg)
    init_from, warm = m.init_from or os.path.join(t.run_dir, "warmup"), None
    if checkpoint.latest_step(init_from) is None:
        if m.warmup_steps <= 0:
            raise FileNotFoundError(
                f"mmrpt.init_from={init_from!r} has no checkpoint and mmrpt.warmup_steps=0"
            )
        warm = caption_warmup(cfg, data, init_from)
        env = platform.setup(cfg.parallel, seed=t.seed)  # the same seeds whether or not a warm-up ran
    monitor = Monitor(t.run_dir, t.steps, start or 0, enabled=is_logging_rank())
    phase = _Phase(cfg, data, init_from, monitor)
    info = dict(init_from=init_from, data=data.stats, dependency_layers=data.layers)
    monitor.banner(run_banner(env, cfg.to_dict(), resumed_from_step=start or 0, **info))
    start_eval, history = phase.resume(start) if start else (phase.evaluate(0), [])
    for step in range(start or 0, t.steps):
        metrics = dp_mean(phase.step(step))
        monitor.scalars(step + 1, metrics)
        history.append({"step": step + 1, **metrics})
        monitor.progress(1, {k: metrics[k] for k in ("mmrpt/reward_total", "train/lm_loss") if k in metrics})
        if due(m.eval_interval, step + 1) and step + 1 < t.steps:
            phase.evaluate(step + 1)
        exiting = t.exit_after is not None and step + 1 >= t.exit_after and step + 1 < t.steps
        if (due(t.save_interval, step + 1) or exiting) and step + 1 < t.steps:  # weights to evaluate, resume
            phase.save(step + 1, start_eval, history)
        if exiting:
            monitor.message(f"exit_after={t.exit_after}: stopping at step {step + 1} (checkpoint saved)")
            monitor.close()
            return dict(objective=m.objective, warmup=warm, start=start_eval, exited_at=step + 1, **info)
    end_eval = phase.evaluate(t.steps)
    monitor.close()
    phase.save(t.steps, start_eval, history)
    result = dict(objective=m.objective, warmup=warm, start=start_eval, end=end_eval, **info)
    result.update(curve=phase.curve, history=history)
    if is_logging_rank():
        with open(os.path.join(t.run_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=1, default=float)
    return result

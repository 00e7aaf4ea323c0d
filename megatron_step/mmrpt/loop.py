"""MMRPT: masked multimodal RL pretraining on webdataset image-text shards, and its caption-imitation
baseline, on the image-text Step model (models/vlm.py).

    cfg = load_run_config("examples/mmrpt/mmrpt_tiny.yaml", ["mmrpt.objective=rl"])
    result = train_mmrpt(cfg)      # under torchrun, or as one process

Stages:
 1. data: generated-scene shards unless `mmrpt.shards` is given; every sample read through the
    image-text pipeline (DALI / webdataset reader); a caption tokenizer.
 2. caption warm-up (when `mmrpt.init_from` has no checkpoint): next-token loss on captions, a share of
    them in the fill-in format with one random sentence masked; saved as the starting checkpoint.
 3. the phase, `train.steps` optimizer steps from that checkpoint:
    rl:      per step, D(s) of every sentence of `prompts_per_step` captions (one forward exposing the
             attention probabilities), the highest-D sentence of each caption masked when it reaches
             the adaptive threshold, `group_size` reconstruction rollouts per masked caption through
             the RL engine (image in the prefill, KV cache), the semantic-visual reward, a GRPO / MIS-PO
             update (megatron_step.rl.loop.policy_update, routing replayed).
    caption: the same captions' next-token loss (the warm-up objective continued): the baseline.
 Evaluated every `mmrpt.eval_interval` steps on held-out scenes: one visual sentence per caption (the
 generator's truth, seeded) masked and reconstructed greedily; attribute accuracy, exact match and
 well-formed answers; D(s) ROC-AUC against the generator's visual/generic labels.
TensorBoard (<run_dir>/tensorboard): reward/*, mask/*, loss/*, eval/*. Result: <run_dir>/result.json.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time

import torch
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_step import platform
from megatron_step.config.run import RunConfig
from megatron_step.mmrpt.data import Sample, caption_tokenizer, ensure_scene_shards, read_samples
from megatron_step.mmrpt.dependency import (
    default_dependency_layers,
    roc_auc,
    select_masked,
    sentence_dependency,
)
from megatron_step.mmrpt.text import CaptionCodec, semantic_visual_reward
from megatron_step.models.vlm import build_step_vlm
from megatron_step.rl.buffer import Rollout
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.rl.loop import _dp, policy_update
from megatron_step.rl.policy import make_forward_step
from megatron_step.training import checkpoint
from megatron_step.training.loop import build_model_and_optimizer
from megatron_step.training.monitor import Monitor, git_hash, is_logging_rank, versions
from megatron_step.training.step import lm_forward_step


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
def lm_batch(seqs: list[list[int]], images: torch.Tensor, text_start: int, pad_id: int) -> dict:
    """Next-token batch over whole sequences; the loss covers the labels from position `text_start`
    (the first caption token) on, not the image slots."""
    b, s = len(seqs), max(len(x) for x in seqs) - 1
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    labels = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros(b, s)
    for i, seq in enumerate(seqs):
        n = len(seq) - 1
        tokens[i, :n] = torch.tensor(seq[:-1])
        labels[i, :n] = torch.tensor(seq[1:])
        mask[i, text_start - 1 : n] = 1.0  # labels from the first caption token on
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": pos, "images": images}


def caption_sequences(codec: CaptionCodec, samples: list[Sample], rng: random.Random, fill_in: float):
    """The warm-up / imitation text of each sample: plain, or (with probability `fill_in`) the fill-in
    format with one uniformly chosen sentence masked and its reconstruction appended."""
    out = []
    for s in samples:
        if len(s.sentences) > 1 and rng.random() < fill_in:
            prompt, target = codec.fill_in(s.sentences, rng.randrange(len(s.sentences)))
            out.append(prompt + target)
        else:
            out.append(codec.plain(s.sentences)[0])
    return out


def _images(samples: list[Sample]) -> torch.Tensor:
    return torch.stack([s.image for s in samples])


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def vlm_run_config(cfg: RunConfig, tok, lr: float, min_lr: float, steps: int) -> RunConfig:
    """The run config the image-text model is built from: vocabulary of the caption tokenizer, MoE
    routing recorded/replayed, MTP off (models/vlm.py), this stage's LR and length."""
    out = copy.deepcopy(cfg)
    m = cfg.model_config()
    out.model = {
        **cfg.model,
        "vocab_size": tok.padded_vocab_size(),
        "routing_replay": bool(m.num_experts),
        "mtp_num_layers": 0,
        "mtp_loss_weights": [],
    }
    out.optim.lr, out.optim.min_lr = lr, min_lr
    out.optim.warmup_steps = min(out.optim.warmup_steps, max(steps - 1, 0))
    out.train.steps = max(steps, 1)
    out.rl.routing_replay = bool(m.num_experts)
    return out


def build_vlm(cfg: RunConfig, codec: CaptionCodec):
    """(chunks, optimizer, scheduler) for the image-text model of `cfg` (see vlm_run_config)."""

    def build(vp_stage):
        return build_step_vlm(cfg.model_config(), cfg.mmrpt.vision, cfg.parallel, codec.image_id)

    _, chunks, optimizer, scheduler = build_model_and_optimizer(cfg, build)
    return chunks, optimizer, scheduler


def lm_step(chunks, optimizer, scheduler, batch: dict, mbs: int) -> dict:
    """One optimizer step of next-token loss over `batch`, split into microbatches of `mbs`."""
    n = batch["tokens"].shape[0]
    micro = [platform.to_device({k: v[i : i + mbs] for k, v in batch.items()}) for i in range(0, n, mbs)]
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=lm_forward_step,
        data_iterator=iter(micro),
        model=chunks[0],
        num_microbatches=len(micro),
        seq_length=batch["tokens"].shape[1],
        micro_batch_size=mbs,
        forward_only=False,
    )
    finalize_model_grads(chunks)
    _, grad_norm, _ = optimizer.step()
    scheduler.step(1)
    loss = float(torch.stack([d["lm loss"] for d in out]).float().mean())
    return {"loss/lm loss": loss, "grad norm": float(grad_norm or 0.0)}


def caption_step(chunks, optimizer, scheduler, codec, samples: list[Sample], rng, cfg) -> dict:
    """One imitation step: next-token loss on `samples` in the warm-up's mixture of formats."""
    seqs = caption_sequences(codec, samples, rng, cfg.mmrpt.fill_in_fraction)
    batch = lm_batch(seqs, _images(samples), codec.visual[1], codec.tok.pad)
    return lm_step(chunks, optimizer, scheduler, batch, cfg.train.micro_batch_size)


def _mean_over_ranks(metrics: dict) -> dict:
    """Per key, the mean over the data-parallel ranks that report it (ranks can differ in keys: a rank
    whose masked sentences are all generic has no attribute term, for example)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if _dp()[0] == 1:
        return metrics
    gathered: list = [None] * _dp()[0]
    dist.all_gather_object(gathered, metrics, group=ps.get_data_parallel_group())
    keys = sorted({k for g in gathered for k in g})
    return {k: sum(g[k] for g in gathered if k in g) / sum(1 for g in gathered if k in g) for k in keys}


def _rank_share(items: list) -> list:
    dp, rank = _dp()
    return items[rank::dp]


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def heldout_tasks(samples: list[Sample], seed: int) -> list[tuple[Sample, int]]:
    """(sample, masked sentence) per held-out sample: one of its visual sentences (ground truth),
    chosen by `seed`; samples without a visual sentence are left out."""
    rng = random.Random(seed)
    out = []
    for s in samples:
        visual = [k for k, t in enumerate(s.sentences) if t.visual]
        if visual:
            out.append((s, rng.choice(visual)))
    return out


@torch.no_grad()
def dependency_auc(model, codec: CaptionCodec, samples: list[Sample], layers, batch: int = 32) -> dict:
    """D(s) of every held-out sentence with a known label; ROC-AUC of D for visual vs generic."""
    scores, labels = [], []
    for i in range(0, len(samples), batch):
        part = samples[i : i + batch]
        enc = [codec.plain(s.sentences) for s in part]
        tok = lm_batch([e[0] for e in enc], _images(part), codec.visual[1], codec.tok.pad)
        d = sentence_dependency(
            model, tok["tokens"], tok["images"], [e[1] for e in enc], codec.visual, layers
        )
        for s, ds in zip(part, d):
            for sent, v in zip(s.sentences, ds):
                if sent.visual is not None:
                    scores.append(v)
                    labels.append(sent.visual)
    vis = [x for x, y in zip(scores, labels) if y]
    gen = [x for x, y in zip(scores, labels) if not y]
    out = {"D visual mean": sum(vis) / max(1, len(vis)), "D generic mean": sum(gen) / max(1, len(gen))}
    if vis and gen:
        out["D roc_auc"] = roc_auc(scores, labels)
    return out


@torch.no_grad()
def caption_loss(model, codec: CaptionCodec, samples: list[Sample], batch: int = 32) -> dict:
    """Held-out caption loss (nats per text token) with each caption's own image and with another
    sample's image (the batch rolled by one): the gap is what the model reads from the image."""
    was_training = model.training
    model.eval()
    sums = {"own": 0.0, "other": 0.0}
    n_tok = 0.0
    try:
        for i in range(0, len(samples), batch):
            part = samples[i : i + batch]
            b = platform.to_device(
                lm_batch(
                    [codec.plain(s.sentences)[0] for s in part], _images(part), codec.visual[1], codec.tok.pad
                )
            )
            for name, imgs in (("own", b["images"]), ("other", b["images"].roll(1, 0))):
                ce = model(b["tokens"], b["position_ids"], None, labels=b["labels"], images=imgs)
                sums[name] += float((ce.float() * b["loss_mask"]).sum())
            n_tok += float(b["loss_mask"].sum())
    finally:
        model.train(was_training)
    return {
        "caption loss": sums["own"] / max(n_tok, 1.0),
        "caption loss other image": sums["other"] / max(n_tok, 1.0),
    }


@torch.no_grad()
def reconstruction_eval(engine: Engine, codec: CaptionCodec, tasks, cfg, batch: int = 64) -> dict:
    """Greedy reconstructions of the held-out masked sentences: mean attribute score, exact match and
    the well-formed share."""
    m = cfg.mmrpt
    params = SamplingParams(
        max_new_tokens=m.max_new_tokens, greedy=True, stop_ids=(codec.answer_end_id,), temperature=1.0
    )
    sums = {"attribute": 0.0, "exact": 0.0, "format": 0.0}
    n_attr = 0
    examples = []
    for i in range(0, len(tasks), batch):
        part = tasks[i : i + batch]
        prompts = [codec.fill_in(s.sentences, k)[0] for s, k in part]
        gens = engine.generate(prompts, params, record_routing=False, images=_images([s for s, _ in part]))
        for (s, k), g in zip(part, gens):
            answer, ok = codec.answer_of(g.response_ids)
            r = semantic_visual_reward(answer, ok, s.sentences[k], m)
            sums["exact"] += r["exact"]
            sums["format"] += r["format"]
            if "attribute" in r:
                sums["attribute"] += r["attribute"]
                n_attr += 1
            if len(examples) < 4:
                examples.append({"target": s.sentences[k].text, "answer": answer})
    n = max(1, len(tasks))
    return {
        "attribute accuracy": sums["attribute"] / max(1, n_attr),
        "exact match": sums["exact"] / n,
        "well formed": sums["format"] / n,
        "examples": examples,
    }


# ---------------------------------------------------------------------------------------------
# MMRPT step
# ---------------------------------------------------------------------------------------------
def mmrpt_rollouts(engine, model, codec, samples: list[Sample], cfg, version: int, layers, seed: int):
    """D(s) -> masking -> G reconstruction rollouts per masked caption -> rewards. Returns (groups of
    Rollout, metrics)."""
    m = cfg.mmrpt
    enc = [codec.plain(s.sentences) for s in samples]
    tok = lm_batch([e[0] for e in enc], _images(samples), codec.visual[1], codec.tok.pad)
    dep = sentence_dependency(model, tok["tokens"], tok["images"], [e[1] for e in enc], codec.visual, layers)
    choice, tau = select_masked(dep, m.mask_quantile)
    chosen = [(s, k) for s, k in zip(samples, choice) if k is not None]
    metrics = {"mask/threshold": tau, "mask/captions masked": len(chosen) / max(1, len(samples))}
    known = [s.sentences[k].visual for s, k in chosen if s.sentences[k].visual is not None]
    if known:
        metrics["mask/visual precision"] = sum(known) / len(known)  # masked sentences that are visual
    if not chosen:
        return [], metrics
    g = m.group_size
    prompts = [codec.fill_in(s.sentences, k)[0] for s, k in chosen for _ in range(g)]
    images = torch.stack([s.image for s, _ in chosen for _ in range(g)])
    params = SamplingParams(
        max_new_tokens=m.max_new_tokens, temperature=m.temperature, stop_ids=(codec.answer_end_id,), seed=seed
    )
    gens = engine.generate(prompts, params, images=images)
    groups, terms = [], {}
    for j, (s, k) in enumerate(chosen):
        grp = []
        for gen, img in zip(gens[j * g : (j + 1) * g], images[j * g : (j + 1) * g]):
            answer, ok = codec.answer_of(gen.response_ids)
            r = semantic_visual_reward(answer, ok, s.sentences[k], m)
            for key, v in r.items():
                terms.setdefault(key, []).append(v)
            grp.append(
                Rollout(
                    gen.prompt_ids,
                    gen.response_ids,
                    gen.logprobs,
                    r["total"],
                    group=j,
                    version=version,
                    routing=gen.routing,
                    info={"image": img},
                )
            )
        groups.append(grp)
    metrics.update({f"reward/{k}": sum(v) / len(v) for k, v in terms.items()})
    metrics["rollout/response tokens"] = sum(len(x.response_ids) for x in gens) / len(gens)
    return groups, metrics


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
def _step_samples(train: list[Sample], order: list[int], step: int, n: int) -> list[Sample]:
    return [train[order[(step * n + i) % len(order)]] for i in range(n)]


def caption_warmup(cfg: RunConfig, codec, train: list[Sample], out_dir: str) -> dict:
    """Stage 2: next-token training on captions from scratch; saves the checkpoint to `out_dir`."""
    m, t = cfg.mmrpt, cfg.train
    wcfg = vlm_run_config(cfg, codec.tok, m.warmup_lr, m.warmup_lr / 10, m.warmup_steps)
    wcfg.optim.lr_schedule = "cosine"
    chunks, optimizer, scheduler = build_vlm(wcfg, codec)
    order = random.Random(t.seed).sample(range(len(train)), len(train))
    rng = random.Random(t.seed + 1)
    monitor = Monitor(out_dir, m.warmup_steps, 0, enabled=is_logging_rank())
    losses = []
    for step in range(m.warmup_steps):
        part = _rank_share(_step_samples(train, order, step, m.batch_size))
        out = caption_step(chunks, optimizer, scheduler, codec, part, rng, cfg)
        out = _mean_over_ranks(out)
        losses.append(out["loss/lm loss"])
        monitor.scalars(step + 1, out)
        monitor.progress(1, {"loss": out["loss/lm loss"]})
    monitor.close()
    checkpoint.save_checkpoint(out_dir, m.warmup_steps, chunks, optimizer, scheduler, {"stage": "warmup"})
    return {"first loss": losses[0] if losses else None, "last loss": losses[-1] if losses else None}


def train_mmrpt(cfg: RunConfig) -> dict:
    m, t = cfg.mmrpt, cfg.train
    env = platform.setup(cfg.parallel, seed=t.seed)
    if cfg.parallel.pp != 1:
        raise ValueError(f"parallel.pp={cfg.parallel.pp}: MMRPT runs the whole model per rank (pp=1)")
    dp = _dp()[0]
    if m.prompts_per_step % dp or m.batch_size % dp:
        raise ValueError(
            f"mmrpt.prompts_per_step({m.prompts_per_step}) and mmrpt.batch_size({m.batch_size}) must be "
            f"divisible by the data-parallel size ({dp})"
        )
    # 1. data
    train_glob = m.shards or ensure_scene_shards(m, heldout=False)
    heldout_glob = m.heldout_shards or (None if m.shards else ensure_scene_shards(m, heldout=True))
    train, train_stats = read_samples(train_glob, m)
    heldout, heldout_stats = read_samples(heldout_glob, m) if heldout_glob else ([], {})
    tok = caption_tokenizer(m, train)
    lm_cfg = cfg.model_config()
    codec = CaptionCodec(tok, m.vision.num_image_tokens, m.response_format)
    layers = m.dependency_layers or default_dependency_layers(lm_cfg)
    tasks = heldout_tasks(heldout, m.data_seed)  # the same masked sentences for every run on this data
    # 2. warm-up
    init_from = m.init_from or os.path.join(t.run_dir, "warmup")
    warm = None
    if checkpoint.latest_step(init_from) is None:
        if m.warmup_steps <= 0:
            raise FileNotFoundError(
                f"mmrpt.init_from={init_from!r} has no checkpoint and mmrpt.warmup_steps=0"
            )
        warm = caption_warmup(cfg, codec, train, init_from)
        env = platform.setup(cfg.parallel, seed=t.seed)
    # 3. the phase
    pcfg = vlm_run_config(cfg, tok, cfg.optim.lr, cfg.optim.min_lr, t.steps)
    chunks, optimizer, scheduler = build_vlm(pcfg, codec)
    checkpoint.load_model_weights(init_from, chunks, optimizer=optimizer)
    model = chunks[0].module
    engine = Engine(model, eos_id=tok.eos, pad_id=tok.pad)
    forward_step = make_forward_step(m.loss)
    monitor = Monitor(t.run_dir, t.steps, 0, enabled=is_logging_rank())
    monitor.banner(
        {
            "git": git_hash(),
            "versions": versions(),
            "layout": cfg.parallel.describe(env.world_size),
            "init_from": init_from,
            "data": {"train": train_stats, "heldout": heldout_stats},
            "dependency_layers": layers,
            "config": cfg.to_dict(),
        }
    )
    curve = []

    def evaluate(step: int) -> dict:
        ev = reconstruction_eval(engine, codec, tasks, cfg) if tasks else {}
        if heldout:
            ev.update(dependency_auc(model, codec, heldout, layers))
            ev.update(caption_loss(model, codec, heldout))
        scalars = {f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)}
        monitor.scalars(step, scalars)
        curve.append({"step": step, **{k: v for k, v in ev.items() if k != "examples"}})
        monitor.message(
            f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if isinstance(v, float))
        )
        return ev

    start_eval = evaluate(0)
    order = random.Random(t.seed + 2).sample(range(len(train)), len(train))
    rng = random.Random(t.seed + 3)
    history = []
    for step in range(t.steps):
        t0 = time.perf_counter()
        if m.objective == "rl":
            part = _rank_share(_step_samples(train, order, step, m.prompts_per_step))
            groups, metrics = mmrpt_rollouts(
                engine, model, codec, part, pcfg, step, layers, seed=t.seed * 100_003 + step * 101 + _dp()[1]
            )
            # never empty on a rank with samples (the top sentence reaches any quantile of its own
            # batch), so every data-parallel rank takes part in the update's gradient all-reduce
            if groups:
                metrics.update(policy_update(chunks, optimizer, scheduler, groups, pcfg, forward_step))
        else:
            part = _rank_share(_step_samples(train, order, step, m.batch_size))
            metrics = caption_step(chunks, optimizer, scheduler, codec, part, rng, pcfg)
        metrics["time/step seconds"] = time.perf_counter() - t0
        metrics = _mean_over_ranks(metrics)
        monitor.scalars(step + 1, metrics)
        history.append({"step": step + 1, **metrics})
        monitor.progress(1, {k: metrics[k] for k in ("reward/total", "loss/lm loss") if k in metrics})
        if m.eval_interval and (step + 1) % m.eval_interval == 0 and step + 1 < t.steps:
            evaluate(step + 1)
        if t.save_interval and (step + 1) % t.save_interval == 0 and step + 1 < t.steps:
            # weights to evaluate or to start another stage from (`mmrpt.init_from`); no resume yet
            stage = {"stage": m.objective}
            checkpoint.save_checkpoint(t.run_dir, step + 1, chunks, optimizer, scheduler, stage)
    end_eval = evaluate(t.steps)
    monitor.close()
    checkpoint.save_checkpoint(t.run_dir, t.steps, chunks, optimizer, scheduler, {"stage": m.objective})
    result = {
        "objective": m.objective,
        "init_from": init_from,
        "warmup": warm,
        "data": {"train": train_stats, "heldout": heldout_stats},
        "dependency_layers": layers,
        "start": start_eval,
        "end": end_eval,
        "curve": curve,
        "history": history,
    }
    if is_logging_rank():
        with open(os.path.join(t.run_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=1, default=float)
    return result


__all__ = ["caption_warmup", "dependency_auc", "heldout_tasks", "mmrpt_rollouts", "train_mmrpt"]

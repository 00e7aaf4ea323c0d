"""MMRPT's data: generated-scene shards when none are given, the caption tokenizer, the samples
read through the image-text pipeline (DALI or the webdataset reference, megatron_step/data/wds/), and
the next-token batches of captions (`lm_batch`, `caption_sequences`).

The tiny runs hold every decoded sample in memory (4,000 images of 3x32x32 floats: 49 MB); the reader
is still the pipeline a cluster run streams from, and its skip counter is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass

import torch

from megatron_step.data.shards import scene_samples, write_shards
from megatron_step.data.tokenizer import StepTokenizer, train_tokenizer
from megatron_step.data.wds import ImageTextConfig, make_reader
from megatron_step.mmrpt.config import MMRPTConfig
from megatron_step.mmrpt.text import CaptionCodec, Sentence, sentences_of

log = logging.getLogger(__name__)

HELDOUT_SEED_OFFSET = 1_000_003  # held-out scenes come from another seed: no image is in both splits


@dataclass
class Sample:
    key: str
    image: torch.Tensor  # (3, S, S) normalised
    caption: str
    sentences: list[Sentence]


def _scene_dir(m: MMRPTConfig, n: int, seed: int) -> str:
    return os.path.join(m.data_dir, f"scenes-n{n}-seed{seed}-px{m.scene_image_size}")


def ensure_scene_shards(m: MMRPTConfig, heldout: bool) -> str:
    """Shards of generated scenes (written once, reused when their manifest says they are complete).
    Returns the shard glob."""
    n = m.heldout_scenes if heldout else m.scenes
    seed = m.data_seed + (HELDOUT_SEED_OFFSET if heldout else 0)
    out = _scene_dir(m, n, seed)
    manifest = os.path.join(out, "manifest.json")
    if not os.path.exists(manifest):
        os.makedirs(out, exist_ok=True)
        shards = write_shards(
            scene_samples(n, seed, m.scene_image_size), out, samples_per_shard=1000, total=n, progress=False
        )
        tmp = manifest + ".tmp"
        with open(tmp, "w") as f:  # written last: a crash mid-way leaves no manifest, so a rerun redoes it
            json.dump({"scenes": n, "seed": seed, "size": m.scene_image_size, "shards": shards}, f)
        os.replace(tmp, manifest)
    return os.path.join(out, "shard-*.tar")


def read_samples(pattern: str, m: MMRPTConfig) -> tuple[list[Sample], dict]:
    """Every sample of the shards, decoded by the configured reader. Returns (samples, reader stats)."""
    cfg = ImageTextConfig(
        image_size=m.vision.image_size,
        batch_size=64,
        index_cache=os.path.join(m.data_dir, "dali-index"),  # DALI pre-scan once per shard version
    )
    reader = make_reader(m.reader, pattern, cfg)
    out = []
    for item in reader.samples():
        image = item.image.cpu().clone()  # a view into the batch would keep the whole batch alive
        out.append(Sample(item.key, image, item.caption, sentences_of(item.caption, item.meta)))
    stats = {"reader": type(reader).__name__, "samples": len(out), "skipped": dict(reader.skipped)}
    if any(reader.skipped.values()):
        log.warning("mmrpt data %s: skipped %s", pattern, reader.skipped)
    return out, stats


def caption_tokenizer(m: MMRPTConfig, samples: list[Sample]) -> StepTokenizer:
    """A SentencePiece tokenizer trained on the training captions (cached under data_dir by the
    captions' content hash)."""
    text = "\n".join(s.caption for s in samples)
    digest = hashlib.sha1(f"{m.tokenizer_vocab_size}\n{text}".encode()).hexdigest()[:12]
    prefix = os.path.join(m.data_dir, f"tok-{digest}", "captions")
    if not os.path.exists(prefix + ".model"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        corpus = prefix + ".txt"
        with open(corpus, "w") as f:
            f.write(text + "\n")
        tmp = train_tokenizer([corpus], prefix + ".part", vocab_size=m.tokenizer_vocab_size)
        os.replace(tmp, prefix + ".model")
        os.replace(prefix + ".part.vocab", prefix + ".vocab")
    return StepTokenizer(prefix + ".model")


def images_of(samples: list[Sample]) -> torch.Tensor:
    """(B, 3, S, S) images of `samples`."""
    return torch.stack([s.image for s in samples])


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


def step_samples(samples: list[Sample], order: list[int], step: int, n: int) -> list[Sample]:
    """The `n` samples of step `step` in the epoch order `order` (wrapping around)."""
    return [samples[order[(step * n + i) % len(order)]] for i in range(n)]


__all__ = [
    "Sample",
    "caption_sequences",
    "caption_tokenizer",
    "ensure_scene_shards",
    "images_of",
    "lm_batch",
    "read_samples",
    "step_samples",
]

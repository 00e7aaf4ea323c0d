"""Image-text batches from webdataset shards (jpg + txt + json per sample) for MMRPT: an NVIDIA DALI
pipeline and a plain `webdataset` reference with one interface.

    from megatron_step.data.wds import ImageTextConfig, make_reader
    cfg = ImageTextConfig(image_size=32, batch_size=8)
    reader = make_reader("auto", "runs/wds/scenes/shard-*.tar", cfg)   # "dali" | "webdataset" | "auto"
    for batch in reader:                 # one pass over the shards = one epoch
        batch.images                     # (B, 3, S, S) float32, resized then normalised (CLIP mean/std)
        batch.keys, batch.captions, batch.metas   # B strings, B strings, B dicts (the sample's json)
    reader.skipped                       # {"bad_jpeg": 1, "truncated_tar": 1, ...} dropped samples by reason
    reader.seen                          # samples delivered so far (all epochs)

Iteration yields `ImageTextBatch`es of `cfg.batch_size` samples (the last one of an epoch may be
smaller; nothing is padded or dropped); `batch.samples()` / `reader.samples()` give one
`ImageTextSample(key, image, caption, meta)` at a time. `skipped` and `seen` add up over epochs.

Modules:
  common     ImageTextConfig, the sample and batch types, expand_urls, the bad-sample checks and their
             order (SKIP_REASONS, sample_problem), PIXEL_ATOL, the counting base both readers share
  reference  WebDatasetReader, the reference: webdataset's tar iterator and key grouping, PIL decode,
             resize as two small torch matmuls (triangle_filter), normalise; checks samples as they stream
  dali       DaliReader: fn.readers.webdataset -> fn.decoders.image -> fn.resize -> fn.crop_mirror_normalize
             over shards that prescan_shard checked first (DALI stops on bad samples) into DALI index
             files, optionally kept in an index cache
  (here)     make_reader, the factory, and dali_available

Both readers drop and count the same samples and deliver the same keys, captions, metas and (to
PIXEL_ATOL, CPU decode) pixels. Shuffle (`cfg.shuffle`, a buffer of `cfg.shuffle_buffer` samples seeded by
`cfg.seed`): the two readers shuffle differently (see each module), so compare them unshuffled.
Throughput and the pre-scan's cost: docs/benchmarks.md §11.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_step.data.wds.common import (
    CLIP_MEAN,
    CLIP_STD,
    PIXEL_ATOL,
    SKIP_REASONS,
    ImageTextBatch,
    ImageTextConfig,
    ImageTextSample,
    expand_urls,
)
from megatron_step.data.wds.dali import DaliReader, prescan_shard
from megatron_step.data.wds.reference import WebDatasetReader, triangle_filter

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PIXEL_ATOL",
    "SKIP_REASONS",
    "DaliReader",
    "ImageTextBatch",
    "ImageTextConfig",
    "ImageTextSample",
    "WebDatasetReader",
    "dali_available",
    "expand_urls",
    "make_reader",
    "prescan_shard",
    "triangle_filter",
]


def dali_available() -> bool:
    """Whether NVIDIA DALI imports here (what make_reader("auto") goes by)."""
    try:  # lazy by nature: the probe is the import
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def make_reader(kind: str, urls: str | Sequence[str], cfg: ImageTextConfig | None = None):
    """kind "dali" | "webdataset" | "auto" (DALI when it imports, else the webdataset reader)."""
    if kind not in ("dali", "webdataset", "auto"):
        raise ValueError(f"reader kind must be 'dali', 'webdataset' or 'auto', got {kind!r}")
    if kind == "auto":
        kind = "dali" if dali_available() else "webdataset"
    return DaliReader(urls, cfg) if kind == "dali" else WebDatasetReader(urls, cfg)

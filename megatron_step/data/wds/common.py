"""What both image-text readers share: the config, the sample and batch types, shard expansion, the checks
that decide whether a sample is good, and the skip/seen counting.

Bad samples (skipped and counted, never raised; the checks and their order are `sample_problem`):
  truncated_tar    the shard is cut or garbled: a member's data or header is cut short (tarfile raises),
                   or the file does not end with tar's zero end-of-archive block (a cut between members,
                   which tarfile reads quietly as a shorter archive). The sample being read at the break
                   is dropped (one count per broken shard); the samples before it come out; whatever
                   followed the cut is gone and not counted.
  missing_image, missing_caption, missing_json   no .jpg / .txt / .json member for the key
  bad_caption      .txt is not UTF-8
  bad_json         .json does not parse to an object (a dict)
  bad_jpeg         Pillow cannot decode the .jpg (random bytes, a cut-off file, a broken marker)

The reference reader runs these checks as it streams (its full decode is the bad_jpeg check); DaliReader's
pre-scan runs the same ones before DALI reads anything, so both count the same samples.

Pixels: both readers resize the decoded image in float32 with the same triangle filter and normalise it
with `ImageTextConfig.mean` / `std` (CLIP's by default). With CPU decode both decode with libjpeg-turbo,
bit for bit, so their pixels agree to float rounding. The tests allow PIXEL_ATOL = 0.03 (about 2/255
before normalising) for other Pillow / libjpeg builds; the resize mismatches it exists to catch (torch's
antialias renormalising at the border, for one) are several times larger. The measured differences:
docs/benchmarks.md §11. GPU ("mixed", nvJPEG) decode is not measured (no GPU with DALI was at hand);
nvJPEG's IDCT and chroma upsampling may differ by more.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "COMPONENTS",
    "PIXEL_ATOL",
    "SKIP_REASONS",
    "TAR_ERRORS",
    "CountingReader",
    "ImageTextBatch",
    "ImageTextConfig",
    "ImageTextSample",
    "ends_with_end_block",
    "expand_urls",
    "is_compressed",
    "key_ext",
    "sample_problem",
]

# CLIP's RGB normalisation (OpenAI CLIP / open_clip), for pixels scaled to 0..1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Largest |DALI - reference| per normalised pixel the parity test accepts: 2 levels of 8 bits (2/255 / std
# 0.26 = 0.03) of decoder difference (why: module docstring; measured: docs/benchmarks.md §11)
PIXEL_ATOL = 0.03

SKIP_REASONS = (
    "truncated_tar",
    "missing_image",
    "missing_caption",
    "missing_json",
    "bad_caption",
    "bad_json",
    "bad_jpeg",
)
COMPONENTS = ("jpg", "txt", "json")  # the members a sample needs; others are ignored
# what reading a broken or cut tar raises: tarfile's own errors, a short read, a garbled header field
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


@dataclass
class ImageTextConfig:
    image_size: int = 32  # S: square resize target (no crop, aspect ratio not kept)
    mean: tuple[float, float, float] = CLIP_MEAN  # per RGB channel, for 0..1 pixels
    std: tuple[float, float, float] = CLIP_STD
    batch_size: int = 8
    decode: str = "auto"  # DaliReader: "auto" (GPU "mixed" decode when CUDA is available) | "cpu" | "gpu"
    num_threads: int = 1  # DALI worker threads (the reference decodes in the calling thread)
    seed: int = 0
    shuffle: bool = False  # shard order + a sample buffer; readers shuffle differently
    shuffle_buffer: int = 512  # samples held for shuffling (DALI initial_fill)
    # DaliReader: a directory keeping each shard's pre-scan (DALI index + skip counts), keyed by the
    # shard's absolute path, size and mtime, so a later reader of unchanged shards skips the scan.
    # None: a temporary directory per reader (scan every time)
    index_cache: str | None = None

    def __post_init__(self):
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if not 1 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be in [1, 4096], got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean {self.mean} and std {self.std} need 3 values each (R, G, B)")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be > 0 per channel, got {self.std}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.decode not in ("auto", "cpu", "gpu"):
            raise ValueError(f"decode must be 'auto', 'cpu' or 'gpu', got {self.decode!r}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")

    def decode_device(self) -> str:
        """ "gpu" or "cpu" for this machine; "gpu" without CUDA is refused here, naming the field."""
        if self.decode == "gpu" and not torch.cuda.is_available():
            raise ValueError("decode='gpu' needs CUDA, which is not available (use decode='cpu' or 'auto')")
        if self.decode == "auto":
            return "gpu" if torch.cuda.is_available() else "cpu"
        return self.decode


@dataclass
class ImageTextSample:
    key: str  # the sample's name in the shard without extension, e.g. "000000042"
    image: torch.Tensor  # (3, S, S) float32, resized then normalised
    caption: str  # the .txt member, UTF-8
    meta: dict  # the .json member (for generated scenes: objects and per-sentence ground truth)


@dataclass
class ImageTextBatch:
    keys: list[str]  # B sample keys, in reading order
    images: torch.Tensor  # (B, 3, S, S) float32; on the GPU after DALI "mixed" decode
    captions: list[str]  # B captions
    metas: list[dict]  # B parsed .json objects

    def __len__(self) -> int:
        return len(self.keys)

    def samples(self) -> Iterator[ImageTextSample]:
        for i, key in enumerate(self.keys):
            yield ImageTextSample(key, self.images[i], self.captions[i], self.metas[i])


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard paths from a glob pattern ("dir/shard-*.tar"), a brace pattern ("shard-{000000..000009}.tar"),
    or a list of either; raises ValueError naming a pattern that matches no file."""
    import braceexpand  # webdataset's dependency; lazy like webdataset itself (see key_ext)

    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns:
        raise ValueError("no shards given (urls is empty)")
    out: list[str] = []
    for pattern in patterns:
        found = []
        for p in braceexpand.braceexpand(pattern):
            found += sorted(glob.glob(p)) if glob.has_magic(p) else [p] if os.path.isfile(p) else []
        if not found:
            raise ValueError(f"no shard matches {pattern!r}")
        out += found
    return out


def key_ext(name: str | None) -> tuple[str | None, str | None]:
    """(key, lower-case extension) as webdataset's group_by_keys splits a member name; (None, None) for a
    name it drops (no extension). Shared by the reference reader and DALI's pre-scan, so both group
    members into samples alike."""
    # lazy: webdataset takes about a second to import, and only reading shards needs it
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name) if name else (None, None)
    return (key, ext.lower()) if key is not None else (None, None)


def _jpeg_ok(data: bytes, draft: bool) -> bool:
    """Whether Pillow decodes the bytes (draft=True: at 1/8 scale, still reading the whole stream)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if draft:
                img.draft("RGB", (1, 1))
            img.load()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def is_compressed(path: str) -> bool:
    """Whether the file starts with a gzip, bzip2, xz or zstd magic number: webdataset reads such a tar
    (and it ends in its codec's trailer, not a tar end block); DALI's pre-scan refuses it."""
    with open(path, "rb") as f:
        return f.read(6).startswith(_COMPRESSED_MAGIC)


def ends_with_end_block(path: str) -> bool:
    """Whether a tar file ends like a finished archive: a whole number of 512-byte blocks, the last one
    zeros (the end-of-archive marker). A file cut between two members lacks it, though Python's tarfile
    reads such a file to its end without complaint."""
    size = os.path.getsize(path)
    if size < 512 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 512)
        return not any(f.read(512))


def sample_problem(parts: dict[str, bytes], check_jpeg: bool) -> str | None:
    """The first reason (in SKIP_REASONS order) to drop a grouped sample, or None when it is good.
    check_jpeg=False leaves "bad_jpeg" to the caller's own decode (the reference decodes in full anyway);
    check_jpeg=True (DALI's pre-scan) decodes with Pillow at 1/8 scale. "truncated_tar" is the caller's
    to find: it is a property of the shard, not of the grouped members."""
    for ext, reason in zip(COMPONENTS, ("missing_image", "missing_caption", "missing_json")):
        if ext not in parts:
            return reason
    try:
        parts["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return "bad_caption"
    try:
        if not isinstance(json.loads(parts["json"]), dict):
            return "bad_json"
    except (ValueError, UnicodeDecodeError):
        return "bad_json"
    return "bad_jpeg" if check_jpeg and not _jpeg_ok(parts["jpg"], draft=True) else None


class CountingReader:
    """Base of both readers: expands the shard urls, keeps the config and the `skipped` (by reason) /
    `seen` / `epoch` bookkeeping, and yields single samples from the batches of `__iter__`.

    The counts add up over epochs. The reference counts a skip as its stream reaches the sample; DALI
    counts a pass's skips (known from its pre-scan) when the pass starts; after whole passes they are
    equal."""

    def __init__(self, urls, cfg: ImageTextConfig):
        self.urls = expand_urls(urls)
        self.cfg = cfg
        self.skipped: dict[str, int] = {}
        self.seen = 0  # samples delivered, all epochs together
        self.epoch = 0  # completed passes

    def _skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def samples(self) -> Iterator[ImageTextSample]:
        for batch in self:
            yield from batch.samples()

    def __iter__(self) -> Iterator[ImageTextBatch]:
        raise NotImplementedError

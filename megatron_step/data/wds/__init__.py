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

Readers:
  WebDatasetReader  the reference: webdataset's tar iterator and key grouping, PIL decode, resize as
                    two small torch matmuls (`triangle_filter`), normalise; checks samples as they stream.
  DaliReader        `fn.readers.webdataset` -> `fn.decoders.image` ("mixed" on a GPU, "cpu" without)
                    -> `fn.resize` (linear, antialias) -> `fn.crop_mirror_normalize`, txt and json passed
                    through as bytes. Runs as a CPU-only pipeline (device_id=None) where CUDA is absent.

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

DALI stops the pipeline on these (its webdataset reader on a broken tar or, with "error", a missing
member; its decoder on random bytes and on a cut-off JPEG: "Premature end of JPEG data"), so
`DaliReader` first pre-scans each shard once, at construction, with Python's `tarfile` in streaming
mode (the same reads webdataset does), applies the same checks (the JPEG one decodes with Pillow at
1/8 scale via `draft`: the whole entropy-coded stream is still parsed, so cut-off and garbled files
fail as in a full decode, for 25-75% of its time) and writes DALI index files (wds2idx "v1.2" format)
listing only the good samples, each member named by the url-quoted sample key, which DALI hands back
as the output's source_info. The two readers' counts are then identical (tested for every cut
position of a shard). Cost, measured in docs/benchmarks.md §11 on 64 px scenes: ~400 us per sample on
one thread of a loaded 2-core box (pre-scan threads: cfg.num_threads, one shard each), i.e. 2-3 DALI
CPU epochs or ~1/4 of a reference epoch, paid once per reader, or once per shard version with
`cfg.index_cache` (a directory keyed by path, size and mtime; MMRPT keeps it under its data_dir).
DALI counts a pass's skips when the pass starts; the reference as it streams; after whole passes they
are equal.
Uncompressed .tar shards only (DALI reads members by byte offset).

Pixels: both readers resize the decoded image in float32 with a triangle filter ("linear + antialias":
half-pixel centres, half-width = the scale factor when shrinking, plain bilinear when enlarging; edge
pixels repeated past the border, DALI's convention: see `triangle_filter`), then normalise. Measured
max |DALI - reference| on generated scenes (64 px JPEG q90 -> 32, 24 and 96 px, CPU decode): 4.8e-7
in normalised units: both decode with libjpeg-turbo, bit for bit. The tests allow PIXEL_ATOL = 0.03
(about 2/255 before normalising) for other Pillow / libjpeg builds; the resize mismatches it exists to
catch were 0.11 (torch's antialias renormalising at the border) to 0.2+. GPU ("mixed", nvJPEG) decode
is not measured here (no GPU with DALI was at hand); nvJPEG's IDCT and chroma upsampling may differ
by more.

Shuffle (`cfg.shuffle`): shard order and a sample buffer of `cfg.shuffle_buffer`, seeded by
`cfg.seed` (+ epoch in the reference); the two readers shuffle differently, so compare them unshuffled.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from megatron_step.data.wds.common import (
    CLIP_MEAN,
    CLIP_STD,
    COMPONENTS,
    PIXEL_ATOL,
    SKIP_REASONS,
    TAR_ERRORS,
    CountingReader,
    ImageTextBatch,
    ImageTextConfig,
    ImageTextSample,
    ends_with_end_block,
    expand_urls,
    is_compressed,
    key_ext,
    sample_problem,
)
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

_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: "__key__"-style members


def _is_meta(name: str) -> bool:
    """Members webdataset's tar iterator skips without reading ("__key__"-style names)."""
    return "/" not in name and name.startswith("__") and name.endswith("__") or bool(_META_RE.match(name))


def prescan_shard(url: str, index_path: str, skipped: dict[str, int]) -> int:
    """Check every sample of one shard as the reference reader would and write a DALI index (wds2idx
    "v1.2": a header line `v1.2 N`, then per sample `ext offset size name` per member) listing only the
    good ones; adds the dropped ones to `skipped` by reason and returns N. Nothing is written when N = 0.

    Reads the shard with tarfile in streaming mode, member data included, exactly as webdataset's
    tar_file_iterator does, so a broken tar breaks at the same member in both readers."""
    if is_compressed(url):
        raise ValueError(f"{url}: compressed shard; DaliReader reads uncompressed .tar (members by offset)")
    rows: list[str] = []
    key, parts, where = None, {}, {}  # the sample being grouped: ext -> bytes, ext -> (offset, size)

    def finish():
        if key is None:
            return
        problem = sample_problem(parts, check_jpeg=True)
        if problem is not None:
            skipped[problem] = skipped.get(problem, 0) + 1
            return
        name = urllib.parse.quote(key, safe="")  # no spaces: the index is space-separated
        rows.append(" ".join(f"{ext} {where[ext][0]} {where[ext][1]} {name}" for ext in COMPONENTS))

    last = None  # the member whose data was read (or started) last: the one a cut tar breaks in
    try:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for member in tf:
                if not member.isreg() or _is_meta(member.name):
                    continue
                last = member.name
                data = tf.extractfile(member).read()  # read like webdataset: a cut member fails here
                k, ext = key_ext(member.name)
                if k is None:
                    continue
                if k != key:
                    finish()
                    key, parts, where = k, {}, {}
                if ext not in parts:  # a duplicate keeps the first copy (webdataset's group_by_keys too)
                    parts[ext], where[ext] = data, (member.offset_data, member.size)
        broken = not ends_with_end_block(url)  # cut between members: tarfile ends quietly
    except TAR_ERRORS:
        broken = True
    if broken:
        skipped["truncated_tar"] = skipped.get("truncated_tar", 0) + 1
        if key_ext(last)[0] == key:
            key = None  # drop the sample that was being read when the tar broke
    finish()  # (when the broken member started a new key, the sample before it is whole: judged as usual)
    if rows:
        with open(index_path, "w", encoding="ascii") as f:
            f.write(f"v1.2 {len(rows)}\n" + "".join(r + "\n" for r in rows))
    return len(rows)


def _cache_name(url: str) -> str:
    """The cache entry of a shard: its absolute path, size and mtime (a rewritten shard misses)."""
    import hashlib

    st = os.stat(url)
    ident = f"{os.path.abspath(url)}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha1(ident.encode()).hexdigest()


def _cached_prescan(url: str, index_path: str, skipped: dict[str, int]) -> int:
    """`prescan_shard` through the index cache: the index and a small json (good count, skip counts)
    next to it; written to temporary names and renamed, so concurrent readers (ranks) never see half
    an entry."""
    meta = index_path[: -len(".idx")] + ".json"
    try:
        with open(meta) as f:
            entry = json.load(f)
        if entry["good"] == 0 or os.path.exists(index_path):
            for reason, k in entry["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + k
            return entry["good"]
    except (OSError, ValueError, KeyError):
        pass  # no entry (or an unreadable one): scan
    mine: dict[str, int] = {}
    tmp = f"{index_path}.{os.getpid()}.{threading.get_ident()}.tmp"
    good = prescan_shard(url, tmp, mine)
    if good:
        os.replace(tmp, index_path)
    with open(tmp + ".json", "w") as f:
        json.dump({"url": os.path.abspath(url), "good": good, "skipped": mine}, f)
    os.replace(tmp + ".json", meta)
    for reason, k in mine.items():
        skipped[reason] = skipped.get(reason, 0) + k
    return good


class DaliReader(CountingReader):
    """NVIDIA DALI pipeline over pre-scanned shards (see the module docstring).

    A thin wrapper instead of DALI's DALIGenericIterator: that iterator turns each output into one
    dense tensor, so the variable-length txt/json bytes would need padding and unpadding, and it drops
    the per-sample source_info that carries the key. Here each `Pipeline.run()` is one batch; the
    reader pads the epoch's last batch by repeating its last sample (pad_last_batch), which is cut off
    again, so every epoch starts on a batch boundary and yields each good sample exactly once.
    """

    def __init__(self, urls: str | Sequence[str], cfg: ImageTextConfig | None = None):
        super().__init__(urls, cfg or ImageTextConfig())
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ImportError(f"DaliReader needs NVIDIA DALI (pip install nvidia-dali-cuda130): {e}") from e
        self.device = self.cfg.decode_device()  # "gpu" -> "mixed" decode; refuses "gpu" without CUDA
        self._tmp = tempfile.TemporaryDirectory(prefix="wds-dali-idx-")
        self._scan_skipped: dict[str, int] = {}
        self._shards: list[tuple[str, str]] = []  # (tar, index) of shards with at least one good sample
        t0 = time.perf_counter()
        cache = self.cfg.index_cache
        if cache:
            os.makedirs(cache, exist_ok=True)
            indexes = [os.path.join(cache, _cache_name(u) + ".idx") for u in self.urls]
        else:
            indexes = [os.path.join(self._tmp.name, f"{i:06d}.idx") for i in range(len(self.urls))]
        counts = [{} for _ in self.urls]
        scan = _cached_prescan if cache else prescan_shard
        # shards in parallel on cfg.num_threads threads: Pillow's decoder and file reads release the GIL
        with ThreadPoolExecutor(self.cfg.num_threads) as pool:
            good = list(pool.map(scan, self.urls, indexes, counts))
        for url, index, n, c in zip(self.urls, indexes, good, counts):
            if n:
                self._shards.append((url, index))
            for reason, k in c.items():
                self._scan_skipped[reason] = self._scan_skipped.get(reason, 0) + k
        self.prescan_s = time.perf_counter() - t0  # the pre-scan's wall time (once per reader)
        self.num_samples = sum(_index_count(idx) for _, idx in self._shards)  # good samples per epoch
        self._pipe = None
        self._mid_epoch = False  # an abandoned epoch leaves the pipeline mid-way: rebuild it

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        c, gpu = self.cfg, self.device == "gpu"

        @pipeline_def(
            batch_size=c.batch_size,
            num_threads=c.num_threads,
            device_id=torch.cuda.current_device() if gpu else None,  # None: a CPU-only pipeline
            seed=c.seed,
        )
        def pipeline():
            jpg, txt, meta = fn.readers.webdataset(
                paths=[tar for tar, _ in self._shards],
                index_paths=[idx for _, idx in self._shards],
                ext=list(COMPONENTS),
                missing_component_behavior="error",  # the pre-scan listed complete samples only
                random_shuffle=c.shuffle,
                initial_fill=c.shuffle_buffer,
                pad_last_batch=True,
                name="reader",
            )
            img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)  # HWC uint8
            # float output: no rounding to uint8 between resize and normalise, as in the reference
            img = fn.resize(
                img,
                size=[c.image_size, c.image_size],
                interp_type=types.INTERP_LINEAR,
                antialias=True,
                dtype=types.FLOAT,
            )
            img = fn.crop_mirror_normalize(
                img,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[m * 255 for m in c.mean],
                std=[s * 255 for s in c.std],
            )  # (3, S, S)
            return img, txt, meta

        pipe = pipeline()
        pipe.build()
        return pipe

    def _to_torch(self, images, n: int) -> torch.Tensor:
        dense = images.as_tensor()  # (B, 3, S, S): every image has the same size after resize
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(dense.shape(), dtype=torch.float32, device=torch.cuda.current_device())
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
            return out[:n]
        return torch.from_numpy(np.array(dense)[:n])  # a copy: DALI reuses its output buffers

    def __iter__(self) -> Iterator[ImageTextBatch]:
        for reason, n in self._scan_skipped.items():  # known from the pre-scan: counted as the pass starts
            self._skip(reason, n)
        if self.num_samples == 0:
            self.epoch += 1
            return
        if self._pipe is None or self._mid_epoch:
            self._pipe = self._build()
        self._mid_epoch = True
        left = self.num_samples
        while left > 0:
            images, txt, meta = self._pipe.run()
            n = min(left, self.cfg.batch_size)
            # source_info is "tar:offset:name"; the pre-scan wrote the url-quoted key as the name
            keys = [urllib.parse.unquote(txt[i].source_info().rsplit(":", 1)[1]) for i in range(n)]
            captions = [np.array(txt[i]).tobytes().decode("utf-8") for i in range(n)]
            metas = [json.loads(np.array(meta[i]).tobytes()) for i in range(n)]
            left -= n
            self.seen += n
            yield ImageTextBatch(keys, self._to_torch(images, n), captions, metas)
        self._mid_epoch = False
        self.epoch += 1


def _index_count(index_path: str) -> int:
    with open(index_path, encoding="ascii") as f:
        return int(f.readline().split()[1])


def dali_available() -> bool:
    try:
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

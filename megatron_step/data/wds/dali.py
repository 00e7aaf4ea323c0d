"""The NVIDIA DALI image-text reader: `fn.readers.webdataset` -> `fn.decoders.image` ("mixed" on a GPU,
"cpu" without) -> `fn.resize` (linear, antialias, float output) -> `fn.crop_mirror_normalize`, txt and
json passed through as bytes: the reference reader's pixel pipeline (see megatron_step.data.wds.reference).
Runs as a CPU-only pipeline (device_id=None) where CUDA is absent.

Why the pre-scan: DALI stops the pipeline on bad samples (its webdataset reader on a broken tar or, with
"error", a missing member; its decoder on random bytes and on a cut-off JPEG: "Premature end of JPEG
data"), so `DaliReader` first pre-scans each shard once, at construction (`prescan_shard`), with Python's
`tarfile` in streaming mode (the same reads webdataset does), applies the same checks (`sample_problem`;
the JPEG one decodes with Pillow at 1/8 scale via `draft`: the whole entropy-coded stream is still
parsed, so cut-off and garbled files fail as in a full decode, in a fraction of its time) and writes
DALI index files (wds2idx "v1.2" format) listing only the good samples, each member named by the
url-quoted sample key, which DALI hands back as the output's source_info. The two readers' counts are
then identical (tested for every cut position of a shard). The pre-scan runs on cfg.num_threads threads,
one shard each, once per reader, or once per shard version with `cfg.index_cache` (a directory keyed by
path, size and mtime; MMRPT keeps it under its data_dir). What it costs against an epoch:
docs/benchmarks.md §11. DALI counts a pass's skips when the pass starts (the reference as it streams).
Uncompressed .tar shards only (DALI reads members by byte offset).

Shuffle (`cfg.shuffle`): DALI's reader shuffles with a buffer of `cfg.shuffle_buffer` samples
(initial_fill), seeded by `cfg.seed`.
"""

from __future__ import annotations

import hashlib
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
    COMPONENTS,
    TAR_ERRORS,
    CountingReader,
    ImageTextBatch,
    ImageTextConfig,
    ends_with_end_block,
    is_compressed,
    key_ext,
    sample_problem,
)

__all__ = ["DaliReader", "prescan_shard"]


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
    """NVIDIA DALI pipeline over pre-scanned shards (see the module docstring for why the pre-scan).

    A thin wrapper instead of DALI's DALIGenericIterator: that iterator turns each output into one
    dense tensor, so the variable-length txt/json bytes would need padding and unpadding, and it drops
    the per-sample source_info that carries the key. Here each `Pipeline.run()` is one batch; the
    reader pads the epoch's last batch by repeating its last sample (pad_last_batch), which is cut off
    again, so every epoch starts on a batch boundary and yields each good sample exactly once.
    """

    def __init__(self, urls: str | Sequence[str], cfg: ImageTextConfig | None = None):
        super().__init__(urls, cfg or ImageTextConfig())
        try:  # lazy: DALI is optional (make_reader falls back to the reference without it)
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
        from nvidia.dali import fn, pipeline_def, types  # lazy: optional, checked in __init__

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
            from nvidia.dali.plugin.pytorch import feed_ndarray  # lazy: optional, as in _build

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
    """N from a DALI index's header line `v1.2 N`: the good samples of its shard."""
    with open(index_path, encoding="ascii") as f:
        return int(f.readline().split()[1])

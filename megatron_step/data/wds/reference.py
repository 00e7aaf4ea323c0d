"""The reference image-text reader: webdataset's own tar iterator and key grouping, Pillow decode, resize
as two small torch matmuls (`triangle_filter`), normalise; samples are checked as they stream
(`sample_problem`, then the full decode is the bad_jpeg check), so skips are counted as the stream
reaches them.

Pixels: the decoded image is resized in float32 with a triangle filter ("linear + antialias": half-pixel
centres, half-width = the scale factor when shrinking, plain bilinear when enlarging; edge pixels repeated
past the border, DALI's convention: see `triangle_filter`), then normalised with `cfg.mean` / `cfg.std`:
what DaliReader's `fn.resize` + `fn.crop_mirror_normalize` compute, so the two agree to PIXEL_ATOL.

Shuffle (`cfg.shuffle`): shard order and webdataset's sample buffer of `cfg.shuffle_buffer`, seeded by
`cfg.seed` and the epoch, so each epoch has a new order.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from megatron_step.data.wds.common import (
    TAR_ERRORS,
    CountingReader,
    ImageTextBatch,
    ImageTextConfig,
    ImageTextSample,
    ends_with_end_block,
    is_compressed,
    key_ext,
    sample_problem,
)

__all__ = ["WebDatasetReader", "triangle_filter"]


def triangle_filter(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32 matrix resizing one axis with a triangle filter ("linear + antialias"), as
    DALI's fn.resize does it: half-pixel centres, half-width max(n_in / n_out, 1) input pixels (plain
    linear interpolation when enlarging), taps beyond the border take the edge pixel's value.

    Why not F.interpolate(mode="bilinear", antialias=True): it renormalises the cut-off filter at the
    border instead, which moves the outermost output row/column on noisy images by more than PIXEL_ATOL
    allows. This filter matches DALI's CPU resize on noise, borders included (tested against DALI in
    tests/data/test_wds_readers.py; measured agreement: docs/benchmarks.md §11).
    """
    scale = n_in / n_out
    half = max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale  # input pixel j spans [j, j + 1)
    offsets = torch.arange(-math.ceil(half) - 1, math.ceil(half) + 2)
    taps = centre.floor().long()[:, None] + offsets[None, :]  # (n_out, K) input indices, may overhang
    w = (1 - ((taps + 0.5) - centre[:, None]).abs() / half).clamp(min=0)
    w = w / w.sum(1, keepdim=True)
    out = torch.zeros(n_out, n_in, dtype=torch.float64)
    out.scatter_add_(1, taps.clamp(0, n_in - 1), w)  # an overhanging tap lands on the edge pixel
    return out.float()


class WebDatasetReader(CountingReader):
    """Reference reader: webdataset tar iteration + key grouping, PIL decode, torch resize/normalise."""

    def __init__(self, urls: str | Sequence[str], cfg: ImageTextConfig | None = None):
        super().__init__(urls, cfg or ImageTextConfig())
        c = self.cfg
        self._mean = torch.tensor(c.mean).view(3, 1, 1) * 255  # (3, 1, 1): normalise uint8-scale pixels
        self._std = torch.tensor(c.std).view(3, 1, 1) * 255
        self._filters: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # by input (H, W)

    def _shard_parts(self, url: str) -> Iterator[dict]:
        """Grouped samples of one shard (`{"__key__", ext: bytes}`), good or not; counts a broken tar."""
        # lazy: webdataset takes about a second to import; importing this module should not pay it
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        errors: list[Exception] = []
        last = [""]  # name of the member webdataset read (or started reading) last

        def stop(exn):  # webdataset's handler hook (member data cut short): remember, end this shard
            errors.append(exn)
            return False

        def select(name):  # webdataset calls it before reading a member's data
            last[0] = name
            return True

        def files():
            with open(url, "rb") as stream:
                try:
                    for f in tar_file_iterator(stream, handler=stop, select_files=select):
                        f["__url__"] = url
                        yield f
                except TAR_ERRORS as exn:  # raised outside webdataset's handler (open, next header)
                    errors.append(exn)
            if not errors and not is_compressed(url) and not ends_with_end_block(url):
                # cut between members: tarfile ends quietly (a compressed tar ends in its codec's trailer)
                errors.append(EOFError(f"{url}: no end-of-archive block"))

        # a duplicate member raises in group_by_keys; ignoring it keeps the first copy (as the pre-scan)
        for parts in group_by_keys(files(), handler=lambda exn: True):
            if errors and parts["__key__"] == key_ext(last[0])[0]:
                continue  # the sample that was being read when the tar broke (counted below)
            yield parts
        if errors:
            self._skip("truncated_tar")

    def _decode(self, jpg: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(jpg)) as img:
            hwc = torch.from_numpy(np.array(img.convert("RGB"))).float()  # (H, W, 3), 0..255
        h, w, s = hwc.shape[0], hwc.shape[1], self.cfg.image_size
        if (h, w) not in self._filters:
            self._filters[(h, w)] = (triangle_filter(h, s), triangle_filter(w, s))
        rows, cols = self._filters[(h, w)]  # (S, H), (S, W)
        x = rows @ hwc.permute(2, 0, 1) @ cols.T  # (S, H) @ (3, H, W) @ (W, S) -> (3, S, S)
        return (x - self._mean) / self._std

    def _good_samples(self, urls: list[str]) -> Iterator[ImageTextSample]:
        for url in urls:
            for parts in self._shard_parts(url):
                problem = sample_problem(parts, check_jpeg=False)
                if problem is None:
                    try:
                        image = self._decode(parts["jpg"])
                    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                        problem = "bad_jpeg"
                if problem is not None:
                    self._skip(problem)
                    continue
                caption = parts["txt"].decode("utf-8")
                yield ImageTextSample(parts["__key__"], image, caption, json.loads(parts["json"]))

    def __iter__(self) -> Iterator[ImageTextBatch]:
        # lazy, as above; webdataset's own buffer shuffle (private there, but it is the reference's)
        from webdataset.filters import _shuffle

        c = self.cfg
        urls, rng = list(self.urls), None
        if c.shuffle:
            rng = random.Random(c.seed * 1_000_003 + self.epoch)
            rng.shuffle(urls)
        stream = self._good_samples(urls)
        if rng is not None:
            stream = _shuffle(stream, bufsize=c.shuffle_buffer, initial=c.shuffle_buffer, rng=rng)
        buf: list[ImageTextSample] = []
        for sample in stream:
            buf.append(sample)
            if len(buf) == c.batch_size:
                yield self._collate(buf)
                buf = []
        if buf:
            yield self._collate(buf)
        self.epoch += 1

    def _collate(self, buf: list[ImageTextSample]) -> ImageTextBatch:
        self.seen += len(buf)
        return ImageTextBatch(
            [s.key for s in buf],
            torch.stack([s.image for s in buf]),
            [s.caption for s in buf],
            [s.meta for s in buf],
        )

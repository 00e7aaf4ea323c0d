"""megatron_step/data/wds/: the DALI pipeline and the webdataset reference give the same keys, captions,
meta and pixels; corrupt or incomplete samples (truncated tar, bad JPEG, missing caption / image / json,
bad json) are skipped and counted identically by both, never raised; config errors name the field."""

from __future__ import annotations

import gzip
import json
import os
import random
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from megatron_step.data.wds import (
    PIXEL_ATOL,
    DaliReader,
    ImageTextConfig,
    WebDatasetReader,
    make_reader,
    prescan_shard,
    triangle_filter,
)
from tools.make_wds_shards import scene_samples, write_shards

dali = pytest.importorskip("nvidia.dali")
READERS = {"dali": DaliReader, "webdataset": WebDatasetReader}


def _scenes(out, n=40, per_shard=16, seed=3, size=64):
    os.makedirs(out, exist_ok=True)
    return write_shards(scene_samples(n, seed, size, 90, 1, 4), str(out), per_shard, progress=False)


def _read_all(reader):
    batches = list(reader)
    return batches, [s for b in batches for s in b.samples()]


@pytest.mark.parametrize("image_size", [32, 24, 96])  # 2x down, 2.67x down, 1.5x up from 64 px
def test_readers_agree_on_keys_captions_meta_pixels(tmp_path, image_size):
    _scenes(tmp_path)  # 40 samples in shards of 16, 16, 8
    cfg = ImageTextConfig(image_size=image_size, batch_size=6, decode="cpu")
    ref_reader, dali_reader = WebDatasetReader(str(tmp_path / "shard-*.tar"), cfg), None
    ref_batches, ref = _read_all(ref_reader)
    dali_reader = DaliReader(str(tmp_path / "shard-*.tar"), cfg)
    dali_batches, got = _read_all(dali_reader)
    expect_keys = [f"{i:09d}" for i in range(40)]
    assert [s.key for s in ref] == [s.key for s in got] == expect_keys
    assert (
        [len(b) for b in ref_batches] == [len(b) for b in dali_batches] == [6] * 6 + [4]
    )  # last one partial
    truth = {f"{i:09d}": (cap, meta) for i, (_, cap, meta) in enumerate(scene_samples(40, 3, 64, 90, 1, 4))}
    for a, b in zip(ref, got):
        assert a.caption == b.caption == truth[a.key][0]
        assert a.meta == b.meta == truth[a.key][1]
        assert a.image.shape == b.image.shape == (3, image_size, image_size)
        assert a.image.dtype == b.image.dtype == torch.float32
    diff = max((a.image - b.image).abs().max().item() for a, b in zip(ref, got))
    # measured on this CPU (both decode with libjpeg-turbo, same filter): 0 to 5e-7; tolerance PIXEL_ATOL
    assert diff <= PIXEL_ATOL, diff
    # normalised with CLIP's mean/std: a mid-grey 0.5 pixel maps near 0, the range is about [-1.8, 2.2]
    assert min(b.images.min().item() for b in dali_batches) > -1.85
    assert max(b.images.max().item() for b in dali_batches) < 2.2
    for r in (ref_reader, dali_reader):
        assert r.skipped == {} and r.seen == 40 and r.epoch == 1


def test_triangle_filter_matches_dali_resize_on_noise():
    """The reference's resize equals DALI's linear+antialias resize, borders included (noise: worst case)."""
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((64, 64), (32, 32)), ((96, 80), (24, 40)), ((40, 50), (64, 17))]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe(img=img, size=(oh, ow)):
            x = fn.external_source(source=lambda: [img], batch=True, layout="HWC")
            return fn.resize(
                x, size=list(size), interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT
            )

        p = pipe()
        p.build()
        got = np.array(p.run()[0][0])  # (oh, ow, 3)
        want = torch.einsum(
            "sh,hwc,tw->stc", triangle_filter(h, oh), torch.from_numpy(img).float(), triangle_filter(w, ow)
        )
        assert np.abs(got - want.numpy()).max() < 2e-3, ((h, w), (oh, ow))


def _member_offsets(path):
    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf}


def _write(path, samples):
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory):
    """Five shards: good ones around a truncated tar (cut inside a jpg that starts a sample, so the sample
    before it is whole), one cut inside a sample's last member, and one of assorted bad samples.
    Returns (pattern, keys that must come out in order, exact skip counts)."""
    root = tmp_path_factory.mktemp("corrupt")
    scenes = list(scene_samples(30, 11, 64, 90, 1, 4))

    def sample(i, drop=(), **override):
        jpg, cap, meta = scenes[i]
        s = {"__key__": f"{i:09d}", "jpg": jpg, "txt": cap.encode(), "json": json.dumps(meta).encode()}
        s.update(override)
        return {k: v for k, v in s.items() if k not in drop}

    _write(root / "shard-000000.tar", [sample(i) for i in range(0, 5)])
    # cut in the middle of sample 8's jpg (its first member): 5, 6, 7 come out, 8 and 9 are lost
    _write(root / "shard-000001.tar", [sample(i) for i in range(5, 10)])
    off, size = _member_offsets(root / "shard-000001.tar")["000000008.jpg"]
    os.truncate(root / "shard-000001.tar", off + size // 2)
    bad = random.Random(0).randbytes(700)
    _write(
        root / "shard-000002.tar",
        [
            sample(10),
            sample(11, drop=("txt",)),  # missing caption
            sample(12, jpg=bad),  # random bytes
            sample(13, drop=("jpg",)),  # no image
            sample(14, jpg=scenes[14][0][: len(scenes[14][0]) // 2]),  # cut-off JPEG
            sample(15, json=b"{not json"),
            sample(16, drop=("json",)),
            sample(17, txt=b"\xff\xfe caption"),  # not UTF-8
            sample(18),
        ],
    )
    # cut in the middle of sample 21's txt (its last member: jpg, json, txt): 19, 20 come out
    _write(root / "shard-000003.tar", [sample(i) for i in range(19, 24)])
    off, size = _member_offsets(root / "shard-000003.tar")["000000021.txt"]
    os.truncate(root / "shard-000003.tar", off + size // 2)
    _write(root / "shard-000004.tar", [sample(i) for i in range(24, 30)])
    good = [0, 1, 2, 3, 4, 5, 6, 7, 10, 18, 19, 20, *range(24, 30)]
    skipped = {
        "truncated_tar": 2,
        "missing_caption": 1,
        "missing_image": 1,
        "missing_json": 1,
        "bad_jpeg": 2,
        "bad_json": 1,
        "bad_caption": 1,
    }
    return str(root / "shard-*.tar"), [f"{i:09d}" for i in good], skipped


@pytest.mark.parametrize("kind", ["dali", "webdataset"])
def test_corrupt_shards_are_skipped_and_counted(corrupt_shards, kind):
    pattern, keys, skipped = corrupt_shards
    reader = READERS[kind](pattern, ImageTextConfig(batch_size=4, decode="cpu"))
    _, samples = _read_all(reader)  # must not raise
    assert [s.key for s in samples] == keys
    assert reader.skipped == skipped
    assert reader.seen == len(keys)
    assert all(torch.isfinite(s.image).all() for s in samples)
    _, again = _read_all(reader)  # a second epoch: same samples, counts add up
    assert [s.key for s in again] == keys
    assert reader.skipped == {k: 2 * v for k, v in skipped.items()} and reader.seen == 2 * len(keys)


def test_any_cut_of_a_shard_counts_the_same_in_both_readers(tmp_path):
    """Cut a 3-sample shard at every member's header start, inside each header and inside each member's
    data: the reference's samples/counts equal the pre-scan's index/counts (what DALI then reads)."""
    _scenes(tmp_path / "full", n=3, per_shard=3)
    full = (tmp_path / "full" / "shard-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "full" / "shard-000000.tar") as tf:
        members = [(m.offset, m.offset_data, m.size) for m in tf]
    cuts = [c for off, data, size in members for c in (off, off + 100, data + size // 2, data + size)]
    keys = [f"{i:09d}" for i in range(3)]
    for cut in [*cuts, 0, 700]:
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(full[:cut])
        ref = WebDatasetReader(str(path), ImageTextConfig())
        got = [s.key for s in ref.samples()]
        skipped: dict = {}
        n = prescan_shard(str(path), str(tmp_path / "cut.idx"), skipped)
        index = (tmp_path / "cut.idx").read_text().splitlines()[1:] if n else []
        assert [line.split()[3] for line in index] == got and skipped == ref.skipped, cut
        assert ref.skipped == {"truncated_tar": 1} and got == keys[: len(got)], cut  # a whole prefix survives
        (tmp_path / "cut.idx").unlink(missing_ok=True)


def test_dali_prescan_counts_without_iterating_and_all_bad_shards(corrupt_shards, tmp_path):
    pattern, keys, _ = corrupt_shards
    reader = DaliReader(pattern, ImageTextConfig(decode="cpu"))
    assert reader.num_samples == len(keys) and reader.prescan_s > 0
    bad = random.Random(1).randbytes(300)
    _write(tmp_path / "shard-000000.tar", [{"__key__": "a", "jpg": bad, "txt": b"x", "json": b"{}"}])
    for kind in READERS:  # nothing good at all: an empty epoch, not an error
        r = make_reader(kind, str(tmp_path / "shard-*.tar"), ImageTextConfig(decode="cpu"))
        assert list(r) == [] and r.skipped == {"bad_jpeg": 1} and r.seen == 0


def test_shuffle_visits_each_sample_once_per_epoch(tmp_path):
    _scenes(tmp_path, n=40, per_shard=10)
    cfg = ImageTextConfig(batch_size=6, decode="cpu", shuffle=True, shuffle_buffer=16, seed=5)
    plain = [f"{i:09d}" for i in range(40)]
    for kind, cls in READERS.items():
        reader = cls(str(tmp_path / "shard-*.tar"), cfg)
        epochs = [[s.key for s in reader.samples()] for _ in range(2)]
        for keys in epochs:
            assert sorted(keys) == plain and keys != plain, kind
        assert epochs[0] != epochs[1], kind  # a new order each epoch


def test_abandoned_dali_epoch_restarts_cleanly(tmp_path):
    _scenes(tmp_path, n=20, per_shard=10)
    reader = DaliReader(str(tmp_path / "shard-*.tar"), ImageTextConfig(batch_size=4, decode="cpu"))
    it = iter(reader)
    assert next(it).keys == [f"{i:09d}" for i in range(4)]
    del it
    assert [s.key for s in reader.samples()] == [f"{i:09d}" for i in range(20)]


def test_make_reader_kinds_and_errors(tmp_path):
    _scenes(tmp_path, n=4, per_shard=4)
    pattern = str(tmp_path / "shard-*.tar")
    assert isinstance(make_reader("auto", pattern), DaliReader)  # DALI imports here
    assert isinstance(make_reader("webdataset", [str(tmp_path / "shard-000000.tar")]), WebDatasetReader)
    with pytest.raises(ValueError, match="'tfrecord'"):
        make_reader("tfrecord", pattern)
    missing = str(tmp_path / "nope-*.tar")
    for kind in READERS:
        with pytest.raises(ValueError, match="nope-\\*"):
            make_reader(kind, missing)
        with pytest.raises(ValueError, match="empty"):
            make_reader(kind, [])
    gz = tmp_path / "gz" / "shard-000000.tar.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress((tmp_path / "shard-000000.tar").read_bytes()))
    ref = WebDatasetReader(str(gz))  # webdataset reads a compressed tar; its gzip trailer is no cut
    assert len(list(ref.samples())) == 4 and ref.skipped == {}
    with pytest.raises(ValueError, match="compressed"):
        DaliReader(str(gz))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"image_size": 0}, "image_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"batch_size": 0}, "batch_size"),
        ({"decode": "tpu"}, "decode.*'tpu'"),
        ({"num_threads": 0}, "num_threads"),
        ({"shuffle_buffer": 0}, "shuffle_buffer"),
    ],
)
def test_config_errors_name_field_and_value(kw, match):
    with pytest.raises(ValueError, match=match):
        ImageTextConfig(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_decode_refused_without_cuda(tmp_path):
    _scenes(tmp_path, n=2, per_shard=2)
    assert ImageTextConfig().decode_device() == "cpu"  # "auto" falls back
    with pytest.raises(ValueError, match="decode='gpu' needs CUDA"):
        DaliReader(str(tmp_path / "shard-*.tar"), ImageTextConfig(decode="gpu"))


def test_index_cache_skips_the_prescan_and_keeps_the_counts(corrupt_shards, tmp_path, monkeypatch):
    import glob
    import shutil

    from megatron_step.data.wds import dali as wds_dali  # where DaliReader looks prescan_shard up

    src, keys, skipped = corrupt_shards
    os.makedirs(tmp_path / "shards")
    for path in glob.glob(src):  # a copy: one shard is rewritten below
        shutil.copy(path, tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "shard-*.tar")
    cfg = ImageTextConfig(batch_size=4, decode="cpu", index_cache=str(tmp_path / "idx"))
    first = DaliReader(pattern, cfg)
    entries = sorted(os.listdir(tmp_path / "idx"))
    assert len([e for e in entries if e.endswith(".json")]) == 5 and not [e for e in entries if ".tmp" in e]
    calls = []
    real = wds_dali.prescan_shard
    monkeypatch.setattr(wds_dali, "prescan_shard", lambda *a: calls.append(a[0]) or real(*a))
    again = DaliReader(pattern, cfg)  # every shard from the cache
    assert calls == []
    for reader in (first, again):
        _, samples = _read_all(reader)
        assert [s.key for s in samples] == keys and reader.skipped == skipped
    # a rewritten shard (new size and mtime) is scanned again, the others are not
    shard = sorted(glob.glob(pattern))[-1]
    with open(shard, "ab") as f:
        f.write(b"\0" * 1024)
    DaliReader(pattern, cfg)
    assert calls == [shard]

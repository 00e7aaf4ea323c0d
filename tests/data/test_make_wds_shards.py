"""tools/make_wds_shards.py and megatron_step/data/scenes.py: deterministic scene shards whose captions,
spans and ground truth agree with the pixels; the folder + captions source skips missing images."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
import webdataset as wds
from PIL import Image

from megatron_step.data.scenes import (
    BACKGROUND,
    PALETTE,
    encode_jpeg,
    generate_scene,
    position_of,
    scene_rng,
)
from tools.make_wds_shards import main

NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}


def _run(out, *extra):
    return main(["--out", str(out), "--no-progress", *map(str, extra)])


def _read(shards):
    """Samples of the shards in order, as {key: {"jpg": bytes, "txt": str, "json": dict}}."""
    ds = wds.WebDataset(shards, shardshuffle=False)
    return {
        s["__key__"]: {"jpg": s["jpg"], "txt": s["txt"].decode("utf-8"), "json": json.loads(s["json"])}
        for s in ds
    }


def _nearest_colour(rgb) -> str:
    named = {**PALETTE, "background": BACKGROUND}
    return min(named, key=lambda k: sum((a - b) ** 2 for a, b in zip(named[k], rgb)))


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_sharding_counts_keys_and_manifest(tmp_path):
    res = _run(tmp_path, "--scenes", 10, "--samples-per-shard", 4)
    assert res["samples"] == 10 and res["skipped"] == 0
    assert [os.path.basename(p) for p in res["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]
    per_shard = [len(_read([p])) for p in res["shards"]]
    assert per_shard == [4, 4, 2]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["samples"] == 10 and manifest["seed"] == 0 and manifest["skipped"] == 0
    assert manifest["generator"]["image_size"] == 64 and manifest["generator"]["source"] == "scenes"
    assert list(_read(res["shards"])) == [f"{i:09d}" for i in range(10)]


def test_same_seed_identical_other_seed_differs(tmp_path):
    a = _run(tmp_path / "a", "--scenes", 6, "--samples-per-shard", 4, "--seed", 3)
    b = _run(tmp_path / "b", "--scenes", 6, "--samples-per-shard", 4, "--seed", 3)
    c = _run(tmp_path / "c", "--scenes", 6, "--samples-per-shard", 4, "--seed", 4)
    # fixed tar mtime/owner: whole files match, not just payloads
    assert [_sha(p) for p in a["shards"]] == [_sha(p) for p in b["shards"]]
    sa, sb, sc = _read(a["shards"]), _read(b["shards"]), _read(c["shards"])
    assert sa == sb
    assert all(sa[k]["jpg"] != sc[k]["jpg"] and sa[k]["txt"] != sc[k]["txt"] for k in sa)
    # a sample does not depend on the shard size: sample i is drawn from scene_rng(seed, i)
    d = _run(tmp_path / "d", "--scenes", 6, "--samples-per-shard", 5, "--seed", 3)
    assert _read(d["shards"]) == sa


def test_read_back_decodes_and_truth_matches_pixels(tmp_path):
    res = _run(tmp_path, "--scenes", 40, "--samples-per-shard", 16, "--image-size", 64, "--seed", 7)
    samples = _read(res["shards"])
    assert len(samples) == 40
    n_objects = 0
    for key, s in samples.items():
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB", key
        img = img.convert("RGB")
        truth = s["json"]
        assert truth["size"] == [64, 64] and 1 <= len(truth["objects"]) <= 4
        for o in truth["objects"]:
            n_objects += 1
            assert _nearest_colour(img.getpixel((o["x"], o["y"]))) == o["colour"], (key, o)
            assert position_of(o["x"], o["y"], 64) == o["position"], (key, o)
            assert o["r"] <= o["x"] <= 63 - o["r"] and o["r"] <= o["y"] <= 63 - o["r"], (key, o)
        # the corner pixel is never covered (corner cells hold no centre and shapes fit in their cell's row)
        assert _nearest_colour(img.getpixel((0, 0))) == "background", key
    assert n_objects > 40  # some scenes have several objects


def test_other_image_size_and_quality(tmp_path):
    res = _run(tmp_path, "--scenes", 3, "--image-size", 96, "--jpeg-quality", 50)
    for s in _read(res["shards"]).values():
        assert Image.open(io.BytesIO(s["jpg"])).size == (96, 96)
    hi = _run(tmp_path / "hi", "--scenes", 3, "--image-size", 96, "--jpeg-quality", 95)
    lo_bytes = sum(len(s["jpg"]) for s in _read(res["shards"]).values())
    hi_bytes = sum(len(s["jpg"]) for s in _read(hi["shards"]).values())
    assert lo_bytes < hi_bytes  # the option reaches the encoder


def test_caption_spans_and_sentence_attributes():
    seen_visual = seen_generic = 0
    for i in range(200):
        _, caption, truth = generate_scene(scene_rng(0, i), 64)
        objects, sentences = truth["objects"], truth["sentences"]
        assert " ".join(s["text"] for s in sentences) == caption
        for s in sentences:
            assert caption[s["start"] : s["end"]] == s["text"]
            if not s["visual"]:
                seen_generic += 1
                assert s["attributes"] == {} and s["objects"] == []
                continue
            seen_visual += 1
            attrs, refs = s["attributes"], [objects[j] for j in s["objects"]]
            assert refs, s
            for name in ("shape", "colour", "size", "position"):
                if name in attrs:
                    assert all(o[name] == attrs[name] for o in refs), (s, refs)
                    assert attrs[name] in s["text"], s
            if "count" in attrs:
                # the count is of every object matching the stated colour/shape, not only of some
                match = [
                    o for o in objects if all(o[k] == attrs[k] for k in ("colour", "shape") if k in attrs)
                ]
                assert attrs["count"] == len(match) == len(refs), (s, objects)
                word = s["text"].split()[2]  # "There are two ..." / "There is one ..."
                assert NUMBERS[word] == attrs["count"], s
                assert s["text"].startswith("There is " if attrs["count"] == 1 else "There are "), s
            if s["text"].startswith("The "):  # "The red circle ..." claims uniqueness
                same = [o for o in objects if (o["colour"], o["shape"]) == (attrs["colour"], attrs["shape"])]
                assert len(same) == 1, (s, objects)
    assert seen_visual > 200 and seen_generic >= 200


def test_generate_scene_deterministic_and_validates():
    a, b = generate_scene(scene_rng(5, 1)), generate_scene(scene_rng(5, 1))
    assert a[1:] == b[1:] and encode_jpeg(a[0]) == encode_jpeg(b[0])
    assert generate_scene(scene_rng(5, 2))[1] != a[1]
    with pytest.raises(ValueError, match="max_objects"):
        generate_scene(scene_rng(0, 0), 64, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="size"):
        generate_scene(scene_rng(0, 0), 16)


def _folder(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (20, 10), (200, 10, 10)).save(imgs / "a.jpg", quality=80)
    Image.new("RGBA", (12, 8), (10, 200, 10, 128)).save(imgs / "b.png")
    (imgs / "bad.jpg").write_bytes(b"not an image")
    return imgs


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_folder_source_skips_missing_and_unreadable(tmp_path, fmt):
    imgs = _folder(tmp_path)
    rows = [("a.jpg", "A red box."), ("missing.jpg", "Gone."), ("b.png", "A green box."), ("bad.jpg", "Bad.")]
    cap = tmp_path / f"captions.{fmt}"
    if fmt == "jsonl":
        cap.write_text("".join(json.dumps({"image": n, "caption": c}) + "\n" for n, c in rows))
    else:
        cap.write_text("".join(f"{n}\t{c}\n" for n, c in rows))
    out = tmp_path / "out"
    res = _run(out, "--images", imgs, "--captions", cap, "--samples-per-shard", 1)
    assert res["samples"] == 2 and res["skipped"] == 2 and len(res["shards"]) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped_reasons"] == {"missing": 1, "unreadable": 1}
    samples = list(_read(res["shards"]).values())
    assert [s["json"] for s in samples] == [{"source": "a.jpg"}, {"source": "b.png"}]
    assert [s["txt"] for s in samples] == ["A red box.", "A green box."]
    assert samples[0]["jpg"] == (imgs / "a.jpg").read_bytes()  # an RGB JPEG passes through untouched
    png = Image.open(io.BytesIO(samples[1]["jpg"]))
    assert png.format == "JPEG" and png.mode == "RGB" and png.size == (12, 8)


def test_malformed_captions_line_names_file_and_line(tmp_path):
    imgs = _folder(tmp_path)
    cap = tmp_path / "c.jsonl"
    cap.write_text(json.dumps({"image": "a.jpg", "caption": "x"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:2:"):
        _run(tmp_path / "out", "--images", imgs, "--captions", cap)
    tsv = tmp_path / "c.tsv"
    tsv.write_text("a.jpg no tab here\n")
    with pytest.raises(ValueError, match=r"c\.tsv:1:"):
        _run(tmp_path / "out", "--images", imgs, "--captions", tsv)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--scenes", "4", "--samples-per-shard", "0"], "--samples-per-shard"),
        (["--scenes", "0"], "--scenes"),
        (["--scenes", "2", "--image-size", "8"], "--image-size"),
        (["--scenes", "2", "--jpeg-quality", "0"], "--jpeg-quality"),
        (["--scenes", "2", "--min-objects", "3", "--max-objects", "2"], "--min-objects"),
        ([], "--scenes"),
        (["--scenes", "2", "--images", "."], "exactly one source"),
        (["--images", "."], "--captions"),
        (["--images", ".", "--captions", "no/such/file.jsonl"], "--captions"),
        (["--images", "no/such/dir", "--captions", "x.tsv"], "--images"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_flag(tmp_path, argv, flag):
    with pytest.raises(ValueError, match=flag):
        _run(tmp_path, *argv)


def test_existing_shards_need_overwrite(tmp_path):
    _run(tmp_path, "--scenes", 5, "--samples-per-shard", 2)
    with pytest.raises(ValueError, match="--overwrite"):
        _run(tmp_path, "--scenes", 2)
    res = _run(tmp_path, "--scenes", 2, "--overwrite")
    assert len(res["shards"]) == 1
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == ["shard-000000.tar"]  # no stale extras

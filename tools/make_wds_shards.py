"""Write webdataset image-text shards (jpg + txt + json per sample) for MMRPT pretraining.

    python tools/make_wds_shards.py --scenes 10000 --out runs/wds/scenes --samples-per-shard 1000
    python tools/make_wds_shards.py --scenes 200 --out runs/wds/tiny --image-size 96 --seed 1
    python tools/make_wds_shards.py --images data/imgs --captions data/captions.jsonl --out runs/wds/real
    python tools/make_wds_shards.py --images data/imgs --captions data/captions.tsv --out runs/wds/real \\
        --samples-per-shard 5000 --overwrite

Sources (exactly one):
  --scenes N                  N generated scenes (megatron_step/data/scenes.py): 1-4 coloured shapes;
                              json = ground truth (objects; per caption sentence its span, visual or not,
                              and the attributes it states).
  --images DIR --captions F   F is JSONL (`{"image": "a.jpg", "caption": "..."}`, for .jsonl/.json) or
                              TSV (`a.jpg<TAB>caption`, any other suffix); json = {"source": name}. JPEG
                              files already RGB pass through byte for byte, others are re-encoded as JPEG.
                              Missing / unreadable images and empty captions are skipped and counted.

Writes OUT/shard-000000.tar, ... (`--samples-per-shard` samples each, keys "000000042") and
OUT/manifest.json (shards, sample counts, seed, generator settings, skipped). Tar headers have a fixed
mtime/owner, so one seed gives byte-identical shards on one Pillow build. Read back with
`webdataset.WebDataset(sorted(glob("OUT/shard-*.tar")), shardshuffle=False)`.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import time
import warnings

from PIL import Image, UnidentifiedImageError

# Megatron-Core (imported by megatron_step.data) announces missing TE/apex at import time; expected here.
warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step.data.scenes import encode_jpeg  # noqa: E402
from megatron_step.data.shards import SHARD_PATTERN, scene_samples, write_shards  # noqa: E402, F401


def read_captions(path: str) -> list[tuple[str, str]]:
    """(image name, caption) pairs from a JSONL or TSV captions file; a bad line raises `FILE:LINE: why`."""
    is_json = path.endswith((".jsonl", ".json"))
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            if is_json:
                try:
                    rec = json.loads(line)
                    pairs.append((str(rec["image"]), str(rec.get("caption") or "")))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: want {{'image': ..., 'caption': ...}} ({e!r})") from e
            else:
                name, tab, caption = line.partition("\t")
                if not tab:
                    raise ValueError(f"{path}:{lineno}: want 'name<TAB>caption', found no tab")
                pairs.append((name, caption))
    return pairs


def _load_jpeg(path: str, quality: int) -> bytes:
    """The file's bytes if it is already an RGB JPEG, else the image re-encoded as RGB JPEG."""
    with open(path, "rb") as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as img:
        img.load()  # decode now: a truncated file must fail here, not in the training loader
        if img.format == "JPEG" and img.mode == "RGB":
            return raw
        return encode_jpeg(img.convert("RGB"), quality)


def folder_samples(images: str, pairs: list[tuple[str, str]], quality: int, skipped: dict):
    """Yield (jpg bytes, caption, {"source": name}); counts what it skips into `skipped` by reason."""
    for name, caption in pairs:
        path = os.path.join(images, name)
        if not caption.strip():
            reason = "empty_caption"
        elif not os.path.isfile(path):
            reason = "missing"
        else:
            try:
                yield _load_jpeg(path, quality), caption, {"source": name}
                continue
            except (OSError, UnidentifiedImageError, ValueError):
                reason = "unreadable"
        skipped[reason] = skipped.get(reason, 0) + 1
        examples = skipped.setdefault("examples", [])
        if len(examples) < 5:  # a few names for the final report, not a list as long as the dataset
            examples.append(name)


def _check(args) -> None:
    """Argument errors as ValueError naming the flag (callers of main(argv) get an exception, not exit 2)."""
    if (args.scenes is None) == (args.images is None):
        raise ValueError("give exactly one source: --scenes N, or --images DIR with --captions FILE")
    if args.scenes is not None and args.scenes < 1:
        raise ValueError(f"--scenes must be >= 1, got {args.scenes}")
    if args.images is not None:
        if not os.path.isdir(args.images):
            raise ValueError(f"--images {args.images!r} is not a directory")
        if args.captions is None:
            raise ValueError("--images needs --captions FILE")
    if args.captions is not None:
        if args.images is None:
            raise ValueError("--captions needs --images DIR")
        if not os.path.isfile(args.captions):
            raise ValueError(f"--captions {args.captions!r} is not a file")
    if args.samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if not 32 <= args.image_size <= 2048:
        raise ValueError(f"--image-size must be in [32, 2048], got {args.image_size}")
    if not 1 <= args.jpeg_quality <= 95:  # Pillow: above 95 only grows the file
        raise ValueError(f"--jpeg-quality must be in [1, 95], got {args.jpeg_quality}")
    if not 1 <= args.min_objects <= args.max_objects <= 4:
        raise ValueError(
            f"--min-objects({args.min_objects}) / --max-objects({args.max_objects}): "
            "need 1 <= min <= max <= 4"
        )
    stale = glob.glob(os.path.join(args.out, "shard-*.tar")) + glob.glob(
        os.path.join(args.out, "manifest.json")
    )
    if stale and not args.overwrite:
        raise ValueError(f"--out {args.out!r} already holds shards / manifest.json (pass --overwrite)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_argument_group("source (exactly one)")
    src.add_argument("--scenes", type=int, metavar="N", help="generate N scenes")
    src.add_argument("--images", metavar="DIR", help="image folder (with --captions)")
    src.add_argument("--captions", metavar="FILE", help=".jsonl {image, caption} or TSV name<TAB>caption")
    ap.add_argument("--out", required=True, help="output folder for shard-*.tar and manifest.json")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="scene generator seed")
    ap.add_argument("--image-size", type=int, default=64, help="scene side in pixels")
    ap.add_argument("--min-objects", type=int, default=1)
    ap.add_argument("--max-objects", type=int, default=4)
    ap.add_argument("--jpeg-quality", type=int, default=90, help="for generated / re-encoded images")
    ap.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    _check(args)

    os.makedirs(args.out, exist_ok=True)
    for old in glob.glob(os.path.join(args.out, "shard-*.tar")):  # a smaller rerun must not leave extras
        os.remove(old)
    skipped: dict = {}
    if args.scenes is not None:
        total = args.scenes
        samples = scene_samples(
            total, args.seed, args.image_size, args.jpeg_quality, args.min_objects, args.max_objects
        )
        settings = {
            "source": "scenes",
            "image_size": args.image_size,
            "min_objects": args.min_objects,
            "max_objects": args.max_objects,
            "jpeg_quality": args.jpeg_quality,
        }
    else:
        pairs = read_captions(args.captions)
        total = len(pairs)
        samples = folder_samples(args.images, pairs, args.jpeg_quality, skipped)
        settings = {"source": "folder", "images": args.images, "captions": args.captions}
        settings["jpeg_quality"] = args.jpeg_quality

    t0 = time.perf_counter()
    shards = write_shards(samples, args.out, args.samples_per_shard, total, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    n = sum(s["samples"] for s in shards)
    examples = skipped.pop("examples", [])
    n_skipped = sum(skipped.values())
    manifest = {
        "shards": shards,
        "samples": n,
        "samples_per_shard": args.samples_per_shard,
        "seed": args.seed,
        "generator": settings,
        "skipped": n_skipped,
        "skipped_reasons": skipped,
    }
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    print(
        f"wrote {len(shards)} shard(s), {n} samples to {args.out} in {dt:.1f}s ({n / max(dt, 1e-9):,.0f}/s)"
    )
    if n_skipped:
        why = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        print(f"  skipped {n_skipped} ({why}), e.g. {', '.join(examples)}")
    return {"shards": [os.path.join(args.out, s["name"]) for s in shards], "samples": n, "skipped": n_skipped}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileExistsError) as e:  # bad arguments or inputs: the message names them
        sys.exit(f"make_wds_shards: {e}")

"""Writing webdataset image-text shards (`jpg`, `txt`, `json` per sample): the library side of
`tools/make_wds_shards.py`, used by the MMRPT entry point to make its generated-scene data.

    shards = write_shards(scene_samples(2000, seed=0, size=64), "runs/wds", samples_per_shard=500)
    # runs/wds/shard-000000.tar ... ; each {"name", "samples"}
"""

from __future__ import annotations

import json
import os

from tqdm import tqdm

from megatron_step.data.scenes import encode_jpeg, generate_scene, scene_rng

SHARD_PATTERN = "shard-%06d.tar"
_TAR_MTIME = 0  # fixed header fields: reruns give identical bytes, not just identical payloads


def scene_samples(
    n: int, seed: int, size: int = 64, quality: int = 90, min_objects: int = 1, max_objects: int = 4
):
    """Yield (jpg bytes, caption, truth) for generated scenes 0..n-1 under `seed`."""
    for i in range(n):
        image, caption, truth = generate_scene(scene_rng(seed, i), size, min_objects, max_objects)
        yield encode_jpeg(image, quality), caption, truth


def write_shards(samples, out: str, samples_per_shard: int, total: int | None = None, progress=True):
    """Write (jpg, caption, json) triples as OUT/shard-%06d.tar; returns [{"name", "samples"}].

    TarWriter, not ShardWriter: ShardWriter opens its first tar on construction (an empty shard when
    nothing is written) and prints each file name.
    """
    import webdataset as wds  # here: importing it is ~0.3 s

    os.makedirs(out, exist_ok=True)
    shards: list[dict] = []
    writer = None
    bar = tqdm(total=total, unit="sample", desc="shards", disable=not progress)
    try:
        for index, (jpg, caption, meta) in enumerate(samples):
            if index % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                shards.append({"name": SHARD_PATTERN % len(shards), "samples": 0})
                path = os.path.join(out, shards[-1]["name"])
                writer = wds.TarWriter(path, encoder=False, mtime=_TAR_MTIME)
            sample = {"__key__": f"{index:09d}", "jpg": jpg, "txt": caption.encode("utf-8")}
            sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
            writer.write(sample)
            shards[-1]["samples"] += 1
            bar.update(1)
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    return shards


__all__ = ["SHARD_PATTERN", "scene_samples", "write_shards"]

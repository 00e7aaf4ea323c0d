"""Images/s of the MMRPT image-text readers: DALI on the CPU (1 and 2 threads) vs the webdataset reference.

    python -m benchmarks.wds_throughput              # 2000 scenes, 64 px -> 32 px, 3 epochs
    python -m benchmarks.wds_throughput --samples 500 --epochs 2 --image-size 128 --out-size 64

Writes generated scenes (tools/make_wds_shards.py's generator, JPEG q90, 500 per shard) to a temporary
folder, then times whole epochs of each reader (decode + resize + normalise into (B, 3, S, S) float32
torch tensors, keys/captions/json included), one epoch of each in turn per round so that load from other
jobs hits all of them alike; reports the median epoch. The reference runs with torch.set_num_threads(1),
as DALI's 1-thread row: its per-image resize is two tiny matmuls, and with 2 intra-op threads on a
2-core box that another job keeps busy they spin-wait for each other (~85 images/s instead of ~900).
The DALI readers' pre-scan (tarfile read + JPEG check + index files, once per reader; on one thread here,
DaliReader spreads shards over cfg.num_threads) is timed separately, alternating with the epochs too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
import warnings

# Megatron-Core (imported by megatron_step.data) announces missing TE/apex at import time; expected here
warnings.filterwarnings("ignore", message=".*not installed.*")

import torch  # noqa: E402

from megatron_step.data.shards import scene_samples, write_shards  # noqa: E402
from megatron_step.data.wds import DaliReader, ImageTextConfig, WebDatasetReader, prescan_shard  # noqa: E402


def run(samples=2000, image_size=64, out_size=32, epochs=3, batch_size=32, threads=(1, 2)) -> dict:
    """Median epoch seconds per reader, the pre-scan's median seconds and the setting; see format_table."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(samples, image_size, out_size, epochs, batch_size, threads)
    finally:
        torch.set_num_threads(torch_threads)


def _run(samples, image_size, out_size, epochs, batch_size, threads) -> dict:
    with tempfile.TemporaryDirectory(prefix="wds-bench-") as tmp:
        write_shards(scene_samples(samples, 0, image_size, 90, 1, 4), tmp, 500, progress=False)
        pattern = os.path.join(tmp, "shard-*.tar")
        cfg = ImageTextConfig(image_size=out_size, batch_size=batch_size, decode="cpu")
        readers = {"webdataset (PIL + torch)": WebDatasetReader(pattern, cfg)}
        for t in threads:
            name = f"DALI CPU, {t} thread{'s' if t > 1 else ''}"
            readers[name] = DaliReader(pattern, dataclasses.replace(cfg, num_threads=t))
        shards = readers["webdataset (PIL + torch)"].urls

        def epoch(reader) -> float:
            t0 = time.perf_counter()
            n = sum(len(b.images) for b in reader)
            assert n == samples, (n, samples)
            return time.perf_counter() - t0

        def prescan() -> float:  # what DaliReader(num_threads=1) runs at construction
            t0 = time.perf_counter()
            for i, url in enumerate(shards):
                prescan_shard(url, os.path.join(tmp, f"bench-{i}.idx"), {})
            return time.perf_counter() - t0

        for r in readers.values():  # warm-up: DALI builds its pipeline, caches fill
            epoch(r)
        times: dict[str, list[float]] = {k: [] for k in [*readers, "pre-scan"]}
        for _ in range(epochs):
            for name, r in readers.items():
                times[name].append(epoch(r))
            times["pre-scan"].append(prescan())
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "samples": samples,
        "image_size": image_size,
        "out_size": out_size,
        "epochs": epochs,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }


def format_table(r: dict) -> str:
    med = r["median_s"]
    ref = med["webdataset (PIL + torch)"]
    lines = [
        f"image-text readers: {r['samples']} scenes ({r['image_size']} px JPEG q90) -> {r['out_size']} px "
        f"float32, batch {r['batch_size']}, median of {r['epochs']} epochs ({r['cores']} cores, "
        f"torch threads {r['torch_threads']})",
        f"{'reader':<28} {'images/s':>9} {'epoch s':>8} {'vs webdataset':>14}",
    ]
    for name, s in med.items():
        if name != "pre-scan":
            lines.append(f"{name:<28} {r['samples'] / s:9,.0f} {s:8.3f} {ref / s:13.2f}x")
    fastest_dali = min(s for k, s in med.items() if k.startswith("DALI"))
    lines.append(
        f"DALI pre-scan (once per reader): {med['pre-scan']:.3f} s = "
        f"{med['pre-scan'] / r['samples'] * 1e6:.0f} us/sample, {med['pre-scan'] / fastest_dali:.2f}x the "
        "fastest DALI epoch"
    )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=64, help="side of the generated JPEGs")
    ap.add_argument("--out-size", type=int, default=32, help="resize target S")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per reader (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    r = run(args.samples, args.image_size, args.out_size, args.epochs, args.batch_size)
    print(format_table(r))
    print(f"(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

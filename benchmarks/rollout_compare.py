"""Rollouts of ragged prompts: the engine with one batch for all prompts (what it did before length
buckets: the shortest prompt prefilled, every other prompt token fed as one decode step of the whole
batch) vs length buckets (megatron_step/rl/engine.py `Engine.buckets`), same weights, same prompts.

    python -m benchmarks.rollout_compare                 # 64 prompts of 16-512 tokens, 128 new

Tiny preset, 1 process, greedy; the greedy tokens of both are checked to be identical before any time
is reported. Prompt lengths are drawn uniformly from [16, 512] (fixed seed); responses stop at the
end-of-sequence id or at 128 tokens. tokens/s counts generated (response) tokens.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.testing import run_distributed


def body(rank, world_size, prompts: int = 64, lo: int = 16, hi: int = 512, new_tokens: int = 128):
    platform.setup(ParallelConfig(), seed=1234)
    cfg = tiny()
    model = build_step_flash(cfg, ParallelConfig())
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(lo, hi + 1, (prompts,), generator=g).tolist()
    batch = [torch.randint(4, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True)
    out = {"prompts": prompts, "lengths": (lo, hi), "new_tokens": new_tokens}
    tokens = {}
    for name, spread in (("one batch", math.inf), ("length buckets", None)):
        engine = Engine(model, eos_id=3, prompt_spread=spread)
        t0 = time.perf_counter()
        gens = engine.generate(batch, params, record_routing=False)
        dt = time.perf_counter() - t0
        tokens[name] = [x.response_ids for x in gens]
        n = sum(len(x) for x in tokens[name])
        calls = engine.stats["decode_tokens"]
        out[name] = {"seconds": dt, "tokens": n, "tok_s": n / dt, "row_steps": calls}
        out[name]["buckets"] = len(engine.buckets(lens, new_tokens))
    if tokens["one batch"] != tokens["length buckets"]:
        raise AssertionError("greedy tokens differ between the two engines")
    out["identical"] = True
    return out


def format_table(r: dict) -> str:
    lo, hi = r["lengths"]
    lines = [
        f"Rollouts: {r['prompts']} prompts of {lo}-{hi} tokens, up to {r['new_tokens']} new, greedy, "
        "tiny preset, 1 process (greedy tokens identical)",
        f"{'engine':<16} {'buckets':>8} {'wall (s)':>9} {'tokens/s':>9} {'row-steps':>10}",
    ]
    for name in ("one batch", "length buckets"):
        x = r[name]
        lines.append(
            f"{name:<16} {x['buckets']:>8} {x['seconds']:>9.2f} {x['tok_s']:>9.0f} {x['row_steps']:>10}"
        )
    a, b = r["one batch"], r["length buckets"]
    lines.append(f"length buckets / one batch: {b['tok_s'] / a['tok_s']:.2f}x tokens/s")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    r = run_distributed(body, 1, prompts=args.prompts, new_tokens=args.new_tokens)[0]
    print(format_table(r))


if __name__ == "__main__":
    main()

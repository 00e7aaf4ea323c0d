"""Rollout wall time of erasable (E3RL) vs plain generation at equal final tokens.

    python -m benchmarks.e3rl_overhead            # tiny preset, 8 prompts x 8 rollouts

Both sides sample the same batch (8 prompts x G=8, prompts of one length) to the same final length
(stop tokens off, so every rollout has S x N tokens), alternating runs in one process; plain is
`Engine.generate`, erasable is `generate_erasable` with (a) the default E3RL policy and (b) a policy
forced to erase every rollout's middle segment K times (the worst case for regeneration work). The
overhead is the time of the erasures (regenerated tokens) plus segment bookkeeping; the prefix is
never recomputed, so it grows with regenerated tokens, not with the prefix length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig
from megatron_step.rl.config import E3RLConfig
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.rl.erasable import E3RLPolicy, generate_erasable
from megatron_step.testing import run_distributed


def body(rank, world_size, opts: dict) -> dict:
    import dataclasses

    class _Forced(E3RLPolicy):
        def decide(self, u, groups, erasures, histories, stats=None):
            mid = self.cfg.num_segments // 2
            erase = [len(h) == mid and e < self.cfg.max_erasures for e, h in zip(erasures, histories)]
            return erase, [0.0] * len(u), stats or {}

    platform.setup(ParallelConfig(), seed=0)
    cfg = dataclasses.replace(tiny(), routing_replay=True)
    model = build_step_flash(cfg, ParallelConfig())
    g = torch.Generator().manual_seed(0)
    prompts, groups = [], []
    for k in range(opts["prompts"]):
        p = torch.randint(4, cfg.vocab_size, (opts["prompt_len"],), generator=g).tolist()
        prompts += [p] * opts["group"]
        groups += [k] * opts["group"]
    ecfg = E3RLConfig(segment_len=opts["segment_len"], num_segments=opts["segments"], max_erasures=opts["k"])
    engine = Engine(model, eos_id=-1)  # no stop token: every rollout reaches S x N tokens
    params = SamplingParams(max_new_tokens=ecfg.max_new_tokens, seed=1)
    times: dict[str, list[float]] = {"plain": [], "e3rl": [], "forced": []}
    regen: dict[str, float] = {}
    for _ in range(opts["runs"]):
        t0 = time.perf_counter()
        plain = engine.generate(prompts, params)
        times["plain"].append(time.perf_counter() - t0)
        for name, pol in (("e3rl", E3RLPolicy(ecfg)), ("forced", _Forced(ecfg))):
            t0 = time.perf_counter()
            gens = generate_erasable(engine, prompts, groups, params, pol)
            times[name].append(time.perf_counter() - t0)
            assert [len(x.response_ids) for x in gens] == [len(x.response_ids) for x in plain]
            regen[name] = sum(x.info["regenerated_tokens"] for x in gens) / len(gens)
            regen[name + "_erasures"] = sum(x.info["erasures"] for x in gens) / len(gens)
    platform.teardown()
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "regen": regen,
        "tokens": sum(len(x.response_ids) for x in plain) / len(plain),
        "rows": len(prompts),
        "threads": torch.get_num_threads(),
        "opts": opts,
    }


def format_table(r: dict) -> str:
    m, o = r["median_s"], r["opts"]
    lines = [
        f"E3RL rollout overhead: tiny preset, {r['rows']} rollouts "
        f"({o['prompts']} prompts x G={o['group']}), "
        f"{r['tokens']:.0f} new tokens each (S={o['segment_len']} x N={o['segments']}), "
        f"{r['threads']} threads, median of {o['runs']} runs",
        f"{'rollouts':<34} {'seconds':>8} {'vs plain':>9} {'erasures/rollout':>17} {'regen tok/rollout':>18}",
        f"{'plain (Engine.generate)':<34} {m['plain']:8.2f} {1.0:9.2f} {0.0:17.2f} {0.0:18.1f}",
    ]
    for name, label in (("e3rl", "E3RL, default policy"), ("forced", f"E3RL, forced K={o['k']} erasures")):
        lines.append(
            f"{label:<34} {m[name]:8.2f} {m[name] / m['plain']:9.2f} "
            f"{r['regen'][name + '_erasures']:17.2f} {r['regen'][name]:18.1f}"
        )
    return "\n".join(lines)


DEFAULTS = {"prompts": 8, "group": 8, "prompt_len": 16, "segment_len": 8, "segments": 5, "k": 2, "runs": 3}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    args = ap.parse_args(argv)

    print(format_table(run_distributed(body, 1, vars(args))[0]))


if __name__ == "__main__":
    main()

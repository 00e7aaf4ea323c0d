"""MTP speculative decoding vs plain decoding at the same batch size: decode tokens/s and draft
acceptance per depth, on a model whose MTP heads were trained (the RL demo's supervised warm-up,
then RL with MTP on -- `python -m benchmarks.rl_compare --suite spec` writes such checkpoints).

    python -m benchmarks.spec_decode --ckpt runs/rl_compare_spec/refresh-seed1234 \
        --set data.data_dir=runs/rl_compare_spec/data --batches 1,16,64   # the suite's tokenizer

Per batch size B: the first B held-out prompts of the demo task (prompts of mixed length, as in RL),
one response each; plain decoding, then speculative decoding with k = 1, 2, 3 drafts, drafted by
the MTP layers over their own KV caches ("cached", the default) and by Megatron-Core's single-position
MTP step ("single"): sampled at T = 1 with the rejection rule, and greedy. One process, one torch
thread (`--threads`), the same weights and prompts; a warm-up call first. tokens/s = response
tokens / wall seconds of `generate`; "x plain" is the ratio to plain decoding of the same mode and
batch, measured in the same run. Acceptance at depth d = drafts accepted / drafts proposed at
depth d (a depth-d draft is proposed only after depth d-1 was accepted, or as the first draft)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_step import platform
from megatron_step.config.run import RLRunConfig, load_run_config
from megatron_step.data.pipeline import run_tokenizer
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.rl.tasks import make_task
from megatron_step.stages.rl import rl_model_config
from megatron_step.training import checkpoint
from megatron_step.training.setup import build_model_and_optimizer


def measure(engine: Engine, prompts, params: SamplingParams, repeats: int) -> dict:
    """Total response tokens / total seconds over `repeats` calls (keys differ per call), the
    acceptance counters over them, and the first call's responses (greedy: compared with plain)."""
    engine.generate(prompts[:1], params, record_routing=False)  # warm-up
    st = engine.stats
    st["spec_proposed"] = [0] * len(st["spec_proposed"])
    st["spec_accepted"] = [0] * len(st["spec_accepted"])
    st["forwards"] = 0
    tokens, seconds, same = 0, 0.0, None
    for r in range(repeats):
        t0 = time.perf_counter()
        gens = engine.generate(
            prompts, params, record_routing=False, keys=[(i, r) for i in range(len(prompts))]
        )
        seconds += time.perf_counter() - t0
        tokens += sum(len(g.response_ids) for g in gens)
        if r == 0:
            same = [g.response_ids for g in gens]
    acc = [a / p if p else float("nan") for a, p in zip(st["spec_accepted"], st["spec_proposed"])]
    return {
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "forwards": st["forwards"],
        "acceptance": acc,
        "first": same,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="run dir with a checkpoint of the RL demo model")
    ap.add_argument("--config", default="examples/rl/rl_tiny.yaml")
    ap.add_argument("--set", action="append", default=[], help="extra config override (repeat)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--depths", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config, args.set, RLRunConfig)
    platform.setup(cfg.parallel, seed=cfg.train.seed)
    try:
        tok = run_tokenizer(cfg.data)
        task = make_task(cfg.rl, tok)
        chunks, optimizer, _ = build_model_and_optimizer(rl_model_config(cfg), cfg.parallel, cfg.optim, 1)
        step = checkpoint.load_model_weights(args.ckpt, chunks, optimizer=optimizer)
        model = chunks[0]
        problems = task.heldout(max(int(b) for b in args.batches.split(",")), cfg.train.seed)
        prompts = [[tok.bos] + tok.encode(task.prompt(p)) for p in problems]
        rows = []
        for b in (int(x) for x in args.batches.split(",")):
            for mode in ("sampled", "greedy"):
                params = SamplingParams(max_new_tokens=cfg.rl.max_new_tokens, greedy=mode == "greedy", seed=7)
                plain = measure(
                    Engine(model, eos_id=tok.eos, pad_id=tok.pad), prompts[:b], params, args.repeats
                )
                rows.append(
                    {
                        "batch": b,
                        "mode": mode,
                        "k": 0,
                        "drafter": "-",
                        **plain,
                        "ratio": 1.0,
                        "same_as_plain": True,
                    }
                )
                for k in (int(x) for x in args.depths.split(",")):
                    for drafter in ("cached", "single"):
                        cached = drafter == "cached"
                        eng = Engine(model, eos_id=tok.eos, pad_id=tok.pad, speculative=k, mtp_cache=cached)
                        m = measure(eng, prompts[:b], params, args.repeats)
                        rows.append({
                            "batch": b, "mode": mode, "k": k, "drafter": drafter, **m,
                            "ratio": m["tokens_per_s"] / plain["tokens_per_s"],
                            "same_as_plain": m["first"] == plain["first"],
                        })  # fmt: skip
                        ratio = rows[-1]["ratio"]
                        print(
                            f"B={b} {mode} k={k} {drafter}: {m['tokens_per_s']:.0f} tok/s ({ratio:.2f}x)",
                            flush=True,
                        )
    finally:
        platform.teardown()
    print(f"\ncheckpoint {args.ckpt} (step {step}); {args.threads} thread(s); max_new_tokens "
          f"{cfg.rl.max_new_tokens}\n")  # fmt: skip
    print("| batch | mode | drafts k | drafter | tokens/s | x plain | forwards | acceptance d=1 | d=2 | d=3 "
          "| greedy = plain |")  # fmt: skip
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        acc = (r["acceptance"] + [float("nan")] * 3)[:3]
        acc_s = " | ".join("-" if a != a else f"{a:.2f}" for a in acc)
        same = ("yes" if r["same_as_plain"] else "NO") if r["mode"] == "greedy" else "n/a"
        print(f"| {r['batch']} | {r['mode']} | {r['k']} | {r['drafter']} | {r['tokens_per_s']:.0f} | "
              f"{r['ratio']:.2f} | "
              f"{r['forwards']} | {acc_s} | {same} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "first"} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()

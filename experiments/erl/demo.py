"""ERL demo: plain tool-using decoding vs step-level erasable rollouts (ERL) on held-out lookup questions.

    # CPU, 1 process (the default sizes aim at a few minutes on 2 cores)
    python -m experiments.erl.demo
    python -m experiments.erl.demo --sft-steps 400 --samples 8   # longer warm-up, more rollouts
    # one GPU: the same command (platform.setup picks CUDA when it is there)

1. The tokenizer is the RL loop's (`run_tokenizer` of examples/rl/rl_tiny.yaml: the embedded 2048-piece
   SentencePiece model, built once under runs/data). The model is the tiny Step 3.5 Flash preset as
   rl_tiny.yaml sets it (vocab 2048), without MTP modules (RL trains next-token log-probs only, and
   the warm-up is faster without them).
2. Supervised warm-up as the RL stage does it (megatron_step.stages.rl.warm_start) -- the repo's
   Megatron-Core pretraining loop (`pretrain`) on the gold trajectories of `LookupTask`
   (`rl.sft.SFTDataset` over `lookup.solution_segments`), loss on the model-written tokens only
   (tool results are masked, as ERL's `sampled_mask` marks them). The checkpoint lands in
   --run-dir/sft and is reused by a later run (pass another --run-dir to train afresh).
3. Generation on every held-out question (--samples rollouts each, temperature 1, the RL policy):
   ERL with max_rollbacks=0 (plain tool-using decoding) and ERL with the default config, step and
   query scope. Printed, per rollout: success rate (exact answer), rollbacks, regen tok (sampled
   tokens thrown away by rollbacks, i.e. sampled again), prefix reused (cached positions kept by the
   rollbacks, not recomputed), tool calls (rolled-back ones included), sampled tok (sampled tokens in
   the kept trajectory; tool tokens excluded), and wall time of the whole batch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
import warnings

# Megatron-Core announces missing TE/apex when it is imported; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*not installed.*")

import torch  # noqa: E402

from megatron_step import platform  # noqa: E402
from megatron_step.config.run import RLRunConfig, load_run_config  # noqa: E402
from megatron_step.data.pipeline import run_tokenizer  # noqa: E402
from megatron_step.rl.engine import Engine, SamplingParams  # noqa: E402
from megatron_step.rl.erl import ERLConfig, erl_stats, generate_erl  # noqa: E402
from megatron_step.rl.lookup import (  # noqa: E402
    LookupConfig,
    LookupTask,
    SearchTool,
    lookup_problems,
    lookup_reward,
    make_world,
    prompt_text,
)
from megatron_step.rl.sft import SFTDataset  # noqa: E402
from megatron_step.stages.pretrain import pretrain  # noqa: E402
from megatron_step.training import checkpoint  # noqa: E402
from megatron_step.training.setup import build_model_and_optimizer  # noqa: E402


def run_config(args):
    return load_run_config(
        "examples/rl/rl_tiny.yaml",
        [
            f"model.seq_length={args.seq_length}",
            f"data.seq_length={args.seq_length}",
            "model.mtp_num_layers=0",
            "model.mtp_loss_weights=[]",
            f"train.seed={args.seed}",
        ],
        RLRunConfig,
    )


def warm_up(cfg, tok, world, args) -> dict:
    """`args.sft_steps` steps of the pretraining loop on gold trajectories (as the RL stage's warm-up)."""

    sft = copy.deepcopy(cfg)
    gbs = args.batch
    sft.train = dataclasses.replace(
        cfg.train,
        steps=args.sft_steps,
        global_batch_size=gbs,
        micro_batch_size=gbs,
        run_dir=os.path.join(args.run_dir, "sft"),
        resume=True,
        exit_after=None,
        eval_interval=0,
        save_interval=0,
        log_interval=max(1, args.sft_steps // 5),
    )
    sft.optim = dataclasses.replace(cfg.optim, lr=args.lr, min_lr=args.lr / 10, warmup_steps=20)
    train = lookup_problems(world, args.sft_steps * gbs, seed=args.seed + 17)
    valid = lookup_problems(world, gbs, seed=args.seed, split="heldout")
    task = LookupTask(LookupConfig(world_seed=args.seed))  # its gold pieces, tool results outside the loss
    ds = (SFTDataset(tok, task, train, args.seq_length), SFTDataset(tok, task, valid, args.seq_length))
    t0 = time.perf_counter()
    out = pretrain(sft, datasets=ds)
    return {"seconds": time.perf_counter() - t0, "losses": out["losses"], "val": out["val_loss"]}


def load_model(cfg, run_dir: str):

    platform.setup(cfg.parallel, seed=cfg.train.seed)
    chunks, _, _ = build_model_and_optimizer(cfg.model_config(), cfg.parallel, cfg.optim, cfg.train.steps)
    checkpoint.load_model_weights(run_dir, chunks)
    return chunks[0].module


def evaluate(engine, tok, world, problems, args) -> list[dict]:

    prompts = [[tok.bos] + tok.encode(prompt_text(p)) for p in problems for _ in range(args.samples)]
    refs = [p.answer for p in problems for _ in range(args.samples)]
    rows = []
    for name, cfg in (
        ("plain (max_rollbacks=0)", ERLConfig(max_rollbacks=0)),
        ("ERL, scope=step", ERLConfig()),
        ("ERL, scope=query", ERLConfig(scope="query")),
    ):
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed)
        t0 = time.perf_counter()
        gens = generate_erl(
            engine, prompts, SearchTool(world), params, cfg, tokenizer=tok, record_routing=False
        )
        wall = time.perf_counter() - t0
        texts = [tok.decode([i for i in g.response_ids if i != tok.eos]) for g in gens]
        ok = [lookup_reward("", t, r) for t, r in zip(texts, refs)]
        st = erl_stats(gens)
        rows.append(
            {
                "name": name,
                "success": sum(ok) / len(ok),
                "rollbacks": st["erl/rollbacks_per_rollout"],
                "regenerated": st["erl/tokens_regenerated"],
                "reused": st["erl/prefix_positions_reused"],
                "tool_calls": st["erl/tool_calls"],
                "sampled": st["erl/sampled_tokens"],
                "wall": wall,
                "gens": gens,
            }
        )
    return rows


def example(row: dict, tok, problems, samples: int) -> str:
    """Every attempt of the first rollout in `row` that rolled back (the first rollout if none did)."""
    gens = row["gens"]
    i = next((k for k, g in enumerate(gens) if g.info["rollbacks"]), 0)
    lines = [
        f"example ({row['name']}): {problems[i // samples].prompt!r} (answer {problems[i // samples].answer})"
    ]
    for s in gens[i].info["steps"]:
        tag = "rolled back" if s["rolled_back"] else "kept"
        res = f" -> {s['result']!r}" if s["result"] is not None else ""
        lines.append(f"  step {s['index']} [{tag:>11}] score {s['score']:.2f}: {s['text']!r}{res}")
    return "\n".join(lines)


def format_table(rows: list[dict], n: int) -> str:
    head = (
        f"{'decoding':<24} {'success':>8} {'rollbacks':>10} {'regen tok':>10} {'prefix reused':>14} "
        f"{'tool calls':>11} {'sampled tok':>12} {'wall s':>8}"
    )
    lines = [f"{n} rollouts each (per-rollout means)", head]
    for r in rows:
        lines.append(
            f"{r['name']:<24} {r['success']:8.3f} {r['rollbacks']:10.2f} {r['regenerated']:10.1f} "
            f"{r['reused']:14.1f} {r['tool_calls']:11.2f} {r['sampled']:12.1f} {r['wall']:8.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="ERL demo on the lookup task (tiny model, CPU)")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8, help="warm-up sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--samples", type=int, default=3, help="rollouts per held-out question")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--run-dir", default="runs/erl_demo")
    args = ap.parse_args(argv)
    # the repo root: rl_tiny.yaml's relative paths
    os.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

    t_start = time.perf_counter()
    cfg = run_config(args)
    tok = run_tokenizer(cfg.data)
    world = make_world(args.seed)
    heldout = sorted(set(lookup_problems(world, 2000, seed=args.seed, split="heldout")), key=lambda p: p.key)
    try:
        sft = warm_up(cfg, tok, world, args)
        module = load_model(cfg, os.path.join(args.run_dir, "sft"))
        engine = Engine(module, eos_id=tok.eos, pad_id=tok.pad)
        rows = evaluate(engine, tok, world, heldout, args)
    finally:
        platform.teardown()
    losses = sft["losses"]
    print()
    print(
        f"warm-up: {args.sft_steps} steps x {args.batch} trajectories in {sft['seconds']:.0f} s"
        + (f", loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else " (checkpoint reused)")
        + (f", held-out loss {sft['val']:.3f}" if sft["val"] is not None else "")
    )
    print(f"held-out: {len(heldout)} distinct questions x {args.samples} samples, temperature 1.0")
    print(format_table(rows, len(heldout) * args.samples))
    print(example(rows[1], tok, heldout, args.samples))
    print(f"total {time.perf_counter() - t_start:.0f} s, {torch.get_num_threads()} threads")


if __name__ == "__main__":  # the dist-checkpoint saver spawns processes: keep this guard
    main()

"""Evaluate a checkpoint on a file of problems: k sampled responses per problem (and one greedy), scored
by the reward its data_source names (megatron_step.rl.dataset), avg@k and pass@k per source.

    from megatron_step.stages.evaluate import evaluate
    out = evaluate(cfg, "runs/rl_data", ["heldout.jsonl"], k=4)     # cfg: an RLRunConfig
    out["sources"]["gsm8k"]["avg@k"], out["overall"]["pass@k"]

avg@k: the mean reward-judged correctness over the k samples of every problem (the quantity the
papers report as avg@k). pass@k: the share of problems with at least one correct sample among its k.
greedy: the share solved by the greedy response. A sample whose reward call failed (raised, timed out,
a sandbox that could not start) is counted in `failed` and scored incorrect here: an evaluation must
say what it could not judge, and the count does.

The model is the run config's (preset + `model:` overrides), in its parallel layout, with the weights
of the run directory's newest checkpoint. Generation is the RL engine's, with its keyed randomness:
sample j of problem i draws with key (i, j) and seed `train.seed`, so the numbers do not depend on the
layout or on how the problems are split over data-parallel ranks.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_step import platform
from megatron_step.rl.dataset import DatasetTask
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.rl.reward_pool import RewardRunner
from megatron_step.rl.rollouts import RolloutSampler
from megatron_step.stages.generate import is_hf_dir, load_policy
from megatron_step.training import checkpoint

__all__ = ["evaluate", "format_table"]


def _dp() -> tuple[int, int]:
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def evaluate(cfg, run_dir: str, files: list[str], k: int = 4, batch: int = 64, progress: bool = True) -> dict:
    """Evaluate `run_dir`'s newest checkpoint (or a Hugging Face directory, with its tokenizer when it
    has one) on `files` (rl.data's keys, prompt format and reward routes apply). Returns {"step" (None
    for an HF directory), "checkpoint" (what was loaded), "k", "problems", "overall": {...}, "sources":
    {source: {...}}}, each {...} = {"problems", "samples", "greedy", "avg@k", "pass@k", "failed"}."""
    if k < 1:
        raise ValueError(f"--k={k}: must be >= 1")
    r = cfg.rl
    platform.setup(cfg.parallel, seed=cfg.train.seed)
    policy = load_policy(cfg, run_dir)  # frozen: a run's newest checkpoint, or an HF directory
    step = None if is_hf_dir(run_dir) else checkpoint.latest_step(run_dir)
    tokenizer = policy.tokenizer
    task = DatasetTask(dataclasses.replace(r.data, train=list(files), eval=list(files)), r.code, tokenizer)
    if task.preference_sources() is not None:
        raise ValueError(
            "rl.data.rewards routes a source to preference: evaluation judges correctness with verifiable "
            "rewards (math, exact, code, module:callable); route that source to one of them here"
        )
    problems = task.heldout(10**12, 0)  # every record, in file order
    engine = Engine(policy.chunks, eos_id=tokenizer.eos, pad_id=tokenizer.pad)
    stop = RolloutSampler._stop_ids(task, tokenizer)
    dp, rank = _dp()
    mine = list(range(rank, len(problems), dp))
    prompts = {i: tokenizer.with_bos(tokenizer.encode(task.prompt(problems[i]))) for i in mine}
    greedy = SamplingParams(max_new_tokens=r.max_new_tokens, greedy=True, stop_ids=stop)
    sampled = SamplingParams(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        seed=cfg.train.seed, stop_ids=stop,
    )  # fmt: skip
    # (problem, sample): sample -1 is the greedy response
    jobs = [(i, -1) for i in mine] + [(i, j) for i in mine for j in range(k)]
    per = max(1, batch)
    # collective (the engine's lockstep group): ranks that share a forward run the same batches
    n_batches = int(engine.lockstep.max((len(jobs) + per - 1) // per))
    texts: dict[tuple[int, int], str] = {}
    show = progress and dist.get_rank() == 0
    for b in tqdm(range(n_batches), desc=f"evaluate {len(problems)} problems x (1 + {k})", disable=not show):
        part = jobs[b * per : (b + 1) * per]
        for params, want in ((greedy, True), (sampled, False)):
            sel = [(i, j) for i, j in part if (j < 0) == want]
            gens = engine.generate(
                [prompts[i] for i, _ in sel],
                params,
                record_routing=False,
                keys=[(i, max(j, 0)) for i, j in sel],
            )
            for key, g in zip(sel, gens):
                texts[key] = tokenizer.decode([t for t in g.response_ids if t != tokenizer.eos])
    keys = sorted(texts)
    items = [(task.prompt(problems[i]), texts[(i, j)], task.reference(problems[i])) for i, j in keys]
    with RewardRunner(task.reward(), timeout_s=r.reward_timeout_s, workers=r.reward_workers) as runner:
        results = runner.run(items) if items else []
    rows = [
        (i, j, res.value >= r.data.correct_at and not res.failed, res.failed)
        for (i, j), res in zip(keys, results)
    ]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)  # collective: every rank
        rows = sorted({(i, j): (i, j, c, f) for part in gathered for i, j, c, f in part}.values())
    out = {
        "step": step,
        "checkpoint": policy.source,
        "k": k,
        "problems": len(problems),
        "run_dir": run_dir,
        "files": list(files),
    }
    out["overall"] = _summary(rows, k)
    out["sources"] = {
        s: _summary([row for row in rows if problems[row[0]].source == s], k) for s in task.sources
    }
    return out


def _summary(rows, k: int) -> dict:
    by_problem: dict[int, list] = {}
    greedy = failed = 0
    for i, j, correct, fail in rows:
        failed += fail
        if j < 0:
            greedy += correct
        else:
            by_problem.setdefault(i, []).append(correct)
    n = len(by_problem)
    samples = sum(len(v) for v in by_problem.values())
    return {
        "problems": n,
        "samples": samples,
        "greedy": greedy / n if n else 0.0,
        "avg@k": sum(sum(v) for v in by_problem.values()) / samples if samples else 0.0,
        "pass@k": sum(any(v) for v in by_problem.values()) / n if n else 0.0,
        "failed": failed,
    }


def format_table(out: dict) -> str:
    k = out["k"]
    head = f"{'source':16s} {'problems':>8s} {'greedy':>7s} {f'avg@{k}':>7s} {f'pass@{k}':>7s} {'failed':>6s}"
    lines = [head]
    for name, s in [*out["sources"].items(), ("all", out["overall"])]:
        lines.append(
            f"{(name or '(none)'):16s} {s['problems']:8d} {s['greedy']:7.3f} {s['avg@k']:7.3f} "
            f"{s['pass@k']:7.3f} {s['failed']:6d}"
        )
    return "\n".join(lines)

"""Rollout sampling for one data-parallel rank: prompts from the task, G responses each from the
engine (plain or E3RL erasable), rewards from the isolated worker pool (plus the preference reward
when configured), and the `Rollout` records the policy update trains on.

    sampler = RolloutSampler(cfg.rl, task, tokenizer, engine, runner, seed=1234, run_dir="runs/rl")
    batch = sampler.generate(version=0, step=0)            # prompts -> responses (KV cache)
    groups, stats = sampler.score(batch)                   # rewards -> [[Rollout] * G] * per_rank

Rewards are scored once per model replica: the first rank of each TP x PP group calls the reward
pool and broadcasts the results to the group, which holds the same rollouts. The preference model
(rl.reward_model, in the run's TP / EP layout) is run by every rank: its forward is collective.

Layout independence: every rank draws the step's `rl.prompts_per_step` problems from one shared
stream and takes its slice; prompt group ids are global (step x prompts_per_step + index), and each
response's randomness is keyed by (seed, policy version, group id, sample index, position), so the
same step gives the same rollouts under any TP / EP / DP layout and DP ranks are decorrelated
(megatron_step.rl.lockstep). Generation calls are collective over the engine's lockstep group.

The held-out evaluation (greedy and sampled accuracy) is `Evaluator`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_step.data.tokenizer import StepTokenizer
from megatron_step.platform import compute_device
from megatron_step.rl.buffer import Rollout
from megatron_step.rl.config import RLConfig
from megatron_step.rl.engine import Engine, Generation, SamplingParams
from megatron_step.rl.erasable import E3RLPolicy, generate_erasable
from megatron_step.rl.erasure_credit import attention_shares, erasure_stats, segment_advantages
from megatron_step.rl.erl import erl_stats, generate_erl
from megatron_step.rl.lockstep import mix_seed
from megatron_step.rl.reward_pool import RewardRunner
from megatron_step.rl.routing_confidence import rollout_confidence
from megatron_step.rl.tasks import Task
from megatron_step.training.checkpoint import py_rng_state

__all__ = ["Evaluator", "RolloutBatch", "RolloutSampler", "group_rollouts"]

log = logging.getLogger(__name__)

# RL prompts are drawn from a pool of this many training problems (with replacement)
POOL_SIZE = 20000


def _dp() -> tuple[int, int]:
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def _same_data_group():
    """The ranks that hold this rank's rollouts -- its TP x PP group (one DP rank's model) -- when
    there are several, else None. They must agree on every reward: a reward that times out on one of
    them only would otherwise give them different training batches (and hang the pipeline)."""
    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return None
    group = ps.get_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


def group_rollouts(rollouts: list[Rollout]) -> list[list[Rollout]]:
    """Rollouts grouped by prompt group, in the order the groups first appear."""
    groups: dict[int, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(r.group, []).append(r)
    return list(groups.values())


@dataclass
class RolloutBatch:
    """What `generate` produced, before rewards: one entry per response (G per problem)."""

    version: int  # policy version that sampled it
    group_base: int  # group id of the first problem
    problems: list  # one per response (each problem repeated G times)
    gens: list[Generation]
    adv_scale: list[list[float]] | None  # E3RL attention credit per response token (None: uniform)
    seconds: float  # generation wall time
    # speculative decoding: drafts proposed / accepted per depth during this batch (None: off)
    spec: tuple[list[int], list[int]] | None = None


_FAILED = object()  # a preference score that could not be computed


class RolloutSampler:
    """Generation and scoring for one data-parallel rank (its `per_rank` prompts per step)."""

    def __init__(
        self,
        rl: RLConfig,
        task: Task,
        tokenizer: StepTokenizer,
        engine: Engine,
        runner: RewardRunner,
        seed: int,
        run_dir: str,
        preference=None,
    ):
        self.rl, self.task, self.tok, self.engine, self.runner = rl, task, tokenizer, engine, runner
        self.run_dir, self.preference = run_dir, preference  # preference: rl.reward_model.PreferenceReward
        # a task's end-of-turn text (a chat template's) stops generation as eos does
        self.stop_ids = self._stop_ids(task, tokenizer)
        self.params = SamplingParams(
            max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
            stop_ids=self.stop_ids,
        )  # fmt: skip
        # RL prompts come from a different seed than the SFT targets: the policy has not seen these
        # worked solutions (both are train-split problems; held-out stays unseen)
        self.pool = task.train(POOL_SIZE, seed + 29)
        dp, rank = _dp()
        if rl.prompts_per_step % dp:
            raise ValueError(
                f"rl.prompts_per_step={rl.prompts_per_step} is not divisible by the data-parallel size "
                f"{dp}: every DP rank takes an equal share of each step's prompts"
            )
        self.rank, self.seed = rank, seed
        self.rng = random.Random(seed * 1000)  # one stream on every rank: the step's prompts are global
        self.per_rank = rl.prompts_per_step // dp
        self.failed = 0  # reward calls that failed (raised, timed out, crashed)
        self.tokens_sampled = 0  # every sampled token, erased ones included (the rollout budget)
        self.e3rl = E3RLPolicy(rl.e3rl) if rl.rollout == "e3rl" else None
        # a task with a tool: every rollout goes through the tool loop (rl.erl; rollbacks only with
        # rl.rollout=erl), tool-written tokens marked in Rollout.sampled_mask
        self.tool = task.tool() if callable(getattr(task, "tool", None)) else None
        if rl.rollout == "erl" and self.tool is None:
            raise ValueError(
                f"rl.rollout=erl with rl.task={rl.task!r}: the task has no tool (`tool()`, see rl/tasks.py); "
                "ERL rolls back tool-calling steps"
            )
        if self.tool is not None and rl.rollout == "e3rl":
            raise ValueError(
                f"rl.rollout=e3rl with rl.task={rl.task!r}, a tool task: use rl.rollout=plain or erl"
            )
        self.erl = rl.erl if rl.rollout == "erl" else dataclasses.replace(rl.erl, max_rollbacks=0)

    @staticmethod
    def _stop_ids(task, tokenizer) -> tuple[int, ...]:
        texts = task.stop_texts() if callable(getattr(task, "stop_texts", None)) else []
        ids = []
        for text in texts:
            got = tokenizer.encode(text)
            if len(got) != 1:
                raise ValueError(
                    f"the stop text {text!r} (rl.data.stop) is {len(got)} tokens for this tokenizer; "
                    "generation stops on one token: use a special token of the chat template"
                )
            ids += got
        return tuple(ids)

    # -- checkpointed state (megatron_step.stages.rl: exact resume) --------------------------------------
    def state(self) -> tuple[dict, dict]:
        """(what every rank shares: the prompt stream's position; this rank's own counters)."""
        return {"prompt_rng": self.rng.getstate()}, {
            "failed": self.failed,
            "tokens_sampled": self.tokens_sampled,
        }

    def load_state(self, shared: dict, own: dict | None, tokens_sampled_mean: float = 0.0) -> None:
        """Restore `state()`; `own` None (the checkpoint was written with another world size): the
        counters restart from the DP mean the run logged, so rl.max_tokens_sampled still holds."""
        self.rng.setstate(py_rng_state(shared["prompt_rng"]))
        if own is None:
            self.failed, self.tokens_sampled = 0, int(round(tokens_sampled_mean))
        else:
            self.failed, self.tokens_sampled = int(own["failed"]), int(own["tokens_sampled"])

    def rollouts(
        self, prompts, params: SamplingParams, keys, record_routing=True, rollbacks=True, engine=None
    ) -> list[Generation]:
        """Responses to `prompts` from `engine` (default the sampler's): the tool loop for a tool task
        (`rollbacks`: as rl.rollout says; False: none, e.g. evaluation), plain decoding otherwise."""
        engine = engine or self.engine
        if self.tool is None:
            return engine.generate(prompts, params, record_routing=record_routing, keys=keys)
        cfg = self.erl if rollbacks else dataclasses.replace(self.erl, max_rollbacks=0)
        return generate_erl(
            engine, prompts, self.tool, params, cfg, tokenizer=self.tok, record_routing=record_routing,
            keys=keys,
        )  # fmt: skip

    def encode_prompt(self, problem) -> list[int]:
        return self.tok.with_bos(self.tok.encode(self.task.prompt(problem)))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i != self.tok.eos])

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, version: int, step: int) -> RolloutBatch:
        """This rank's `per_rank` problems of rollout batch `step` x G responses with the current
        engine weights. Every rank calls it once per batch, in order (the prompt stream is shared)."""
        g = self.rl.group_size
        step_problems = [self.rng.choice(self.pool) for _ in range(self.rl.prompts_per_step)]
        first = self.rank * self.per_rank
        chosen = step_problems[first : first + self.per_rank]
        group_base = step * self.rl.prompts_per_step + first
        prompts = [self.encode_prompt(p) for p in chosen for _ in range(g)]
        groups = [group_base + i // g for i in range(len(prompts))]
        keys = [(grp, i % g) for i, grp in enumerate(groups)]  # (prompt group id, sample index)
        params = dataclasses.replace(self.params, seed=mix_seed(self.seed, version))
        t0 = time.perf_counter()
        st = self.engine.stats
        before = (list(st.get("spec_proposed", [])), list(st.get("spec_accepted", [])))
        if self.e3rl is None:
            gens = self.rollouts(prompts, params, keys)
        else:
            gens = generate_erasable(self.engine, prompts, groups, params, self.e3rl, keys=keys)
        seconds = time.perf_counter() - t0
        scales = None
        if self.e3rl is not None and self.e3rl.cfg.advantage_rule != "uniform":
            shares = attention_shares(self.engine.model, gens)
            scales = segment_advantages([1.0] * len(gens), gens, self.e3rl.cfg, shares)
        problems = [p for p in chosen for _ in range(g)]
        spec = None
        if getattr(self.engine, "speculative", 0):
            spec = tuple(
                [x - y for x, y in zip(st[k], b)] for k, b in zip(("spec_proposed", "spec_accepted"), before)
            )
        return RolloutBatch(version, group_base, problems, gens, scales, seconds, spec)

    # -- scoring ---------------------------------------------------------------------------------------
    def _preference(self, batch: RolloutBatch, texts: list[str]) -> list:
        """The preference reward of each response it scores (in-process: a model, batched), None for
        the others, `_FAILED` where the call failed.
        Under TP / EP its forward is collective: every rank calls this, each with its own batch."""
        task = self.task
        use = self._uses_preference(batch)
        try:
            scored = self.preference.score_batch(
                [(task.prompt(p), t, task.solution(p)) for p, t, u in zip(batch.problems, texts, use) if u]
            )
        except Exception as e:  # noqa: BLE001 -- counted and logged, the run goes on
            log.warning("preference reward failed: %s", e)
            return [_FAILED if u else None for u in use]
        it = iter(scored)
        return [next(it) if u else None for u in use]

    def _uses_preference(self, batch: RolloutBatch) -> list[bool]:
        """Which responses the preference model scores: those of the sources routed to it
        (rl.data.rewards.<source>=preference), or every one when no source is routed."""
        routed = getattr(self.task, "preference_sources", lambda: None)()
        if routed is None:
            return [True] * len(batch.problems)
        return [getattr(p, "source", "") in routed for p in batch.problems]

    def _add_preference(self, results, prefs: list) -> dict[str, float]:
        """Add `rl.preference_weight` x the preference reward where it was scored (None: not this
        response's source); a failed call fails the rewards of the responses it was to score."""
        for res, pref in zip(results, prefs, strict=True):
            if pref is _FAILED:
                res.failed, res.value = True, 0.0
            elif pref is not None and not res.failed:
                res.value += self.rl.preference_weight * pref
        got = [x for x in prefs if x is not None and x is not _FAILED]
        return {"rl/reward_preference": sum(got) / len(got)} if got else {}

    def score(self, batch: RolloutBatch) -> tuple[list[list[Rollout]], dict[str, float]]:
        """Rewards for `batch` -> its prompt groups of Rollouts, and this rank's rollout metrics."""
        task, g, gens = self.task, self.rl.group_size, batch.gens
        texts = [self.decode(x.response_ids) for x in gens]
        items = [(task.prompt(p), t, task.reference(p)) for p, t in zip(batch.problems, texts)]
        # scored once per model: the group's first rank calls the rewards, the others receive them;
        # the preference model runs on every rank (its forward is collective under TP / EP)
        prefs = self._preference(batch, texts) if self.preference is not None else None
        group = _same_data_group()
        box: list = [None]
        if group is None or dist.get_rank(group) == 0:
            results = self.runner.run(items)
            box = [(results, self._add_preference(results, prefs) if self.preference is not None else {})]
        if group is not None:  # collective: TP x PP group
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        results, stats = box[0]
        correct = [task.correct(p, t) for p, t in zip(batch.problems, texts)]
        rollouts = [
            Rollout(
                prompt_ids=gen.prompt_ids,
                response_ids=gen.response_ids,
                rollout_logp=gen.logprobs,
                reward=res.value,
                group=batch.group_base + i // g,
                version=batch.version,
                reward_failed=res.failed,
                routing=gen.routing,
                adv_scale=None if batch.adv_scale is None else batch.adv_scale[i],
                truncated=not gen.response_ids or gen.response_ids[-1] not in (self.tok.eos, *self.stop_ids),
                sampled_mask=gen.info.get("sampled_mask"),
                info={"correct": correct[i], "entropy": sum(gen.entropies) / max(1, len(gen.entropies))},
            )
            for i, (gen, res) in enumerate(zip(gens, results))
        ]
        n_tok = sum(len(x.response_ids) for x in gens)
        # what the policy sampled: a tool rollout's teacher-forced results are not, erased tokens are
        n_sampled = sum(
            (len(x.response_ids) if r.sampled_mask is None else sum(r.sampled_mask))
            + x.info.get("regenerated_tokens", 0)
            for x, r in zip(gens, rollouts)
        )
        self.tokens_sampled += n_sampled
        stats.update(
            {
                "rl/reward_mean": sum(r.value for r in results) / len(results),
                "rl/reward_std": torch.tensor([r.value for r in results]).std().item(),
                "rl/reward_failed": float(sum(r.failed for r in results)),
                "rl/accuracy_train": sum(correct) / len(correct),
                "rl/response_length": n_tok / len(gens),
                "rl/entropy": sum(r.info["entropy"] for r in rollouts) / len(rollouts),
                "rl/generation_tokens_per_sec": n_sampled / batch.seconds,
                "rl/tokens_sampled": float(n_sampled),
            }
        )
        # a reward that names its outcomes (the code reward: pass / fail / timeout / crash): how many of
        # each; every label on every rank, so the DP mean sees the same keys everywhere
        for label in getattr(self.runner.fn, "outcomes", ()):
            stats[f"rl/reward_outcome_{label}"] = float(sum(r.outcome == label for r in results))
        stats.update(rollout_confidence([x.confidence for x in gens if x.confidence]))
        if batch.spec is not None:  # acceptance per draft depth: accepted / proposed at that depth
            proposed, accepted = batch.spec
            for d, (p, a) in enumerate(zip(proposed, accepted)):
                stats[f"spec/acceptance_{d + 1}"] = a / p if p else 0.0
            stats["spec/tokens_per_draft_step"] = 1.0 + sum(accepted) / max(1, proposed[0])
        if self.tool is not None:
            stats.update(erl_stats(gens))
        if self.e3rl is not None:
            stats.update(erasure_stats(gens, correct))
            self._log_erasures(batch, correct)
        self.failed += int(stats["rl/reward_failed"])
        return group_rollouts(rollouts), stats

    def sample(self, version: int, step: int) -> tuple[list[list[Rollout]], dict[str, float]]:
        """generate + score."""
        return self.score(self.generate(version, step))

    def _log_erasures(self, batch: RolloutBatch, correct) -> None:
        """Every erased segment, as text, to <run_dir>/erasures.rank<R>.jsonl: what was cut out, its
        uncertainty and threshold, and whether the final (kept) rollout was right. Not trained on."""
        lines = []
        g = self.rl.group_size
        for i, (gen, ok) in enumerate(zip(batch.gens, correct)):
            for e in gen.info.get("erased", []):
                record = {
                    "version": batch.version,
                    "group": batch.group_base + i // g,
                    "segment": e["segment"],
                    "erased": self.decode(e["tokens"]),
                    "u": round(e["u"], 4),
                    "theta": round(e["theta"], 4),
                    "kept_response": self.decode(gen.response_ids),
                    "kept_correct": bool(ok),
                }
                lines.append(json.dumps(record))
        if lines:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, f"erasures.rank{self.rank}.jsonl"), "a") as f:
                f.write("\n".join(lines) + "\n")


class Evaluator:
    """Held-out accuracy of the policy: `rl.eval_problems` problems of the task's held-out split,
    this rank's share of them, averaged over data-parallel ranks."""

    def __init__(self, rl: RLConfig, task: Task, sampler: RolloutSampler, engine: Engine, seed: int):
        self.rl, self.task, self.sampler, self.engine = rl, task, sampler, engine  # engine: the trainer's
        self.heldout = task.heldout(rl.eval_problems, seed)
        self.by_source: dict[str, tuple[float, float | None]] = {}

    @torch.no_grad()
    def accuracy(self) -> tuple[float, float | None]:
        """(greedy accuracy, sampled accuracy): sampled = `rl.eval_samples` responses per problem at
        the rollout temperature (a fixed seed, so evaluations differ only by the weights) -- the
        quantity RL optimises; None at 0."""
        r, s = self.rl, self.sampler
        dp, rank = _dp()
        ids = list(range(len(self.heldout)))[rank::dp]  # shards may differ by one problem: the engine
        mine = [self.heldout[i] for i in ids]  # keeps the ranks in step (Engine.generate)
        prompts = [s.encode_prompt(p) for p in mine]

        sources = list(getattr(self.task, "sources", None) or [])  # the same list on every rank
        sources = sources if len(sources) > 1 else []
        per = torch.zeros(len(sources), 4, dtype=torch.float64)  # greedy hits, n, sampled hits, n

        def hits(gens, problems, col: int) -> int:
            got = [self.task.correct(p, s.decode(x.response_ids)) for x, p in zip(gens, problems)]
            for ok, p in zip(got, problems) if sources else ():
                if p.source in sources:
                    per[sources.index(p.source), col : col + 2] += torch.tensor(
                        [float(ok), 1.0], dtype=torch.float64
                    )
            return sum(got)

        # a tool task is evaluated through the tool loop without rollbacks: the policy's own success
        greedy = s.rollouts(
            prompts,
            SamplingParams(max_new_tokens=r.max_new_tokens, greedy=True, stop_ids=s.stop_ids),
            [(i,) for i in ids],
            record_routing=False,
            rollbacks=False,
            engine=self.engine,
        )
        counts = [hits(greedy, mine, 0), len(mine), 0, 0]
        if r.eval_samples:
            k = r.eval_samples
            params = SamplingParams(
                max_new_tokens=r.max_new_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=r.top_k,
                seed=0,
                stop_ids=s.stop_ids,
            )
            sampled = s.rollouts(
                [p for p in prompts for _ in range(k)],
                params,
                [(i, j) for i in ids for j in range(k)],  # (held-out problem, sample): any layout
                record_routing=False,
                rollbacks=False,
                engine=self.engine,
            )
            counts[2:] = [hits(sampled, [p for p in mine for _ in range(k)], 2), k * len(mine)]
        t = torch.cat([torch.tensor(counts, dtype=torch.float64), per.flatten()])
        if dp > 1:  # sums of counts, not a mean of ratios: ranks may hold different numbers of problems
            t = t.to(compute_device())  # NCCL moves only CUDA tensors
            dist.all_reduce(t, group=ps.get_data_parallel_group())
        t, per = t[:4].tolist(), t[4:].view(-1, 4).tolist()
        # per data_source (a task with several): {source: (greedy, sampled or None)}, for the run's log
        self.by_source = {
            src: (g / n, (gs / ns if ns else None)) for src, (g, n, gs, ns) in zip(sources, per) if n
        }
        return t[0] / t[1], (t[2] / t[3] if t[3] else None)

"""Off-policy RL with colocated inference, on `torchrun` (no Ray):

    prompts -> G rollouts each (the trainer's own model, KV cache) -> rewards (isolated workers) ->
    group advantages -> policy update (Megatron-Core forward-backward + distributed optimizer,
    routing replayed) -> policy version + 1 -> next step

    cfg = load_run_config("examples/rl/rl_tiny.yaml")
    out = train_rl(cfg)          # {"accuracy": [(step, held-out accuracy)], ...}

Sync mode generates with the training model itself (same parameters, nothing copied). Async mode
(`rl.async_mode`) generates on an inference replica in a background thread while the trainer
updates; after every update the trainer copies its weights into the replica (the weight sync, timed)
and the rollout buffer drops groups more than `rl.max_staleness` versions old.

Data parallelism: each DP rank generates, scores and trains on its own share of the prompts; the
gradient all-reduce is Megatron-Core's. Metrics are averaged over DP ranks. PP must be 1 (the engine
runs the whole model on each rank).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import threading
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_step import platform
from megatron_step.config.run import RunConfig
from megatron_step.data.tokenizer import StepTokenizer
from megatron_step.rl.buffer import Rollout, RolloutBuffer
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.rl.erasable import (
    E3RLPolicy,
    attention_shares,
    erasure_stats,
    generate_erasable,
    segment_advantages,
)
from megatron_step.rl.losses import group_advantages
from megatron_step.rl.policy import make_forward_step, pack, token_logp
from megatron_step.rl.rewards import RewardRunner, WeightedSum, format_reward, math_reward
from megatron_step.rl.tasks import arithmetic_problems, prompt_text, solution_text
from megatron_step.training import checkpoint
from megatron_step.training.loop import build_model_and_optimizer
from megatron_step.training.monitor import Monitor, git_hash, is_logging_rank, versions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# config helpers
# ---------------------------------------------------------------------------------------------
def rl_model_overrides(cfg: RunConfig) -> RunConfig:
    """The RL run's model: routing replay as configured; MTP modules kept (weights load) but given
    no loss (RL trains next-token log-probs only)."""
    out = copy.deepcopy(cfg)
    m = cfg.model_config()
    out.model = {
        **cfg.model,
        "routing_replay": cfg.rl.routing_replay and bool(m.num_experts),
        "mtp_loss_weights": [0.0] * m.mtp_num_layers,
    }
    return out


def resolve_reward_fn(path: str | None):
    """`package.module:callable` -> the callable (None -> None), with errors naming rl.reward_fn."""
    if not path:
        return None
    import importlib

    mod, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"rl.reward_fn={path!r}: expected 'package.module:callable'")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rl.reward_fn={path!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"rl.reward_fn={path!r}: not callable")
    return fn


def tokenizer_for(cfg: RunConfig) -> StepTokenizer:
    """The run's tokenizer (the embedded one is built, once, by the data pipeline)."""
    from megatron_step.data.pipeline import _embedded_assets

    if cfg.data.tokenizer_model:
        return StepTokenizer(cfg.data.tokenizer_model)
    return StepTokenizer(_embedded_assets(cfg)[0])


# ---------------------------------------------------------------------------------------------
# supervised warm-up on worked solutions
# ---------------------------------------------------------------------------------------------
class SFTDataset(torch.utils.data.Dataset):
    """Worked arithmetic solutions, one per sample, padded to seq_length; loss on the answer only."""

    def __init__(self, tokenizer: StepTokenizer, problems, seq_length: int):
        self.items = []
        for p in problems:
            prompt = tokenizer.encode(prompt_text(p))
            answer = tokenizer.encode(" " + solution_text(p)) + [tokenizer.eos]
            ids = ([tokenizer.bos] + prompt + answer)[: seq_length + 1]
            n = len(ids) - 1
            tokens = torch.full((seq_length,), tokenizer.pad, dtype=torch.long)
            labels = torch.full((seq_length,), tokenizer.pad, dtype=torch.long)
            mask = torch.zeros(seq_length)
            tokens[:n] = torch.tensor(ids[:-1])
            labels[:n] = torch.tensor(ids[1:])
            mask[len(prompt) : n] = 1.0  # labels from the first answer token on (bos shifts by one)
            self.items.append({"tokens": tokens, "labels": labels, "loss_mask": mask})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def run_sft(cfg: RunConfig, tokenizer: StepTokenizer, run_dir: str) -> None:
    """`rl.sft_steps` steps of supervised warm-up with the pretraining loop; checkpoint in run_dir."""
    from megatron_step.training.loop import pretrain

    r = cfg.rl
    sft = copy.deepcopy(cfg)
    sft.train = dataclasses.replace(
        cfg.train,
        steps=r.sft_steps,
        global_batch_size=r.sft_global_batch_size,
        micro_batch_size=min(cfg.train.micro_batch_size, r.sft_global_batch_size),
        run_dir=run_dir,
        resume=True,
        exit_after=None,
        eval_interval=0,
        save_interval=0,
    )
    sft.optim = dataclasses.replace(cfg.optim, lr=r.sft_lr, min_lr=r.sft_lr / 10, warmup_steps=20)
    kw = dict(min_steps=r.task_min_steps, max_steps=r.task_max_steps, max_operand=r.task_max_operand)
    train = arithmetic_problems(r.sft_steps * r.sft_global_batch_size, cfg.train.seed + 17, **kw)
    valid = arithmetic_problems(64, cfg.train.seed, split="heldout", **kw)
    seq = cfg.data.seq_length
    pretrain(sft, datasets=(SFTDataset(tokenizer, train, seq), SFTDataset(tokenizer, valid, seq)))


# ---------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------
def _dp() -> tuple[int, int]:
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def _mean_over_dp(values: dict) -> dict:
    if not values or _dp()[0] == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=platform.compute_device())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return {k: float(v) / _dp()[0] for k, v in zip(keys, t.tolist())}


class Rollouts:
    """Generation + scoring for one DP rank."""

    def __init__(self, cfg: RunConfig, tokenizer: StepTokenizer, engine: Engine, runner: RewardRunner):
        self.cfg, self.tok, self.engine, self.runner = cfg, tokenizer, engine, runner
        self.eval_engine = engine  # the trainer's own model (async mode samples from a replica)
        r = cfg.rl
        self.params = SamplingParams(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k
        )
        kw = dict(min_steps=r.task_min_steps, max_steps=r.task_max_steps, max_operand=r.task_max_operand)
        # RL prompts are drawn from a different seed than the SFT targets: the policy has not seen
        # these worked solutions (both are train-split problems; held-out stays unseen)
        self.pool = arithmetic_problems(20000, cfg.train.seed + 29, **kw)
        self.heldout = arithmetic_problems(r.eval_problems, cfg.train.seed, split="heldout", **kw)
        dp, rank = _dp()
        self.rng = random.Random(cfg.train.seed * 1000 + rank)
        self.per_rank = max(1, r.prompts_per_step // dp)
        self.failed = 0
        self.tokens_sampled = 0  # every sampled token, erased ones included (the rollout budget)
        self.e3rl = E3RLPolicy(r.e3rl) if r.rollout == "e3rl" else None
        self.preference = None
        if r.reward_model:
            from megatron_step.rl.reward_model import PreferenceReward, RewardModel

            self.preference = PreferenceReward(RewardModel.load(r.reward_model), tokenizer, r.length_penalty)

    def encode_prompt(self, problem) -> list[int]:
        return [self.tok.bos] + self.tok.encode(prompt_text(problem))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i != self.tok.eos])

    def sample_groups(self, version: int, group_base: int) -> tuple[list[Rollout], dict]:
        g = self.cfg.rl.group_size
        problems = [self.rng.choice(self.pool) for _ in range(self.per_rank)]
        prompts = [self.encode_prompt(p) for p in problems for _ in range(g)]
        t0 = time.perf_counter()
        if self.e3rl is None:
            gens = self.engine.generate(prompts, self.params)
        else:
            gens = generate_erasable(
                self.engine,
                prompts,
                [group_base + i // g for i in range(len(prompts))],
                self.params,
                self.e3rl,
            )
        gen_s = time.perf_counter() - t0
        texts = [self.decode(x.response_ids) for x in gens]
        expanded = [p for p in problems for _ in range(g)]
        refs = [p.answer for p in expanded]
        results = self.runner.run([(prompt_text(p), t, p.answer) for p, t in zip(expanded, texts)])
        pref_stats = {}
        if self.preference is not None:
            # in-process (a model), batched; a failure marks the batch's preference part failed
            try:
                prefs = self.preference.score_batch(
                    [(prompt_text(p), t, solution_text(p)) for p, t in zip(expanded, texts)]
                )
            except Exception as e:  # noqa: BLE001 -- counted and logged, the run goes on
                log.warning("preference reward failed: %s", e)
                prefs = None
            w = self.cfg.rl.preference_weight
            for i, res in enumerate(results):
                if prefs is None:
                    res.failed, res.value = True, 0.0
                elif not res.failed:
                    res.value += w * prefs[i]
            if prefs is not None:
                pref_stats = {"reward/preference": sum(prefs) / len(prefs)}
        correct = [math_reward("", t, a) for t, a in zip(texts, refs)]
        scales = self._advantage_scales(gens)
        rollouts = []
        for i, (gen, res) in enumerate(zip(gens, results)):
            rollouts.append(
                Rollout(
                    prompt_ids=gen.prompt_ids,
                    response_ids=gen.response_ids,
                    rollout_logp=gen.logprobs,
                    reward=res.value,
                    group=group_base + i // g,
                    version=version,
                    reward_failed=res.failed,
                    routing=gen.routing,
                    info={
                        "correct": correct[i],
                        "entropy": sum(gen.entropies) / max(1, len(gen.entropies)),
                        **({"adv_scale": scales[i]} if scales is not None else {}),
                    },
                )
            )
        n_tok = sum(len(x.response_ids) for x in gens)
        n_sampled = n_tok + sum(x.info.get("regenerated_tokens", 0) for x in gens)
        self.tokens_sampled += n_sampled
        stats = {
            "reward/mean": sum(r.value for r in results) / len(results),
            "reward/std": torch.tensor([r.value for r in results]).std().item(),
            "reward/failed": float(sum(r.failed for r in results)),
            "accuracy/train": sum(correct) / len(correct),
            "response length": n_tok / len(gens),
            "entropy": sum(r.info["entropy"] for r in rollouts) / len(rollouts),
            "generation tokens per sec": n_sampled / gen_s,
            "tokens sampled": float(n_sampled),
            **pref_stats,
        }
        if self.e3rl is not None:
            stats.update(erasure_stats(gens, correct))
            self._log_erasures(version, group_base, gens, correct)
        self.failed += int(stats["reward/failed"])
        return rollouts, stats

    def _log_erasures(self, version: int, group_base: int, gens, correct) -> None:
        """Every erased segment, as text, to <run_dir>/erasures.rank<R>.jsonl: what was cut out, its
        uncertainty and threshold, and whether the final (kept) rollout was right. Not trained on."""
        lines = []
        g = self.cfg.rl.group_size
        for i, (gen, ok) in enumerate(zip(gens, correct)):
            for e in gen.info.get("erased", []):
                lines.append(
                    json.dumps(
                        {
                            "version": version,
                            "group": group_base + i // g,
                            "segment": e["segment"],
                            "erased": self.decode(e["tokens"]),
                            "u": round(e["u"], 4),
                            "theta": round(e["theta"], 4),
                            "kept_response": self.decode(gen.response_ids),
                            "kept_correct": bool(ok),
                        }
                    )
                )
        if lines:
            path = os.path.join(self.cfg.train.run_dir, f"erasures.rank{_dp()[1]}.jsonl")
            os.makedirs(self.cfg.train.run_dir, exist_ok=True)
            with open(path, "a") as f:
                f.write("\n".join(lines) + "\n")

    def _advantage_scales(self, gens) -> list[list[float]] | None:
        """Per-token advantage scales of the segment rule (None: the sequence advantage as is)."""
        if self.e3rl is None or self.e3rl.cfg.advantage_rule == "uniform":
            return None
        shares = attention_shares(self.engine.model, gens)
        return segment_advantages([1.0] * len(gens), gens, self.e3rl.cfg, shares)

    @torch.no_grad()
    def heldout_accuracy(self) -> tuple[float, float | None]:
        """(greedy accuracy, sampled accuracy) on this rank's share of the held-out problems, averaged
        over DP. Sampled: `rl.eval_samples` responses per problem at the rollout temperature (a fixed
        seed, so evaluations differ only by the weights) -- the quantity RL optimises; None at 0."""
        r = self.cfg.rl
        dp, rank = _dp()
        mine = self.heldout[rank::dp]
        prompts = [self.encode_prompt(p) for p in mine]

        def hits(gens, problems) -> int:
            return sum(math_reward("", self.decode(x.response_ids), p.answer) for x, p in zip(gens, problems))

        greedy = self.eval_engine.generate(
            prompts, SamplingParams(max_new_tokens=r.max_new_tokens, greedy=True), record_routing=False
        )
        counts = [hits(greedy, mine), len(mine), 0, 0]
        if r.eval_samples:
            k = r.eval_samples
            params = SamplingParams(
                max_new_tokens=r.max_new_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=r.top_k,
                seed=0,
            )
            sampled = self.eval_engine.generate(
                [p for p in prompts for _ in range(k)], params, record_routing=False
            )
            counts[2:] = [hits(sampled, [p for p in mine for _ in range(k)]), k * len(mine)]
        t = torch.tensor(counts, dtype=torch.float64)
        if dp > 1:
            t = t.to(platform.compute_device())  # NCCL moves only CUDA tensors
            dist.all_reduce(t, group=ps.get_data_parallel_group())
        t = t.tolist()
        return t[0] / t[1], (t[2] / t[3] if t[3] else None)


# ---------------------------------------------------------------------------------------------
# policy update
# ---------------------------------------------------------------------------------------------
def policy_update(
    chunks, optimizer, scheduler, groups: list[list[Rollout]], cfg: RunConfig, forward_step
) -> dict:
    """One optimizer step on `groups` (this rank's share). Returns metrics."""
    model = chunks[0]
    rewards = torch.tensor([[r.reward for r in grp] for grp in groups])
    adv = group_advantages(rewards)
    items = [
        {
            "prompt_ids": r.prompt_ids,
            "response_ids": r.response_ids,
            "rollout_logp": r.rollout_logp,
            # segment-level credit (E3RL attention rule): the sequence advantage times a per-token scale
            "advantage": [float(adv[i, j]) * x for x in r.info["adv_scale"]]
            if "adv_scale" in r.info
            else float(adv[i, j]),
            "routing": r.routing,
            "image": r.info.get("image"),  # image-text rollouts (MMRPT)
        }
        for i, grp in enumerate(groups)
        for j, r in enumerate(grp)
        if not r.reward_failed  # a failed reward scores 0 in its group's statistics but is not trained on
    ]
    mbs = cfg.train.micro_batch_size
    micro = [
        platform.to_device(pack(items[i : i + mbs], replay=cfg.rl.routing_replay))
        for i in range(0, len(items), mbs)
    ]
    t0 = time.perf_counter()
    with torch.no_grad():  # pi_old: the trainer's forward at the version that generated (this one)
        for b in micro:
            b["old_logp"] = token_logp(model, b) * b["mask"]
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=model,
        num_microbatches=len(micro),
        seq_length=max(b["tokens"].shape[1] for b in micro),
        micro_batch_size=mbs,
        forward_only=False,
    )
    finalize_model_grads(chunks)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(1)
    dt = time.perf_counter() - t0
    metrics = {}
    for key in out[0]:
        metrics[f"loss/{key}"] = float(torch.stack([d[key] for d in out]).float().mean())
    n_tok = sum(float(b["mask"].sum()) for b in micro)
    metrics.update({"grad norm": float(grad_norm or 0.0), "training tokens per sec": n_tok / dt})
    return metrics


# ---------------------------------------------------------------------------------------------
# async generation
# ---------------------------------------------------------------------------------------------
class AsyncGenerator:
    """Generation on an inference replica in a background thread, one step ahead of the trainer.
    `sync(version)` copies the trainer's weights into the replica (timed) between rollout batches."""

    def __init__(self, rollouts: Rollouts, replica, trainer_module, buffer: RolloutBuffer, steps: int):
        self.rollouts, self.replica, self.src, self.buffer = rollouts, replica, trainer_module, buffer
        # by name: the replica has no MTP modules (see train_rl)
        self.replica_state = {
            n: t for n, t in replica.state_dict(keep_vars=True).items() if torch.is_tensor(t)
        }
        self.src_state = {
            n: t for n, t in trainer_module.state_dict(keep_vars=True).items() if torch.is_tensor(t)
        }
        missing = set(self.replica_state) - set(self.src_state)
        if missing:
            raise RuntimeError(f"inference replica has tensors the trainer lacks: {sorted(missing)[:3]}")
        self.lock = threading.Lock()  # held while generating and while syncing
        self.version, self.steps, self.error = 0, steps, None
        self.stats: list[dict] = []
        self.stop = threading.Event()
        self.sync(0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sync(self, version: int) -> float:
        t0 = time.perf_counter()
        with self.lock, torch.no_grad():
            for name, t in self.replica_state.items():
                t.copy_(self.src_state[name])
            self.version = version
        return time.perf_counter() - t0

    def _run(self):
        try:
            batch = 0
            while not self.stop.is_set() and batch < self.steps:
                # at most one batch ahead of the trainer
                if len(self.buffer) >= self.rollouts.per_rank * self.rollouts.cfg.rl.group_size:
                    time.sleep(0.01)
                    continue
                with self.lock:
                    version = self.version
                    rollouts, stats = self.rollouts.sample_groups(version, batch * self.rollouts.per_rank)
                self.stats.append(stats)
                self.buffer.add(rollouts)
                batch += 1
        except BaseException as e:  # surfaced to the trainer
            self.error = e
            self.buffer.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=60)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train_rl(cfg: RunConfig) -> dict:
    t, r = cfg.train, cfg.rl
    env = platform.setup(cfg.parallel, seed=t.seed)
    if cfg.parallel.pp != 1:
        raise ValueError(
            f"parallel.pp={cfg.parallel.pp}: the colocated engine runs the whole model per rank (pp=1)"
        )
    tokenizer = tokenizer_for(cfg)
    init_from = r.init_from
    if init_from is None or checkpoint.latest_step(init_from) is None:
        if r.sft_steps <= 0:
            raise FileNotFoundError(f"rl.init_from={init_from!r} has no checkpoint and rl.sft_steps=0")
        init_from = init_from or f"{t.run_dir}/sft"
        run_sft(cfg, tokenizer, init_from)
        env = platform.setup(cfg.parallel, seed=t.seed)
    rl_cfg = rl_model_overrides(cfg)
    mcfg, chunks, optimizer, scheduler = build_model_and_optimizer(rl_cfg)
    checkpoint.load_model_weights(init_from, chunks, optimizer=optimizer)
    module = chunks[0].module
    engine = Engine(module, eos_id=tokenizer.eos, pad_id=tokenizer.pad)
    reward_fn = resolve_reward_fn(r.reward_fn) or WeightedSum(
        {"math": (math_reward, 1.0), "format": (format_reward, r.reward_format_weight)}
    )
    runner = RewardRunner(reward_fn, timeout_s=r.reward_timeout_s, workers=r.reward_workers)
    rollouts = Rollouts(rl_cfg, tokenizer, engine, runner)
    buffer = RolloutBuffer(r.max_staleness, group_size=r.group_size)
    forward_step = make_forward_step(cfg.rl.loss)
    monitor = Monitor(t.run_dir, t.steps, 0, enabled=is_logging_rank())
    monitor.banner(
        {
            "git": git_hash(),
            "versions": versions(),
            "world_size": env.world_size,
            "layout": cfg.parallel.describe(env.world_size),
            "init_from": init_from,
            "config": cfg.to_dict(),
        }
    )
    gen = None
    if r.async_mode:
        from megatron_step.models.step_flash import build_step_flash

        # The replica has no MTP modules: Megatron-Core's InferenceMode flag (which makes GPTModel
        # skip MTP while generating) is process-wide, and setting it from the generation thread
        # would switch the trainer's concurrent forward into inference behaviour too.
        replica = build_step_flash(
            dataclasses.replace(mcfg, mtp_num_layers=0, mtp_loss_weights=[]), cfg.parallel
        )
        rollouts.engine = Engine(replica, eos_id=tokenizer.eos, pad_id=tokenizer.pad)
        gen = AsyncGenerator(rollouts, replica, module, buffer, t.steps + r.max_staleness + 1)

    def evaluate(step: int, metrics: dict) -> None:
        acc, acc_s = rollouts.heldout_accuracy()
        accuracy.append((step, acc))
        tokens_at_eval.append((step, rollouts.tokens_sampled))
        metrics["accuracy/heldout"] = acc
        msg = f"step {step}: held-out accuracy {acc:.3f} (greedy)"
        if acc_s is not None:
            accuracy_sampled.append((step, acc_s))
            metrics["accuracy/heldout sampled"] = acc_s
            msg += f", {acc_s:.3f} (sampled x{r.eval_samples}, T={r.temperature})"
        monitor.message(msg)

    accuracy, accuracy_sampled, rewards_curve, staleness_seen, tokens_at_eval = [], [], [], [], []
    first: dict = {}
    evaluate(0, first)
    monitor.scalars(0, first)
    version = 0
    try:
        for step in range(t.steps):
            t0 = time.perf_counter()
            if gen is None:
                new, stats = rollouts.sample_groups(version, step * rollouts.per_rank)
                buffer.add(new)
            while not buffer.wait_for(rollouts.per_rank, version, timeout=1.0):
                if gen is not None and gen.error is not None:
                    raise RuntimeError("async generation failed") from gen.error
                if buffer.closed:
                    raise RuntimeError("rollout buffer closed before a step's groups arrived")
            groups = buffer.take(rollouts.per_rank, version)
            if gen is not None:
                stats = gen.stats[-1] if gen.stats else {}
            stale = RolloutBuffer.staleness(groups, version)
            staleness_seen += stale
            metrics = policy_update(chunks, optimizer, scheduler, groups, rl_cfg, forward_step)
            version += 1
            sync_s = gen.sync(version) if gen is not None else 0.0  # sync mode: the same parameters
            metrics.update(stats)
            metrics.update(
                {
                    "staleness/mean": sum(stale) / len(stale),
                    "staleness/max": float(max(stale)),
                    "staleness/dropped groups": float(buffer.dropped_stale),
                    "weight sync seconds": sync_s,
                    "tokens sampled/cumulative per rank": float(rollouts.tokens_sampled),
                    "step seconds": time.perf_counter() - t0,
                }
            )
            metrics = _mean_over_dp(metrics)
            metrics["staleness/max"] = float(max(stale))
            rewards_curve.append((step + 1, metrics.get("reward/mean", float("nan"))))
            # the DP mean (the same number on every rank), so all ranks stop at the same step
            budget_used = metrics["tokens sampled/cumulative per rank"]
            last = step + 1 == t.steps or 0 < r.max_tokens_sampled <= budget_used
            if t.eval_interval and ((step + 1) % t.eval_interval == 0 or last):
                evaluate(step + 1, metrics)
            monitor.scalars(step + 1, metrics)
            monitor.progress(
                1, {"reward": metrics.get("reward/mean", 0.0), "stale": metrics["staleness/max"]}
            )
            if (step + 1) % t.log_interval == 0:
                g = metrics.get
                monitor.message(
                    f"step {step + 1}/{t.steps} reward {g('reward/mean', 0):.3f} "
                    f"acc(train) {g('accuracy/train', 0):.3f} len {g('response length', 0):.1f} "
                    f"mismatch_kl {g('loss/mismatch_kl', 0):.2e} mask(token/traj) "
                    f"{g('loss/token_mask_rate', 0):.3f}/{g('loss/traj_mask_rate', 0):.3f}"
                )
            if (t.save_interval and (step + 1) % t.save_interval == 0) or last:
                checkpoint.save_checkpoint(
                    t.run_dir, step + 1, chunks, optimizer, scheduler, {"rl_version": version}
                )
            if last:
                if step + 1 < t.steps:
                    monitor.message(f"step {step + 1}: rl.max_tokens_sampled={r.max_tokens_sampled} used")
                break
    finally:
        if gen is not None:
            gen.close()
        runner.close()
        monitor.close()
    return {
        "accuracy": accuracy,
        "accuracy_sampled": accuracy_sampled,
        "reward": rewards_curve,
        "staleness": staleness_seen,
        "reward_failures": rollouts.failed,
        "tokens_sampled": tokens_at_eval,
        "run_dir": t.run_dir,
    }


__all__ = ["SFTDataset", "policy_update", "run_sft", "train_rl"]

"""Off-policy RL with colocated inference, on `torchrun` (no Ray):

    prompts -> G rollouts each (the trainer's own model, KV cache) -> rewards (isolated workers) ->
    group advantages -> policy update (Megatron-Core forward-backward + distributed optimizer,
    routing replayed) -> policy version + 1 -> next step

    cfg = load_run_config("examples/rl/rl_tiny.yaml", cls=RLRunConfig)
    out = train_rl(cfg)          # {"accuracy": [(step, held-out accuracy)], ...}

Two loop shapes. Sync (`_run_sync`): generate with the training model itself (same parameters,
nothing copied), score, update. Async (`rl.async_mode`, `_run_async`): an inference replica samples
in a background thread (megatron_step.rl.async_gen), up to `rl.max_ahead` policy versions ahead,
while the trainer updates; each rollout carries its version and pi_old (the replica's forward at
that version); after every update the trainer copies its weights into the replica (the weight
sync, timed) and the rollout buffer drops groups more than `rl.max_staleness` versions old.

Layouts: each DP rank generates, scores and trains on its own share of each step's prompts (chosen
from one stream shared by all ranks, sampled with keyed randomness: the rollouts do not depend on the
layout); the gradient all-reduce is Megatron-Core's. Under TP / EP the ranks joined by a forward's
collectives stay in lockstep -- the same number of decode steps, generation chunks and update
microbatches (megatron_step.rl.lockstep). Under PP (and VPP, and uneven `parallel.pipeline_layout`)
the engine runs each decode step through the stages and the last stage samples (rl.engine); the
update is Megatron-Core's pipelined schedule. Metrics are averaged over DP ranks (staleness/max is the
maximum). The preference reward model is loaded in the run's TP / EP layout. Not yet: the async
loop under TP / PP / EP (its generation thread would interleave collectives with the trainer's), the
preference reward model under PP (its forward is not pipelined), E3RL's attention credit under
TP / PP (it reads one rank's heads and layers); each is refused at start.

Actor-critic (`rl.advantage=gae`): a critic in the same layout (megatron_step.rl.critic) gives each
step's rollouts per-token GAE advantages before the policy update, then takes its own value-loss
steps on them; it is checkpointed with the policy under <run_dir>/critic.

The pieces: megatron_step.rl.tasks (prompts), rl.rollouts (sampling, scoring, held-out accuracy),
rl.reward_pool (isolated rewards), rl.policy (the update), rl.sft (the warm-up's data; its run is
megatron_step.stages.pretrain), rl.buffer (versions, staleness).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_step import platform
from megatron_step.config.run import RLRunConfig
from megatron_step.data.pipeline import run_tokenizer
from megatron_step.models.step_flash import StepFlashConfig, build_step_flash
from megatron_step.rl.async_gen import AsyncGenerator
from megatron_step.rl.buffer import RolloutBuffer
from megatron_step.rl.code_reward import CodeReward
from megatron_step.rl.critic import Critic, critic_dir
from megatron_step.rl.engine import Engine, unwrap_chunks
from megatron_step.rl.lockstep import Lockstep
from megatron_step.rl.policy import PolicyUpdate, build_reference
from megatron_step.rl.reward_model import PreferenceReward, RewardModel
from megatron_step.rl.reward_pool import RewardRunner
from megatron_step.rl.rewards import default_reward, resolve_reward_fn
from megatron_step.rl.rollouts import Evaluator, RolloutSampler
from megatron_step.rl.routing_confidence import merge_stages
from megatron_step.rl.sft import sft_config, sft_datasets
from megatron_step.rl.tasks import make_task
from megatron_step.stages.pretrain import due, pretrain
from megatron_step.training import checkpoint
from megatron_step.training.monitor import Monitor, is_logging_rank, run_banner
from megatron_step.training.setup import build_model_and_optimizer
from megatron_step.training.step import dp_mean

__all__ = ["rl_model_config", "train_rl", "warm_start"]


def rl_model_config(cfg: RLRunConfig) -> StepFlashConfig:
    """The RL run's model: routing replay as configured; the MTP modules kept (weights load) with
    loss weight `rl.mtp_loss_weight` per depth on the sampled responses (0: no MTP loss)."""
    m = cfg.model_config()
    return m.replace(
        routing_replay=cfg.rl.routing_replay and bool(m.num_experts),
        mtp_loss_weights=[cfg.rl.mtp_loss_weight] * m.mtp_num_layers,
    )


def warm_start(cfg: RLRunConfig, task, tokenizer) -> str:
    """The run directory the policy starts from: `rl.init_from`, after a supervised warm-up on the
    task's worked solutions when it holds no checkpoint (`rl.sft_steps`; default <run_dir>/sft)."""
    r = cfg.rl
    if r.init_from is not None and checkpoint.latest_step(r.init_from) is not None:
        return r.init_from
    if r.sft_steps <= 0:
        raise FileNotFoundError(f"rl.init_from={r.init_from!r} has no checkpoint and rl.sft_steps=0")
    init_from = r.init_from or f"{cfg.train.run_dir}/sft"
    data = sft_datasets(task, tokenizer, r, cfg.train.seed, cfg.data.seq_length)
    pretrain(sft_config(cfg, init_from), datasets=data)
    return init_from


def _is_count(key: str) -> bool:
    """RL metrics that count events (summed over the DP ranks by end_step, not averaged)."""
    return key == "rl/reward_failed" or key.startswith("rl/reward_outcome_")


_RECORDS = ("accuracy", "accuracy_sampled", "reward", "staleness", "tokens_sampled")  # train_rl's curves


@dataclass
class _Run:
    """What both loop shapes share: the stage's components, its per-step bookkeeping and records."""

    cfg: RLRunConfig
    chunks: list
    optimizer: object
    scheduler: object
    sampler: RolloutSampler
    evaluator: Evaluator
    update: PolicyUpdate
    monitor: Monitor
    version: int = 0
    out: dict = field(default_factory=lambda: {k: [] for k in _RECORDS})
    # held while evaluating: the async loop pauses its generation thread (the trainer's engine sets
    # Megatron-Core's process-wide InferenceMode, which would turn the thread's pi_old forwards into
    # inference forwards)
    pause: object = field(default_factory=contextlib.nullcontext)
    critic: Critic | None = None  # rl.advantage=gae
    # the sampler's (shared, own) state as of the end of this step -- what a checkpoint keeps and the
    # counters logged: the sampler's own in sync mode; in exact async mode the generator's (as of the
    # last batch the step waited for; its argument: with the queue), not wherever its thread has got to
    sampler_state: Callable[[bool], tuple[dict, dict]] | None = None

    def state(self, queue: bool = False) -> tuple[dict, dict]:
        return self.sampler.state() if self.sampler_state is None else self.sampler_state(queue)

    def train(self, groups: list) -> dict:
        """One RL update on `groups`: GRPO advantages, or (actor-critic) the critic's values -> GAE ->
        the actor step, then the critic's value-loss steps on the same rollouts."""
        if self.critic is None:
            return self.update(groups)
        r = self.cfg.rl
        advantages, metrics = self.critic.advantages(groups, r.gamma, r.lam)
        metrics.update(self.update(groups, advantages=advantages))
        metrics.update(self.critic.update(groups))
        return metrics

    def evaluate(self, step: int, metrics: dict) -> None:
        with self.pause:
            acc, acc_s = self.evaluator.accuracy()
        self.out["accuracy"].append((step, acc))
        self.out["tokens_sampled"].append((step, self.state()[1]["tokens_sampled"]))
        metrics["rl/accuracy_heldout"] = acc
        for src, (g, sampled) in self.evaluator.by_source.items():  # rl.task=dataset with several sources
            metrics[f"rl/accuracy_heldout/{src or 'none'}"] = g
            if sampled is not None:
                metrics[f"rl/accuracy_heldout_sampled/{src or 'none'}"] = sampled
        msg = f"step {step}: held-out accuracy {acc:.3f} (greedy)"
        if acc_s is not None:
            self.out["accuracy_sampled"].append((step, acc_s))
            metrics["rl/accuracy_heldout_sampled"] = acc_s
            msg += f", {acc_s:.3f} (sampled x{self.cfg.rl.eval_samples}, T={self.cfg.rl.temperature})"
        self.monitor.message(msg)

    def end_step(self, step: int, metrics: dict, stale: list[int], t0: float, **extra: float) -> bool:
        """Average, evaluate, log and save step `step` (0-based); True when the run stops here."""
        t, r = self.cfg.train, self.cfg.rl
        self.out["staleness"] += stale
        metrics.update(
            {
                "staleness/mean": sum(stale) / len(stale),
                "staleness/max": float(max(stale)),
                **{f"rl/{k}": v for k, v in extra.items()},
                "rl/tokens_sampled_cumulative": float(self.state()[1]["tokens_sampled"]),
                "rl/step_seconds": time.perf_counter() - t0,
            }
        )
        # events are counted over the DP ranks (the same total under any layout); the rest is averaged
        metrics = dp_mean(metrics, max_keys=("staleness/max",), is_count=_is_count)
        metrics = merge_stages(metrics)  # Sigma_k of every pipeline stage's layers (collective, PP group)
        self.out["reward"].append((step + 1, metrics.get("rl/reward_mean", float("nan"))))
        # the DP mean (the same number on every rank), so all ranks stop at the same step
        budget_hit = 0 < r.max_tokens_sampled <= metrics["rl/tokens_sampled_cumulative"]
        exiting = t.exit_after is not None and step + 1 >= t.exit_after  # a preempted job: save, stop
        last = step + 1 == t.steps or budget_hit
        if t.eval_interval and ((step + 1) % t.eval_interval == 0 or last):
            self.evaluate(step + 1, metrics)
        self.monitor.scalars(step + 1, metrics)
        g = metrics.get
        self.monitor.progress(1, {"reward": g("rl/reward_mean", 0.0), "stale": metrics["staleness/max"]})
        if (step + 1) % t.log_interval == 0:
            self.monitor.message(
                f"step {step + 1}/{t.steps} reward {g('rl/reward_mean', 0):.3f} "
                f"acc(train) {g('rl/accuracy_train', 0):.3f} len {g('rl/response_length', 0):.1f} "
                f"mismatch_kl {g('policy/mismatch_kl', 0):.2e} mask(token/traj) "
                f"{g('policy/token_mask_rate', 0):.3f}/{g('policy/traj_mask_rate', 0):.3f}"
            )
        if due(t.save_interval, step + 1) or last or exiting:
            self.save(step + 1, metrics["rl/tokens_sampled_cumulative"])
        if budget_hit and step + 1 < t.steps:
            self.monitor.message(f"step {step + 1}: rl.max_tokens_sampled={r.max_tokens_sampled} used")
        if exiting and not last:
            self.monitor.message(f"exit_after={t.exit_after}: stopping at step {step + 1} (checkpoint saved)")
        return last or exiting

    def save(self, step: int, tokens_sampled_mean: float) -> None:
        """Everything an exact resume needs at the end of RL step `step`: the critic first (so that a
        policy checkpoint of step s always has its critic of step s), then the policy with the
        version, the prompt stream's position and each rank's sampling counters (exact async mode:
        and its rollout queue)."""
        t = self.cfg.train
        if self.critic is not None:
            self.critic.save(t.run_dir, step, keep_last=t.keep_last)
        shared, own = self.state(queue=True)
        extra = {"rl_version": self.version, "sampler": shared, "tokens_sampled_mean": tokens_sampled_mean}
        checkpoint.save_checkpoint(
            t.run_dir, step, self.chunks, self.optimizer, self.scheduler, extra, rank_state=own,
            keep_last=t.keep_last,
        )  # fmt: skip

    def resume(self, step: int) -> dict | None:
        """Continue from this run's checkpoint of `step` (`save`); the critic from its own. Returns the
        rollout queue an exact async run saved with it (None: none)."""
        t = self.cfg.train
        loaded = checkpoint.load_checkpoint(t.run_dir, self.chunks, self.optimizer, self.scheduler, step=step)
        extra = loaded["extra"]
        if "sampler" not in extra:
            raise ValueError(
                f"{loaded['path']}: written by an RL run that did not checkpoint its sampler state; "
                "train.resume=never with train.overwrite=true starts the run over"
            )
        self.version = int(extra["rl_version"])
        self.sampler.load_state(extra["sampler"], loaded["rank_state"], extra.get("tokens_sampled_mean", 0.0))
        if self.critic is not None:
            self.critic.resume(t.run_dir, step)
        own = loaded["rank_state"]
        queue = None if own is None or "queue" not in own else own
        self.monitor.message(
            f"resumed from {loaded['path']} (policy version {self.version}"
            + (f", {len(queue['queue'])} queued rollouts)" if queue else ")")
        )
        return queue


def _run_sync(run: _Run, start: int = 0) -> None:
    """Generate with the trainer's own weights, score, update: every group is from the current version."""
    for step in range(start, run.cfg.train.steps):
        t0 = time.perf_counter()
        batch = run.sampler.generate(run.version, step)  # prompts -> responses
        groups, stats = run.sampler.score(batch)  # rewards (worker pool) -> prompt groups
        metrics = {**run.train(groups), **stats}  # one optimizer step (+ the critic's)
        run.version += 1  # the engine holds the trainer's module: nothing to copy
        if run.end_step(step, metrics, [0] * len(groups), t0, weight_sync_seconds=0.0, dropped_groups=0.0):
            break


def _run_async(run: _Run, replica, start: int = 0, queue: dict | None = None) -> None:
    """The replica samples ahead in a thread; the trainer takes what the buffer's staleness cap allows,
    updates, and copies its weights into the replica. `queue`: the exact-mode queue a resumed run's
    checkpoint holds (`AsyncGenerator.state`)."""
    t, r, s = run.cfg.train, run.cfg.rl, run.sampler
    buffer = RolloutBuffer(r.max_staleness, group_size=r.group_size)
    ahead = r.max_staleness if r.max_ahead is None else r.max_ahead
    if start and r.exact_staleness and queue is None:
        raise ValueError(
            f"{t.run_dir}: its checkpoint of step {start} holds no rollout queue (written outside "
            "rl.exact_staleness, or with another world size), so this exact-staleness run cannot go on "
            "exactly; resume it with rl.exact_staleness=false, or start over (train.resume=never "
            "train.overwrite=true)"
        )
    exact_resume = bool(start) and r.exact_staleness
    gen = AsyncGenerator(
        s,
        replica,
        run.chunks[0].module,
        buffer,
        ahead,
        t.micro_batch_size,
        replay=r.routing_replay,
        exact=r.exact_staleness,
        first_batch=start + ahead if exact_resume else start,
        version=run.version,
        restored=queue if exact_resume else None,
    )
    run.pause = gen.lock
    if r.exact_staleness:
        run.sampler_state = lambda queue: gen.state(run.version, queue)
    try:
        for step in range(start, t.steps):
            t0 = time.perf_counter()
            while not buffer.wait_for(s.per_rank, run.version, timeout=1.0):
                if gen.error is not None:
                    raise RuntimeError("async generation failed") from gen.error
                if buffer.closed:
                    raise RuntimeError("rollout buffer closed before a step's groups arrived")
            groups = buffer.take(s.per_rank, run.version)
            stale = RolloutBuffer.staleness(groups, run.version)
            metrics = {**run.train(groups), **gen.stats_for(groups)}
            run.version += 1
            sync_s = gen.sync(run.version)
            dropped = float(buffer.dropped_stale)
            if run.end_step(step, metrics, stale, t0, weight_sync_seconds=sync_s, dropped_groups=dropped):
                break
    finally:
        gen.close()


def _check_layout(cfg: RLRunConfig) -> None:
    """Refuse, at start, the layouts the RL stage cannot run yet (see the module docstring)."""
    p, r = cfg.parallel, cfg.rl
    mp = {k: v for k, v in (("tp", p.tp), ("pp", p.pp), ("ep", p.ep), ("cp", p.cp)) if v > 1}
    if mp and r.async_mode:
        raise ValueError(
            f"rl.async_mode=true with parallel {mp}: the async generation thread would run model-parallel "
            "collectives beside the trainer's; use rl.async_mode=false (sync) under TP / PP / EP"
        )
    staged = {k: v for k, v in (("pp", p.pp), ("cp", p.cp)) if v > 1}
    if staged and r.reward_model:
        raise ValueError(
            f"rl.reward_model={r.reward_model!r} with parallel {staged}: the reward model runs its forward "
            "in one pipeline stage (TP / EP are fine); drop parallel.pp/cp or the reward model"
        )
    split = {k: v for k, v in (("tp", p.tp), ("pp", p.pp)) if v > 1}
    if split and r.rollout == "e3rl" and r.e3rl.advantage_rule == "attention":
        raise ValueError(
            f"rl.e3rl.advantage_rule=attention with parallel {split}: the attention shares are read from "
            "this rank's heads and layers only; use rl.e3rl.advantage_rule=uniform in this layout"
        )


def _frozen_copy(model: StepFlashConfig, cfg: RLRunConfig, chunks):
    """This rank's last model chunk, rebuilt and loaded with the current weights, never updated: the
    drafter of `rl.speculative.refresh_drafter=false` (MTP heads that miss every weight sync)."""
    copy = unwrap_chunks(build_step_flash(model, cfg.parallel))[-1]
    copy.load_state_dict(unwrap_chunks(chunks)[-1].state_dict())
    copy.requires_grad_(False)
    return copy


def train_rl(cfg: RLRunConfig) -> dict:
    """Run the RL stage per `cfg`; returns {"accuracy": [(step, greedy held-out accuracy)],
    "accuracy_sampled", "reward": [(step, mean reward)], "staleness" (per trained group),
    "tokens_sampled": [(step, tokens)], "reward_failures", "run_dir"}."""
    t, r = cfg.train, cfg.rl
    _check_layout(cfg)
    env = platform.setup(cfg.parallel, seed=t.seed)
    # before the warm-up: a run directory holding a run is refused (or continued) at once
    start = checkpoint.resume_step(t, extra_dirs=(critic_dir(t.run_dir),))
    tokenizer = run_tokenizer(cfg.data)
    task = make_task(r, tokenizer)
    routed = getattr(task, "preference_sources", lambda: None)()
    if routed is not None and not r.reward_model:
        raise ValueError(
            f"rl.data.rewards routes {sorted(s for s in routed if s) or ['(default)']} to preference, but "
            "rl.reward_model is not set: give a reward model (tools/train_reward_model.py writes one)"
        )
    init_from = warm_start(cfg, task, tokenizer)
    env = platform.setup(cfg.parallel, seed=t.seed)  # the same seeds whether or not a warm-up ran
    model = rl_model_config(cfg)
    # the LR schedule runs over every optimizer step: RL steps x actor minibatches
    chunks, optimizer, scheduler = build_model_and_optimizer(
        model, cfg.parallel, cfg.optim, t.steps * r.actor_minibatches
    )
    checkpoint.load_model_weights(init_from, chunks, optimizer=optimizer)
    # every (virtual) stage of this rank
    conf = r.routing_confidence
    spec = r.speculative
    engine = Engine(
        chunks,
        eos_id=tokenizer.eos,
        pad_id=tokenizer.pad,
        routing_confidence=conf,
        speculative=spec.tokens,
        accept=spec.accept,
        mtp_cache=spec.mtp_cache,
        drafter=None if spec.refresh_drafter or not spec.tokens else _frozen_copy(model, cfg, chunks),
    )
    reward = CodeReward(r.code) if r.reward_fn == "code" else resolve_reward_fn(r.reward_fn)
    if reward is None:  # the task's own (a tool task's exact answer), else math + format
        reward = (
            task.reward()
            if callable(getattr(task, "reward", None))
            else default_reward(r.reward_format_weight)
        )
    runner = RewardRunner(reward, timeout_s=r.reward_timeout_s, workers=r.reward_workers)
    pref = (
        PreferenceReward(RewardModel.load(r.reward_model, cfg.parallel), tokenizer, r.length_penalty)
        if r.reward_model
        else None
    )
    sampler = RolloutSampler(r, task, tokenizer, engine, runner, t.seed, t.run_dir, preference=pref)
    evaluator = Evaluator(r, task, sampler, engine, t.seed)  # the trainer's weights, also in async mode
    # the KL term's reference: the policy's starting weights, frozen, in the same layout
    reference = build_reference(model, cfg.parallel, init_from) if r.loss.kl_coef > 0 else None
    update = PolicyUpdate(
        chunks,
        optimizer,
        scheduler,
        r.loss,
        t.micro_batch_size,
        replay=r.routing_replay,
        reference=reference,
        routing_confidence=r.routing_confidence,
        minibatches=r.actor_minibatches,
        max_skipped=t.max_skipped_steps,
    )
    critic = None
    if r.advantage == "gae":  # the critic: same architecture and layout, its own optimizer
        critic = Critic.build(
            model, cfg.parallel, cfg.optim, r.critic, t.steps, t.micro_batch_size, init_from,
            max_skipped=t.max_skipped_steps,
        )  # fmt: skip
    monitor = Monitor(t.run_dir, t.steps, start or 0, enabled=is_logging_rank())
    banner = {"init_from": init_from, **({"critic_from": critic.loaded} if critic else {})}
    if callable(getattr(task, "info", None)):  # a dataset task: records read, skipped, sources
        banner["rl_data"] = task.info()
    monitor.banner(run_banner(env, cfg.to_dict(), resumed_from_step=start or 0, **banner))
    run = _Run(cfg, chunks, optimizer, scheduler, sampler, evaluator, update, monitor, critic=critic)
    try:
        queue = None
        if start:
            queue = run.resume(start)
        else:
            first: dict = {}
            run.evaluate(0, first)
            monitor.scalars(0, first)
        start = start or 0
        if not r.async_mode:
            _run_sync(run, start)
        else:
            # The replica has no MTP modules: Megatron-Core's InferenceMode flag (which makes GPTModel
            # skip MTP while generating) is process-wide, and setting it from the generation thread
            # would switch the trainer's concurrent forward into inference behaviour too.
            replica = build_step_flash(
                dataclasses.replace(model, mtp_num_layers=0, mtp_loss_weights=[]), cfg.parallel
            )
            # driven from the generation thread: no collective (async runs are DP-only, see
            # _check_layout), not even E3RL's alignment across ranks -- it would race the trainer's
            alone = Lockstep(None)
            sampler.engine = Engine(
                replica,
                eos_id=tokenizer.eos,
                pad_id=tokenizer.pad,
                lockstep=alone,
                across_ranks=alone,
                routing_confidence=r.routing_confidence,
            )
            _run_async(run, replica, start, queue)
    finally:
        runner.close()
        monitor.close()
    return {**run.out, "reward_failures": sampler.failed, "run_dir": t.run_dir}

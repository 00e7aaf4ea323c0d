"""Asynchronous generation: an inference replica samples the next batches in a background thread
while the trainer updates; after each update the trainer copies its weights into the replica.

    gen = AsyncGenerator(sampler, replica, trainer_module, buffer, ahead=2, micro_batch_size=8)  # starts
    ...                     # the trainer takes groups from `buffer`, updates, then:
    seconds = gen.sync(version)
    gen.close()

How far ahead: rollout batch b (the trainer trains on it at version b when nothing is dropped) is
sampled once the replica holds version v >= b - `ahead`, so its staleness is at most `ahead`
(rl.max_ahead, default rl.max_staleness): with a slow trainer the thread keeps up to ahead + 1
batches queued. Each rollout is tagged with the version v of the weights that sampled it and gets
its pi_old -- the replica's own forward on it, the trainer's numerics at version v (the replica is
the trainer's module class with copied weights) -- so the update can take the PPO ratio to the
behaviour policy (megatron_step.rl.losses). The buffer drops groups staler than rl.max_staleness
(possible when rl.max_ahead is larger) and counts them.

Exact mode (rl.exact_staleness): the trainer, before it syncs version v, waits until the batch
v - 1 + ahead has been sampled with version v - 1, so batch b is always sampled with version
max(0, b - ahead): the staleness of every step is fixed (0, 1, .., ahead, ahead, ...) and the run no
longer depends on thread timing -- the same rollouts and numbers on every rerun. It is also the mode
that resumes exactly: `state(v)` right after `sync(v)` is the queue (batches v .. v - 1 + ahead, each
sampled with its version, its pi_old recorded) and the sampler's state once the last of them was
sampled; a generator built with `restored=` that state and `first_batch=v + ahead` goes on as the
uninterrupted one would (megatron_step.stages.rl). Outside exact mode how far the thread got depends
on timing, so a resumed run restarts the queue empty (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from megatron_step.rl.buffer import Rollout, RolloutBuffer
from megatron_step.rl.policy import record_old_logp
from megatron_step.rl.rollouts import RolloutSampler

__all__ = ["AsyncGenerator"]


class AsyncGenerator:
    """Generation on an inference replica in a background thread, at most `ahead` policy versions
    ahead of the trainer. `sync(version)` copies the trainer's weights into the replica (timed)
    between rollout batches. `micro_batch_size`, `replay`: of the pi_old forward (rollouts per
    forward; MoE routing replayed from the rollout, as the trainer's forwards do)."""

    def __init__(
        self,
        sampler: RolloutSampler,
        replica,
        trainer_module,
        buffer: RolloutBuffer,
        ahead: int,
        micro_batch_size: int,
        replay: bool = True,
        exact: bool = False,
        first_batch: int = 0,
        version: int = 0,
        restored: dict | None = None,
    ):
        if ahead < 0:
            raise ValueError(f"rl.max_ahead={ahead}: must be >= 0")
        self.sampler, self.replica, self.buffer = sampler, replica, buffer
        self.ahead, self.mbs, self.replay, self.exact = ahead, micro_batch_size, replay, exact
        # by name: the replica has no MTP modules (see megatron_step.stages.rl)
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
        # a resumed run starts at `first_batch` with its version: in exact mode with the queue of
        # `state()` (`restored`), otherwise empty (the first `ahead` steps after a resume are then
        # fresher than in the uninterrupted run)
        self.version, self.error, self.first_batch = version, None, first_batch
        self.stats: dict[int, dict] = {}  # rollout batch -> its sampling metrics
        if restored is not None:
            buffer.add([Rollout(**r) for r in restored["queue"]])
            self.stats.update({int(b): m for b, m in restored["queue_stats"].items()})
        # rollout batch -> the sampler's state() once it was sampled (the one before first_batch: now)
        self.after: dict[int, tuple[dict, dict]] = {first_batch - 1: sampler.state()}
        self.produced = threading.Condition()  # notified when a batch is in the buffer
        self.n_produced = first_batch
        self.stop = threading.Event()
        self.sync(version, wait=False)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sync(self, version: int, wait: bool = True) -> float:
        """Copy the trainer's weights into the replica; they are now policy `version`. Seconds taken
        (in exact mode including the wait for the batch the previous version still has to sample)."""
        t0 = time.perf_counter()
        if self.exact and wait:
            with self.produced:
                while self.n_produced < version + self.ahead:
                    if self.error is not None:
                        raise RuntimeError("async generation failed") from self.error
                    self.produced.wait(timeout=1.0)
        with self.lock, torch.no_grad():
            for name, t in self.replica_state.items():
                t.copy_(self.src_state[name])
            self.version = version
        return time.perf_counter() - t0

    def _run(self):
        s = self.sampler
        try:
            batch = self.first_batch
            while not self.stop.is_set():
                if batch - self.version > self.ahead:  # batch b waits for version b - ahead
                    time.sleep(0.01)
                    continue
                with self.lock:
                    groups, stats = s.sample(self.version, batch)
                    record_old_logp(self.replica, [r for g in groups for r in g], self.mbs, self.replay)
                self.stats[batch] = stats
                self.after[batch] = s.state()
                self.after.pop(batch - self.ahead - 2, None)  # state() reads at most `ahead` back
                self.buffer.add([r for g in groups for r in g])
                batch += 1
                with self.produced:
                    self.n_produced = batch
                    self.produced.notify_all()
        except BaseException as e:  # surfaced to the trainer
            self.error = e
            self.buffer.close()

    def state(self, version: int, queue: bool = True) -> tuple[dict, dict]:
        """Exact mode, right after `sync(version)`: (the sampler's shared state, this rank's own) as
        they were once batch version - 1 + ahead -- the last one `sync` waited for -- was sampled;
        with `queue` the own part also holds the queued rollouts of batches version .. version - 1 +
        ahead and their sampling metrics (`restored=` of a resumed generator). A batch the thread
        samples meanwhile (version's own) is not in it: the resumed generator samples it again, with
        the same weights."""
        if not self.exact:
            raise RuntimeError("AsyncGenerator.state: only rl.exact_staleness=true fixes the queue")
        last = version - 1 + self.ahead
        shared, own = self.after[last]
        if not queue:
            return shared, own
        per_step = self.sampler.rl.prompts_per_step  # group ids are batch x prompts_per_step + i
        queue = [dataclasses.asdict(r) for r in self.buffer.held() if r.group // per_step <= last]
        stats = {b: self.stats[b] for b in range(version, last + 1)}
        return shared, {**own, "queue": queue, "queue_stats": stats}

    def stats_for(self, groups) -> dict[str, float]:
        """The sampling metrics of the batches `groups` came from (their mean, per key): what the
        trainer logs for the step that trained on them."""
        per_step = self.sampler.rl.prompts_per_step  # group ids are batch x prompts_per_step + i
        batches = sorted({g[0].group // per_step for g in groups})
        got = [self.stats[b] for b in batches if b in self.stats]
        keys = sorted({k for m in got for k in m})
        return {k: sum(m[k] for m in got if k in m) / sum(k in m for m in got) for k in keys}

    def close(self):
        self.stop.set()
        self.thread.join(timeout=60)

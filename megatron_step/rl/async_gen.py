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
longer depends on thread timing -- the same rollouts and numbers on every rerun.
"""

from __future__ import annotations

import threading
import time

import torch

from megatron_step.rl.buffer import RolloutBuffer
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
        # a resumed run starts at its step's batch with its version (the queue starts empty: the
        # first `ahead` steps after a resume are fresher than in the uninterrupted run)
        self.version, self.error, self.first_batch = version, None, first_batch
        self.stats: dict[int, dict] = {}  # rollout batch -> its sampling metrics
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
                self.buffer.add([r for g in groups for r in g])
                batch += 1
                with self.produced:
                    self.n_produced = batch
                    self.produced.notify_all()
        except BaseException as e:  # surfaced to the trainer
            self.error = e
            self.buffer.close()

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

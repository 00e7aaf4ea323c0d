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
    ):
        if ahead < 0:
            raise ValueError(f"rl.max_ahead={ahead}: must be >= 0")
        self.sampler, self.replica, self.buffer = sampler, replica, buffer
        self.ahead, self.mbs, self.replay = ahead, micro_batch_size, replay
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
        self.version, self.error = 0, None
        self.stats: list[dict] = []
        self.stop = threading.Event()
        self.sync(0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sync(self, version: int) -> float:
        """Copy the trainer's weights into the replica; they are now policy `version`. Seconds taken."""
        t0 = time.perf_counter()
        with self.lock, torch.no_grad():
            for name, t in self.replica_state.items():
                t.copy_(self.src_state[name])
            self.version = version
        return time.perf_counter() - t0

    def _run(self):
        s = self.sampler
        try:
            batch = 0
            while not self.stop.is_set():
                if batch - self.version > self.ahead:  # batch b waits for version b - ahead
                    time.sleep(0.01)
                    continue
                with self.lock:
                    groups, stats = s.sample(self.version, batch)
                    record_old_logp(self.replica, [r for g in groups for r in g], self.mbs, self.replay)
                self.stats.append(stats)
                self.buffer.add([r for g in groups for r in g])
                batch += 1
        except BaseException as e:  # surfaced to the trainer
            self.error = e
            self.buffer.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=60)

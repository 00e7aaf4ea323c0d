"""Asynchronous generation: an inference replica samples the next batches in a background thread
while the trainer updates; after each update the trainer copies its weights into the replica.

    gen = AsyncGenerator(sampler, replica, trainer_module, buffer, steps)   # starts the thread
    ...                     # the trainer takes groups from `buffer`, updates, then:
    seconds = gen.sync(version)
    gen.close()

How far ahead: the thread keeps at most one step's rollouts waiting in the buffer (it pauses while
the buffer holds `per_rank x G` rollouts), and tags each rollout with the policy version of the
weights it sampled with; the buffer drops groups beyond `rl.max_staleness`.
"""

from __future__ import annotations

import threading
import time

import torch

from megatron_step.rl.buffer import RolloutBuffer
from megatron_step.rl.rollouts import RolloutSampler

__all__ = ["AsyncGenerator"]


class AsyncGenerator:
    """Generation on an inference replica in a background thread, ahead of the trainer.
    `sync(version)` copies the trainer's weights into the replica (timed) between rollout batches."""

    def __init__(self, sampler: RolloutSampler, replica, trainer_module, buffer: RolloutBuffer, steps: int):
        self.sampler, self.replica, self.buffer = sampler, replica, buffer
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
        self.version, self.steps, self.error = 0, steps, None
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
            while not self.stop.is_set() and batch < self.steps:
                if len(self.buffer) >= s.per_rank * s.rl.group_size:  # at most one batch ahead
                    time.sleep(0.01)
                    continue
                with self.lock:
                    groups, stats = s.sample(self.version, batch)
                self.stats.append(stats)
                self.buffer.add([r for g in groups for r in g])
                batch += 1
        except BaseException as e:  # surfaced to the trainer
            self.error = e
            self.buffer.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=60)

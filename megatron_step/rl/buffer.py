"""Rollouts tagged with the policy version that generated them, and a thread-safe buffer that hands the
trainer whole prompt groups no staler than a cap.

    buffer = RolloutBuffer(max_staleness=1, group_size=8)
    # generation thread                          # trainer, at policy version `step`
    buffer.add(rollouts)                          if buffer.wait_for(4, step, timeout=600):
                                                      groups = buffer.take(4, step)  # 4 x 8 rollouts

Why versions: with off-policy (asynchronous) generation the engine samples with weights a few updates
behind the trainer. Staleness = current version - the version that generated a rollout; a group whose
oldest rollout is more than `max_staleness` versions old is dropped (and counted in `dropped_stale`):
its importance ratios pi_theta / pi_old drift far from 1, and clipping or MIS-PO masks would discard most
of it anyway. max_staleness=0 is on-policy: only rollouts of the current version are used.

Why whole groups: GRPO normalises a reward against the other samples of the same prompt, so a group
is trained on all together or not at all.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    """One sampled response to one prompt, as it moves from generation to the trainer."""

    prompt_ids: list[int]  # the prompt's token ids as the engine was given them (template applied)
    response_ids: list[int]  # the sampled response's token ids (EOS included when it was sampled)
    rollout_logp: list[float]  # log pi_rollout of each response token, recorded by the engine while sampling
    reward: float  # scalar reward of the whole response
    group: int  # id of the prompt group: the G samples of one prompt share it (advantages use the group)
    version: int  # policy version (number of optimizer updates of the weights) that generated it
    reward_failed: bool = False  # the reward function failed (error, timeout): `reward` is a placeholder
    routing: object | None = None  # MoE routing recorded during generation (for routing replay); opaque
    # per response token, the factor on the sequence advantage (E3RL's attention credit over segments);
    # None: every token takes the sequence advantage as is
    adv_scale: list[float] | None = None
    image: torch.Tensor | None = None  # (3, H, W) the image in the prompt (the image-text model, MMRPT)
    # log pi_old of each response token: the trainer's forward with the weights of `version` (the
    # behaviour policy in the trainer's numerics), taken right after sampling (async generation);
    # None: the update takes it from its current weights, which are that version (sync)
    old_logp: list[float] | None = None
    # the response was cut at rl.max_new_tokens without EOS: the episode did not end (the critic
    # bootstraps from the value of its last state, megatron_step.rl.critic)
    truncated: bool = False
    # per response token, 1 where the policy sampled it, 0 where a tool wrote it (ERL's tool results):
    # 0s are teacher-forced context, outside the loss; None: every token was sampled
    sampled_mask: list[int] | None = None
    info: dict = field(default_factory=dict)  # what the trainer does not read: correctness, entropy, ...

    def __post_init__(self):
        for name in ("rollout_logp", "adv_scale", "old_logp", "sampled_mask"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.response_ids):
                raise ValueError(
                    f"rollout of group {self.group}: {len(values)} {name} for "
                    f"{len(self.response_ids)} response tokens (need one per token)"
                )


@dataclass
class _Group:
    rollouts: list[Rollout]
    order: int  # arrival order of the group's first rollout (FIFO among groups of the same version)
    complete: bool

    @property
    def version(self) -> int:  # a group is as stale as its oldest rollout
        return min(r.version for r in self.rollouts)


class RolloutBuffer:
    """Thread-safe store of rollouts by prompt group. One lock guards everything; a condition on it wakes
    `wait_for` when rollouts arrive or the buffer is closed.

    group_size: None means every `add` call carries whole groups (a group id may not be added again while
    it is in the buffer); an int G means rollouts of a group may arrive over several calls and the group
    is complete, and can be taken, once it holds G. A group dropped as stale while incomplete may leave
    late members behind; they form an incomplete group that is dropped once it is stale too.
    """

    def __init__(self, max_staleness: int, group_size: int | None = None):
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise ValueError(f"rl.max_staleness={max_staleness!r}: must be an integer >= 0")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"rl.group_size={group_size!r}: must be an integer >= 1 (or None)")
        self.max_staleness = max_staleness
        self.group_size = group_size
        self._cond = threading.Condition(threading.Lock())
        self._groups: dict[int, _Group] = {}  # group id -> group
        self._order = itertools.count()
        self._closed = False
        self._added = 0  # rollouts added
        self._taken = 0  # groups handed out by take()
        self._dropped_stale = 0  # groups dropped for staleness
        self._dropped_stale_rollouts = 0  # rollouts in those groups

    # -- producer side ------------------------------------------------------------------------------

    def add(self, rollouts: list[Rollout]) -> None:
        """Add rollouts; all or none (the whole call is checked before anything is stored)."""
        by_group: dict[int, list[Rollout]] = {}
        for r in rollouts:
            by_group.setdefault(r.group, []).append(r)
        with self._cond:
            if self._closed:
                raise RuntimeError("RolloutBuffer.add after close()")
            for gid, rs in by_group.items():
                held = self._groups.get(gid)
                if self.group_size is None and held is not None:
                    raise ValueError(
                        f"group {gid} is already in the buffer; with group_size=None each add() must "
                        "carry whole groups (or set group_size)"
                    )
                n = len(rs) + (len(held.rollouts) if held is not None else 0)
                if self.group_size is not None and n > self.group_size:
                    raise ValueError(f"group {gid} would hold {n} rollouts, group_size={self.group_size}")
            for gid, rs in by_group.items():
                group = self._groups.get(gid)
                if group is None:
                    group = self._groups[gid] = _Group([], next(self._order), complete=False)
                group.rollouts.extend(rs)
                group.complete = self.group_size is None or len(group.rollouts) == self.group_size
            self._added += len(rollouts)
            self._cond.notify_all()

    def close(self) -> None:
        """No more rollouts will come: wake every `wait_for` (they return what is there)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- trainer side -------------------------------------------------------------------------------

    def take(self, n_groups: int, current_version: int) -> list[list[Rollout]]:
        """Remove and return up to `n_groups` complete groups with version >= current_version -
        max_staleness, oldest version first (those nearest their staleness limit go first; arrival order
        among equal versions). Staler groups, complete or not, are dropped first and counted."""
        if n_groups < 0:
            raise ValueError(f"n_groups={n_groups}: must be >= 0")
        with self._cond:
            self._drop_stale(current_version)
            chosen = sorted(self._ready(), key=lambda ig: (ig[1].version, ig[1].order))[:n_groups]
            for gid, _ in chosen:
                del self._groups[gid]
            self._taken += len(chosen)
            return [g.rollouts for _, g in chosen]

    def wait_for(self, n_groups: int, current_version: int, timeout: float | None = None) -> bool:
        """Block until `n_groups` complete, fresh-enough groups are ready (True), or `timeout` seconds
        pass or the buffer is closed without them (False). None waits without limit. Stale groups are
        dropped while waiting, so the count only includes groups `take` would return."""

        def ready() -> bool:
            self._drop_stale(current_version)
            return self._closed or len(self._ready()) >= n_groups

        with self._cond:
            self._cond.wait_for(ready, timeout)
            return len(self._ready()) >= n_groups

    @staticmethod
    def staleness(groups: list[list[Rollout]], current_version: int) -> list[int]:
        """current_version - the oldest version in each group (0: generated by the current policy)."""
        return [current_version - min(r.version for r in g) for g in groups]

    # -- counters -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Rollouts held, in complete and incomplete groups."""
        with self._cond:
            return sum(len(g.rollouts) for g in self._groups.values())

    def held(self) -> list[Rollout]:
        """Every rollout held (complete and incomplete groups), groups in arrival order: what a
        checkpoint of the queue keeps (`add` them back, in this order, to restore it)."""
        with self._cond:
            return [r for g in sorted(self._groups.values(), key=lambda g: g.order) for r in g.rollouts]

    @property
    def closed(self) -> bool:
        """close() was called: `wait_for` no longer blocks, so a waiting loop should stop on it."""
        with self._cond:
            return self._closed

    @property
    def dropped_stale(self) -> int:
        """Groups dropped because they were too stale when the trainer asked."""
        with self._cond:
            return self._dropped_stale

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the counters (for logging)."""
        with self._cond:
            return {
                "added": self._added,
                "taken_groups": self._taken,
                "dropped_stale": self._dropped_stale,
                "dropped_stale_rollouts": self._dropped_stale_rollouts,
                "held_rollouts": sum(len(g.rollouts) for g in self._groups.values()),
                "ready_groups": len(self._ready()),
            }

    # -- internals (call with the lock held) --------------------------------------------------------

    def _ready(self) -> list[tuple[int, _Group]]:
        return [(gid, g) for gid, g in self._groups.items() if g.complete]

    def _drop_stale(self, current_version: int) -> None:
        oldest_ok = current_version - self.max_staleness
        for gid in [gid for gid, g in self._groups.items() if g.version < oldest_ok]:
            self._dropped_stale += 1
            self._dropped_stale_rollouts += len(self._groups.pop(gid).rollouts)

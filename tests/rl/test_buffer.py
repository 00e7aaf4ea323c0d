"""RolloutBuffer: staleness cap, whole groups, ordering, counters, and a producer-thread smoke test."""

import threading
import time

import pytest

from megatron_step.rl.buffer import Rollout, RolloutBuffer


def group(gid: int, version: int, size: int = 2, versions: list[int] | None = None) -> list[Rollout]:
    """`size` rollouts of prompt group `gid`; `versions` gives each rollout its own version."""
    versions = versions or [version] * size
    return [
        Rollout(
            prompt_ids=[1, 2],
            response_ids=[3, 4, 5],
            rollout_logp=[-0.1, -0.2, -0.3],
            reward=float(i),
            group=gid,
            version=v,
            info={"i": i},
        )
        for i, v in enumerate(versions)
    ]


def ids(groups: list[list[Rollout]]) -> list[int]:
    return [g[0].group for g in groups]


def test_validation():
    with pytest.raises(ValueError, match=r"max_staleness=-1"):
        RolloutBuffer(max_staleness=-1)
    with pytest.raises(ValueError, match=r"group_size=0"):
        RolloutBuffer(max_staleness=0, group_size=0)
    with pytest.raises(ValueError, match="2 rollout_logp for 3 response tokens"):
        Rollout([1], [3, 4, 5], [-0.1, -0.2], reward=0.0, group=0, version=0)
    with pytest.raises(ValueError, match="n_groups=-1"):
        RolloutBuffer(0).take(-1, 0)


def test_staleness_cap_drop_when_over_keep_when_equal():
    # cap 2 at current version 10: version 8 has staleness 2 (= cap, kept), version 7 has 3 (dropped).
    buf = RolloutBuffer(max_staleness=2)
    buf.add(group(0, version=7) + group(1, version=8) + group(2, version=10))
    assert len(buf) == 6
    out = buf.take(10, current_version=10)
    assert ids(out) == [1, 2]
    assert RolloutBuffer.staleness(out, 10) == [2, 0]
    assert buf.dropped_stale == 1
    assert buf.stats() == {
        "added": 6,
        "taken_groups": 2,
        "dropped_stale": 1,
        "dropped_stale_rollouts": 2,
        "held_rollouts": 0,
        "ready_groups": 0,
    }
    assert len(buf) == 0


def test_on_policy_cap_zero():
    buf = RolloutBuffer(max_staleness=0)
    buf.add(group(0, version=4) + group(1, version=5))
    assert ids(buf.take(5, current_version=5)) == [1]
    assert buf.dropped_stale == 1


def test_group_staleness_is_its_oldest_rollout():
    # One group generated across versions 4 and 6 (partial rollouts): staleness at 6 is 2.
    g = group(0, version=0, versions=[6, 4])
    assert RolloutBuffer.staleness([g], 6) == [2]
    buf = RolloutBuffer(max_staleness=1)
    buf.add(g)
    assert buf.take(1, current_version=6) == []  # 6 - 4 = 2 > 1: the whole group goes
    assert buf.dropped_stale == 1 and len(buf) == 0


def test_oldest_version_first_then_arrival_order_and_n_groups():
    buf = RolloutBuffer(max_staleness=5)
    buf.add(group(10, version=3))
    buf.add(group(11, version=1))
    buf.add(group(12, version=3))
    buf.add(group(13, version=2))
    assert ids(buf.take(3, current_version=3)) == [11, 13, 10]  # versions 1, 2, 3 (10 came before 12)
    assert ids(buf.take(3, current_version=3)) == [12]
    assert buf.take(3, current_version=3) == []


def test_groups_are_kept_whole():
    buf = RolloutBuffer(max_staleness=1)
    buf.add(group(0, version=0, size=4) + group(1, version=0, size=3))
    out = buf.take(1, current_version=0)
    assert len(out) == 1 and len(out[0]) == 4 and {r.group for r in out[0]} == {0}
    assert [r.info["i"] for r in out[0]] == [0, 1, 2, 3]  # arrival order within the group
    assert len(buf) == 3


def test_group_size_waits_for_complete_groups():
    buf = RolloutBuffer(max_staleness=1, group_size=3)
    g = group(0, version=0, size=3)
    buf.add(g[:2])
    assert buf.take(1, current_version=0) == []  # 2 of 3: not ready
    assert len(buf) == 2 and buf.stats()["ready_groups"] == 0
    buf.add(g[2:])
    out = buf.take(1, current_version=0)
    assert [r.info["i"] for r in out[0]] == [0, 1, 2]
    with pytest.raises(ValueError, match="would hold 4 rollouts, group_size=3"):
        buf.add(group(1, version=0, size=4))
    assert len(buf) == 0  # the refused call stored nothing


def test_incomplete_stale_group_is_dropped():
    buf = RolloutBuffer(max_staleness=1, group_size=3)
    buf.add(group(0, version=0, size=2))
    assert buf.take(1, current_version=2) == []
    assert buf.stats()["dropped_stale_rollouts"] == 2 and len(buf) == 0


def test_whole_group_adds_refuse_a_pending_group_id():
    buf = RolloutBuffer(max_staleness=1)
    buf.add(group(0, version=0))
    with pytest.raises(ValueError, match="group 0 is already in the buffer"):
        buf.add(group(0, version=0) + group(1, version=0))
    assert len(buf) == 2  # all or nothing: group 1 was not stored either
    buf.take(1, current_version=0)
    buf.add(group(0, version=1))  # an id may come back once its group has left the buffer
    assert len(buf) == 2


def test_wait_for_timeout_close_and_staleness():
    buf = RolloutBuffer(max_staleness=0)
    assert not buf.closed
    t0 = time.monotonic()
    assert buf.wait_for(1, current_version=0, timeout=0.05) is False
    assert time.monotonic() - t0 >= 0.04
    buf.add(group(0, version=0))
    assert buf.wait_for(1, current_version=1, timeout=0.01) is False  # stale at version 1: dropped
    assert buf.dropped_stale == 1
    threading.Timer(0.05, buf.close).start()
    assert buf.wait_for(1, current_version=1, timeout=5.0) is False  # woken by close, not the timeout
    assert time.monotonic() - t0 < 4.0
    assert buf.closed
    with pytest.raises(RuntimeError, match="after close"):
        buf.add(group(1, version=1))


def test_producer_thread_smoke():
    # A generation thread adds 40 groups of 4, one rollout at a time (so groups complete across add
    # calls), tagging them with the trainer's version when it started generating. The trainer takes 4
    # groups per step and bumps the version. With cap 1 nothing may be staler than 1 when taken; every
    # group is either taken whole exactly once or counted as dropped.
    n_groups, size, per_step = 40, 4, 4
    buf = RolloutBuffer(max_staleness=1, group_size=size)
    version = [0]  # shared with the producer: the trainer's current version

    def produce():
        for gid in range(n_groups):
            v = version[0]
            for r in group(gid, version=v, size=size):
                buf.add([r])
                time.sleep(0.0002)
        buf.close()

    producer = threading.Thread(target=produce)
    producer.start()
    taken: list[list[Rollout]] = []
    while True:
        ready = buf.wait_for(per_step, version[0], timeout=10.0)
        out = buf.take(per_step, version[0])
        if not out and not ready:
            break
        assert max(RolloutBuffer.staleness(out, version[0])) <= 1
        taken += out
        version[0] += 1
    producer.join(timeout=10.0)
    assert not producer.is_alive()

    seen = ids(taken)
    assert len(seen) == len(set(seen))
    assert all(len(g) == size and {r.group for r in g} == {g[0].group} for g in taken)
    stats = buf.stats()
    assert stats["added"] == n_groups * size
    assert stats["taken_groups"] == len(taken)
    assert len(taken) + stats["dropped_stale"] == n_groups
    assert stats["dropped_stale_rollouts"] == stats["dropped_stale"] * size
    assert len(taken) > 0 and len(buf) == 0

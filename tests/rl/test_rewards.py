"""Reward functions (math, format, weighted sums) and the process-isolated RewardRunner.

The runner tests spawn real worker processes; their helper rewards live in `_rewards_fixtures` (a
stdlib-only module, cheap for each spawned worker to import) rather than here.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time

import pytest

from megatron_step.rl.reward_pool import RewardResult, RewardRunner
from megatron_step.rl.rewards import (
    RewardFn,
    WeightedSum,
    format_reward,
    math_reward,
    normalize_answer,
)
from megatron_step.rl.tasks import arithmetic_problems, solution_text
from tests.rl._rewards_fixtures import Unloadable, length_reward, misbehaving_reward, one


def _alive(pid: int) -> bool:
    """True while `pid` exists, zombies included (a zombie still has /proc/<pid>): that is the point."""
    return os.path.exists(f"/proc/{pid}")


def _pids(runner: RewardRunner) -> list[int]:
    return [w.process.pid for w in runner._workers]


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")

# ---------------------------------------------------------------------------------------------------
# math_reward / format_reward / normalize_answer
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        (" 3 + 4 = 7. <answer>7</answer>", "7", 1.0),
        ("<answer> +14.0 </answer>", "14", 1.0),
        ("<answer>014</answer>", "14", 1.0),
        ("<answer>-3</answer>", "-3", 1.0),
        ("<answer>1,000</answer>", "1000", 1.0),
        ("<answer>15</answer>", "14", 0.0),
        ("<answer>-14</answer>", "14", 0.0),
        ("14", "14", 0.0),  # no answer tag: nothing to grade
        ("<answer></answer>", "", 0.0),  # an empty tag never matches, not even an empty reference
        ("<answer>7</answer> then <answer>8</answer>", "8", 0.0),  # the first tag is the answer
        ("<answer>7</answer>", "so <answer>7</answer>", 1.0),  # a reference response: its tag counts
        ("<answer>seven</answer>", "7", 0.0),
    ],
)
def test_math_reward_exact(response, reference, expected):
    assert math_reward("Q", response, reference) == expected


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("0.5", "\\frac{1}{2}", 1.0),  # decimal vs LaTeX fraction: only math_verify can say so
        ("\\frac{2}{4}", "1/2", 1.0),
        ("2", "\\sqrt{4}", 1.0),
        ("1+x", "x+1", 1.0),
        ("0.5", "\\frac{1}{3}", 0.0),
        ("2x", "2", 0.0),
    ],
)
def test_math_reward_symbolic(answer, reference, expected):
    assert math_reward("Q", f"<answer>{answer}</answer>", reference) == expected


def test_math_reward_on_generated_solutions():
    for p in arithmetic_problems(300, seed=9):
        assert math_reward(p.prompt, " " + solution_text(p), p.answer) == 1.0
        wrong = str(int(p.answer) + 1)
        assert math_reward(p.prompt, f"<answer>{wrong}</answer>", p.answer) == 0.0


def test_normalize_answer():
    assert normalize_answer(" + 1 4 .0 ") == "14"
    assert normalize_answer("1,234,567") == "1234567"
    assert normalize_answer("(1,2)") == "(1,2)"  # not a thousands separator: kept
    assert normalize_answer("2.50") == "2.50"  # only an all-zero fraction is dropped
    assert normalize_answer("-0") == "0"


@pytest.mark.parametrize(
    "response, expected",
    [
        ("3 + 4 = 7. <answer>7</answer>", 1.0),
        ("<think>3 + 4 = 7</think> <answer>7</answer>", 1.0),
        ("no tag", 0.0),
        ("<answer>7</answer> <answer>7</answer>", 0.0),  # two answers
        ("<answer>7", 0.0),  # unclosed
        ("</answer>7<answer>", 0.0),  # reversed
        ("<answer>  </answer>", 0.0),  # blank
        ("<think>still thinking <answer>7</answer>", 0.0),  # think never closed
        ("<think>a</think><answer>7</answer></think>", 0.0),  # stray close
        ("<answer>7</answer><think>late</think>", 0.0),  # think after the answer
        ("<think>a</think><think>b</think><answer>7</answer>", 0.0),  # two think blocks
    ],
)
def test_format_reward(response, expected):
    assert format_reward("Q", response, "7") == expected


def test_reward_fns_satisfy_protocol():
    for fn in (math_reward, format_reward, WeightedSum({"one": (one, 1.0)})):
        assert isinstance(fn, RewardFn)


# ---------------------------------------------------------------------------------------------------
# WeightedSum
# ---------------------------------------------------------------------------------------------------


def test_weighted_sum_arithmetic():
    reward = WeightedSum({"math": (math_reward, 1.0), "format": (format_reward, 0.1)})
    right, wrong_ans, no_tag = "<answer>7</answer>", "<answer>8</answer>", "7"
    assert reward.components("Q", right, "7") == {"math": 1.0, "format": 1.0}
    assert reward("Q", right, "7") == pytest.approx(1.1)
    assert reward.components("Q", wrong_ans, "7") == {"math": 0.0, "format": 1.0}
    assert reward("Q", wrong_ans, "7") == pytest.approx(0.1)
    assert reward("Q", no_tag, "7") == 0.0
    penalty = WeightedSum({"len": (length_reward, -0.5), "one": (one, 2.0)})
    assert penalty("Q", "abcd", "") == pytest.approx(-0.5 * 4 + 2.0)


def test_weighted_sum_validation():
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum({})
    with pytest.raises(ValueError, match="'a': weight must be a finite"):
        WeightedSum({"a": (one, math.inf)})
    with pytest.raises(TypeError, match="'a': fn must be callable"):
        WeightedSum({"a": ("not a function", 1.0)})
    with pytest.raises(ValueError, match="'a' must be a"):
        WeightedSum({"a": one})


# ---------------------------------------------------------------------------------------------------
# RewardRunner
# ---------------------------------------------------------------------------------------------------


def test_runner_rejects_unpicklable_and_bad_args():
    with pytest.raises(TypeError, match="picklable"):
        RewardRunner(lambda p, r, ref: 0.0)

    def local(prompt, response, reference):
        return 0.0

    with pytest.raises(TypeError, match="picklable"):
        RewardRunner(local)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardRunner(one, timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        RewardRunner(one, workers=0)
    assert multiprocessing.active_children() == []  # nothing was started for a rejected fn


@needs_proc
def test_runner_isolates_failures():
    items = [
        ("p0", "ok", "r"),
        ("p1", "raise", "r"),
        ("p2", "nan", "r"),
        ("p3", "longer answer", "r"),
        ("p4", "inf", "r"),
        ("p5", "str", "r"),
        ("p6", "die", "r"),
        ("p7", "last", "r"),
    ]
    with RewardRunner(misbehaving_reward, timeout_s=20.0, workers=2) as runner:
        pids = _pids(runner)
        results = runner.run(items)
        assert all(isinstance(r, RewardResult) for r in results)
        by_response = dict(zip((i[1] for i in items), results))
        for ok in ("ok", "longer answer", "last"):
            r = by_response[ok]
            assert (r.value, r.failed, r.error) == (float(len(ok)), False, None)
            assert 0.0 <= r.seconds < 5.0
        assert by_response["raise"].error == "ValueError: bad response for 'p1'"
        assert by_response["nan"].error == "non-finite reward nan"
        assert by_response["inf"].error == "non-finite reward -inf"
        assert by_response["str"].error == "TypeError: reward returned str, not a real number"
        assert by_response["die"].error == "worker died (exit code 3)"
        for bad in ("raise", "nan", "inf", "str", "die"):
            assert by_response[bad].failed and by_response[bad].value == 0.0
        assert (runner.failed_total, runner.timeouts_total) == (5, 0)
        # The dead worker was replaced (and reaped); the pool still has two live workers.
        assert len(runner._workers) == 2 and sum(p in _pids(runner) for p in pids) == 1
        assert sum(_alive(p) for p in pids) == 1
        assert [r.value for r in runner.run([("p", "abc", "r")])] == [3.0]
        assert runner.run([]) == []
        with pytest.raises(TypeError, match=r"items\[1\] must be a \(prompt, response, reference\)"):
            runner.run([("p", "r", "ref"), ("p", "r")])
        assert runner.run([("p", "r", "ref")])[0].value == 1.0  # still usable: nothing was sent
    live = _pids(runner)
    assert runner._workers == []
    assert multiprocessing.active_children() == []
    assert not any(_alive(p) for p in pids + live)


@needs_proc
def test_runner_timeout_kills_and_continues():
    items = [("p", "a", "r"), ("p", "hang", "r"), ("p", "bb", "r"), ("p", "ccc", "r")]
    # One worker is the worst case: the hung call blocks every later item until the kill and the
    # replacement's start-up. A 60 s sleep against a 1 s timeout: the run must still end within seconds
    # (1 s timeout + one interpreter start-up, ~0.1 s idle and a few s on a loaded 2-core box).
    with RewardRunner(misbehaving_reward, timeout_s=1.0, workers=1) as runner:
        assert runner.run([("p", "warm", "r")])[0].value == 4.0  # time the run, not the first start-up
        first_pid = _pids(runner)[0]
        t0 = time.monotonic()
        results = runner.run(items)
        elapsed = time.monotonic() - t0
        assert elapsed < 10.0, elapsed
        assert [r.value for r in results] == [1.0, 0.0, 2.0, 3.0]
        assert [r.failed for r in results] == [False, True, False, False]
        assert results[1].error == "timeout after 1.0 s"
        assert 1.0 <= results[1].seconds < 5.0
        assert (runner.failed_total, runner.timeouts_total) == (1, 1)
        assert not _alive(first_pid)  # the hung worker was killed and reaped, not left a zombie
        # Counters accumulate across runs.
        runner.run([("p", "hang", "r"), ("p", "raise", "r"), ("p", "ok", "r")])
        assert (runner.failed_total, runner.timeouts_total) == (3, 2)
    assert multiprocessing.active_children() == []
    runner.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        runner.run([("p", "a", "r")])


def test_runner_weighted_math_reward_matches_in_process():
    reward = WeightedSum({"math": (math_reward, 1.0), "format": (format_reward, 0.1)})
    problems = arithmetic_problems(20, seed=1)
    items = [(p.prompt, " " + solution_text(p), p.answer) for p in problems[:10]]
    items += [(p.prompt, f"<answer>{int(p.answer) + 1}</answer>", p.answer) for p in problems[10:15]]
    items += [(p.prompt, "I don't know", p.answer) for p in problems[15:]]
    with RewardRunner(reward, timeout_s=20.0, workers=1) as runner:
        results = runner.run(items)
    assert [r.value for r in results] == [reward(*item) for item in items]
    assert [r.value for r in results] == pytest.approx([1.1] * 10 + [0.1] * 5 + [0.0] * 5)
    assert not any(r.failed for r in results)
    assert multiprocessing.active_children() == []


def test_runner_reports_fn_that_cannot_load_in_worker():
    runner = RewardRunner(Unloadable(), timeout_s=5.0, workers=1)
    with pytest.raises(RuntimeError, match="could not load fn .*cannot be rebuilt in the worker"):
        runner.run([("p", "r", "ref")])
    assert runner._workers == []  # closed itself: it cannot score anything
    assert multiprocessing.active_children() == []

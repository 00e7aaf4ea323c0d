"""megatron_step.rl.code_reward: the outcome of each kind of program, references of both shapes, and 64
candidates scored concurrently by the reward workers without one lost or mixed up."""

import json

import pytest

from megatron_step.rl.code_reward import CodeReward, extract_program, parse_reference
from megatron_step.rl.reward_pool import RewardRunner
from megatron_step.rl.sandbox import SandboxConfig, isolation_available

CHECK = "def check(f):\n    assert f(3) == 9\n    assert f(-2) == 4\n"
SQUARE = json.dumps({"test": CHECK, "entry_point": "square"})
ADD = json.dumps({"cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}]})
FAST = SandboxConfig(cpu_s=1, wall_s=30)


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}```\nDone."


@pytest.mark.parametrize(
    "program, ref, want",
    [
        ("def square(x):\n    return x * x\n", SQUARE, (1.0, "pass")),
        ("def square(x):\n    return 2 * x\n", SQUARE, (0.0, "fail")),
        ("def square(x):\n    while True:\n        pass\n", SQUARE, (0.0, "timeout")),
        ("def square(x):\n    return [0] * (10 ** 10)\n", SQUARE, (0.0, "crash")),  # MemoryError
        ("import os\nos._exit(0)\n", SQUARE, (0.0, "fail")),  # exits before its tests: not a pass
        ("a, b = map(int, input().split())\nprint(a + b)\n", ADD, (1.0, "pass")),
        ("a, b = map(int, input().split())\nprint(a - b)\n", ADD, (0.0, "fail")),
        ("print(1 / 0)\n", ADD, (0.0, "crash")),
    ],
)
def test_each_kind_of_program_gets_its_outcome(program, ref, want):
    assert CodeReward(FAST).detailed("", fenced(program), ref) == want


def test_the_program_is_the_last_fenced_block_else_the_answer_else_everything():
    assert extract_program("```\nfirst\n```\ntext\n```py\nsecond\n```") == "second\n"
    assert extract_program("think... <answer>print(1)</answer>") == "print(1)"
    assert extract_program("print(2)") == "print(2)"


@pytest.mark.parametrize(
    "reference, match",
    [
        ("7", "must be a JSON object"),
        ("{not json", "not JSON"),
        ('{"tests": ""}', "'tests' must be non-empty"),
        ('{"tests": "assert 1", "entry_point": "a b"}', "'entry_point' must be an identifier"),
        ('{"cases": []}', "needs 'tests'"),
        ('{"cases": [{"input": "1"}]}', r"cases\[0\] must be an object with a string 'output'"),
    ],
)
def test_a_bad_reference_is_named(reference, match):
    with pytest.raises(ValueError, match=match):
        parse_reference(reference)


@pytest.mark.skipif(isolation_available() is not None, reason=f"no namespaces: {isolation_available()}")
def test_64_candidates_scored_concurrently_none_lost_none_mixed_up():
    """Item i asks for f() == i; odd items answer i + 1 (wrong), every 16th loops: a result that went to
    the wrong item, or got lost, shows up as a wrong value or outcome."""
    items, want = [], []
    for i in range(64):
        answer = "while True:\n        pass" if i % 16 == 5 else f"return {i + (i % 2)}"
        ref = json.dumps({"tests": f"assert f() == {i}\n"})
        items.append(("", fenced(f"def f():\n    {answer}\n"), ref))
        want.append((0.0, "timeout") if i % 16 == 5 else (1.0, "pass") if i % 2 == 0 else (0.0, "fail"))
    items.append(("", fenced("print(1)\n"), "not json"))  # a bad reference: a failed call, not a 0
    with RewardRunner(CodeReward(FAST), timeout_s=60, workers=8) as runner:
        results = runner.run(items)
    assert [(r.value, r.outcome) for r in results[:64]] == want
    assert not any(r.failed for r in results[:64])
    assert results[64].failed and "not JSON" in results[64].error and results[64].outcome is None

"""The embedded arithmetic task: deterministic, exact answers, disjoint hash splits, regular solutions."""

from __future__ import annotations

import re

import pytest

from megatron_step.rl.config import RLConfig
from megatron_step.rl.rewards import extract_answer
from megatron_step.rl.tasks import (
    ArithmeticTask,
    Problem,
    Task,
    arithmetic_problems,
    make_task,
    prompt_text,
    solution_text,
    split_of,
)

_EXPR_CHARS = re.compile(r"[0-9+\-*() ]+")


def _py_value(key: str) -> int:
    # The key is generated text; check it is nothing but arithmetic before handing it to eval.
    assert _EXPR_CHARS.fullmatch(key), key
    return eval(key, {"__builtins__": {}})


def test_deterministic():
    a = arithmetic_problems(300, seed=7)
    assert a == arithmetic_problems(300, seed=7)
    assert a[:100] == arithmetic_problems(100, seed=7)  # a shorter list is a prefix of a longer one
    assert a != arithmetic_problems(300, seed=8)
    h = arithmetic_problems(50, seed=7, split="heldout")
    assert h == arithmetic_problems(50, seed=7, split="heldout")


def test_splits_disjoint_and_hash_defined():
    train = arithmetic_problems(4000, seed=0)
    heldout = arithmetic_problems(1000, seed=0, split="heldout")
    other_seed_heldout = arithmetic_problems(1000, seed=1, split="heldout")
    train_keys = {p.key for p in train}
    assert train_keys.isdisjoint(p.key for p in heldout)
    assert train_keys.isdisjoint(p.key for p in other_seed_heldout)  # the split ignores the seed
    assert all(split_of(p.key) == "train" for p in train)
    assert all(split_of(p.key) == "heldout" for p in heldout + other_seed_heldout)
    # Draws are with replacement: 1-step expressions (21 * 3 * 21 = 1323, ~10% heldout) repeat in a list
    # of 1000, but the multi-step ones (83k 2-step, 5.2M 3-step) are nearly all distinct.
    multi = [p.key for p in heldout if p.steps >= 2]
    assert len(set(multi)) > 0.95 * len(multi)


def test_heldout_fraction_is_about_ten_percent():
    # Every 1-step expression with operands 0..20 (21 * 3 * 21 = 1323 keys): the hash puts ~10% aside.
    keys = [f"{a} {op} {b}" for a in range(21) for op in "+-*" for b in range(21)]
    frac = sum(split_of(k) == "heldout" for k in keys) / len(keys)
    assert 0.08 < frac < 0.12, frac


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_answers_equal_python_eval(split):
    problems = arithmetic_problems(2000, seed=11, split=split, max_steps=4)
    for p in problems:
        assert p.answer == str(_py_value(p.key)), p
        assert p.prompt == f"What is {p.key}?"
        ops = re.findall(r" [-+*] ", p.key)
        assert len(ops) == p.steps and 1 <= p.steps <= 4
        assert all(0 <= int(x) <= 20 for x in re.findall(r"\d+", p.key))
    assert {p.steps for p in problems} == {1, 2, 3, 4}
    assert any(int(p.answer) < 0 for p in problems)  # subtraction can go below zero
    assert any("(" in p.key for p in problems)


def test_parentheses_only_where_precedence_needs_them():
    for p in arithmetic_problems(2000, seed=5):
        # A group is only ever the left operand of a "*": "(... + 4) * 2", never "(...) + 2".
        assert p.key.count("(") == p.key.count(")")
        for m in re.finditer(r"\)", p.key):
            assert p.key[m.end() :].startswith(" * "), p.key
        # With the parentheses deleted, reading strictly left to right is the computation.
        flat = p.key.replace("(", "").replace(")", "")
        tokens = flat.split(" ")
        value = int(tokens[0])
        for op, b in zip(tokens[1::2], tokens[2::2]):
            value = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
        assert str(value) == p.answer, p.key


def test_step_and_operand_ranges():
    problems = arithmetic_problems(500, seed=2, min_steps=2, max_steps=2, max_operand=5)
    assert all(p.steps == 2 for p in problems)
    assert all(0 <= int(x) <= 5 for p in problems for x in re.findall(r"\d+", p.key))


def test_solution_text_example_and_round_trip():
    p = Problem(prompt="What is (3 + 4) * 2?", answer="14", steps=2, key="(3 + 4) * 2")
    assert solution_text(p) == "3 + 4 = 7. 7 * 2 = 14. <answer>14</answer>"
    assert prompt_text(p) == "Q: What is (3 + 4) * 2?\nA:"
    with pytest.raises(ValueError, match="evaluates to 7, not answer '8'"):
        solution_text(Problem(prompt="What is 3 + 4?", answer="8", steps=1, key="3 + 4"))
    for p in arithmetic_problems(1000, seed=4, max_steps=4):
        sol = solution_text(p)
        assert sol.endswith(f"<answer>{p.answer}</answer>")
        assert extract_answer(sol) == p.answer
        assert extract_answer(prompt_text(p) + " " + sol) == p.answer
        assert sol.count("=") == p.steps


def test_solution_text_rejects_foreign_keys():
    with pytest.raises(ValueError, match="not a generated arithmetic expression"):
        solution_text(Problem(prompt="What is 2 ** 3?", answer="8", steps=1, key="2 ** 3"))


def test_extract_answer():
    assert extract_answer("no tag here") is None
    assert extract_answer("<answer>") is None
    assert extract_answer("x <answer> 12 </answer> y") == "12"
    assert extract_answer("<answer>1</answer><answer>2</answer>") == "1"
    assert extract_answer("<answer>\n-3\n</answer>") == "-3"
    assert extract_answer("<answer></answer>") == ""


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n must be"),
        ({"split": "valid"}, "split must be"),
        ({"min_steps": 0}, "min_steps"),
        ({"min_steps": 3, "max_steps": 2}, r"max_steps\(2\) must be an int >= min_steps\(3\)"),
        ({"max_operand": 0}, "max_operand"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"n": 5, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        arithmetic_problems(**args)


def test_empty_split_is_an_error_not_a_hang():
    # max_operand=1 with one step gives 12 expressions ({0,1} x {+,-,*} x {0,1}); none hashes to heldout.
    keys = [f"{a} {op} {b}" for a in (0, 1) for op in "+-*" for b in (0, 1)]
    assert not any(split_of(k) == "heldout" for k in keys)
    with pytest.raises(ValueError, match="too few distinct expressions"):
        arithmetic_problems(1, seed=0, split="heldout", max_steps=1, max_operand=1)


def test_arithmetic_task_is_the_default_and_a_task():

    task = make_task(RLConfig(task_max_operand=7))
    assert isinstance(task, ArithmeticTask) and isinstance(task, Task) and task.max_operand == 7
    train, held = task.train(50, seed=3), task.heldout(20, seed=3)
    assert train == arithmetic_problems(50, 3, min_steps=1, max_steps=2, max_operand=7)
    assert not {p.key for p in train} & {p.key for p in held}
    p = train[0]
    assert task.prompt(p) == prompt_text(p) and task.reference(p) == p.answer
    assert task.correct(p, " " + task.solution(p)) and not task.correct(p, "<answer>x</answer>")


def make_tiny_task(rl):
    """A user task for `rl.task=tests.rl.test_tasks:make_tiny_task` (the hook's contract test)."""
    return ArithmeticTask(max_steps=1, max_operand=2)


def not_a_task(rl):
    return object()


def test_task_hook_resolves_and_checks_the_protocol():

    assert make_task(RLConfig(task="tests.rl.test_tasks:make_tiny_task")).max_operand == 2
    with pytest.raises(ValueError, match="not a Task"):
        make_task(RLConfig(task="tests.rl.test_tasks:not_a_task"))
    with pytest.raises(ValueError, match=r"rl.task='nope': expected 'package.module:callable'"):
        make_task(RLConfig(task="nope"))

"""The embedded default RL task: generated multi-step integer arithmetic with verifiable answers.

    from megatron_step.rl.tasks import arithmetic_problems, prompt_text, solution_text
    from megatron_step.rl.rewards import extract_answer
    train = arithmetic_problems(10_000, seed=0)                      # RL prompts / warm-up targets
    heldout = arithmetic_problems(500, seed=0, split="heldout")      # never seen in training
    p = train[0]
    prompt_text(p)                      # "Q: What is (3 + 4) * 2?\\nA:"
    solution_text(p)                    # "3 + 4 = 7. 7 * 2 = 14. <answer>14</answer>"
    extract_answer(" 3 + 4 = 7. 7 * 2 = 14. <answer>14</answer>")   # "14"

Why this task: it needs no download (every machine can generate it), its answers are checked exactly
(an integer string compare), and its difficulty is a dial (steps, operand size) a tiny model can climb
during a CPU demo. The same (prompt, answer) pair serves supervised warm-up (`solution_text`) and RL
(`math_reward` in `megatron_step.rl.rewards` against `Problem.answer`).

Expressions are built strictly left to right: start from one operand, then `steps` times apply
`op operand` to everything so far. Parentheses wrap the left part only where ordinary precedence would
otherwise bind the new operand first, i.e. a `*` after a `+`/`-`: "(3 + 4) * 2", while "3 * 4 - 2" and
"3 - 4 + 2" need none. Consequence used by `solution_text`: the key with its parentheses deleted, read
strictly left to right, is exactly the computation, and Python's `eval` of the key gives the answer.

Splits: a problem is "heldout" iff sha256(key) mod 10 == 0 (about 10% of distinct expressions), else
"train". The split is a property of the expression itself, not of the seed or the draw order, so the
two splits are disjoint for every (seed, n) pair, and two seeds never leak an expression across splits.
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from megatron_step.rl.rewards import math_reward, resolve_callable

if TYPE_CHECKING:  # rl.config imports the lookup task, which imports this module
    from megatron_step.rl.config import RLConfig

__all__ = [
    "SPLITS",
    "ArithmeticTask",
    "Problem",
    "Task",
    "make_task",
    "arithmetic_problems",
    "prompt_text",
    "solution_text",
    "split_of",
]

SPLITS = ("train", "heldout")
_OPS = ("+", "-", "*")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
# A key with parentheses removed: "3 + 4 * 2" (single spaces around each operator, no signs).
_FLAT_KEY = re.compile(r"\d+(?: [-+*] \d+)*")
_TOKEN = re.compile(r"\d+|[-+*]")


@dataclass(frozen=True)
class Problem:
    """One generated problem; frozen because problems are values (safe to hash, share and cache)."""

    prompt: str  # the question, e.g. "What is (3 + 4) * 2?"; `prompt_text` adds the Q/A frame
    answer: str  # canonical answer: the integer value as str(int), e.g. "14" or "-3" (no "+", no ".0")
    steps: int  # number of binary operations in the expression (1 = "a op b")
    key: str  # the expression itself, e.g. "(3 + 4) * 2": a stable id, and what decides the split


def split_of(key: str) -> str:
    """The split `key` belongs to: "heldout" iff sha256(key) mod 10 == 0, else "train".

    hashlib, not hash(): Python salts str hashes per process (PYTHONHASHSEED), which would reshuffle
    the split on every run.
    """
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 10 == 0 else "train"


def _draw(rng: random.Random, steps: int, max_operand: int) -> tuple[str, int]:
    """One left-to-right expression with `steps` operations and its exact integer value."""
    value = rng.randint(0, max_operand)
    expr, last_op = str(value), None
    for _ in range(steps):
        op, b = rng.choice(_OPS), rng.randint(0, max_operand)
        if op == "*" and last_op in ("+", "-"):
            # "3 + 4 * 2" would multiply first; the left part was built first, so bracket it.
            expr = f"({expr})"
        expr = f"{expr} {op} {b}"
        value = _APPLY[op](value, b)
        last_op = op
    return expr, value


def arithmetic_problems(
    n: int,
    seed: int,
    split: str = "train",
    min_steps: int = 1,
    max_steps: int = 3,
    max_operand: int = 20,
) -> list[Problem]:
    """`n` problems of `split`, a pure function of the arguments.

    Operands are drawn uniformly from 0..max_operand, the number of operations uniformly from
    min_steps..max_steps, the operators uniformly from +, -, *. Candidates are drawn from one
    `random.Random(seed)` stream and kept when `split_of(key) == split`, so a "heldout" list costs ~10x
    as many draws as a "train" list of the same n (cheap: ~10 us a draw). Draws are with replacement, so
    a list samples the task's distribution and can repeat problems: at the defaults there are only
    21 * 3 * 21 = 1323 one-step expressions (~130 of them heldout), which a long list repeats, but 83k
    two-step and 5.2M three-step ones.
    Answer magnitudes grow with max_operand^(max_steps + 1): 20^4 = 160000 at the defaults.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(min_steps, int) or min_steps < 1:
        raise ValueError(f"min_steps must be an int >= 1, got {min_steps!r}")
    if not isinstance(max_steps, int) or max_steps < min_steps:
        raise ValueError(f"max_steps({max_steps!r}) must be an int >= min_steps({min_steps})")
    if not isinstance(max_operand, int) or max_operand < 1:
        raise ValueError(f"max_operand must be an int >= 1, got {max_operand!r}")

    rng = random.Random(seed)
    # ~10 draws per heldout problem on average; 100x n (+ slack for small n) only runs out when the
    # expression space is so small that the split has (almost) no members, e.g. max_operand=1, 1 step.
    budget = 100 * n + 10_000
    out: list[Problem] = []
    for _ in range(budget):
        steps = rng.randint(min_steps, max_steps)
        key, value = _draw(rng, steps, max_operand)
        if split_of(key) == split:
            out.append(Problem(prompt=f"What is {key}?", answer=str(value), steps=steps, key=key))
            if len(out) == n:
                return out
    raise ValueError(
        f"found only {len(out)} of n({n}) {split!r} problems in {budget} draws: max_operand({max_operand})"
        f" and max_steps({max_steps}) leave too few distinct expressions in this split"
    )


def solution_text(problem: Problem) -> str:
    """Short worked solution for supervised warm-up: one "a op b = c." per operation, in the order the
    expression was built, then the answer tag, e.g. "3 + 4 = 7. 7 * 2 = 14. <answer>14</answer>".

    Kept rigidly regular (same shape every time, intermediate results carried forward) so a tiny model
    learns the procedure rather than phrasing. Raises ValueError if `problem.key` is not an expression
    this module generates or its value disagrees with `problem.answer`.
    """
    flat = problem.key.replace("(", "").replace(")", "")
    if not _FLAT_KEY.fullmatch(flat):
        raise ValueError(f"problem.key {problem.key!r} is not a generated arithmetic expression")
    tokens = _TOKEN.findall(flat)
    value = int(tokens[0])
    parts = []
    for op, b in zip(tokens[1::2], tokens[2::2]):
        new = _APPLY[op](value, int(b))
        parts.append(f"{value} {op} {b} = {new}.")
        value = new
    if str(value) != problem.answer:
        raise ValueError(f"problem.key {problem.key!r} evaluates to {value}, not answer {problem.answer!r}")
    parts.append(f"<answer>{problem.answer}</answer>")
    return " ".join(parts)


def prompt_text(problem: Problem) -> str:
    """What the policy reads: exactly "Q: " + problem.prompt + "\\nA:" (no trailing space).

    The completion starts right after "A:"; a supervised target is therefore
    `prompt_text(p) + " " + solution_text(p)`, and sampled responses usually begin with a space. About
    15-25 pieces with a 2048-piece SentencePiece vocabulary (digits and operators are short pieces).
    """
    return f"Q: {problem.prompt}\nA:"


# ---------------------------------------------------------------------------------------------------
# The prompt source of the RL stage: a typed hook, as the reward is
# ---------------------------------------------------------------------------------------------------
@runtime_checkable
class Task(Protocol):
    """Where the RL stage's prompts come from and how a response is judged; `rl.task` selects one.

    Problems are opaque to the stage: it only hands them back to the task. Contract: `train` and
    `heldout` are pure functions of their arguments (every data-parallel rank draws the same lists),
    and the two splits never share a problem.

    Optional, for a tool-use task (`megatron_step.rl.lookup.LookupTask`): `tool()` returns a fresh
    tool (`search(query) -> str`; the rollouts then go through the tool loop of megatron_step.rl.erl),
    `segments(problem)` the worked solution as (text, forced) pieces -- the warm-up tokenizes them
    piece by piece and keeps forced (tool-written) pieces out of the loss -- and `reward()` the
    task's reward function where rl.reward_fn is unset.
    """

    def train(self, n: int, seed: int) -> list:
        """`n` training problems (RL prompts and the supervised warm-up's targets)."""
        ...

    def heldout(self, n: int, seed: int) -> list:
        """`n` held-out problems, for evaluation only."""
        ...

    def prompt(self, problem) -> str:
        """The text the policy reads."""
        ...

    def reference(self, problem) -> str:
        """What the reward function receives as `reference` (e.g. the final answer)."""
        ...

    def solution(self, problem) -> str:
        """A worked reference response: the supervised warm-up's target and the preference RM's
        reference."""
        ...

    def correct(self, problem, response: str) -> bool:
        """Whether `response` solves `problem` (the accuracy the stage reports)."""
        ...


@dataclass(frozen=True)
class ArithmeticTask:
    """The embedded default: generated multi-step arithmetic (`arithmetic_problems`), graded by
    `megatron_step.rl.rewards.math_reward`'s answer check."""

    min_steps: int = 1
    max_steps: int = 2
    max_operand: int = 5

    def _kw(self) -> dict:
        return dict(min_steps=self.min_steps, max_steps=self.max_steps, max_operand=self.max_operand)

    def train(self, n: int, seed: int) -> list[Problem]:
        return arithmetic_problems(n, seed, **self._kw())

    def heldout(self, n: int, seed: int) -> list[Problem]:
        return arithmetic_problems(n, seed, split="heldout", **self._kw())

    def prompt(self, problem: Problem) -> str:
        return prompt_text(problem)

    def reference(self, problem: Problem) -> str:
        return problem.answer

    def solution(self, problem: Problem) -> str:
        return solution_text(problem)

    def correct(self, problem: Problem, response: str) -> bool:
        return math_reward("", response, problem.answer) == 1.0


def make_task(rl: RLConfig, tokenizer=None) -> Task:
    """The task `rl.task` names: "arithmetic" (the embedded default, shaped by `rl.task_*`), "lookup"
    (multi-hop questions through a search tool, `rl.lookup`), "dataset" (the user's problem files,
    `rl.data`), or a
    `package.module:callable` taking the RLConfig and returning a Task. `tokenizer`: the run's (a
    dataset's chat prompts use its own chat template when it has one)."""
    if rl.task == "arithmetic":
        return ArithmeticTask(rl.task_min_steps, rl.task_max_steps, rl.task_max_operand)
    if rl.task == "lookup":
        from megatron_step.rl.lookup import LookupTask  # lookup imports this module (split_of)

        return LookupTask(rl.lookup)
    if rl.task == "dataset":
        from megatron_step.rl.dataset import DatasetTask  # dataset imports this module (split_of)

        return DatasetTask(rl.data, rl.code, tokenizer)
    task = resolve_callable(rl.task, "rl.task")(rl)
    if not isinstance(task, Task):
        raise ValueError(f"rl.task={rl.task!r} returned {type(task).__name__}, not a Task (rl/tasks.py)")
    return task

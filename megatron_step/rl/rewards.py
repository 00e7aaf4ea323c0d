"""Rewards as typed callables: the `RewardFn` contract, the math (exact + math-verify) and format
rewards, their weighted sum, and `rl.reward_fn` resolution. They run isolated in worker processes
(megatron_step.rl.reward_pool); nothing here assumes a process.

    from megatron_step.rl.rewards import WeightedSum, format_reward, math_reward
    reward = WeightedSum({"math": (math_reward, 1.0), "format": (format_reward, 0.1)})
    reward("What is 3 + 4?", " 3 + 4 = 7. <answer>7</answer>", "7")        # 1.1, in-process
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import re
import threading
from typing import Protocol, runtime_checkable

__all__ = [
    "RewardFn",
    "WeightedSum",
    "extract_answer",
    "format_reward",
    "math_reward",
    "default_reward",
    "exact_reward",
    "normalize_answer",
    "resolve_callable",
    "resolve_reward_fn",
]


@runtime_checkable
class RewardFn(Protocol):
    """A reward: `fn(prompt, response, reference) -> float`.

    prompt     the text the policy was given (e.g. `tasks.prompt_text(problem)`)
    response   the text the policy generated after the prompt, special tags included
    reference  the ground truth: a final answer ("14", "\\frac{1}{2}") or a reference response

    Contract: a pure function of its three strings (no state carried between calls: the runner may call
    it in any worker, in any order, several times) returning a finite real number. It *may* raise or
    hang on adversarial input; `RewardRunner` turns that into a failed result instead of a crash. To be
    run by `RewardRunner` it must also be picklable: a module-level function, or an instance of a
    module-level class whose attributes pickle.
    """

    def __call__(self, prompt: str, response: str, reference: str) -> float: ...


# ---------------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------------

# Non-greedy and DOTALL: the *first* answer tag wins, and an answer may span lines.
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_WS = re.compile(r"\s+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INT = re.compile(r"[+-]?\d+")


def extract_answer(response: str) -> str | None:
    """The stripped content of the first <answer>...</answer> in `response`, None if there is none.
    An empty tag gives "" (present but empty), which no reward counts as correct."""
    m = _ANSWER.search(response)
    return m.group(1).strip() if m else None


def normalize_answer(s: str) -> str:
    """Canonical text of a short answer: whitespace removed, a leading "+" dropped, thousands commas
    removed ("1,000" -> "1000"; commas elsewhere, e.g. in "(1,2)", are kept), a trailing ".0" (or
    ".00"...) dropped, and integers written without leading zeros ("014" -> "14", "-0" -> "0")."""
    s = _WS.sub("", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = s.removeprefix("+")
    s = re.sub(r"(?<=\d)\.0+$", "", s)
    if _INT.fullmatch(s):
        s = str(int(s))
    return s


@functools.cache
def _math_verify_module():
    """math_verify, imported on first use: it pulls in sympy and an ANTLR parser (~0.3 s CPU), which
    every spawned reward worker would otherwise pay at start-up even when it runs a different reward."""
    import math_verify

    return math_verify


def _in_dollars(s: str) -> str:
    # math_verify's LaTeX extractor looks for math delimiters: a bare "\sqrt{4}" parses to nothing.
    return s if "$" in s else f"${s}$"


def _symbolically_equal(reference: str, answer: str) -> bool:
    """math_verify's verdict on answer == reference (LaTeX, fractions, decimals, simple expressions).

    math_verify bounds its own parse/verify with signal.alarm, which only works in a process's main
    thread; elsewhere its internal timeout is switched off (it would raise ValueError) and the caller's
    (e.g. RewardRunner's) timeout is the bound.
    """
    mv = _math_verify_module()
    t = 5 if threading.current_thread() is threading.main_thread() else None
    gold = mv.parse(_in_dollars(reference), parsing_timeout=t) or mv.parse(reference, parsing_timeout=t)
    pred = mv.parse(_in_dollars(answer), parsing_timeout=t) or mv.parse(answer, parsing_timeout=t)
    if not gold or not pred:
        return False
    return bool(mv.verify(gold, pred, timeout_seconds=t))


def math_reward(prompt: str, response: str, reference: str) -> float:
    """1.0 if the response's <answer> equals `reference`, else 0.0 (also when there is no <answer>).

    Two stages. (1) Exact match after `normalize_answer` ("+14", "14.0", " 14 " all equal "14").
    (2) Otherwise, unless both sides are plain integers (then (1) already decided, and sympy would only
    add ~ms per call on the default arithmetic task), math_verify judges mathematical equality:
    "\\frac{1}{2}" vs "0.5", "\\sqrt{4}" vs "2", "x+1" vs "1+x". A reference that itself contains an
    <answer> tag (a reference response) is graded by its tag's content. `prompt` is unused.
    """
    answer = extract_answer(response)
    if not answer:  # None (no tag) or "" (empty tag)
        return 0.0
    ref_answer = extract_answer(reference)
    if ref_answer is not None:  # a reference *response*: grade against its answer tag
        reference = ref_answer
    a, r = normalize_answer(answer), normalize_answer(reference)
    if a == r:
        return 1.0
    if _INT.fullmatch(a) and _INT.fullmatch(r):
        return 0.0
    return 1.0 if _symbolically_equal(reference, answer) else 0.0


def exact_reward(prompt: str, response: str, reference: str) -> float:
    """1.0 if the response's <answer> equals `reference` after `normalize_answer` on both sides (no
    symbolic equivalence: "1/2" is not "0.5"), else 0.0. For labels that are names, codes or choices."""
    answer = extract_answer(response)
    if not answer:
        return 0.0
    return 1.0 if normalize_answer(answer) == normalize_answer(reference) else 0.0


def format_reward(prompt: str, response: str, reference: str) -> float:
    """1.0 if `response` has exactly one <answer>...</answer> with non-blank content and, if it uses
    <think>, exactly one <think>...</think> pair closed before <answer>; else 0.0.

    Rewards the shape the graders rely on (one answer to extract, reasoning kept apart from it), not
    its correctness. `prompt` and `reference` are unused.
    """
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return 0.0
    start, end = response.index("<answer>"), response.index("</answer>")
    if end < start or not response[start + len("<answer>") : end].strip():
        return 0.0
    n_open, n_close = response.count("<think>"), response.count("</think>")
    if n_open == 0 and n_close == 0:
        return 1.0
    if n_open != 1 or n_close != 1:
        return 0.0
    return 1.0 if response.index("<think>") < response.index("</think>") < start else 0.0


class WeightedSum:
    """sum(weight * fn(...)) over named rewards; itself a RewardFn.

        WeightedSum({"math": (math_reward, 1.0), "format": (format_reward, 0.1)})

    `components` returns the unweighted value of each part, for logging what the policy is learning
    (a rising total can be all format reward). Picklable when every part is, so RewardRunner can run it.
    """

    def __init__(self, parts: dict[str, tuple[RewardFn, float]]):
        if not parts:
            raise ValueError("WeightedSum needs at least one (fn, weight) part, got none")
        for name, part in parts.items():
            if not (isinstance(part, tuple) and len(part) == 2):
                raise ValueError(f"part {name!r} must be a (fn, weight) tuple, got {part!r}")
            fn, w = part
            if not callable(fn):
                raise TypeError(f"part {name!r}: fn must be callable, got {fn!r}")
            if not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ValueError(f"part {name!r}: weight must be a finite real number, got {w!r}")
        self.parts = {name: (fn, float(w)) for name, (fn, w) in parts.items()}

    def components(self, prompt: str, response: str, reference: str) -> dict[str, float]:
        """{name: unweighted value} of every part, in the order given."""
        return {name: float(fn(prompt, response, reference)) for name, (fn, _) in self.parts.items()}

    def __call__(self, prompt: str, response: str, reference: str) -> float:
        values = self.components(prompt, response, reference)
        return sum(self.parts[name][1] * v for name, v in values.items())

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: ({getattr(f, '__name__', f)!r}, {w})" for n, (f, w) in self.parts.items())
        return f"WeightedSum({{{inner}}})"


def resolve_callable(path: str, field: str):
    """`package.module:callable` -> the callable, with errors naming the config `field` (a user hook:
    `rl.reward_fn`, `rl.task`)."""
    mod, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"{field}={path!r}: expected 'package.module:callable'")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{field}={path!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"{field}={path!r}: not callable")
    return fn


def resolve_reward_fn(path: str | None):
    """`rl.reward_fn` -> the RewardFn it names; None -> None."""
    return resolve_callable(path, "rl.reward_fn") if path else None


def default_reward(format_weight: float) -> WeightedSum:
    """The embedded task's reward: math correctness (weight 1) + format (`rl.reward_format_weight`)."""
    return WeightedSum({"math": (math_reward, 1.0), "format": (format_reward, format_weight)})

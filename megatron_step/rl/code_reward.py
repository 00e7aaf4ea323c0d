"""The code-execution reward: a response's program run against the problem's tests in the sandbox
(megatron_step.rl.sandbox), 1.0 when every test passes.

    from megatron_step.rl.code_reward import CodeReward
    reward = CodeReward()                              # rl.reward_fn=code, limits from rl.code.*
    ref = '{"tests": "def check(f):\\n    assert f(2) == 4", "entry_point": "square"}'
    reward.detailed("", "```python\\ndef square(x):\\n    return x * x\\n```", ref)   # (1.0, "pass")

The reference (a problem's label) is JSON, one of two shapes:
- tests: {"tests": "<python>", "entry_point": "<name>"} -- HumanEval's `test` / `entry_point` (the key
  "test" is accepted too): the tests run after the solution in its namespace, then `check(<entry_point>)`
  when an entry point is given; MBPP-style bare asserts need no entry point;
- stdin/stdout cases: {"cases": [{"input": "...", "output": "..."}, ...]}: the solution runs as a
  script once per case; its stdout must equal `output` up to trailing whitespace on each line and
  trailing blank lines. Cases stop at the first one that does not pass.

The program is the last fenced code block of the response (```python ... ``` or ``` ... ```), else the
content of its <answer> tag, else the whole response.

Outcomes (`detailed`'s label, counted per step as rl/reward_outcome_<label>): pass (1.0), fail (a test
failed, wrong output, or the program exited before its tests finished), timeout (CPU or wall clock),
crash (raised: MemoryError, PermissionError, a refused connection...; or killed by a signal). A
sandbox that cannot run, or a reference that is not one of the shapes above, raises: the reward worker
reports a failed call (rl/reward_failed), which is excluded from training, never scored as wrong.
"""

from __future__ import annotations

import dataclasses
import json
import re

from megatron_step.rl.rewards import extract_answer
from megatron_step.rl.sandbox import SandboxConfig, run_program

__all__ = ["CodeReward", "extract_program", "parse_reference"]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_program(response: str) -> str:
    """The program in `response` (see the module docstring for the order)."""
    blocks = _FENCE.findall(response)
    if blocks:
        return blocks[-1][1]
    answer = extract_answer(response)
    return answer if answer is not None else response


def parse_reference(reference: str) -> dict:
    """The JSON reference -> {"tests", "entry_point"} or {"cases": [(input, output), ...]}; ValueError
    naming what is wrong otherwise."""
    try:
        ref = json.loads(reference)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"code reference is not JSON ({e.msg} at char {e.pos}): {reference[:80]!r}"
        ) from None
    if not isinstance(ref, dict):
        raise ValueError(f"code reference must be a JSON object, got {type(ref).__name__}")
    tests = ref.get("tests", ref.get("test"))
    if tests is not None:
        if not isinstance(tests, str) or not tests.strip():
            raise ValueError("code reference field 'tests' must be non-empty Python source")
        entry = ref.get("entry_point")
        if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
            raise ValueError(f"code reference field 'entry_point' must be an identifier, got {entry!r}")
        return {"tests": tests, "entry_point": entry}
    cases = ref.get("cases")
    if not isinstance(cases, list) or not cases:
        raise ValueError("code reference needs 'tests' (Python source) or 'cases' (a non-empty list)")
    out = []
    for i, case in enumerate(cases):
        if not (isinstance(case, dict) and isinstance(case.get("output"), str)):
            raise ValueError(f"code reference cases[{i}] must be an object with a string 'output'")
        stdin = case.get("input", "")
        if not isinstance(stdin, str):
            raise ValueError(f"code reference cases[{i}].input must be a string")
        out.append((stdin, case["output"]))
    return {"cases": out}


def _same_output(got: str, want: str) -> bool:
    def norm(s: str) -> list[str]:
        lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(got) == norm(want)


def _outcome(status: str) -> str:
    return {"ok": "pass", "assertion": "fail", "no_result": "fail", "timeout": "timeout"}.get(status, "crash")


@dataclasses.dataclass
class CodeReward:
    """A RewardFn (picklable: the reward workers run it) with the sandbox's limits."""

    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    outcomes = ("pass", "fail", "timeout", "crash")  # the labels `detailed` gives (counted per step)

    def detailed(self, prompt: str, response: str, reference: str) -> tuple[float, str]:
        """(reward, outcome label) for one response."""
        ref = parse_reference(reference)
        program = extract_program(response)
        if "tests" in ref:
            res = run_program(program, cfg=self.sandbox, tests=ref["tests"], entry_point=ref["entry_point"])
            outcome = _outcome(res.status)
            return (1.0 if outcome == "pass" else 0.0), outcome
        for stdin, want in ref["cases"]:
            res = run_program(program, stdin=stdin, cfg=self.sandbox)
            outcome = _outcome(res.status)
            if outcome == "pass" and not _same_output(res.stdout, want):
                outcome = "fail"
            if outcome != "pass":
                return 0.0, outcome
        return 1.0, "pass"

    def __call__(self, prompt: str, response: str, reference: str) -> float:
        return self.detailed(prompt, response, reference)[0]

    def check_reference(self, reference: str) -> None:
        """Raise ValueError when `reference` is not a tests object (checked as a dataset is read)."""
        parse_reference(reference)

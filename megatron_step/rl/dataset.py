"""Dataset-driven RL: problems from the user's JSONL or Parquet files (`rl.task=dataset`, the `rl.data`
section), each scored by the reward its `data_source` names.

    rl.task=dataset 'rl.data.train=[problems.jsonl]' 'rl.data.eval=[heldout.jsonl]' \\
        rl.data.rewards.mbpp=code rl.data.rewards.gsm8k=math

A record (one JSON object per line, or one row of a .parquet file):
    {"prompt": "What is 2 + 3?", "label": "5", "data_source": "gsm8k"}
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "label": ...}
- `prompt` (`rl.data.prompt_key`): text, or chat messages ending with a user turn. With
  `rl.data.prompt_format=chat` (the default: what an SFT run on the same chat template learned) the
  prompt is rendered with the chat template and its generation prompt; text is one user turn. `raw`
  gives the text to the policy as it is (messages are refused there).
- `label` (`rl.data.label_key`): the reference the reward receives (a number is taken as its text; for
  the code reward, the JSON tests object or its text).
- `data_source` (`rl.data.source_key`, optional): which reward scores the record --
  `rl.data.rewards.<source>=<reward>`, else `rl.data.default_reward`. A reward is "math" (math-verify
  on the <answer> tag), "exact" (the <answer> tag's text after normalisation), "code" (the sandboxed
  code reward, limits `rl.code.*`) or a `package.module:callable` RewardFn.
- `solution` (`rl.data.solution_key`, optional): a worked response, the supervised warm-up's target
  (needed only when `rl.init_from` holds no checkpoint and `rl.sft_steps` > 0).

Checked when the files are read: a missing or empty file, a line that is not JSON, a record without the
prompt or the label, a label its reward cannot use (`check_reference` of the reward: the code reward
parses its tests) -- `file:line: field 'x': what`, or skipped and counted with
`rl.data.skip_bad_lines=true`. Without `rl.data.eval` files, records whose prompt hashes into the
held-out tenth (`tasks.split_of`) are held out.

The reference a reward worker receives is the record's (source, label) as JSON: `RoutedReward`, the
task's reward, routes it to the source's reward. A routed call that fails (an exception, a timeout, a
sandbox that cannot start) is a failed reward call: counted, and excluded from its group's baseline
and from training, never scored as a wrong answer.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from megatron_step.data.chat import ChatError, ChatTemplate, check_messages
from megatron_step.data.records import iter_records
from megatron_step.rl.code_reward import CodeReward
from megatron_step.rl.rewards import exact_reward, math_reward, resolve_callable
from megatron_step.rl.sandbox import SandboxConfig
from megatron_step.rl.tasks import split_of

__all__ = ["DataProblem", "DatasetTask", "RLDataConfig", "RLDataError", "RoutedReward", "reward_by_name"]

PROMPT_FORMATS = ("chat", "raw")


@dataclass
class RLDataConfig:
    """The `rl.data` section: the problem files of `rl.task=dataset` (see the module docstring)."""

    train: list[str] = field(default_factory=list)  # JSONL / .parquet files of training problems
    eval: list[str] = field(default_factory=list)  # held-out problems; empty: a hashed tenth of train
    prompt_key: str = "prompt"
    label_key: str = "label"
    source_key: str = "data_source"
    solution_key: str = "solution"
    prompt_format: str = "chat"  # chat (rendered with the chat template) | raw
    chat_template: str | None = None  # a Jinja file; None: the embedded tokenizer's ChatML template
    # the text that ends a chat turn: generation stops there as at eos (chat format only; one token)
    stop: str = "<|im_end|>"
    # data_source -> reward: math, exact, code, preference (the rl.reward_model's win rate against the
    # record's `solution`, scored in the trainer) or package.module:callable
    rewards: dict[str, str] = field(default_factory=dict)
    default_reward: str = "math"  # the reward of a source not in `rewards` (and of records without one)
    correct_at: float = 1.0  # a response counts as correct (rl/accuracy_*) when its reward is >= this
    skip_bad_lines: bool = False

    def __post_init__(self):
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"rl.data.prompt_format={self.prompt_format!r}: expected one of {PROMPT_FORMATS}"
            )


class RLDataError(ValueError):
    """A problem file that cannot be used (the message names the file, the line and the field)."""


@dataclass(frozen=True)
class DataProblem:
    """One record: frozen (problems are values the stage hands back to the task)."""

    prompt: str  # the text the policy reads (rendered)
    label: str  # the reference its reward receives
    source: str  # data_source ("" when the record has none)
    solution: str | None  # a worked response, when the record has one
    where: str  # "file:line", for messages


def preference_only(prompt: str, response: str, reference: str) -> float:
    """The worker-side reward of a source routed to `preference`: no verifiable part (the preference
    model, in the trainer, gives the whole reward; megatron_step.rl.rollouts)."""
    return 0.0


def reward_by_name(name: str, code: SandboxConfig, field_name: str):
    """A reward of `rl.data.rewards` / `rl.data.default_reward` by name."""
    if name == "preference":
        return preference_only
    if name == "math":
        return math_reward
    if name == "exact":
        return exact_reward
    if name == "code":
        return CodeReward(code)
    if ":" not in name:
        raise ValueError(
            f"{field_name}={name!r}: expected math, exact, code, preference or 'package.module:callable'"
        )
    return resolve_callable(name, field_name)


class RoutedReward:
    """A RewardFn whose reference is `json.dumps([source, label])`: the source's reward scores the
    label. Picklable (the reward workers run it) when its rewards are."""

    def __init__(self, routes: dict, default):
        self.routes, self.default = dict(routes), default
        labels: list[str] = []
        for fn in [*self.routes.values(), default]:
            labels += [x for x in getattr(fn, "outcomes", ()) if x not in labels]
        self.outcomes = tuple(labels)

    def pick(self, source: str):
        return self.routes.get(source, self.default)

    def detailed(self, prompt: str, response: str, reference: str) -> tuple[float, str | None]:
        source, label = json.loads(reference)
        fn = self.pick(source)
        if callable(getattr(fn, "detailed", None)):
            return fn.detailed(prompt, response, label)
        return fn(prompt, response, label), None

    def __call__(self, prompt: str, response: str, reference: str) -> float:
        return self.detailed(prompt, response, reference)[0]


def _text(value, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ChatError(f"{what}: expected text, got {value!r:.60}")
    text = str(value)  # a number is taken as its text
    if not text.strip():
        raise ChatError(f"{what}: expected non-empty text, got {value!r}")
    return text


def _label(value, key: str) -> str:
    if isinstance(value, dict | list):  # a structured label (the code reward's tests object)
        return json.dumps(value)
    return _text(value, f"field {key!r}")


class DatasetTask:
    """The `Task` (megatron_step.rl.tasks) of `rl.task=dataset`."""

    def __init__(self, cfg: RLDataConfig, code: SandboxConfig, tokenizer=None):
        if not cfg.train:
            raise RLDataError("rl.task=dataset needs problem files: rl.data.train=[file.jsonl, ...]")
        self.cfg = cfg
        chat = cfg.prompt_format == "chat"
        # the file, else the tokenizer's own template, else the default (megatron_step.data.chat)
        self.template = ChatTemplate.for_tokenizer(cfg.chat_template, tokenizer) if chat else None
        routes = {
            src: reward_by_name(name, code, f"rl.data.rewards.{src}") for src, name in cfg.rewards.items()
        }
        self._reward = RoutedReward(
            routes, reward_by_name(cfg.default_reward, code, "rl.data.default_reward")
        )
        self.skipped, self.reasons = 0, []
        records = self._read(cfg.train)
        if cfg.eval:
            self._train, self._eval = records, self._read(cfg.eval)
        else:  # a hashed tenth of the prompts, so the two never share a problem
            self._train = [p for p in records if split_of(p.prompt) == "train"]
            self._eval = [p for p in records if split_of(p.prompt) == "heldout"]
        for name, got in (("training", self._train), ("held-out", self._eval)):
            if not got:
                files = cfg.eval if name == "held-out" and cfg.eval else cfg.train
                raise RLDataError(f"{', '.join(files)}: no {name} problems (after {self.skipped} skipped)")
        self.sources = sorted({p.source for p in self._train + self._eval})

    # -- reading ---------------------------------------------------------------------------------------
    def _prompt(self, value) -> str:
        c = self.cfg
        if isinstance(value, list):
            if self.template is None:
                raise ChatError(f"field {c.prompt_key!r}: chat messages need rl.data.prompt_format=chat")
            messages = check_messages(value, need_assistant=False)
            if messages[-1]["role"] != "user":
                raise ChatError(f"field {c.prompt_key!r}: the messages must end with a user turn")
            return self.template.render(messages, add_generation_prompt=True)
        text = _text(value, f"field {c.prompt_key!r}")
        if self.template is None:
            return text
        return self.template.render([{"role": "user", "content": text}], add_generation_prompt=True)

    def _record(self, record, where: str) -> DataProblem:
        c = self.cfg
        if not isinstance(record, dict):
            raise ChatError(f"expected a JSON object, got {type(record).__name__}")
        for key in (c.prompt_key, c.label_key):
            if key not in record:
                hint = "rl.data.prompt_key / rl.data.label_key set the names"
                raise ChatError(f"no field {key!r}; its fields: {sorted(record)[:8]} ({hint})")
        source = record.get(c.source_key, "")
        if not isinstance(source, str):
            raise ChatError(f"field {c.source_key!r}: expected text, got {source!r:.60}")
        label = _label(record[c.label_key], c.label_key)
        check = getattr(self._reward.pick(source), "check_reference", None)
        if callable(check):
            try:
                check(label)
            except ValueError as e:
                raise ChatError(f"field {c.label_key!r}: {e}") from None
        solution = record.get(c.solution_key)
        if solution is not None and not isinstance(solution, str):
            raise ChatError(f"field {c.solution_key!r}: expected text, got {solution!r:.60}")
        return DataProblem(self._prompt(record[c.prompt_key]), label, source, solution, where)

    def _read(self, paths: list[str]) -> list[DataProblem]:
        out = []
        for path in paths:
            if not os.path.isfile(path):
                raise RLDataError(f"{path}: no such file (rl.data.train / rl.data.eval)")
            n_lines = 0
            try:
                for at, record in iter_records(path):
                    n_lines += 1
                    try:
                        if isinstance(record, ChatError):
                            raise record
                        p = self._record(record, at)
                    except ChatError as e:
                        where = f"{at}: {e}"
                        if not self.cfg.skip_bad_lines:
                            hint = "rl.data.skip_bad_lines=true skips and counts such lines"
                            raise RLDataError(f"{where} ({hint})") from None
                        self.skipped += 1
                        if len(self.reasons) < 5:
                            self.reasons.append(where)
                        continue
                    out.append(p)
            except ChatError as e:  # the file itself (not Parquet, no pyarrow)
                raise RLDataError(str(e)) from None
            if n_lines == 0:
                raise RLDataError(f"{path}: empty file (no records)")
        return out

    # -- the Task protocol ----------------------------------------------------------------------------
    def train(self, n: int, seed: int) -> list[DataProblem]:
        """The training records: all of them when n covers them (the sampler draws from the pool), else
        a seeded sample of n."""
        if n >= len(self._train):
            return list(self._train)
        return random.Random(seed).sample(self._train, n)

    def heldout(self, n: int, seed: int) -> list[DataProblem]:
        """The first n held-out records (in file order: every evaluation sees the same ones)."""
        return self._eval[:n]

    def prompt(self, problem: DataProblem) -> str:
        return problem.prompt

    def reference(self, problem: DataProblem) -> str:
        return json.dumps([problem.source, problem.label])

    def solution(self, problem: DataProblem) -> str:
        if problem.solution is None:
            raise RLDataError(
                f"{problem.where}: no field {self.cfg.solution_key!r}, the worked solution a supervised "
                "warm-up trains on: start from a trained policy (rl.init_from=<an SFT run>) or set "
                "rl.sft_steps=0"
            )
        return problem.solution

    def correct(self, problem: DataProblem, response: str) -> bool:
        try:
            value, _ = self._reward.detailed("", response, self.reference(problem))
        except Exception:  # noqa: BLE001 -- an infra failure is not a correct answer
            return False
        return value >= self.cfg.correct_at

    def reward(self) -> RoutedReward:
        return self._reward

    def preference_sources(self) -> set[str] | None:
        """The sources whose reward is the preference model's (`rl.data.rewards.<source>=preference`);
        None when no source is routed to it (then rl.reward_model, if set, adds to every reward)."""
        names = {s for s, name in self.cfg.rewards.items() if name == "preference"}
        if self.cfg.default_reward == "preference":
            return {s for s in self.sources if s not in self.cfg.rewards} | names | {""}
        return names or None

    def stop_texts(self) -> list[str]:
        return [self.cfg.stop] if self.template is not None and self.cfg.stop else []

    def info(self) -> dict:
        return {
            "train": len(self._train), "heldout": len(self._eval), "sources": self.sources,
            "skipped": self.skipped, "skipped_first": self.reasons,
            "chat_template": self.template.source if self.template is not None else None,
        }  # fmt: skip

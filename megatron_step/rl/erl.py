"""ERL: step-level erasable rollouts for tool use (the idea of arXiv 2510.00861). A rollout is a
sequence of steps (reason -> `<search>query</search>` -> tool result, ..., `<answer>X</answer>`);
a step whose local score falls under a threshold is rolled back -- the whole step, or only its query
part -- and regenerated in place on top of the KV cache of everything before it.

    tool = SearchTool(make_world(seed=0))
    gens = generate_erl(engine, prompts, tool, SamplingParams(max_new_tokens=96, seed=0), ERLConfig(),
                        tokenizer=tok)
    gens[i].info["steps"], gens[i].info["rollbacks"], gens[i].info["sampled_mask"]

How a rollout runs (one rollout at a time, batch size 1 per KV cache: Megatron-Core's static cache
keeps one length for the whole batch, and the rollouts of a batch call tools and roll back at
different positions, so sharing a cache would force re-feeding every other row's tokens):

1. Prefill the prompt. Decode one step: sample (as `Engine.generate`: `Engine.sample`, the same
   log-probs and entropies) until the step's text contains `</search>` or `</answer>`, a stop token
   (eos or `params.stop_ids`), `max_step_tokens`, or the response cap (`params.max_new_tokens`). The
   logits that predicted each of the step's tokens are kept (a few (V,) rows), so a rollback needs no
   forward of earlier positions.
2. On `</search>`: the tool answers the step's query (`lookup.extract_query`), then the step is scored
   (`score_fn(step)`, default `default_step_score`) -- before the result is fed, so a rejected step
   costs no forward of its result.
3. Rejected (score < threshold, rollbacks left): `cache.truncate` to the step's start (scope "step") or
   to the token where `<search>` begins (scope "query": the step's reasoning is kept) and sample again
   from the kept logits at that boundary. The regenerated step is scored again and may be rejected
   again, while the rollout has rollbacks left.
4. Kept: the step's last token and the result tokens ` <result>...</result>` (`lookup.format_result`,
   teacher-forced, not sampled) go through the cache -- one position per call, as `Engine.forward`
   feeds a chunk into a non-empty cache -- and the next step starts from the last logits.

The returned response is exactly the kept trajectory (sampled tokens and tool-result tokens). Tool
tokens are marked in `info["sampled_mask"]` (1: sampled, 0: teacher-forced; the trainer must exclude
0s from the loss); their `logprobs` and `entropies` are 0.0. The cache holds one copy of each kept
position: at the end its length is len(prompt) + len(response) - 1 when the response ends on a sampled
token (the last token is never fed, as in `Engine.generate`), whatever the number of rollbacks. (A
rollout that stops after a search -- `max_steps` or the response cap reached -- keeps the result tokens
in the response without feeding them: nothing is left to predict.) The RL stage trains on ERL rollouts
with `rl.rollout: erl` on a task that has a tool (`megatron_step.rl.lookup.LookupTask`): `Rollout.
sampled_mask` carries the marks and `policy.pack` keeps the 0s out of the loss.

Layouts. A forward of a TP / EP / PP model is collective; the ranks of one model replica hold the same
rollouts and take the same decisions (tokens are sampled on the last pipeline stage and broadcast,
`Engine.sample`), but data-parallel ranks joined by expert parallelism hold different prompts, whose
rollouts need different numbers of forwards (steps, rollbacks, tool results). Every model call is
therefore one round agreed on `engine.lockstep` (one 1-element all-reduce before it): a rank whose
rollouts are done keeps answering rounds with a padding forward through a scratch cache until no rank
of the group has work. Keyed randomness (`keys`, as `Engine.generate`) makes a rollout independent of
the layout and of the other rollouts on its rank.

`Generation.info`: `steps` (every attempt in order, kept and rolled back: `Step.record()`),
`rollbacks`, `regenerated_tokens` (sampled tokens thrown away by rollbacks), `prefix_reused` (cached
positions kept, not recomputed, summed over rollbacks), `tool_calls`, `sampled_mask`, `cache_length`.
`Generation.routing` (MoE layers) covers the fed positions, as in `Engine.generate`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_step.rl.engine import Engine, Generation, KVCache, SamplingParams
from megatron_step.rl.lookup import (
    ANSWER_CLOSE,
    NO_RESULT,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    extract_answer,
    extract_query,
    format_result,
)

__all__ = ["ERLConfig", "Step", "Tool", "default_step_score", "erl_stats", "generate_erl"]


class Tool(Protocol):
    """A tool: answers a query string; `lookup.NO_RESULT` ("no result") when it finds nothing."""

    def search(self, query: str) -> str: ...


class Codec(Protocol):
    """What ERL needs of a tokenizer (`StepTokenizer` is one)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class ERLConfig:
    """ERL knobs. The paper's constants (threshold, rollback budget, score weights) are not available
    here; these defaults are ours, each with its reason. They are sized for the tiny CPU lookup task
    (2-3 steps of ~10-20 tokens)."""

    # keep a step iff its score >= threshold. With `default_step_score` (0.5 * hit + 0.5 * confidence,
    # in [0, 1]) a step without a hit (failed or ungrounded search, no grounded answer, cut by length)
    # scores < 0.5, so it is always rolled back while rollbacks remain; a step with a hit is rolled
    # back only if its geometric-mean token probability is under 0.1 (0.5 + 0.5 * 0.1 = 0.55): the
    # model was close to guessing, the tool's answer may be luck
    threshold: float = 0.55
    # rollbacks per rollout: 3 lets each step of a 2-hop trajectory (3 steps) be retried about once,
    # and bounds the extra sampling to 3 * max_step_tokens tokens per rollout
    max_rollbacks: int = 3
    # "step": truncate to the step's first token; "query": to the token where `<search>` begins, the
    # step's reasoning before it kept (steps without `<search>` roll back whole)
    scope: str = "step"
    max_steps: int = 4  # kept steps per rollout: hops + the answer step, one spare
    max_step_tokens: int = 24  # sampled tokens per step: a gold lookup step is ~15 pieces of the 2k vocab

    def __post_init__(self):
        if self.max_rollbacks < 0:
            raise ValueError(f"erl.max_rollbacks={self.max_rollbacks}: must be >= 0")
        if self.scope not in ("step", "query"):
            raise ValueError(f"erl.scope={self.scope!r}: one of 'step', 'query'")
        for name in ("max_steps", "max_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"erl.{name}={getattr(self, name)}: must be >= 1")
        if not math.isfinite(self.threshold):
            raise ValueError(f"erl.threshold={self.threshold}: must be finite")


@dataclass
class Step:
    """One attempt at a step, what `score_fn` sees (the tool has answered; its result is not fed yet)."""

    index: int  # which kept step this attempt is for (0: the first step of the response)
    attempt: int  # 0: first sample; k: the k-th regeneration of this step
    start: int  # response index of the step's first token
    tokens: list[int]  # the sampled tokens of the step (for scope "query": the kept reasoning included)
    logprobs: list[float]  # log pi of each, at the sampling temperature
    text: str  # decode(tokens)
    # "search" (ended in </search>), "answer" (ended in </answer>), "stop" (a stop token / eos),
    # "length" (max_step_tokens or the response cap)
    kind: str
    query: str | None = None  # the searched string (kind "search")
    result: str | None = None  # the tool's answer (kind "search")
    query_start: int | None = None  # response index where `<search>` begins, if the text has one
    context: str = ""  # decode(prompt + the kept response before the step): what the step could read
    score: float = float("nan")
    rolled_back: bool = False

    @property
    def found(self) -> bool:
        return self.kind == "search" and self.result is not None and self.result != NO_RESULT

    @property
    def grounded(self) -> bool:
        """The step's key string was there to be read: a search's subject (the query's first word)
        or an answer occurs, as whole words, in the context (the question or an earlier result). A
        model that searches for a name nobody mentioned is guessing, even when the tool knows it."""
        if self.kind == "search":
            key = (self.query or "").split()[:1]
            key = key[0] if key else ""
        elif self.kind == "answer":
            key = extract_answer(self.text) or ""
        else:
            return False
        return bool(key) and re.search(rf"(?<!\w){re.escape(key)}(?!\w)", self.context) is not None

    def record(self) -> dict:
        return {
            "index": self.index,
            "attempt": self.attempt,
            "start": self.start,
            "tokens": list(self.tokens),
            "text": self.text,
            "kind": self.kind,
            "query": self.query,
            "result": self.result,
            "found": self.found,
            "grounded": self.grounded,
            "score": self.score,
            "rolled_back": self.rolled_back,
        }


def default_step_score(step: Step) -> float:
    """0.5 * hit + 0.5 * exp(mean token log-prob), in [0, 1]. hit (0 or 1): a search that returned a
    fact for a grounded subject, or a grounded non-empty `<answer>` (`Step.grounded`); 0 for a failed
    or ungrounded search, a stop without an answer and a step cut by length. Only the rollout's own
    text and the tool's answer are used -- never the reference answer (that is the reward's). The
    confidence term (geometric-mean token probability) separates steps with the same hit value; see
    `ERLConfig.threshold` for how the two combine."""
    if step.kind == "search":
        hit = float(step.found and step.grounded)
    elif step.kind == "answer":
        hit = float(step.grounded)
    else:
        hit = 0.0
    conf = math.exp(sum(step.logprobs) / len(step.logprobs)) if step.logprobs else 0.0
    return 0.5 * hit + 0.5 * conf


def token_at_char(codec: Codec, tokens: list[int], char: int) -> int:
    """The index of the token in which character `char` of decode(tokens) falls (the largest j with
    len(decode(tokens[:j])) <= char)."""
    j = 0
    for k in range(1, len(tokens) + 1):
        if len(codec.decode(tokens[:k])) > char:
            break
        j = k
    return j


class _Rounds:
    """One round per model call, agreed on `engine.lockstep`: a rank with work calls `work()` before
    each call; `drain()`, once its rollouts are done, answers the other ranks' rounds with padding
    forwards through a 1-row scratch cache until none has work (free when no collective joins ranks)."""

    def __init__(self, engine: Engine):
        self.engine, self.step = engine, engine.lockstep
        self.scratch: KVCache | None = None
        self.idle = 0  # padding forwards made

    def work(self) -> None:
        self.step.any(True)  # collective: engine.lockstep.group

    def drain(self) -> None:
        while self.step.any(False):  # collective: engine.lockstep.group
            if self.scratch is None or self.scratch.length + 1 > self.scratch.max_len:
                self.scratch = KVCache(1, 64)
            self.engine.forward(self.scratch, torch.tensor([[self.engine.pad_id]]))
            self.idle += 1


class _Rollout:
    """One rollout's state: its cache, the kept trajectory, the current step's boundary logits."""

    def __init__(self, engine, prompt, tool, codec, params, cfg, score_fn, seed, key, record, rounds):
        self.rounds = rounds  # the lockstep rounds of the call (`_Rounds`)
        self.engine, self.prompt, self.tool, self.codec = engine, list(prompt), tool, codec
        self.params, self.cfg, self.score_fn = params, cfg, score_fn
        self.seed, self.key = seed, key  # keyed randomness: a token's key is (*key, index, rollbacks)
        self.cap = params.max_new_tokens
        self.prompt_text = codec.decode(self.prompt)
        self.cache = KVCache(1, len(prompt) + self.cap)
        self.stop = set(params.stop_ids) | {engine.eos_id}
        self.record = record and bool(engine.replays)
        self.routing: list[torch.Tensor] = []  # per fed position: (layers, K)
        self.resp: list[int] = []
        self.logp: list[float] = []
        self.ent: list[float] = []
        self.mask: list[int] = []
        self.steps: list[Step] = []
        self.rollbacks = self.regenerated = self.prefix_reused = self.tool_calls = 0

    def forward(self, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` at the cache's position; the last position's (V,) logits ((0,) off the last
        pipeline stage). One model call per round of `self.rounds`: the prompt in one call, tokens fed
        into a non-empty cache one position per call (as `Engine.forward` does)."""
        rec = [] if self.record else None
        calls = [tokens] if self.cache.length == 0 else [[t] for t in tokens]
        for call in calls:
            self.rounds.work()  # collective: engine.lockstep (see the module docstring)
            logits = self.engine.forward(self.cache, torch.tensor([call]), rec)
        if rec:
            for _, call in rec:  # per call: (start, per layer (s, 1, K))
                self.routing.extend(torch.stack(call, 0)[:, :, 0].unbind(1))
        return logits[0, -1]

    def sample_step(self, start: int, logits_k: list[torch.Tensor]) -> str:
        """Sample from response index len(resp) (>= start) until the step ends; `logits_k[k]` predicts
        step token k and grows as tokens are fed. The last token is not fed. Returns the step's kind."""
        while True:
            key = (*self.key, len(self.resp), self.rollbacks)
            # under PP the last stage samples and broadcasts to its pipeline (Engine.sample)
            tok, lp, ent = self.engine.sample(
                logits_k[len(self.resp) - start][None], self.params, self.seed, [key]
            )
            t = int(tok[0])
            self.resp.append(t)
            self.logp.append(float(lp[0]))
            self.ent.append(float(ent[0]))
            self.mask.append(1)
            text = self.codec.decode(self.resp[start:])
            if SEARCH_CLOSE in text:
                return "search"
            if ANSWER_CLOSE in text:
                return "answer"
            if t in self.stop:
                return "stop"
            if len(self.resp) - start >= self.cfg.max_step_tokens or len(self.resp) >= self.cap:
                return "length"
            logits_k.append(self.forward([t]))
            self.engine.stats["decode_tokens"] += 1

    def make_step(self, index: int, attempt: int, start: int, kind: str) -> Step:
        tokens = self.resp[start:]
        text = self.codec.decode(tokens)
        step = Step(index, attempt, start, tokens, self.logp[start:], text, kind)
        step.context = self.prompt_text + self.codec.decode(self.resp[:start])
        c = text.find(SEARCH_OPEN)
        if c >= 0:
            step.query_start = start + token_at_char(self.codec, tokens, c)
        if kind == "search":
            step.query = extract_query(text)
            step.result = self.tool.search(step.query)
            self.tool_calls += 1
        score = (self.score_fn or default_step_score)(step)
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"score_fn returned {score!r} for step {index}: must be a finite number")
        step.score = float(score)
        return step

    def rollback(self, to: int) -> None:
        """Drop response index >= `to` (the cache holds len(prompt) + `to` positions afterwards)."""
        keep = len(self.prompt) + to
        self.regenerated += sum(self.mask[to:])
        self.prefix_reused += keep
        self.rollbacks += 1
        del self.resp[to:], self.logp[to:], self.ent[to:], self.mask[to:]
        del self.routing[keep:]
        self.cache.truncate(keep)

    def run(self) -> Generation:
        cfg = self.cfg
        logits = self.forward(self.prompt)
        self.engine.stats["prefill_tokens"] += len(self.prompt)
        finish = "length"
        for index in range(cfg.max_steps):
            start = len(self.resp)
            logits_k = [logits]  # logits_k[k] predicts step token k: the boundary of any rollback
            attempt = 0
            while True:
                kind = self.sample_step(start, logits_k)
                step = self.make_step(index, attempt, start, kind)
                self.steps.append(step)
                if step.score >= cfg.threshold or self.rollbacks >= cfg.max_rollbacks:
                    break
                step.rolled_back = True
                to = start
                if cfg.scope == "query" and step.query_start is not None:
                    to = step.query_start
                self.rollback(to)
                del logits_k[to - start + 1 :]
                attempt += 1
            if kind in ("answer", "stop"):
                finish = "stop"
                break
            if len(self.resp) >= self.cap:
                break
            feed = [self.resp[-1]]  # the step's last token, sampled but not fed yet
            if kind == "search":
                forced = self.codec.encode(format_result(step.result))[: self.cap - len(self.resp)]
                self.resp += forced
                self.logp += [0.0] * len(forced)
                self.ent += [0.0] * len(forced)
                self.mask += [0] * len(forced)
                if len(self.resp) >= self.cap:
                    break  # the result filled the response: nothing left to predict
                feed += forced
            if index + 1 == cfg.max_steps:
                break  # no step follows: the pending tokens need not be fed
            logits = self.forward(feed)
            self.engine.stats["decode_tokens"] += len(feed)
        info = {
            "steps": [s.record() for s in self.steps],
            "rollbacks": self.rollbacks,
            "regenerated_tokens": self.regenerated,
            "prefix_reused": self.prefix_reused,
            "tool_calls": self.tool_calls,
            "sampled_mask": list(self.mask),
            "cache_length": self.cache.length,
        }
        g = Generation(self.prompt, self.resp, self.logp, self.ent, finish, info=info)
        if self.routing:
            stacked = torch.stack(self.routing, 0)  # (positions fed, layers, K)
            g.routing = list(stacked.transpose(0, 1).contiguous().unbind(0))
        return g


@torch.no_grad()
def generate_erl(
    engine: Engine,
    prompts: list[list[int]],
    tool: Tool,
    params: SamplingParams,
    cfg: ERLConfig,
    score_fn: Callable[[Step], float] | None = None,
    *,
    tokenizer: Codec,
    record_routing: bool = True,
    keys: list[tuple[int, ...]] | None = None,
) -> list[Generation]:
    """One ERL rollout per prompt (repeat a prompt G times for a group), one after the other, each with
    its own batch-1 KV cache of len(prompt) + params.max_new_tokens positions (the response cap counts
    sampled and tool tokens). `tokenizer` decodes steps (tag detection, the query) and encodes tool
    results. `score_fn(step) -> float` (default `default_step_score`) is called once per attempt,
    after the tool answered; steps scoring under `cfg.threshold` are rolled back while the rollout has
    `cfg.max_rollbacks` left. `cfg.max_rollbacks=0` is plain tool-using decoding.
    `keys[i]`: prompt i's key for the keyed randomness, as `Engine.generate` (default (i,)); a token's
    uniform is keyed by (params.seed, *keys[i], response index, rollbacks so far).
    Every rank of `engine.lockstep` calls this together, each with its own prompts (none included).
    `engine.last_kv`: KV bytes used / allocated, summed over the rollouts' caches, and the padding
    forwards this rank made to keep its group in step (`idle_forwards`)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_erl: every prompt needs at least one token")
    keys = [(i,) for i in range(len(prompts))] if keys is None else [tuple(k) for k in keys]
    if len(keys) != len(prompts):
        raise ValueError(f"generate_erl: {len(prompts)} prompts but {len(keys)} keys")
    t0 = time.perf_counter()
    seed = engine.seed_of(params)
    rounds = _Rounds(engine)
    out, used, allocated = [], 0, 0
    with engine.inference():
        for p, key in zip(prompts, keys):
            r = _Rollout(engine, p, tool, tokenizer, params, cfg, score_fn, seed, key, record_routing, rounds)
            out.append(r.run())
            used += r.cache.used_bytes()
            allocated += r.cache.allocated_bytes()
        rounds.drain()
    engine.stats["seconds"] += time.perf_counter() - t0
    engine.last_kv = {"used_bytes": used, "allocated_bytes": allocated, "idle_forwards": rounds.idle}
    return out


def erl_stats(gens: list[Generation]) -> dict[str, float]:
    """Per-rollout means of the ERL counters: the RL stage's erl/* metrics and the demo's table."""
    n = max(1, len(gens))

    def mean(key):
        return sum(g.info.get(key, 0) for g in gens) / n

    return {
        "erl/rollbacks_per_rollout": mean("rollbacks"),
        "erl/tokens_regenerated": mean("regenerated_tokens"),
        "erl/prefix_positions_reused": mean("prefix_reused"),
        "erl/tool_calls": mean("tool_calls"),
        "erl/response_length": sum(len(g.response_ids) for g in gens) / n,
        # tokens the policy sampled in the kept responses (tool results excluded)
        "erl/sampled_tokens": sum(sum(g.info["sampled_mask"]) for g in gens) / n,
    }

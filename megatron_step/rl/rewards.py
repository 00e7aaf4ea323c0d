"""Rewards as typed callables, and a runner that scores them in worker processes with a timeout.

    from megatron_step.rl.rewards import RewardRunner, WeightedSum, format_reward, math_reward
    reward = WeightedSum({"math": (math_reward, 1.0), "format": (format_reward, 0.1)})
    reward("What is 3 + 4?", " 3 + 4 = 7. <answer>7</answer>", "7")        # 1.1, in-process
    with RewardRunner(reward, timeout_s=5.0, workers=4) as runner:
        results = runner.run([(prompt, response, answer), ...])           # list[RewardResult]
        rewards = [r.value for r in results]                               # 0.0 where r.failed

Why a runner: reward code is user code (a verifier, a sandboxed program, a parser fed with whatever the
policy wrote), and in RL a policy finds the inputs that make it crash or spin. Running it in the
trainer's process would let one pathological response kill or stall a multi-GPU step. The runner runs
it in worker processes: an exception becomes a failed result, a hang costs at most `timeout_s` (the
worker is killed and replaced), and a segfault costs one worker, never the run.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import pickle
import re
import signal
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing import connection, get_context
from typing import Protocol, runtime_checkable

from megatron_step.rl.tasks import extract_answer

__all__ = [
    "RewardFn",
    "RewardResult",
    "RewardRunner",
    "WeightedSum",
    "format_reward",
    "math_reward",
    "normalize_answer",
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

_WS = re.compile(r"\s+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INT = re.compile(r"[+-]?\d+")


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


# ---------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    """The outcome of one reward call."""

    value: float  # the reward; 0.0 when failed, so a batch of results is always usable as-is
    failed: bool  # True when the call raised, timed out, returned a non-finite/non-number, or crashed
    error: str | None  # why it failed: "timeout after 2.0 s", "ValueError: ...", "worker died (...)"
    seconds: float  # wall time of the call (measured in the worker; for a timeout, until the kill)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + "..."


def _worker_main(conn, payload: bytes) -> None:
    """Body of one reward worker process.

    Wire protocol on `conn` (a duplex Pipe): the worker first sends ("ready", None), or
    ("init_error", text) if `fn` cannot be unpickled here (e.g. it lives in a module this fresh
    interpreter cannot import) and exits. Then, for each (index, prompt, response, reference) it
    receives, it sends (index, value, error, seconds); None asks it to exit. fn is unpickled here, not
    passed as a Process argument, so that failure is reported as text instead of a traceback on stderr.
    """
    # Ctrl-C reaches the whole process group; the parent decides what to do, workers just keep quiet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fn = pickle.loads(payload)
    except BaseException as e:  # an import-time SystemExit is as fatal as an ImportError
        conn.send(("init_error", _describe(e)))
        conn.close()
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent gone: nothing left to score for
            return
        if msg is None:
            conn.close()
            return
        index, prompt, response, reference = msg
        t0 = time.perf_counter()
        try:
            out = fn(prompt, response, reference)
            # A str or a tensor would convert with float() and hide a bug: only real numbers count.
            if not isinstance(out, numbers.Real):
                value, error = 0.0, f"TypeError: reward returned {type(out).__name__}, not a real number"
            elif not math.isfinite(float(out)):
                value, error = 0.0, f"non-finite reward {float(out)!r}"
            else:
                value, error = float(out), None
        except BaseException as e:  # isolation is the point: SystemExit and friends are failures too
            value, error = 0.0, _describe(e)
        conn.send((index, value, error, time.perf_counter() - t0))


@dataclass(eq=False)  # identity semantics: `list.index` must find this very worker
class _Worker:
    process: object  # multiprocessing SpawnProcess
    conn: connection.Connection  # parent's end of the duplex pipe
    state: str  # "starting" (until "ready"), "idle", or "busy" (scoring item `index`)
    since: float  # time.monotonic() the process started ("starting") or the item was sent ("busy")
    index: int = -1


def _stop(w: _Worker, grace_s: float) -> None:
    """Join `w` within grace_s, then SIGKILL (a hung reward may ignore SIGTERM) and reap: no zombie."""
    w.process.join(grace_s)
    if w.process.is_alive():
        w.process.kill()
        w.process.join(5.0)
    w.conn.close()
    if w.process.exitcode is not None:
        w.process.close()  # frees the sentinel fd now rather than at garbage collection


def _shutdown(workers: list[_Worker]) -> None:
    """Ask non-busy workers to exit, give them a moment, kill the rest. Module-level (not a method) so
    weakref.finalize can hold it without keeping the runner alive."""
    for w in workers:
        if w.state != "busy":
            with contextlib.suppress(OSError):  # already dead: _stop reaps it all the same
                w.conn.send(None)
    deadline = time.monotonic() + 2.0
    for w in workers:
        _stop(w, 0.0 if w.state == "busy" else max(0.0, deadline - time.monotonic()))
    workers.clear()


class RewardRunner:
    """Scores (prompt, response, reference) items with `fn` in a small pool of worker processes.

        with RewardRunner(math_reward, timeout_s=5.0, workers=4) as runner:
            results = runner.run(items)                   # one RewardResult per item, same order

    Guarantees per item: an exception -> failed=True with "Type: message"; a non-finite or non-numeric
    return -> failed; a call still running after `timeout_s` -> its worker is SIGKILLed and replaced,
    failed=True with "timeout after {timeout_s} s"; a worker that dies (segfault, os._exit) -> failed.
    Failed items get value 0.0. Other items keep being scored meanwhile, so one hung call costs its
    item `timeout_s` and the run at most that plus one worker start-up, never a stall.

    `fn` must be picklable (a module-level function or an instance of a module-level class): workers
    are fresh interpreters ("spawn" context, safe in a CUDA/NCCL trainer where fork is not), and they
    receive fn by pickle, re-importing its module. A TypeError at construction says so when it is not.

    Workers start at construction (each ~0.1-0.5 s: a fresh interpreter importing fn's module), so they
    warm up while the caller generates rollouts; `run` waits for them, and a start-up that takes longer
    than `startup_timeout_s` or fails to load fn raises RuntimeError. The timeout clock of an item starts
    when it is handed to a ready worker, so start-up never counts against it. Workers are daemonic
    (they die with the trainer), which means fn cannot start multiprocessing children of its own
    (subprocess is fine). Counters across runs: `failed_total` (all failures) and `timeouts_total`.
    """

    def __init__(
        self, fn: RewardFn, timeout_s: float = 5.0, workers: int = 1, startup_timeout_s: float = 120.0
    ):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        try:
            payload = pickle.dumps(fn)
        except Exception as e:
            raise TypeError(
                f"RewardRunner needs a picklable fn (a module-level function, or an instance of a"
                f" module-level class) because it runs in spawned worker processes; {fn!r} is not:"
                f" {_describe(e)}"
            ) from e
        if not isinstance(timeout_s, numbers.Real) or not (0 < timeout_s < math.inf):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if not isinstance(startup_timeout_s, numbers.Real) or not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be a number > 0, got {startup_timeout_s!r}")
        self.fn = fn
        self.timeout_s = float(timeout_s)
        self.n_workers = workers
        self.startup_timeout_s = float(startup_timeout_s)
        self.failed_total = 0
        self.timeouts_total = 0
        self._payload = payload
        self._ctx = get_context("spawn")
        self._workers: list[_Worker] = []
        # Runs _shutdown on close(), on garbage collection, or at interpreter exit, whichever is first.
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for _ in range(workers):
            self._workers.append(self._start_worker())

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        p = self._ctx.Process(
            target=_worker_main, args=(child_conn, self._payload), name="reward-worker", daemon=True
        )
        p.start()
        child_conn.close()  # the child holds its copy; closing ours makes the child's death read as EOF
        return _Worker(process=p, conn=parent_conn, state="starting", since=time.monotonic())

    def _replace(self, w: _Worker) -> None:
        """Kill `w` (whatever it is doing) and put a fresh worker in its slot."""
        _stop(w, 0.0)
        self._workers[self._workers.index(w)] = self._start_worker()

    def _fail(self, results: list, w: _Worker, error: str, seconds: float, timeout: bool = False) -> None:
        results[w.index] = RewardResult(value=0.0, failed=True, error=error, seconds=seconds)
        self.failed_total += 1
        self.timeouts_total += int(timeout)

    def _service(self, w: _Worker, results: list) -> bool:
        """Read every message `w` has sent; False when `w` is dead (its item, if any, marked failed)."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "init_error":
                    raise RuntimeError(f"reward worker could not load fn {self.fn!r}: {msg[1]}")
                if msg[0] == "ready":
                    w.state = "idle"
                    continue
                index, value, error, seconds = msg
                results[index] = RewardResult(
                    value=value, failed=error is not None, error=error, seconds=seconds
                )
                self.failed_total += int(error is not None)
                w.state, w.index = "idle", -1
        except (EOFError, OSError):
            pass  # the pipe closed: the process is gone; fall through to the exit-code check
        if w.process.is_alive():
            return True
        code = w.process.exitcode
        if w.state == "starting":
            raise RuntimeError(f"reward worker exited with code {code} while loading fn {self.fn!r}")
        if w.state == "busy":
            self._fail(results, w, f"worker died (exit code {code})", time.monotonic() - w.since)
        return False

    def run(self, items: list[tuple[str, str, str]]) -> list[RewardResult]:
        """Score every (prompt, response, reference) item; results are in item order.

        Blocks until every item has a result. If anything escapes (Ctrl-C, a worker that cannot load
        fn), the runner closes itself first: in-flight answers would otherwise arrive during a later run.
        """
        if not self._finalizer.alive:
            raise RuntimeError("RewardRunner is closed")
        for i, item in enumerate(items):
            if not (
                isinstance(item, tuple | list) and len(item) == 3 and all(isinstance(s, str) for s in item)
            ):
                raise TypeError(
                    f"items[{i}] must be a (prompt, response, reference) tuple of str, got {item!r}"
                )
        results: list[RewardResult | None] = [None] * len(items)
        pending = deque(range(len(items)))
        try:
            while pending or any(w.state == "busy" for w in self._workers):
                for w in list(self._workers):
                    if w.state == "idle" and pending:
                        w.index = pending.popleft()
                        try:
                            w.conn.send((w.index, *items[w.index]))
                        except OSError:  # died while idle (killed from outside): retry the item elsewhere
                            pending.appendleft(w.index)
                            self._replace(w)
                            continue
                        w.state, w.since = "busy", time.monotonic()
                deadlines = [
                    w.since + (self.timeout_s if w.state == "busy" else self.startup_timeout_s)
                    for w in self._workers
                    if w.state in ("busy", "starting")
                ]
                wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                connection.wait(
                    [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers], wait_s
                )
                now = time.monotonic()
                for w in list(self._workers):
                    if not self._service(w, results):
                        self._replace(w)
                    elif w.state == "busy" and now - w.since >= self.timeout_s:
                        self._fail(
                            results, w, f"timeout after {self.timeout_s} s", now - w.since, timeout=True
                        )
                        self._replace(w)
                    elif w.state == "starting" and now - w.since >= self.startup_timeout_s:
                        raise RuntimeError(
                            f"reward worker not ready after startup_timeout_s({self.startup_timeout_s})"
                        )
        except BaseException:
            self.close()
            raise
        return results

    def close(self) -> None:
        """Stop every worker (graceful exit, then SIGKILL) and reap it. Idempotent."""
        self._finalizer()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

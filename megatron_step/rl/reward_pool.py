"""The isolating worker pool that scores rewards: each `RewardFn` call runs in a worker process with a
timeout, so user reward code cannot crash or stall the trainer.

    from megatron_step.rl.reward_pool import RewardRunner
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
import math
import numbers
import pickle
import signal
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing import connection, get_context

from megatron_step.rl.rewards import RewardFn

__all__ = ["RewardResult", "RewardRunner"]


@dataclass
class RewardResult:
    """The outcome of one reward call."""

    value: float  # the reward; 0.0 when failed, so a batch of results is always usable as-is
    failed: bool  # True when the call raised, timed out, returned a non-finite/non-number, or crashed
    error: str | None  # why it failed: "timeout after 2.0 s", "ValueError: ...", "worker died (...)"
    seconds: float  # wall time of the call (measured in the worker; for a timeout, until the kill)
    # what happened, for a reward that says (its `detailed` method, e.g. the code reward's "pass",
    # "fail", "timeout", "crash"); None for a plain RewardFn or a failed call
    outcome: str | None = None


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + "..."


def _worker_main(conn, payload: bytes) -> None:
    """Body of one reward worker process.

    Wire protocol on `conn` (a duplex Pipe): the worker first sends ("ready", None), or
    ("init_error", text) if `fn` cannot be unpickled here (e.g. it lives in a module this fresh
    interpreter cannot import) and exits. Then, for each (index, prompt, response, reference) it
    receives, it sends (index, value, error, seconds, outcome); None asks it to exit. A fn with a
    `detailed(prompt, response, reference) -> (value, outcome label)` method is called through it.
    fn is unpickled here, not passed as a Process argument, so that failure is reported as text
    instead of a traceback on stderr.
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
    detailed = getattr(fn, "detailed", None)
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
        outcome = None
        try:
            if detailed is not None:
                out, outcome = detailed(prompt, response, reference)
                outcome = None if outcome is None else str(outcome)
            else:
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
        conn.send((index, value, error, time.perf_counter() - t0, None if error else outcome))


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
                index, value, error, seconds, outcome = msg
                results[index] = RewardResult(
                    value=value, failed=error is not None, error=error, seconds=seconds, outcome=outcome
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

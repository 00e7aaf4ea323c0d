"""Helper rewards for tests/rl/test_rewards.py, in their own module because RewardRunner's spawned
workers unpickle a fn by importing its module: importing this one costs a worker almost nothing, while
importing the test module would pull pytest into every worker (~0.15 s CPU each, several times that on
a loaded machine, which the timeout tests would then be measuring).

Only the standard library and nothing from the project: a worker start-up stays a bare interpreter.
"""

from __future__ import annotations

import math
import os
import time


def length_reward(prompt: str, response: str, reference: str) -> float:
    """Well-behaved: the response length, so each result is checkable against its own item."""
    return float(len(response))


def misbehaving_reward(prompt: str, response: str, reference: str) -> float:
    """Misbehaves on demand, chosen by the response text; otherwise the response length."""
    if response == "raise":
        raise ValueError(f"bad response for {prompt!r}")
    if response == "nan":
        return math.nan
    if response == "inf":
        return -math.inf
    if response == "str":
        return "1.0"  # a str would sneak through float(); the runner must refuse it
    if response == "hang":
        time.sleep(60)
    if response == "die":
        os._exit(3)
    return float(len(response))


def one(prompt: str, response: str, reference: str) -> float:
    return 1.0


def _explode_on_load():
    raise RuntimeError("cannot be rebuilt in the worker")


class Unloadable:
    """Pickles fine in the parent, fails to unpickle in the worker: a fn whose module is missing there."""

    def __call__(self, prompt: str, response: str, reference: str) -> float:
        return 0.0

    def __reduce__(self):
        return (_explode_on_load, ())


def flaky_reward(prompt: str, response: str, reference: str) -> float:
    """For the RL loop test: raises on about 1 in 5 items and hangs on about 1 in 17 (chosen by a
    stable hash of the item), else 1.0 when the reference appears in the response."""
    import hashlib

    h = int(hashlib.sha256((prompt + "|" + response).encode()).hexdigest(), 16)
    if h % 5 == 0:
        raise RuntimeError("flaky reward")
    if h % 17 == 1:
        time.sleep(60)
    return 1.0 if reference in response else 0.0


def broken_reward(prompt: str, response: str, reference: str) -> float:
    """Always raises: every call is a failed reward call (tools/evaluate.py counts them)."""
    raise RuntimeError("this reward is broken")


def always_right(prompt: str, response: str, reference: str) -> float:
    """1 for any response (a source every response solves)."""
    return 1.0

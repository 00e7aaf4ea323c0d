"""Run an untrusted Python program in a sandbox: its own process tree, resource limits, a private work
directory, no network, no writes outside the sandbox (where the OS allows; posttrain/README.md says what
is isolated on which host).

    from megatron_step.rl.sandbox import SandboxConfig, run_program
    res = run_program("print(input()[::-1])", stdin="abc\\n", cfg=SandboxConfig())
    res.status, res.stdout                         # "ok", "cba\\n"

Two modes, chosen by `SandboxConfig.isolation`:
- "namespaces" (the default where the host allows it, "auto"): `unshare` (util-linux) gives the
  program's runner fresh network, mount and PID namespaces (and, when the trainer is not root, a user
  namespace). Inside: no network interface but a down loopback, every mount read-only, a private tmpfs
  on /tmp, /var/tmp and /dev/shm (gone with the run), /proc of its own PID namespace only, and every
  process the program started dies with it. Run by root, the program gets a fresh uid of its own, so
  RLIMIT_NPROC holds (root is exempt from it) and file permissions apply.
- "rlimits" (hosts without unprivileged namespaces): the same rlimits, its own session and a temporary
  work directory; the network is reachable, the filesystem is protected only by permissions, and a
  process that leaves the program's session can outlive it.

Why by hand: no library in the field's list sandboxes code; this uses the kernel's own mechanisms
(namespaces, rlimits) through `unshare` and the standard library instead of a container runtime,
which a training node may not have.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass

__all__ = ["SandboxConfig", "SandboxError", "ProgramResult", "isolation_available", "run_program"]

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")
_UNSHARE = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
# fresh uids for programs run by root: 2**20 + 16 per trainer-side process (its pid) + a counter, so
# concurrent sandboxes never share a uid and so never share an RLIMIT_NPROC budget
_UID_BASE, _UID_SLOTS = 1 << 20, 16
_counter = itertools.count()
_counter_lock = threading.Lock()


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): an infrastructure error, never a wrong answer."""


@dataclass
class SandboxConfig:
    """Limits of one program run (the code reward's `rl.code.*`)."""

    cpu_s: float = 5.0  # CPU seconds of each process (RLIMIT_CPU, whole seconds, rounded up)
    wall_s: float = 10.0  # wall-clock limit of the run: a sleeping or blocked program is stopped too
    memory_mb: int = 1024  # address space of each process (RLIMIT_AS); an interpreter needs ~30 MB
    file_mb: int = 16  # largest file written (RLIMIT_FSIZE); the private tmpfs holds 4 x this
    nproc: int = 32  # processes of the program's uid (RLIMIT_NPROC): a fork bomb stops here
    output_kb: int = 256  # stdout / stderr kept (the rest is read and dropped)
    isolation: str = "auto"  # auto (namespaces where the host allows) | namespaces | rlimits
    # the interpreter that runs the program (stdlib only: -I -S); None: the trainer's base interpreter
    python: str | None = None

    def __post_init__(self):
        for name in ("cpu_s", "wall_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"rl.code.{name}={getattr(self, name)}: must be > 0")
        for name, low in (("memory_mb", 64), ("file_mb", 1), ("nproc", 2), ("output_kb", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"rl.code.{name}={getattr(self, name)}: must be >= {low}")
        if self.isolation not in ("auto", "namespaces", "rlimits"):
            raise ValueError(f"rl.code.isolation={self.isolation!r}: expected auto, namespaces or rlimits")


@dataclass
class ProgramResult:
    """What a run gave. status: "ok" (finished; for tests: all passed), "assertion" (a test failed),
    "error" (raised: `detail` names the exception), "timeout" (CPU or wall clock), "signal" (killed by
    `signal`), "no_result" (exited without the harness's report, e.g. os._exit(0) before its tests)."""

    status: str
    detail: str
    exit_code: int | None
    signal: str | None
    stdout: str
    stderr: str
    seconds: float
    isolation: dict


def _unshare_prefix() -> list[str]:
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, *_UNSHARE]


@functools.cache
def isolation_available() -> str | None:
    """None when namespaces mode works on this host, else why not (one line)."""
    if shutil.which("unshare") is None:
        return "no `unshare` (util-linux) on PATH"
    try:
        p = subprocess.run([*_unshare_prefix(), "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    return None if p.returncode == 0 else f"unshare failed: {p.stderr.strip() or p.returncode}"


def _mode(cfg: SandboxConfig) -> str:
    if cfg.isolation == "rlimits":
        return "rlimits"
    why = isolation_available()
    if why is None:
        return "namespaces"
    if cfg.isolation == "namespaces":
        raise SandboxError(f"rl.code.isolation=namespaces but this host cannot: {why}")
    return "rlimits"


def _python(cfg: SandboxConfig) -> tuple[str, str]:
    """(interpreter, its prefix) for the program."""
    if cfg.python:
        exe = shutil.which(cfg.python) or cfg.python
        if not os.access(exe, os.X_OK):
            raise SandboxError(f"rl.code.python={cfg.python!r}: not an executable")
        exe = os.path.realpath(exe)
        return exe, os.path.dirname(os.path.dirname(exe))
    exe = os.path.realpath(sys.executable)  # a venv's python is a link to its base interpreter
    return exe, os.path.realpath(sys.base_prefix)


def _user_processes() -> int:
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                n += os.stat(f"/proc/{pid}").st_uid == uid
    return n


def run_program(
    source: str,
    stdin: str = "",
    cfg: SandboxConfig | None = None,
    tests: str | None = None,
    entry_point: str | None = None,
) -> ProgramResult:
    """Run `source` in the sandbox. With `tests` (Python code: asserts, or a `check(candidate)` called on
    `entry_point`, HumanEval's shape) the tests run after the source in the same namespace; without,
    the source runs as __main__ with `stdin`. Raises SandboxError when the sandbox itself fails."""
    cfg = cfg or SandboxConfig()
    mode = _mode(cfg)
    python, prefix = _python(cfg)
    root = os.geteuid() == 0
    with _counter_lock:
        slot = next(_counter) % _UID_SLOTS
    uid = _UID_BASE + (os.getpid() % 60000) * _UID_SLOTS + slot if root and mode == "namespaces" else None
    # root without a uid of its own is exempt from RLIMIT_NPROC; another user's count includes the
    # trainer's own processes (outside a user namespace), so the budget is on top of those
    nproc = cfg.nproc if uid is not None or mode == "namespaces" else _user_processes() + cfg.nproc
    spec = asdict(cfg) | {
        "mode": mode, "source": source, "stdin": stdin, "tests": tests, "entry_point": entry_point,
        "harness_mode": "tests" if tests is not None else "stdio", "uid": uid, "nproc_limit": nproc,
        "python": python, "python_prefix": prefix,
    }  # fmt: skip
    work = None
    argv = [os.path.realpath(sys.executable), "-I", "-S", _RUNNER]
    if mode == "namespaces":
        argv = [*_unshare_prefix(), *argv]
    else:
        work = tempfile.mkdtemp(prefix="sandbox-")
        spec["work_dir"] = work
    try:
        p = subprocess.run(
            argv, input=json.dumps(spec), capture_output=True, text=True, timeout=cfg.wall_s + 30
        )
    except subprocess.TimeoutExpired as e:
        raise SandboxError(f"the sandbox runner did not finish within {cfg.wall_s + 30} s") from e
    except OSError as e:
        raise SandboxError(f"could not start the sandbox runner: {e}") from e
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    try:
        out = json.loads(p.stdout)
    except json.JSONDecodeError:
        tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        raise SandboxError(f"the sandbox runner gave no result ({mode} mode): {tail}") from None
    if out["status"] == "infra_error":
        raise SandboxError(f"the sandbox failed ({mode} mode): {out['detail']}")
    out.pop("stdout_bytes", None), out.pop("stderr_bytes", None)
    return ProgramResult(**out)

"""megatron_step.rl.sandbox: each hostile program ends in a named result, and nothing it started or
wrote outlives the run. Namespaces mode where the host allows it (skipped, with the reason, where
not); the rlimits mode everywhere."""

import contextlib
import os
import socket
import tempfile
import threading

import pytest

from megatron_step.rl.sandbox import SandboxConfig, SandboxError, isolation_available, run_program

NS = pytest.mark.skipif(isolation_available() is not None, reason=f"no namespaces: {isolation_available()}")
FAST = dict(cpu_s=2, wall_s=4)


def _cmdlines_with(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    line = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in line:
                found.append(f"{pid}: {line}")
    return found


def _sandbox_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("sandbox-")}


@pytest.fixture(params=["namespaces", "rlimits"])
def cfg(request):
    if request.param == "namespaces" and isolation_available() is not None:
        pytest.skip(f"no namespaces on this host: {isolation_available()}")
    before = _sandbox_dirs()
    yield SandboxConfig(isolation=request.param, **FAST)
    assert _sandbox_dirs() == before, "a work directory was left behind"


def test_a_script_reads_stdin_and_its_output_comes_back(cfg):
    res = run_program("import sys\nprint(sys.stdin.read()[::-1].strip())", stdin="abc\n", cfg=cfg)
    assert (res.status, res.stdout, res.isolation["mode"]) == ("ok", "cba\n", cfg.isolation)


def test_tests_pass_fail_or_never_run(cfg):
    check = "def check(f):\n    assert f(3) == 9\n"
    good = run_program("def sq(x):\n    return x * x\n", cfg=cfg, tests=check, entry_point="sq")
    assert good.status == "ok"
    bad = run_program("def sq(x):\n    return x + x\n", cfg=cfg, tests=check, entry_point="sq")
    assert bad.status == "assertion"
    # exiting "successfully" before the tests run is not a pass
    early = run_program("import os\nos._exit(0)\n", cfg=cfg, tests="assert False\n")
    assert early.status == "no_result" and early.exit_code == 0
    assert run_program("import sys\nsys.exit(0)\n", cfg=cfg, tests="assert False\n").status == "error"


def test_an_infinite_loop_and_a_sleep_time_out(cfg):
    cfg.cpu_s, cfg.wall_s = 1, 60  # the CPU limit, whatever the load on this machine
    loop = run_program("while True:\n    pass\n", cfg=cfg)
    assert loop.status == "timeout" and "CPU" in loop.detail, loop
    cfg.wall_s = 2
    sleep = run_program("import time\ntime.sleep(60)\n", cfg=cfg)
    assert sleep.status == "timeout" and "wall" in sleep.detail and 1.9 < sleep.seconds < 10, sleep


def test_a_10_gb_allocation_is_a_memory_error(cfg):
    res = run_program("x = bytearray(10 * 1024**3)\n", cfg=cfg)
    assert res.status == "error" and res.detail.startswith("MemoryError"), res


def test_a_crash_by_signal_is_named(cfg):
    res = run_program("import ctypes\nctypes.string_at(0)\n", cfg=cfg)
    assert (res.status, res.signal) == ("signal", "SIGSEGV")


def test_output_beyond_the_cap_is_dropped_not_blocking(cfg):
    cfg.output_kb = 4
    res = run_program("print('x' * 10_000_000)\n", cfg=cfg)
    assert res.status == "ok" and len(res.stdout) == 4096


@NS
def test_a_fork_bomb_stops_at_the_process_limit_and_leaves_nothing():
    marker = "4242.1717"  # a sleep no other process runs: found in /proc if a child survived
    bomb = (
        "import os\nkids = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        f"            os.execv('/bin/sleep', ['sleep', '{marker}'])\n        kids += 1\n"
        "finally:\n    print(kids, flush=True)\n"
    )
    res = run_program(bomb, cfg=SandboxConfig(nproc=16, **FAST))
    assert res.status == "error" and "BlockingIOError" in res.detail, res
    assert 0 < int(res.stdout) < 16  # stopped at the limit, with live children at the time
    assert _cmdlines_with(marker) == []


@NS
def test_a_process_that_leaves_the_session_dies_with_the_run():
    marker = "4343.1818"
    daemon = (
        "import os\nif os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv('/bin/sleep', ['sleep', '{marker}'])\nprint('parent done')\n"
    )
    res = run_program(daemon, cfg=SandboxConfig(**FAST))
    assert (res.status, res.stdout) == ("ok", "parent done\n")
    assert _cmdlines_with(marker) == []


@NS
def test_writes_outside_the_work_directory_fail_or_vanish():
    # a directory of this host outside /tmp (the sandbox has its own /tmp): this test's own
    target = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"_evil_{os.getpid()}.txt")
    res = run_program(f"open({target!r}, 'w').write('x')\n", cfg=SandboxConfig(**FAST))
    assert res.status == "error" and ("Read-only" in res.detail or "Permission" in res.detail), res
    assert not os.path.exists(target)
    # /tmp is the sandbox's own tmpfs: the write succeeds there and is gone after the run
    leak = os.path.join("/tmp", "sandbox-leak-check.txt")
    write_read = f"open({leak!r}, 'w').write('x')\nprint(open({leak!r}).read())\n"
    res = run_program(write_read, cfg=SandboxConfig(**FAST))
    assert (res.status, res.stdout) == ("ok", "x\n") and not os.path.exists(leak)
    # a file larger than file_mb is refused, and so is more than 4 x file_mb in all
    one_mb = SandboxConfig(file_mb=1, **FAST)
    big = run_program("open('big', 'wb').write(b'x' * (2 << 20))\n", cfg=one_mb)
    assert big.status == "error" and "File too large" in big.detail, big
    many = "for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * 1000_000)\n"
    full = run_program(many, cfg=one_mb)
    assert full.status == "error" and "No space left on device" in full.detail, full


@NS
def test_no_network_not_even_a_server_on_this_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        with contextlib.suppress(OSError):
            accepted.append(server.accept())

    t = threading.Thread(target=accept)
    t.start()
    connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    res = run_program(connect, cfg=SandboxConfig(**FAST))
    t.join()
    server.close()
    assert res.status == "error" and "Network is unreachable" in res.detail, res
    assert accepted == []


def test_bad_settings_and_a_missing_interpreter_are_clear():
    with pytest.raises(ValueError, match=r"rl.code.isolation='docker'"):
        SandboxConfig(isolation="docker")
    with pytest.raises(ValueError, match=r"rl.code.memory_mb=10: must be >= 64"):
        SandboxConfig(memory_mb=10)
    with pytest.raises(SandboxError, match=r"rl.code.python='/no/such/python'"):
        run_program("print(1)", cfg=SandboxConfig(python="/no/such/python"))

"""The inside of one code sandbox run (megatron_step.rl.sandbox): stdlib only, started as
`python -I -S sandbox_runner.py` with a JSON spec on stdin, prints one JSON result on stdout.

It is not imported by the library; `sandbox.run_program` starts it, in namespaces mode under
`unshare --net --mount --pid --fork --kill-child --mount-proc` (so this process is PID 1 of a fresh PID
namespace: when it exits, the kernel kills every process the program left behind) and, when the trainer
is not root, `--user --map-root-user` as well. What it does there, in order:

1. mount namespace: every mount made private, then remounted read-only (best effort, counted); a
   fresh tmpfs (size 4 x `file_mb`) on /tmp, /var/tmp and /dev/shm; the work directory /tmp/work;
2. the interpreter: when the program runs as another uid, the interpreter's prefix is bind-mounted
   read-only at /tmp/.python (the trainer's Python may live under a directory only root can enter);
3. the program: its own session, a fresh uid when the runner is the real root (so RLIMIT_NPROC holds:
   root is exempt from it), rlimits (CPU, address space, file size, processes, open files, no core),
   a minimal environment, stdout/stderr captured up to `output_kb`, a wall-clock limit;
4. the harness (`_harness.py` in the work directory) runs the solution and reports on a private pipe,
   with a per-run nonce, whether the tests passed, failed an assertion or raised: a program that exits
   early (`os._exit(0)`, `sys.exit()`) cannot pass for one that ran its tests. It runs in the program's
   own interpreter, so a program that introspects the interpreter could still forge the report: the
   sandbox bounds what a program can do, not whether it is honest.

In rlimits mode (no namespaces on this host) steps 1-2 are skipped and the work directory is the one
the parent made; processes that leave the program's session can outlive it (posttrain/README.md,
"Code reward").
"""

import contextlib
import ctypes
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
_FLAG = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME}
_FLAG.update({"nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME})

HARNESS = r"""
import os, sys
_r, _w, _mode, _entry = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
_nonce = os.read(_r, 64).decode()
os.close(_r)
_pid = os.getpid()


def _report(status, detail=""):
    if os.getpid() != _pid:  # a forked child of the program: only the program's own process reports
        os._exit(1)
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os.write(_w, (_nonce + "\n" + status + "\n" + detail[:2000]).encode("utf-8", "replace"))
    os.close(_w)


def _main():
    sys.argv = ["solution.py"]
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    g = {"__name__": "__main__" if _mode == "stdio" else "solution", "__builtins__": __builtins__}
    try:
        exec(compile(source, "solution.py", "exec"), g)
        if _mode == "tests":
            with open("tests.py", encoding="utf-8") as f:
                tests = f.read()
            exec(compile(tests, "tests.py", "exec"), g)
            if _entry:
                g["check"](g[_entry])
    except SystemExit as e:
        if _mode == "stdio" and e.code in (None, 0):
            _report("ok")
        else:
            _report("error", "SystemExit: %r" % (e.code,))
        raise
    except AssertionError as e:
        _report("assertion", "AssertionError: %s" % (e,))
        return 1
    except BaseException as e:
        _report("error", "%s: %s" % (type(e).__name__, e))
        return 1
    _report("ok")
    return 0


sys.exit(_main())
"""


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, src, target, fstype, flags, data=None) -> int:
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        return ctypes.get_errno()
    return 0


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount, parents first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            flags = 0
            for opt in fields[5].split(","):
                flags |= _FLAG.get(opt, 0)
            out.append((point, flags))
    return out


def _isolate_filesystem(spec: dict, info: dict) -> None:
    libc = _libc()
    err = _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    if err:
        raise OSError(err, f"making the mounts private: {os.strerror(err)}")
    ro = failed = 0
    for point, flags in _mount_points():
        if point == "/proc" or point.startswith("/proc/"):
            continue
        if _mount(libc, None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags):
            failed += 1
        else:
            ro += 1
    info["read_only_mounts"], info["read_only_failed"] = ro, failed
    size = f"size={4 * int(spec['file_mb'])}m,mode=1777"  # room for a few files of the largest size
    for point in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(point):
            err = _mount(libc, "tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, size)
            if err:
                raise OSError(err, f"mounting a tmpfs on {point}: {os.strerror(err)}")


def _bind_python(spec: dict) -> tuple[str, dict]:
    """The interpreter's prefix bind-mounted read-only at /tmp/.python -> (its executable there, env)."""
    libc = _libc()
    prefix, exe = spec["python_prefix"], spec["python"]
    os.mkdir("/tmp/.python", 0o755)
    for flags in (MS_BIND | MS_REC, MS_BIND | MS_REMOUNT | MS_RDONLY):
        err = _mount(libc, prefix if not flags & MS_REMOUNT else None, "/tmp/.python", None, flags)
        if err:
            raise OSError(err, f"bind-mounting {prefix}: {os.strerror(err)}")
    rel = os.path.relpath(exe, prefix)
    return os.path.join("/tmp/.python", rel), {"LD_LIBRARY_PATH": "/tmp/.python/lib"}


def _reader(stream, cap: int, box: list) -> None:
    """Keep the first `cap` bytes of `stream` in box[0] as they come (box[1]: bytes seen), drain the
    rest: a chatty program never blocks, and a process holding the pipe open never stalls the run."""
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            break
        box[1] += len(chunk)
        if len(box[0]) < cap:
            box[0] += chunk[: cap - len(box[0])]


def _read_report(fd: int) -> str:
    """The harness's report, written before the program exited: read what the pipe holds now, without
    waiting for EOF (a process the program left behind may still hold the write end)."""
    os.set_blocking(fd, False)
    data = bytearray()
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    os.close(fd)
    return data.decode("utf-8", "replace")


def _limits(spec: dict, uid: int | None):
    def apply():
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        cpu = max(1, int(-(-spec["cpu_s"] // 1)))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        mem = int(spec["memory_mb"]) << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        fsize = int(spec["file_mb"]) << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NPROC, (spec["nproc_limit"], spec["nproc_limit"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _child_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def run(spec: dict) -> dict:
    info: dict = {"mode": spec["mode"]}
    namespaces = spec["mode"] == "namespaces"
    uid = spec.get("uid")  # a fresh uid for the program (the runner is the real root), or None
    python, env = spec["python"], {}
    if namespaces:
        _isolate_filesystem(spec, info)
        work = "/tmp/work"
        os.mkdir(work, 0o700)
        if uid is not None:
            python, env = _bind_python(spec)
    else:
        work = spec["work_dir"]
    files = {"solution.py": spec["source"], "_harness.py": HARNESS}
    if spec.get("tests") is not None:
        files["tests.py"] = spec["tests"]
    for name, text in files.items():
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(text)
    if uid is not None:
        for name in [*files, "."]:
            os.chown(os.path.join(work, name), uid, uid)
    info["uid"] = uid if uid is not None else os.getuid()
    nonce = secrets.token_hex(16)
    nonce_r, nonce_w = os.pipe()
    report_r, report_w = os.pipe()
    os.set_inheritable(report_r, False)
    os.write(nonce_w, nonce.encode())
    os.close(nonce_w)
    env.update({"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"})
    env["PYTHONHASHSEED"] = "0"
    argv = [python, "-I", "-S", "_harness.py", str(nonce_r), str(report_w), spec["harness_mode"]]
    argv.append(spec.get("entry_point") or "")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(nonce_r, report_w), preexec_fn=_limits(spec, uid), start_new_session=True,
    )  # fmt: skip
    os.close(nonce_r)
    os.close(report_w)
    cap = int(spec["output_kb"]) << 10
    boxes = [[bytearray(), 0], [bytearray(), 0]]
    threads = [
        threading.Thread(target=_reader, args=(s, cap, b), daemon=True)
        for s, b in ((proc.stdout, boxes[0]), (proc.stderr, boxes[1]))
    ]
    for t in threads:
        t.start()

    def feed():
        try:
            proc.stdin.write(spec.get("stdin", "").encode())
            proc.stdin.close()
        except OSError:  # the program exited without reading its input
            pass

    threading.Thread(target=feed, daemon=True).start()
    wall_timeout = False
    try:
        proc.wait(timeout=float(spec["wall_s"]))
    except subprocess.TimeoutExpired:
        wall_timeout = True
    seconds = time.monotonic() - t0
    # whatever the program left (its process group; in a PID namespace: every process but this one)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if namespaces and os.getpid() == 1:  # PID 1 of the sandbox's PID namespace: never the host's -1
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    proc.wait()
    report = _read_report(report_r)
    for t in threads:
        t.join(1.0)  # rlimits mode: a process that left the session may hold the pipes open
    lines = report.split("\n", 2)
    status, detail = "no_result", ""
    if len(lines) >= 2 and lines[0] == nonce:
        status, detail = lines[1], lines[2] if len(lines) > 2 else ""
    code = proc.returncode
    sig = signal.Signals(-code).name if code is not None and code < 0 else None
    if wall_timeout:
        status, detail = "timeout", f"wall clock over {spec['wall_s']} s"
    elif sig == "SIGXCPU" or (sig == "SIGKILL" and _child_cpu() >= spec["cpu_s"]):
        # the kernel's RLIMIT_CPU signals: SIGXCPU at the soft limit, SIGKILL at the hard one (+1 s)
        status, detail = "timeout", f"CPU time over {spec['cpu_s']} s"
    elif sig is not None and status in ("no_result", "ok"):
        status, detail = "signal", sig
    elif status == "no_result" and code == 0:
        detail = "the program exited before its tests finished"
    elif status == "no_result":
        tail = bytes(boxes[1][0]).decode("utf-8", "replace").strip().splitlines()
        status, detail = "error", tail[-1] if tail else f"exit code {code}"
    out = {"status": status, "detail": detail, "exit_code": code, "signal": sig, "seconds": seconds}
    for key, box in (("stdout", boxes[0]), ("stderr", boxes[1])):
        out[key], out[key + "_bytes"] = bytes(box[0]).decode("utf-8", "replace"), box[1]
    out["isolation"] = info
    return out


if __name__ == "__main__":
    try:
        result = run(json.load(sys.stdin))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent as an infrastructure error
        result = {"status": "infra_error", "detail": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()

"""The golden runs: deterministic CPU runs of the real entry points whose per-step scalars are kept in
tests/golden/*.txt. tests/test_golden.py reruns them and compares (rtol 1e-5; in practice they are
bit-identical on the machine that wrote them).

    python -m tests.golden.runs                  # run all, compare with the files, print the tables
    python -m tests.golden.runs --write          # regenerate every file (see "When to regenerate")
    python -m tests.golden.runs --write rl_sync  # one of them (with the runs it depends on)

When to regenerate: only in a commit that is *meant* to change the numbers (a new default, a fixed
bug in a loss, a different data order), saying why in the commit message; a refactor must leave every
file unchanged. A file also changes when the environment does (Python's stdlib -- the embedded
corpus --, torch, megatron-core, the CPU's instruction set): each file's header records the one that
wrote it.

Every run is pinned to 2 intra-op threads and to ATen's AVX2 kernels and MKL's AVX2 code path
(`ATEN_CPU_CAPABILITY`, `MKL_CBWR`), so a machine with more cores or AVX-512 computes the same sums in
the same order -- mostly: two x86 CPUs with the same software have been seen to part in the last bit of
a loss after a few steps (the test suite's CI machines changed CPU; the code that had passed there gave
other numbers on the new one, equal to what HEAD gave), and 30 optimizer steps amplify that into
percent. So a golden file may have one variant per machine class: `<file>.txt` and
`<file>@<machine>.txt`, `<machine>` a hash of the CPU model and its ISA flags (each file's header
names them), and a run passes when it reproduces one variant.

    python -m tests.golden.runs --add-machine    # add this machine's variant of every file

`--add-machine` is for a commit that did *not* change the numbers, on a machine no variant matches:
check first that the last commit whose golden test passed (on another machine) gives, here, the same
numbers as this one (`git worktree add /tmp/old <commit>`, run this module there with
`PYTHONPATH=/tmp/old` and `--work /tmp/old_runs`, then `python tools/loss_compare.py /tmp/old_runs/<run>
runs/golden/<run> --assert-equal`). `--write` (a change meant to move the numbers) replaces every
variant with this machine's one file: the others cannot be remade here and would be stale.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from megatron_step.testing import golden

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
RTOL = 1e-5
ENV = {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "PYTHONHASHSEED": "0"}
# The runs' own TorchInductor cache (Megatron-Core compiles its fused MoE / activation helpers with
# torch.compile): with torch 2.14.1 a kernel cached by a process pinned to AVX2 and then loaded by one
# on AVX-512 (every other test, a user's run) corrupted the heap -- "corrupted size vs. prev_size"
# in Megatron-Core's MoE permute, measured on an AVX-512 machine; a cache of its own keeps the two apart.
CACHE_ENV = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(tempfile.gettempdir(), "torchinductor_golden_avx2")}


@dataclass
class Run:
    """One entry-point run; `outputs` maps a golden file name to (run dir relative to the work dir,
    the scalars kept). A run that starts from another's checkpoint (rl_e3rl from rl_sync's warm-up)
    makes that checkpoint itself when it is missing, with the same numbers."""

    name: str
    script: str
    config: str
    overrides: list[str]
    outputs: dict[str, tuple[str, list[str]]]
    describe: str = ""


_PRETRAIN = [
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "data.seq_length=64",
    "model.seq_length=64",
    "train.steps=30",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.log_interval=10",
    "train.eval_interval=0",
    "train.eval_steps=2",
    "train.save_interval=0",
    "optim.warmup_steps=5",
]
_RL = [
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "train.micro_batch_size=4",
    "train.log_interval=100",
    "rl.sft_steps=60",
    "rl.sft_global_batch_size=8",
    "rl.prompts_per_step=2",
    "rl.group_size=4",
    "rl.max_new_tokens=24",
    "rl.eval_problems=8",
    "rl.eval_samples=1",
    "rl.reward_workers=1",
]
_MMRPT = [
    "mmrpt.scenes=48",
    "mmrpt.heldout_scenes=16",
    "mmrpt.reader=webdataset",
    "mmrpt.warmup_steps=40",
    "mmrpt.batch_size=4",
    "mmrpt.prompts_per_step=2",
    "mmrpt.group_size=4",
    "mmrpt.max_new_tokens=6",
    "mmrpt.eval_interval=0",
    "train.steps=3",
    "train.micro_batch_size=4",
    "train.save_interval=0",
]

RUNS = [
    Run(
        "pretrain",
        "pretrain/pretrain_step.py",
        "examples/tiny/tiny.yaml",
        [*_PRETRAIN, "data.data_dir={work}/data", "train.run_dir={work}/pretrain"],
        {
            "pretrain_tiny": (
                "pretrain",
                [
                    "train/lm_loss",
                    "train/mtp_1_loss",
                    "train/mtp_2_loss",
                    "train/mtp_3_loss",
                    "train/grad_norm",
                    "val/lm_loss",
                ],
            )
        },
        describe="tiny preset (MTP-3) on the embedded corpus, 30 steps, 1 process",
    ),
    Run(
        "rl_sync",
        "posttrain/train_rl.py",
        "examples/rl/rl_tiny.yaml",
        [
            *_RL,
            "train.steps=6",
            "train.eval_interval=6",
            "data.data_dir={work}/data",
            "train.run_dir={work}/rl_sync",
            "rl.init_from={work}/rl_sft",
        ],
        {
            "rl_sft": ("rl_sft", ["train/lm_loss", "train/grad_norm"]),
            "rl_sync": (
                "rl_sync",
                [
                    "rl/reward_mean",
                    "rl/accuracy_train",
                    "rl/response_length",
                    "policy/loss",
                    "policy/mismatch_kl",
                    "train/grad_norm",
                    "rl/accuracy_heldout",
                ],
            ),
        },
        describe="supervised warm-up (60 steps) then 6 sync MIS-PO steps on generated arithmetic",
    ),
    Run(
        "rl_e3rl",
        "posttrain/train_rl.py",
        "examples/rl/rl_tiny.yaml",
        [
            *_RL,
            "train.steps=4",
            "train.eval_interval=4",
            "rl.rollout=e3rl",
            "rl.e3rl.segment_len=8",
            "rl.e3rl.num_segments=3",
            "rl.e3rl.threshold_std=0.0",
            "data.data_dir={work}/data",
            "train.run_dir={work}/rl_e3rl",
            "rl.init_from={work}/rl_sft",
        ],
        {
            "rl_e3rl": (
                "rl_e3rl",
                [
                    "rl/reward_mean",
                    "e3rl/erasures_per_rollout",
                    "e3rl/tokens_regenerated",
                    "policy/loss",
                    "train/grad_norm",
                    "rl/accuracy_heldout",
                ],
            )
        },
        describe="4 RL steps with E3RL erasable rollouts from the rl_sync warm-up checkpoint",
    ),
    Run(
        "mmrpt",
        "pretrain/pretrain_mmrpt.py",
        "examples/mmrpt/mmrpt_tiny.yaml",
        [
            *_MMRPT,
            "mmrpt.data_dir={work}/mmrpt_data",
            "mmrpt.init_from={work}/mmrpt_warmup",
            "train.run_dir={work}/mmrpt",
        ],
        {
            "mmrpt_warmup": ("mmrpt_warmup", ["train/lm_loss", "train/grad_norm"]),
            "mmrpt_rl": (
                "mmrpt",
                [
                    "mmrpt/reward_total",
                    "mmrpt/mask_threshold",
                    "policy/loss",
                    "train/grad_norm",
                    "eval/attribute_accuracy",
                    "eval/d_roc_auc",
                    "eval/caption_loss",
                ],
            ),
        },
        describe="generated scenes, caption warm-up (40 steps), then 3 MMRPT (GRPO) steps",
    ),
]
BY_NAME = {r.name: r for r in RUNS}
FILES = {f: r for r in RUNS for f in r.outputs}


_ISA_FLAGS = (
    "fma",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)


def machine() -> tuple[str, str]:
    """(tag, description) of this machine's CPU: its model name and the ISA flags that can change a
    kernel's arithmetic; the tag is 8 hex digits of their hash."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    desc = f"{model} [{' '.join(f for f in _ISA_FLAGS if f in flags)}]"
    return hashlib.sha1(desc.encode()).hexdigest()[:8], desc


def variants(file: str) -> list[str]:
    """The paths of `file`'s golden variants: `<file>.txt` first, then `<file>@<machine>.txt`."""
    main = os.path.join(GOLDEN_DIR, file + ".txt")
    extra = sorted(glob.glob(os.path.join(GOLDEN_DIR, glob.escape(file) + "@*.txt")))
    return ([main] if os.path.exists(main) else []) + extra


def check(work: str, file: str) -> tuple[bool, str]:
    """(whether the run in `work` reproduces one of `file`'s variants, a report: the matching
    variant, or for each a one-line summary and the mismatched rows of the closest)."""
    got = curves_of(work, file)
    paths = variants(file)
    if not paths:
        return False, f"{file}: no golden file in {GOLDEN_DIR} (python -m tests.golden.runs --write {file})"
    results = []
    for path in paths:
        rows = golden.compare(golden.read_table(path)[1], got, rtol=RTOL)
        if rows and all(r.ok for r in rows):
            table = golden.format_rows(rows, ("golden", "this run"))
            return True, f"{path} reproduced (rtol {RTOL}):\n{table}"
        results.append((sum(not r.ok for r in rows) if rows else 1 << 30, path, rows))
    tag, desc = machine()
    lines = [f"{file}: no golden variant reproduced (rtol {RTOL}); this machine is {tag}: {desc}"]
    lines += [f"  {path}: {n} of {len(rows)} values mismatched" for n, path, rows in results]
    _, path, rows = min(results, key=lambda r: r[0])
    lines.append(f"closest, {path}:\n" + golden.format_rows(rows, ("golden", "this run"), only_bad=True))
    lines.append(
        "If the code did not change the numbers but the machine differs, see tests/golden/runs.py "
        "(--add-machine)."
    )
    return False, "\n".join(lines)


def environment() -> str:
    """What the numbers depend on besides the code: one line for the file headers."""
    import torch
    from megatron.core.package_info import __shortversion__ as mcore

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, megatron-core {mcore}, "
        f"{platform.machine()}, {ENV}"
    )


def execute(run: Run, work: str, log=print) -> float:
    """Run `run` (its `needs` must have run in `work`); returns its wall time."""
    args = [a.format(work=work) for a in run.overrides]
    cmd = [sys.executable, os.path.join(REPO, run.script), "--config", run.config, *args]
    env = {**os.environ, **ENV, **CACHE_ENV, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(
            f"golden run {run.name} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}"
            f"\n{proc.stderr[-6000:]}"
        )
    dt = time.perf_counter() - t0
    log(f"{run.name}: {dt:.0f} s")
    return dt


def curves_of(work: str, file: str) -> golden.Curves:
    run_dir, keys = FILES[file].outputs[file]
    return golden.read_run(os.path.join(work, run_dir), keys)


def header(file: str, how: str = "--write") -> list[str]:
    run = FILES[file]
    cmd = " ".join([f"python {run.script} --config {run.config}", *run.overrides])
    return [
        f"golden: {file} -- {run.describe}",
        f"written by: python -m tests.golden.runs {how} {file}   (tests/golden/runs.py says when)",
        f"command ({{work}} = a scratch dir): {cmd}",
        f"environment: {environment()}",
        "machine: {1} ({0})".format(*machine()),
    ]


def plan(names: list[str]) -> list[Run]:
    """The runs that produce `names` (file or run names), in RUNS order."""
    unknown = [n for n in names if n not in FILES and n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown golden file or run {unknown[0]!r}; known: {', '.join(FILES)}")
    wanted = {FILES[n].name if n in FILES else n for n in names}
    return [r for r in RUNS if r.name in wanted]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"golden files or runs (default: all): {', '.join(FILES)}")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--write", action="store_true", help="regenerate the files (all variants) instead")
    how.add_argument(
        "--add-machine",
        action="store_true",
        help="add this machine's variant to files no variant reproduces (code unchanged)",
    )
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "golden"), help="scratch directory")
    ap.add_argument(
        "--no-run", action="store_true", help="use the run directories already in --work (do not run again)"
    )
    args = ap.parse_args(argv)
    runs = plan(args.names or list(FILES))
    for run in runs if not args.no_run else []:
        execute(run, args.work)
    bad = 0
    for run in runs:
        for file in run.outputs:
            # a name that is a file's (rl_sync is a run's and a file's) selects that file only
            chosen = file in args.names or (run.name in args.names and run.name not in FILES)
            if args.names and not chosen:
                continue
            if args.write:
                for old in variants(file):
                    os.remove(old)
                path = os.path.join(GOLDEN_DIR, file + ".txt")
                golden.write_table(path, curves_of(args.work, file), header(file))
                print(f"wrote {path}")
                continue
            ok, report = check(args.work, file)
            if args.add_machine and not ok:
                path = os.path.join(GOLDEN_DIR, f"{file}@{machine()[0]}.txt")
                golden.write_table(path, curves_of(args.work, file), header(file, "--add-machine"))
                print(f"wrote {path}")
                continue
            print(f"== {file}\n{report}\n")
            bad += not ok
    return 1 if bad and not args.add_machine else 0


if __name__ == "__main__":
    sys.exit(main())

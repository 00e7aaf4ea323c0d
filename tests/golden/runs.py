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
the same order.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from megatron_step.testing import golden

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
RTOL = 1e-5
ENV = {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "PYTHONHASHSEED": "0"}


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


def environment() -> str:
    """What the numbers depend on besides the code: one line for the file headers."""
    import platform

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
    env = {**os.environ, **ENV, "PYTHONWARNINGS": "ignore"}
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


def header(file: str) -> list[str]:
    run = FILES[file]
    cmd = " ".join([f"python {run.script} --config {run.config}", *run.overrides])
    return [
        f"golden: {file} -- {run.describe}",
        f"written by: python -m tests.golden.runs --write {file}   (tests/golden/runs.py says when)",
        f"command ({{work}} = a scratch dir): {cmd}",
        f"environment: {environment()}",
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
    ap.add_argument("--write", action="store_true", help="regenerate the files instead of comparing")
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "golden"), help="scratch directory")
    args = ap.parse_args(argv)
    runs = plan(args.names or list(FILES))
    for run in runs:
        execute(run, args.work)
    bad = 0
    for run in runs:
        for file in run.outputs:
            if args.names and file not in args.names and run.name not in args.names:
                continue
            path = os.path.join(GOLDEN_DIR, file + ".txt")
            got = curves_of(args.work, file)
            if args.write:
                golden.write_table(path, got, header(file))
                print(f"wrote {path}")
                continue
            rows = golden.compare(golden.read_table(path)[1], got, rtol=RTOL)
            print(f"== {file}\n{golden.format_rows(rows, ('golden', 'this run'))}\n")
            bad += sum(not r.ok for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

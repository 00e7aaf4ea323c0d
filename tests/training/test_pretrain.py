"""Text pretraining end to end on the embedded corpus: TensorBoard scalars, bit-exact resume,
crash-safe checkpoints, 2-process parity, layout dry-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_step import platform
from megatron_step.config.run import RLRunConfig, load_run_config
from megatron_step.stages.pretrain import dry_run, pretrain, start_state
from megatron_step.testing import run_distributed
from megatron_step.testing.golden import read_run
from megatron_step.training import checkpoint
from megatron_step.training.dry_run import format_report
from megatron_step.training.setup import build_model_and_optimizer
from tests.golden import runs

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def data_dir(embedded_data):
    return embedded_data  # tests/conftest.py: shared with the golden runs


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_run_logs_every_scalar_to_tensorboard(golden_run):
    """The golden pretraining run (tests/golden/runs.py: the entry point, 30 steps, MTP-3) logged
    every scalar of docs/metrics.md's training table, at the steps it should."""
    run_dir = os.path.join(golden_run("pretrain"), "pretrain")
    curves = read_run(run_dir)
    for tag in (
        "train/lm_loss",
        "train/mtp_1_loss",
        "train/mtp_2_loss",
        "train/mtp_3_loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "train/step_ms",
        "train/optimizer_step_ms",
        "train/tflops_per_device",
        "train/mfu",
        "train/skipped_iterations",
        "moe/dropped_tokens",
        "val/lm_loss",
    ):
        assert tag in curves, (tag, sorted(curves))
    assert sorted(curves["train/lm_loss"]) == list(range(1, 31))
    assert sorted(curves["val/lm_loss"]) == [30]  # eval_interval 0: validation at the last step only
    assert max(curves["train/skipped_iterations"].values()) == 0.0
    moe_layers = range(2, 8)  # tiny: layers 2..7 are MoE (Megatron numbers layers from 1)
    for layer in moe_layers:
        for kind in ("load_max", "load_min"):
            assert sorted(curves[f"moe/{kind}/layer_{layer + 1:02d}"]) == [10, 20, 30]  # log_interval 10
    assert os.path.exists(os.path.join(run_dir, "run_info.json"))


def test_resume_is_bit_exact(data_dir, tmp_path):
    full = run_distributed(train, 1, data_dir, str(tmp_path / "a"), ("train.steps=6",))[0]
    b = str(tmp_path / "b")
    first = run_distributed(train, 1, data_dir, b, ("train.steps=6", "train.exit_after=3"))[0]
    second = run_distributed(train, 1, data_dir, b, ("train.steps=6", "train.resume=true"))[0]
    assert len(first["losses"]) == 3 and second["start"] == 3
    assert first["losses"] + second["losses"] == full["losses"]
    # the weights of the uninterrupted run and of the resumed one, read back from their final checkpoints
    a, b = run_distributed(final_weights, 1, data_dir, [str(tmp_path / "a"), b], ("train.steps=6",))[0]
    assert a.keys() == b.keys() and len(a) > 10
    for name, p in a.items():
        assert torch.equal(p, b[name]), name


@pytest.mark.slow  # make test-all; the default suite resumes bit-exactly in one process
def test_macro_layer_wise_resume_on_two_ranks(data_dir, tmp_path):
    """MACRO under the layer-wise distributed optimizer (+ ZeRO-1 AdamW for the rest), DP=2: its
    momentum goes through dist-checkpointing; the radius is re-read from W (fp32 rounding)."""
    opt = ("train.steps=4", "optim.optimizer=macro", "optim.lr=0.01")
    pick = lambda runs: next(r for r in runs if r["losses"])  # noqa: E731
    full = pick(run_distributed(train, 2, data_dir, str(tmp_path / "a"), opt))
    b = str(tmp_path / "b")
    first = pick(run_distributed(train, 2, data_dir, b, (*opt, "train.exit_after=2")))
    second = pick(run_distributed(train, 2, data_dir, b, (*opt, "train.resume=true")))
    assert second["start"] == 2
    assert first["losses"] + second["losses"] == pytest.approx(full["losses"], rel=1e-6)


def test_kill_9_during_save_keeps_previous_checkpoint(data_dir, tmp_path):
    latest_step = checkpoint.latest_step
    run_dir = str(tmp_path / "run")
    # first run: a complete checkpoint at step 2
    run_distributed(train, 1, data_dir, run_dir, ("train.steps=2",))
    assert latest_step(run_dir) == 2
    # second run resumes, saves at step 4 and pauses mid-save (shards written, not committed): kill it
    env = dict(os.environ, MEGATRON_STEP_SAVE_PAUSE_S="120", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "pretrain/pretrain_step.py",
        "--config",
        "examples/tiny/tiny.yaml",
        "--resume",
        *BASE,
        f"data.data_dir={data_dir}",
        f"train.run_dir={run_dir}",
        "train.steps=4",
    ]
    # its own process group, so the kill takes its checkpoint-writer worker with it (as a node
    # failure would) instead of leaving that child orphaned after the test
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    tmp_dir = os.path.join(run_dir, "checkpoints", "iter_0000004.tmp")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isdir(tmp_dir) and os.listdir(tmp_dir)):
        assert proc.poll() is None, "training exited before its save"
        time.sleep(0.5)
    time.sleep(2)  # the shards are being written / the save is paused
    os.killpg(proc.pid, signal.SIGKILL)  # the group we started (its id is the leader's pid)
    proc.wait()
    assert os.path.isdir(tmp_dir), "expected an uncommitted checkpoint"
    assert latest_step(run_dir) == 2
    out = run_distributed(load_latest, 1, data_dir, run_dir, ("train.steps=4",))[0]
    assert out == {"step": 2, "finite": True}


@pytest.mark.slow  # make test-all; DP = 2 steps == 1 process: tests/platform, tests/models
def test_two_process_dp_matches_one_process(data_dir, golden_run, tmp_path, monkeypatch):
    """DP=2 (distributed optimizer over 2 ranks) follows the 1-process golden pretraining run (the
    same config and kernels, tests/golden/runs.py) step for step."""
    one = read_run(os.path.join(golden_run("pretrain"), "pretrain"), ["train/lm_loss"])["train/lm_loss"]
    for name in ("ATEN_CPU_CAPABILITY", "MKL_CBWR"):  # the golden run's kernels (its thread count differs)
        monkeypatch.setenv(name, runs.ENV[name])
    for name, value in runs.CACHE_ENV.items():  # and its kernel cache (runs.py says why)
        monkeypatch.setenv(name, value)
    overrides = [a for a in runs.BY_NAME["pretrain"].overrides if "{work}" not in a]
    # "spawn": fresh interpreters read those variables (a forkserver's ranks inherit the server's kernels)
    two = run_distributed(
        train, 2, data_dir, str(tmp_path / "two"), (*overrides, "train.exit_after=4"), start_method="spawn"
    )
    curve = next(r["losses"] for r in two if r["losses"])
    assert curve == pytest.approx([one[s] for s in range(1, 5)], rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# MTP staging: MTP-1 alone, then MTP-2/3 from it (train.init_from + train.mtp_init_from_first)
# ---------------------------------------------------------------------------------------------------
MTP1_ALONE = ("model.mtp_loss_weights=[0.3,0.0,0.0]",)
JOINT = ("model.mtp_loss_weights=[0.1,0.09,0.081]", "train.steps=1")


@pytest.fixture(scope="module")
def mtp1_run(embedded_data, tmp_path_factory):
    """Phase 1: 20 steps with only MTP-1 in the loss (MTP-2/3 keep their initial weights)."""
    run_dir = str(tmp_path_factory.mktemp("mtp1") / "run")
    run_distributed(train, 1, embedded_data, run_dir, ("train.steps=20", *MTP1_ALONE))
    return run_dir


def staged_start(rank, world_size, data_dir, run_dir, extra=()):
    """Build as a pretraining run does and start it (start_state): what it recorded, and this rank's
    MTP parameters as {(module, name): tensor}."""
    cfg = config(data_dir, run_dir, *extra)
    chunks, opt, sched = _built(data_dir, run_dir, extra)
    start, info = start_state(cfg.train, chunks, opt, sched)
    mtp = {}
    for c in chunks:
        for n, p in c.module.named_parameters():
            if m := re.search(r"mtp\.layers\.(\d+)\.(.+)$", n):
                mtp[(int(m.group(1)), m.group(2))] = p.detach().clone()
    return start, info, mtp


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_mtp_staging_copies_mtp_1_into_mtp_2_and_3(layout, mtp1_run, embedded_data, tmp_path):
    """After the copy every MTP module equals module 1 on the ranks that hold them (under TP each
    shard; under PP only the last stage holds MTP); without it they differ (module 2/3 untrained)."""
    world, par = {"tp2": (2, ("parallel.tp=2",)), "pp2": (2, ("parallel.pp=2",))}[layout]
    extra = (*JOINT, *par, f"train.init_from={mtp1_run}")
    staged = run_distributed(
        staged_start, world, embedded_data, str(tmp_path / "s"), (*extra, "train.mtp_init_from_first=true")
    )
    held = [mtp for _, _, mtp in staged if mtp]
    assert len(held) == (1 if layout == "pp2" else world)
    for start, info, _ in staged:
        assert start == 0 and info["init_from"] == f"{mtp1_run} step 20"
        assert info["mtp_init_from_first"].startswith(f"{len(held) * len(held[0]) * 2 // 3} tensors")
    for mtp in held:
        assert {k for k, _ in mtp} == {0, 1, 2}
        for (k, name), p in mtp.items():
            assert torch.equal(p, mtp[(0, name)]), (k, name)
    one_process = (*JOINT, f"train.init_from={mtp1_run}")
    (plain,) = run_distributed(staged_start, 1, embedded_data, str(tmp_path / "p"), one_process)
    mtp = plain[2]
    differ = [n for (k, n), p in mtp.items() if k == 1 and not torch.equal(p, mtp[(0, n)])]
    assert len(differ) > len(mtp) // 6 and "mtp_init_from_first" not in plain[1]


def test_mtp_staging_starts_the_joint_phase_with_trained_mtp_2_and_3(mtp1_run, embedded_data, tmp_path):
    """The joint phase's first MTP-2/3 losses: from MTP-1's weights far below those of the untrained
    modules the same phase starts with without the copy."""
    joint = (*JOINT, f"train.init_from={mtp1_run}")
    losses = {}
    for arm, more in (("staged", ("train.mtp_init_from_first=true",)), ("plain", ())):
        run_distributed(train, 1, embedded_data, str(tmp_path / arm), (*joint, *more))
        curves = read_run(str(tmp_path / arm), ["train/mtp_1_loss", "train/mtp_2_loss", "train/mtp_3_loss"])
        losses[arm] = {k: v[1] for k, v in curves.items()}
    s, p = losses["staged"], losses["plain"]
    assert s["train/mtp_1_loss"] == pytest.approx(p["train/mtp_1_loss"], rel=1e-6), losses  # same MTP-1
    for d in (2, 3):
        assert s[f"train/mtp_{d}_loss"] < p[f"train/mtp_{d}_loss"] - 0.3, losses


def test_train_init_from_is_pretrainings_own():
    with pytest.raises(ValueError, match="needs train.init_from"):
        load_run_config("examples/tiny/tiny.yaml", ["train.mtp_init_from_first=true"])
    with pytest.raises(ValueError, match="needs >= 2 MTP modules"):
        load_run_config(
            "examples/tiny/tiny.yaml",
            [
                "train.init_from=x",
                "train.mtp_init_from_first=true",
                "model.mtp_num_layers=1",
                "model.mtp_loss_weights=[0.3]",
            ],
        )
    with pytest.raises(ValueError, match="RL runs start from rl.init_from"):
        load_run_config("examples/rl/rl_tiny.yaml", ["train.init_from=x"], RLRunConfig)


def test_dry_run_of_the_report_layout_on_4096_gpus():
    cfg = load_run_config("examples/step35_flash/step35_flash.yaml")
    report = run_distributed(_dry, 1, cfg, 4096)[0]
    assert "pp=8 vpp=2" in report and "ep=8" in report and "dp=512" in report
    assert "peak per GPU" in report
    with pytest.raises(
        ValueError, match=r"etp\(1\) \* ep\(8\) \* pp\(8\) = 64 does not divide world size 4000"
    ):
        dry_run(cfg, 4000)
    bad = load_run_config("examples/step35_flash/step35_flash.yaml", ["parallel.pipeline_layout=null"])
    with pytest.raises(ValueError, match=r"num_layers\(45\) is not divisible by pp\(8\)"):
        dry_run(bad, 4096)


# ---------------------------------------------------------------------------------------------------
# process bodies (module-level so they pickle into spawned ranks)
# ---------------------------------------------------------------------------------------------------
# A small, quick run of the tiny preset on the embedded corpus.
BASE = [
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "data.seq_length=64",
    "model.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.log_interval=2",
    "train.eval_interval=0",
    "train.eval_steps=2",
    "train.save_interval=0",
    "optim.warmup_steps=2",
]


def config(data_dir: str, run_dir: str, *extra: str):
    return load_run_config(
        "examples/tiny/tiny.yaml", [*BASE, f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", *extra]
    )


def train(rank, world_size, data_dir, run_dir, extra=()):
    out = pretrain(config(data_dir, run_dir, *extra))
    return {"losses": out["losses"], "val_loss": out["val_loss"], "start": out["start"]}


def _built(data_dir, run_dir, extra):
    cfg = config(data_dir, run_dir, *extra)
    platform.setup(cfg.parallel, seed=cfg.train.seed)
    return build_model_and_optimizer(cfg.model_config(), cfg.parallel, cfg.optim, cfg.train.steps)


def load_latest(rank, world_size, data_dir, run_dir, extra=()):
    """Build model + optimizer as a run would and load the latest checkpoint; returns its step."""
    chunks, opt, sched = _built(data_dir, run_dir, extra)
    info = checkpoint.load_checkpoint(run_dir, chunks, opt, sched)
    total = sum(float(p.detach().double().sum()) for c in chunks for p in c.module.parameters())
    return {"step": info["step"], "finite": bool(torch.isfinite(torch.tensor(total)))}


def final_weights(rank, world_size, data_dir, run_dirs, extra=()):
    """Per run directory, the model weights of its latest checkpoint by name (1 process)."""
    chunks, _, _ = _built(data_dir, run_dirs[0], extra)
    out = []
    for run_dir in run_dirs:
        checkpoint.load_model_weights(run_dir, chunks)
        out.append({n: p.detach().clone() for c in chunks for n, p in c.module.named_parameters()})
    return out


def _dry(rank, world_size, cfg, world):
    return format_report(dry_run(cfg, world))

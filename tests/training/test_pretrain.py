"""Text pretraining end to end on the embedded corpus: TensorBoard scalars, bit-exact resume,
crash-safe checkpoints, 2-process parity, layout dry-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_step.config.run import load_run_config
from megatron_step.testing import run_distributed
from tests.training import _bodies

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_run_logs_every_scalar_to_tensorboard(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = str(tmp_path / "run")
    out = run_distributed(_bodies.train, 1, data_dir, run_dir, ("train.steps=6", "train.eval_interval=3"))[0]
    assert len(out["losses"]) == 6 and out["val_loss"] is not None
    ea = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "lm loss",
        "mtp_1 loss",
        "mtp_2 loss",
        "mtp_3 loss",
        "lr",
        "grad norm",
        "tokens per sec",
        "TFLOPs per device",
        "MFU",
        "moe/dropped_tokens",
        "val loss",
    ):
        assert tag in tags, (tag, sorted(tags))
    moe_layers = range(2, 8)  # tiny: layers 2..7 are MoE (Megatron numbers layers from 1)
    for layer in moe_layers:
        assert (
            f"expert_load/max/layer_{layer + 1:02d}" in tags
            and f"expert_load/min/layer_{layer + 1:02d}" in tags
        )
    losses = [e.value for e in ea.Scalars("lm loss")]
    assert losses == pytest.approx(out["losses"])
    assert [e.step for e in ea.Scalars("val loss")] == [3, 6]
    assert "run_info" in ea.Tags()["tensors"] or os.path.exists(os.path.join(run_dir, "run_info.json"))


def test_resume_is_bit_exact(data_dir, tmp_path):
    full = run_distributed(_bodies.train, 1, data_dir, str(tmp_path / "a"), ("train.steps=6",))[0]
    b = str(tmp_path / "b")
    first = run_distributed(_bodies.train, 1, data_dir, b, ("train.steps=6", "train.exit_after=3"))[0]
    second = run_distributed(_bodies.train, 1, data_dir, b, ("train.steps=6", "train.resume=true"))[0]
    assert len(first["losses"]) == 3 and second["start"] == 3
    assert first["losses"] + second["losses"] == full["losses"]
    for name, p in full["params"].items():
        assert torch.equal(p, second["params"][name]), name


def test_macro_layer_wise_resume_on_two_ranks(data_dir, tmp_path):
    """MACRO under the layer-wise distributed optimizer (+ ZeRO-1 AdamW for the rest), DP=2: its
    momentum goes through dist-checkpointing; the radius is re-read from W (fp32 rounding)."""
    opt = ("train.steps=4", "optim.optimizer=macro", "optim.lr=0.01")
    pick = lambda runs: next(r for r in runs if r["losses"])  # noqa: E731
    full = pick(run_distributed(_bodies.train, 2, data_dir, str(tmp_path / "a"), opt))
    b = str(tmp_path / "b")
    first = pick(run_distributed(_bodies.train, 2, data_dir, b, (*opt, "train.exit_after=2")))
    second = pick(run_distributed(_bodies.train, 2, data_dir, b, (*opt, "train.resume=true")))
    assert second["start"] == 2
    assert first["losses"] + second["losses"] == pytest.approx(full["losses"], rel=1e-6)


def test_kill_9_during_save_keeps_previous_checkpoint(data_dir, tmp_path):
    from megatron_step.training.checkpoint import latest_step

    run_dir = str(tmp_path / "run")
    # first run: a complete checkpoint at step 2
    run_distributed(_bodies.train, 1, data_dir, run_dir, ("train.steps=2",))
    assert latest_step(run_dir) == 2
    # second run resumes, saves at step 4 and pauses mid-save (shards written, not committed): kill it
    env = dict(os.environ, MEGATRON_STEP_SAVE_PAUSE_S="120", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "pretrain/pretrain_step.py",
        "--config",
        "examples/tiny/tiny.yaml",
        "--resume",
        *_bodies.BASE,
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
    out = run_distributed(_bodies.load_latest, 1, data_dir, run_dir, ("train.steps=4",))[0]
    assert out == {"step": 2, "finite": True}


def test_two_process_dp_matches_one_process(data_dir, tmp_path):
    one = run_distributed(_bodies.train, 1, data_dir, str(tmp_path / "one"), ("train.steps=4",))[0]
    two = run_distributed(_bodies.train, 2, data_dir, str(tmp_path / "two"), ("train.steps=4",))
    curve = next(r["losses"] for r in two if r["losses"])
    assert curve == pytest.approx(one["losses"], rel=1e-5)


def test_dry_run_of_the_report_layout_on_4096_gpus():
    from megatron_step.training.dry_run import dry_run

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


def _dry(rank, world_size, cfg, world):
    from megatron_step.training.dry_run import dry_run, format_report

    return format_report(dry_run(cfg, world))

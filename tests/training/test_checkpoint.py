"""Checkpoint integrity and the run-directory rules (megatron_step.training.checkpoint): a damaged
newest checkpoint -- a truncated shard, deleted metadata, changed bytes of the same size -- is named
and the previous complete one loaded; a re-save that fails never costs the complete copy; keep_last
retention; train.resume never / auto / required and train.overwrite."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_step import platform
from megatron_step.models.step_flash import tiny
from megatron_step.optim.config import OptimConfig
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed
from megatron_step.training import checkpoint
from megatron_step.training.config import TrainConfig
from megatron_step.training.setup import build_model_and_optimizer

pytestmark = pytest.mark.distributed


def _model():
    return tiny()


def _weights(chunks) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items() if torch.is_tensor(v)}


def _save_steps(rank, world_size, run_dir, steps, keep_last=0):
    """Save a tiny model at each of `steps`, its weights shifted by the step (so loads tell them
    apart); the weights of each save."""
    platform.setup(ParallelConfig(), seed=7)
    chunks, opt, sched = build_model_and_optimizer(_model(), ParallelConfig(), OptimConfig(), 10)
    opt.step()  # zero gradients: the optimizer state exists to save
    saved = {}
    for s in steps:
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(1.0)
        checkpoint.save_checkpoint(
            run_dir, s, chunks, opt, sched, {"tag": s}, rank_state={"r": s}, keep_last=keep_last
        )
        saved[s] = _weights(chunks)
    return saved


def _load(rank, world_size, run_dir, fallback=True):
    """resolve_latest, then load_checkpoint: (step, extra tag, rank_state, weights)."""
    platform.setup(ParallelConfig(), seed=8)
    chunks, opt, sched = build_model_and_optimizer(_model(), ParallelConfig(), OptimConfig(), 10)
    step = checkpoint.resolve_latest(run_dir, fallback=fallback)
    out = checkpoint.load_checkpoint(run_dir, chunks, opt, sched, step=step)
    return out["step"], out["extra"]["tag"], out["rank_state"], _weights(chunks)


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    """A run directory with complete checkpoints of steps 1 and 2, and their weights."""
    root = tmp_path_factory.mktemp("ckpt")
    run_dir = str(root / "run")
    saved = run_distributed(_save_steps, 1, run_dir, [1, 2])[0]
    return run_dir, saved


def _copy(run_dir: str, dst) -> str:
    import shutil

    shutil.copytree(run_dir, dst)
    return str(dst)


def _shard(run_dir: str, step: int) -> str:
    d = checkpoint.checkpoint_dir(run_dir, step)
    shards = [n for n in os.listdir(d) if n.endswith(".distcp")]
    return os.path.join(d, sorted(shards)[0])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_intact_run_loads_its_newest_checkpoint_with_its_rank_state(two_saves):
    run_dir, saved = two_saves
    assert checkpoint.verify(checkpoint.checkpoint_dir(run_dir, 2)) is None
    step, tag, rank_state, weights = run_distributed(_load, 1, run_dir)[0]
    assert (step, tag, rank_state) == (2, 2, {"r": 2})
    assert _same(weights, saved[2])


@pytest.mark.parametrize("damage", ["truncated shard", "deleted metadata", "changed bytes"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_loaded(damage, two_saves, tmp_path, capfd):
    run_dir = _copy(two_saves[0], tmp_path / "run")
    saved = two_saves[1]
    shard = _shard(run_dir, 2)
    if damage == "truncated shard":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
        bad = shard
    elif damage == "deleted metadata":
        bad = os.path.join(checkpoint.checkpoint_dir(run_dir, 2), ".metadata")
        os.remove(bad)
    else:  # the same size, other bytes: only the CRC-32 can tell
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        bad = shard
    assert checkpoint.verify(checkpoint.checkpoint_dir(run_dir, 2)) is not None
    assert checkpoint.resolve_latest(run_dir) == 1  # in this process, to read its message
    err = capfd.readouterr().err
    assert f"step 2 is damaged -- {bad}" in err, err
    assert os.path.isdir(checkpoint.checkpoint_dir(run_dir, 2) + ".damaged")  # kept for inspection
    assert checkpoint.saved_steps(run_dir) == [1]
    step, tag, _, weights = run_distributed(_load, 1, run_dir)[0]
    assert (step, tag) == (1, 1)
    assert _same(weights, saved[1])


def test_without_fallback_a_damaged_checkpoint_stops_the_run(two_saves, tmp_path):
    run_dir = _copy(two_saves[0], tmp_path / "run")
    shard = _shard(run_dir, 2)
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.raises(
        checkpoint.RunDirError, match=r"step 2 is damaged .*truncated or replaced.*checkpoint_fallback=false"
    ):
        checkpoint.resolve_latest(run_dir, fallback=False)


def _failing_resave(rank, world_size, run_dir):
    """Re-save step 2 with other weights, failing after the shards are written (before the commit)."""
    platform.setup(ParallelConfig(), seed=9)
    chunks, opt, sched = build_model_and_optimizer(_model(), ParallelConfig(), OptimConfig(), 10)
    opt.step()

    def fail(*a, **k):
        raise OSError("injected: the disk filled up")

    checkpoint._write_manifest, real = fail, checkpoint._write_manifest
    try:
        checkpoint.save_checkpoint(run_dir, 2, chunks, opt, sched, {"tag": 99})
    except OSError as e:
        return str(e)
    finally:
        checkpoint._write_manifest = real
    return None


def test_a_resave_that_fails_keeps_the_complete_copy(two_saves, tmp_path):
    run_dir = _copy(two_saves[0], tmp_path / "run")
    assert run_distributed(_failing_resave, 1, run_dir)[0] == "injected: the disk filled up"
    step, tag, _, weights = run_distributed(_load, 1, run_dir)[0]
    assert (step, tag) == (2, 2)
    assert _same(weights, two_saves[1][2])


def test_a_moved_aside_copy_is_put_back(two_saves, tmp_path):
    """A crash between moving the complete copy aside and committing the new one (the `.old` step)."""
    run_dir = _copy(two_saves[0], tmp_path / "run")
    d = checkpoint.checkpoint_dir(run_dir, 2)
    os.rename(d, d + ".old")
    assert checkpoint.resolve_latest(run_dir) == 2
    assert os.path.isdir(d) and not os.path.exists(d + ".old")


def test_keep_last_keeps_the_newest(tmp_path):
    run_dir = str(tmp_path / "run")
    run_distributed(_save_steps, 1, run_dir, [1, 2, 3, 4], 2)
    assert checkpoint.saved_steps(run_dir) == [3, 4]
    assert checkpoint.latest_step(run_dir) == 4


def test_resume_modes_and_overwrite(two_saves, tmp_path):
    run_dir = _copy(two_saves[0], tmp_path / "run")
    os.makedirs(os.path.join(run_dir, "tensorboard"))
    held = r"holds a run \(checkpoints up to step 2\): train.resume=auto"
    with pytest.raises(checkpoint.RunDirError, match=held):
        checkpoint.resume_step(TrainConfig(run_dir=run_dir))
    assert checkpoint.resume_step(TrainConfig(run_dir=run_dir, resume="auto")) == 2
    assert checkpoint.resume_step(TrainConfig(run_dir=run_dir, resume=True)) == 2  # true means auto
    assert checkpoint.resume_step(TrainConfig(run_dir=run_dir, resume="required")) == 2
    assert checkpoint.resume_step(TrainConfig(run_dir=run_dir, overwrite=True)) is None
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    assert not os.path.exists(os.path.join(run_dir, "tensorboard"))
    assert checkpoint.resume_step(TrainConfig(run_dir=run_dir, resume="auto")) is None
    with pytest.raises(checkpoint.RunDirError, match="train.resume=required: no checkpoint under"):
        checkpoint.resume_step(TrainConfig(run_dir=run_dir, resume="required"))
    with pytest.raises(ValueError, match=r"train.resume='maybe': one of never, auto, required"):
        TrainConfig(resume="maybe")

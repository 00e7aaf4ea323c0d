"""MMRPT end to end at toy size: shards with deliberately corrupted samples (the run continues and the
skip counter is right), caption warm-up, then MMRPT (D(s) masking, rollouts with the image in the
prefill, semantic-visual reward, GRPO update) and the caption-imitation baseline from the same
checkpoint; TensorBoard scalars and the result file."""

from __future__ import annotations

import json
import os
import random

import pytest
import webdataset as wds

from megatron_step.config.run import MMRPTRunConfig, load_run_config
from megatron_step.data.shards import scene_samples, write_shards
from megatron_step.stages.mmrpt import train_mmrpt
from megatron_step.testing import run_distributed
from megatron_step.testing.golden import read_run
from megatron_step.training.checkpoint import checkpoint_dir, latest_step

pytestmark = pytest.mark.distributed

SKIPPED = {"truncated_tar": 1, "bad_jpeg": 1, "missing_caption": 1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmrpt_data")
    train, heldout = root / "train", root / "heldout"
    os.makedirs(train)
    write_shards(scene_samples(48, seed=5), str(train), samples_per_shard=24, progress=False)
    write_shards(scene_samples(16, seed=6), str(heldout), samples_per_shard=16, progress=False)
    extra = list(scene_samples(4, seed=9))

    def sample(i, **kw):
        jpg, cap, meta = extra[i]
        s = {"__key__": f"x{i:08d}", "jpg": jpg, "txt": cap.encode(), "json": json.dumps(meta).encode()}
        s.update(kw)
        return {k: v for k, v in s.items() if v is not None}

    with wds.TarWriter(str(train / "shard-000002.tar"), encoder=False, mtime=0) as w:
        w.write(sample(0))
        w.write(sample(1, txt=None))  # missing caption
        w.write(sample(2, jpg=random.Random(0).randbytes(500)))  # bad JPEG
        w.write(sample(3))
    path = train / "shard-000003.tar"  # a truncated tar: cut inside its only sample's image
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        w.write(sample(0) | {"__key__": "y00000000"})
    os.truncate(path, 1200)
    return str(train / "shard-*.tar"), str(heldout / "shard-*.tar"), str(root)


def _run(rank, world_size, overrides):
    return train_mmrpt(load_run_config("examples/mmrpt/mmrpt_tiny.yaml", overrides, MMRPTRunConfig))


def _overrides(shards, run_dir, objective):
    train, heldout, data_dir = shards
    return [
        f"mmrpt.shards={train}",
        f"mmrpt.heldout_shards={heldout}",
        f"mmrpt.data_dir={data_dir}",
        f"mmrpt.init_from={data_dir}/warmup",
        "mmrpt.warmup_steps=3",
        "mmrpt.batch_size=4",
        "mmrpt.prompts_per_step=2",
        "mmrpt.group_size=4",
        "mmrpt.max_new_tokens=6",
        "mmrpt.eval_interval=0",
        f"mmrpt.objective={objective}",
        "train.steps=2",
        "train.micro_batch_size=4",
        "train.save_interval=1",
        f"train.run_dir={run_dir}",
    ]


@pytest.fixture(scope="module")
def rl_run(shards, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("rl"))
    return run_dir, run_distributed(_run, 1, _overrides(shards, run_dir, "rl"))[0]


def test_mmrpt_run_skips_corrupt_samples_and_logs_rewards(rl_run):
    run_dir, rl = rl_run
    # the corrupt samples were skipped and counted; every good one was read (48 + 2)
    assert rl["data"]["train"]["skipped"] == SKIPPED
    assert rl["data"]["train"]["samples"] == 50
    assert rl["warmup"]["last_loss"] < rl["warmup"]["first_loss"]
    for key in ("attribute_accuracy", "exact_match", "well_formed", "d_roc_auc", "caption_loss"):
        assert key in rl["start"] and key in rl["end"]
    steps = rl["history"]
    assert [h["step"] for h in steps] == [1, 2]
    assert all(
        "mmrpt/reward_total" in h and "mmrpt/mask_threshold" in h and "policy/loss" in h for h in steps
    )
    scalars = set(read_run(run_dir))
    assert {
        "mmrpt/reward_total",
        "mmrpt/reward_attribute",
        "mmrpt/mask_visual_precision",
        "eval/d_roc_auc",
    } <= scalars
    assert os.path.exists(os.path.join(run_dir, "result.json"))
    assert latest_step(run_dir) == 2 and os.path.isdir(checkpoint_dir(run_dir, 1))  # mid-run save + final


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if "seconds" not in k and "per_sec" not in k} for h in history]


def test_a_resumed_mmrpt_run_equals_the_uninterrupted_one(shards, rl_run, tmp_path):
    """The 2-step MMRPT run of `rl_run` again, stopped after step 1 (train.exit_after) and resumed:
    the same history, end evaluation and TensorBoard scalars, bit for bit (one process)."""
    straight_dir, straight = rl_run
    run_dir = str(tmp_path / "cut")
    ov = _overrides(shards, run_dir, "rl")
    first = run_distributed(_run, 1, [*ov, "train.exit_after=1"])[0]
    assert first["exited_at"] == 1 and "end" not in first
    resumed = run_distributed(_run, 1, [*ov, "train.resume=auto"])[0]
    assert [h["step"] for h in resumed["history"]] == [1, 2]  # step 1 from the checkpoint's record
    assert _untimed(resumed["history"]) == _untimed(straight["history"])
    assert resumed["end"] == straight["end"] and resumed["start"] == straight["start"]
    a, b = read_run(straight_dir), read_run(run_dir)
    keys = [k for k in a if "seconds" not in k and "per_sec" not in k]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.slow
def test_caption_baseline_starts_from_the_same_warmup(shards, rl_run, tmp_path):
    """The baseline loads the warm-up checkpoint the MMRPT run wrote (no second warm-up) and is
    evaluated on the same held-out tasks."""
    _, rl = rl_run
    cap = run_distributed(_run, 1, _overrides(shards, str(tmp_path / "cap"), "caption"))[0]
    assert cap["warmup"] is None
    assert cap["start"]["attribute_accuracy"] == rl["start"]["attribute_accuracy"]
    assert cap["start"]["caption_loss"] == pytest.approx(rl["start"]["caption_loss"], rel=1e-6)
    assert all("train/lm_loss" in h for h in cap["history"])


@pytest.mark.slow
def test_mmrpt_runs_data_parallel_on_two_ranks(shards, tmp_path):
    """DP=2: each rank takes half of the step's captions; metrics are averaged over ranks, so both
    ranks return the same history (the model's DP parity is tests/models/test_vlm.py)."""
    ov = _overrides(shards, str(tmp_path / "dp2"), "rl")
    ov[ov.index(f"mmrpt.init_from={shards[2]}/warmup")] = f"mmrpt.init_from={tmp_path}/warmup"
    a, b = run_distributed(_run, 2, ov)
    assert a["data"]["train"]["skipped"] == SKIPPED
    assert a["history"] == b["history"]
    assert all("mmrpt/reward_total" in h for h in a["history"])

"""Platform layer: capability detection, ParallelConfig validation, the CPU patch list and its
guarantee never to touch a CUDA run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_step import platform
from megatron_step.platform import ParallelConfig, capabilities, cpu_patches
from megatron_step.testing import run_distributed


def test_parallel_config_derives_dp_and_names_bad_values():
    p = ParallelConfig(tp=2, pp=2, ep=4)
    assert p.sequence_parallel is True
    assert p.dp(16) == 4
    assert p.expert_dp(16) == 2
    with pytest.raises(ValueError, match=r"tp\(2\) \* pp\(2\) \* cp\(1\) = 4 does not divide world size 6"):
        p.dp(6)
    with pytest.raises(ValueError, match=r"etp\(1\) \* ep\(4\) \* pp\(2\) = 8 does not divide world size 12"):
        p.validate(12)
    with pytest.raises(ValueError, match=r"parallel.tp must be a positive integer, got 0"):
        ParallelConfig(tp=0)
    with pytest.raises(ValueError, match=r"vpp=2 needs pp >= 2"):
        ParallelConfig(vpp=2)
    with pytest.raises(ValueError, match="sequence_parallel=True needs tp > 1"):
        ParallelConfig(sequence_parallel=True)


def test_every_patch_is_documented():
    assert cpu_patches.WRITTEN_FOR_MCORE == "0.19.2"
    for patch in cpu_patches.PATCHES:
        assert patch.symbol and len(patch.reason) > 20, patch


def _fake_cuda(monkeypatch):
    caps = dataclasses.replace(capabilities.detect(), cuda=True, device_count=1)
    monkeypatch.setattr(cpu_patches, "detect", lambda: caps)


def test_patches_refuse_to_apply_when_cuda_is_present(monkeypatch):
    was_applied = cpu_patches.applied()
    before = (torch.cuda.current_device, torch.cuda.Stream, torch.Tensor.cuda)
    _fake_cuda(monkeypatch)
    with pytest.raises(RuntimeError, match="must never alter GPU runs"):
        cpu_patches.apply_cpu_patches()
    assert (torch.cuda.current_device, torch.cuda.Stream, torch.Tensor.cuda) == before
    assert cpu_patches.applied() == was_applied


@pytest.mark.skipif(torch.cuda.is_available(), reason="applies the CPU patches")
def test_patches_apply_and_undo_cleanly():
    from megatron.core.optimizer import clip_grads

    originals = (torch.cuda.current_device, torch.cuda.Stream, torch.Tensor.cuda, clip_grads.torch)
    cpu_patches.apply_cpu_patches()
    try:
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2).cuda().device.type == "cpu"
        # the module-scoped view maps "cuda" factories to CPU; plain torch is untouched
        assert clip_grads.torch.zeros(1, device="cuda").device.type == "cpu"
        assert clip_grads.torch.distributed is torch.distributed
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        end.record()
        assert end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end)
    finally:
        cpu_patches.remove_cpu_patches()
    assert (torch.cuda.current_device, torch.cuda.Stream, torch.Tensor.cuda, clip_grads.torch) == originals


def _setup_body(rank, world_size):

    env = platform.setup(ParallelConfig(), seed=0)
    return env.cpu_patched, cpu_patches.applied(), torch.cuda.Stream.__module__


@pytest.mark.gpu
def test_gpu_run_is_never_patched():

    patched, applied, stream_module = run_distributed(_setup_body, 1)[0]
    assert not patched and not applied and stream_module.startswith("torch.cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_cpu_setup_applies_patches():

    patched, applied, stream_module = run_distributed(_setup_body, 1)[0]
    assert patched and applied and stream_module == cpu_patches.__name__

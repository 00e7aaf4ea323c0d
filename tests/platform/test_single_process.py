"""1-process forward/backward of Megatron-Core's GPTModel with MoE on CPU through the platform layer."""

from __future__ import annotations

import math

import torch

from megatron_step import platform
from megatron_step.models.gpt_local import LocalGPTConfig, build_local_gpt
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed


def _fwd_bwd(rank, world_size):
    cfg = LocalGPTConfig()
    platform.setup(ParallelConfig(), seed=7)
    model = build_local_gpt(cfg, ParallelConfig())
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    pos = torch.arange(cfg.seq_length).unsqueeze(0).expand_as(tokens)
    loss = model(tokens, pos, None, labels=tokens)  # (B, S)
    loss.mean().backward()
    n_params = sum(p.numel() for p in model.parameters())
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    experts = [n for n, _ in model.named_parameters() if "experts" in n]
    return tuple(loss.shape), loss.mean().item(), n_params, no_grad, len(experts)


def test_forward_backward_one_process():
    shape, loss, n_params, no_grad, n_expert_params = run_distributed(_fwd_bwd, 1)[0]
    cfg = LocalGPTConfig()
    assert shape == (2, cfg.seq_length)
    # an untrained model is near-uniform over the vocabulary
    assert abs(loss - math.log(cfg.vocab_size)) < 0.5
    assert n_params > 0 and n_expert_params > 0
    assert no_grad == []

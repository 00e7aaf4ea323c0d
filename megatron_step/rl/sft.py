"""The RL stage's supervised warm-up: the task's worked solutions as next-token data, so a policy
that has never seen the task starts RL able to produce its format (`rl.sft_steps`; the run itself is
text pretraining's loop, megatron_step.stages.pretrain).

    train, valid = sft_datasets(task, tokenizer, cfg.rl, seed=1234, seq_length=64)
    sft_cfg = sft_config(cfg, run_dir="runs/rl_tiny/sft")
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.distributed as dist

from megatron_step.data.tokenizer import StepTokenizer
from megatron_step.rl.config import RLConfig
from megatron_step.rl.tasks import Task

__all__ = ["SFTDataset", "sft_config", "sft_datasets"]

SFT_VALID_PROBLEMS = 64  # held-out worked solutions for the warm-up's validation loss
SFT_WARMUP_STEPS = 20  # LR warm-up of the supervised warm-up


class SFTDataset(torch.utils.data.Dataset):
    """Worked solutions, one per sample, padded to seq_length; the loss covers the answer only.

    A tool task's solution (`task.segments`) is tokenized piece by piece, as a tool rollout produces
    it (sampled text, then the tool's result encoded on its own), so the token boundaries around tool
    results are the ones the policy meets; the tool-written pieces get no loss."""

    def __init__(self, tokenizer: StepTokenizer, task: Task, problems, seq_length: int):
        self.items = []
        segments = getattr(task, "segments", None)
        for p in problems:
            prompt = tokenizer.encode(task.prompt(p))
            if callable(segments):
                answer, learn = [], []
                for text, forced in segments(p):
                    piece = tokenizer.encode(text)
                    answer += piece
                    learn += [0.0 if forced else 1.0] * len(piece)
            else:
                answer = tokenizer.encode(" " + task.solution(p))
                learn = [1.0] * len(answer)
            answer, learn = answer + [tokenizer.eos], learn + [1.0]
            full = ([tokenizer.bos] if tokenizer.bos is not None else []) + prompt + answer  # as before
            first = len(full) - len(answer) - 1  # the label index of the first answer token
            ids = full[: seq_length + 1]
            n = len(ids) - 1
            tokens = torch.full((seq_length,), tokenizer.pad, dtype=torch.long)
            labels = torch.full((seq_length,), tokenizer.pad, dtype=torch.long)
            mask = torch.zeros(seq_length)
            tokens[:n] = torch.tensor(ids[:-1])
            labels[:n] = torch.tensor(ids[1:])
            mask[first:n] = torch.tensor(learn[: n - first])
            self.items.append({"tokens": tokens, "labels": labels, "loss_mask": mask})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def sft_datasets(task: Task, tokenizer: StepTokenizer, rl: RLConfig, seed: int, seq_length: int):
    """(train, valid): one worked solution per warm-up sample; validation on held-out problems."""
    train = task.train(rl.sft_steps * rl.sft_global_batch_size, seed + 17)
    valid = task.heldout(SFT_VALID_PROBLEMS, seed)
    return SFTDataset(tokenizer, task, train, seq_length), SFTDataset(tokenizer, task, valid, seq_length)


def sft_config(cfg, run_dir: str):
    """The warm-up's run config from the RL run's (same model, layout, data; the rl.sft_* steps,
    batch and LR; resumable, saved at its end only)."""
    r = cfg.rl
    dp = cfg.parallel.dp(dist.get_world_size() if dist.is_initialized() else 1)
    if r.sft_global_batch_size % dp:
        raise ValueError(
            f"rl.sft_global_batch_size={r.sft_global_batch_size} is not divisible by the data-parallel "
            f"size {dp}: the warm-up splits each batch evenly over the DP ranks"
        )
    sft = copy.deepcopy(cfg)
    sft.train = dataclasses.replace(
        cfg.train,
        steps=r.sft_steps,
        global_batch_size=r.sft_global_batch_size,
        # the RL micro-batch size, capped at one DP rank's share of the warm-up batch
        micro_batch_size=math.gcd(cfg.train.micro_batch_size, r.sft_global_batch_size // dp),
        run_dir=run_dir,
        resume="auto",  # the warm-up continues (or reuses) its own checkpoint
        overwrite=False,
        exit_after=None,
        eval_interval=0,
        save_interval=0,
    )
    sft.optim = dataclasses.replace(
        cfg.optim, lr=r.sft_lr, min_lr=r.sft_lr / 10, warmup_steps=SFT_WARMUP_STEPS
    )
    return sft

"""The SFT stage: chat conversations (megatron_step.data.sft) through the chat template, next-token
loss on the assistant turns, on text pretraining's loop (megatron_step.stages.pretrain): the same
Megatron-Core model, layouts, distributed optimizer, validation, TensorBoard, checkpoints and exact
resume; `train.init_from` is the checkpoint it starts from.

    cfg = load_run_config("examples/sft/sft_tiny.yaml", ["sft.train_files=[chats.jsonl]"], SFTRunConfig)
    out = train_sft(cfg)          # pretrain()'s result + "data" (what was read, skipped, cut)

Without `sft.train_files` it trains on the embedded chat data: the arithmetic task's problems and
worked solutions (megatron_step.rl.tasks) written as conversations -- a system prompt on some, a
second user/assistant exchange on others -- to `<data.data_dir>/chat/{train,valid}.jsonl`, so the
stage runs on a fresh machine with no download.
"""

from __future__ import annotations

import json
import os
import random

import torch.distributed as dist

from megatron_step import platform
from megatron_step.config.run import SFTRunConfig
from megatron_step.data.chat import ChatTemplate
from megatron_step.data.pipeline import run_tokenizer
from megatron_step.data.sft import ChatDataset, read_conversations
from megatron_step.platform.capabilities import detect
from megatron_step.rl.tasks import ArithmeticTask
from megatron_step.stages.pretrain import pretrain

__all__ = ["embedded_chats", "sft_datasets", "train_sft"]

_SYSTEMS = ("You are a careful math tutor.", "Show your steps, then give the answer.")


def _conversation(task: ArithmeticTask, problems, rng: random.Random) -> dict:
    messages = [{"role": "system", "content": rng.choice(_SYSTEMS)}] if rng.random() < 0.5 else []
    for p in problems:
        messages += [
            {"role": "user", "content": task.prompt(p)},
            {"role": "assistant", "content": task.solution(p)},
        ]
    return {"messages": messages}


def embedded_chats(data_dir: str, n_train: int, n_valid: int, seed: int) -> tuple[str, str]:
    """Write (once, on rank 0) the embedded chat data; returns (train file, valid file). One or two
    problems per conversation; the valid conversations use held-out problems."""
    out = os.path.join(data_dir, "chat")
    paths = (
        os.path.join(out, f"train_{n_train}_{seed}.jsonl"),
        os.path.join(out, f"valid_{n_valid}_{seed}.jsonl"),
    )
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and not all(os.path.isfile(p) for p in paths):
        os.makedirs(out, exist_ok=True)
        task, rng = ArithmeticTask(), random.Random(seed)
        for path, n, problems in (
            (paths[0], n_train, task.train(2 * n_train, seed + 41)),
            (paths[1], n_valid, task.heldout(2 * n_valid, seed + 43)),
        ):
            lines, k = [], 0
            for _ in range(n):
                take = 1 + (rng.random() < 0.3)
                lines.append(json.dumps(_conversation(task, problems[k : k + take], rng)))
                k += take
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, path)  # a crash mid-write leaves no half file under the final name
    if dist.is_initialized():
        dist.barrier()
    return paths


def sft_datasets(cfg: SFTRunConfig, tokenizer) -> tuple[ChatDataset, ChatDataset, dict]:
    """(train, valid, info) for `cfg`: the files read, the template applied, the samples cut to
    data.seq_length; info counts lines, skipped lines (with the first reasons), cut and dropped
    samples."""
    s, seq = cfg.sft, cfg.data.seq_length
    template = ChatTemplate.for_tokenizer(s.chat_template, tokenizer)
    train_files, valid_files = s.train_files, s.valid_files
    if not train_files:
        made = embedded_chats(cfg.data.data_dir, s.embedded_train, s.embedded_valid, cfg.train.seed)
        train_files, valid_files = [made[0]], [made[1]]
    read = read_conversations(train_files, s, tokenizer, template)
    samples = read["samples"]
    info = {"train_files": train_files, "lines": read["lines"], "skipped": read["skipped"]}
    info["skipped_first"] = read["reasons"]
    if valid_files:
        vread = read_conversations(valid_files, s, tokenizer, template)
        valid_samples = vread["samples"]
        info.update(valid_files=valid_files, valid_skipped=vread["skipped"])
    else:  # the last valid_fraction of the training records (before the shuffle)
        n_valid = max(1, int(len(samples) * s.valid_fraction)) if s.valid_fraction > 0 else 0
        if n_valid == 0 or n_valid >= len(samples):
            raise ValueError(
                f"sft.valid_files is empty and sft.valid_fraction={s.valid_fraction} of {len(samples)} "
                "conversations leaves no validation or no training set: give sft.valid_files"
            )
        samples, valid_samples = samples[:-n_valid], samples[-n_valid:]
        info["valid_from_train"] = n_valid
    train = ChatDataset(samples, tokenizer, seq, s.overlong, pack=s.pack)
    valid = ChatDataset(valid_samples, tokenizer, seq, s.overlong, pack=s.pack)
    if s.shuffle:
        train.shuffle(cfg.train.seed)
    info.update(train=train.info, valid=valid.info, chat_template=template.source)
    return train, valid, info


def train_sft(cfg: SFTRunConfig) -> dict:
    """Run the SFT stage per `cfg`; returns pretrain()'s result plus "data" (sft_datasets' info)."""
    if cfg.sft.pack and detect().transformer_engine:
        raise ValueError(
            "sft.pack=true: packed rows need the local layer spec (its core attention takes the "
            "block-diagonal mask); this machine builds the Transformer Engine spec, whose fused attention "
            "takes packed sequences only as THD packed_seq_params, not built here. Use sft.pack=false"
        )
    platform.setup(cfg.parallel, seed=cfg.train.seed)
    tokenizer = run_tokenizer(cfg.data)
    train, valid, info = sft_datasets(cfg, tokenizer)
    out = pretrain(cfg, datasets=(train, valid, info))
    return {**out, "data": info}

"""Train/valid GPT datasets from indexed data, built by Megatron-Core's own builder.

    from megatron_step.data import StepTokenizer, build_gpt_datasets
    train_ds, valid_ds = build_gpt_datasets(["data/train"], "98,2,0", seq_length=512, seed=1234,
                                            tokenizer=StepTokenizer("tok/step.model"),
                                            train_samples=10_000, valid_samples=100, cache_dir="runs/x/cache")
    sample = train_ds[0]

Each item (Megatron-Core `GPTDataset.__getitem__`, with `create_attention_mask=False`), S = seq_length:
    tokens        (S,)  int64    input ids
    labels        (S,)  int64    tokens shifted left by one: labels[i] == tokens[i + 1] for i < S - 1
                                 (each sample reads S + 1 tokens; tokens = [:-1], labels = [1:])
    loss_mask     (S,)  float32  1.0, except 0.0 where labels == pad (and after eod if eod_mask_loss)
    position_ids  (S,)  int64    0..S-1 (restarting after each eod if reset_position_ids)
A multi-prefix blend returns Megatron's `BlendedDataset`, whose items add `dataset_id` (int).
Samples span document boundaries: documents are concatenated (eod between them) and cut into S + 1
token windows; shuffling is by `seed`, so the sample order is a pure function of (data, seed).

Distributed: with torch.distributed initialised, Megatron builds (and writes the index cache) on rank 0
first, barriers, then the other ranks load the cache. `cache_dir` must therefore be on a filesystem
every rank sees. Without torch.distributed the builder simply builds in-process.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron_step.data.tokenizer import StepTokenizer

__all__ = ["build_gpt_datasets"]


def _every_rank() -> bool:
    return True


def build_gpt_datasets(
    prefixes_or_blend: list[str],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer: StepTokenizer,
    train_samples: int,
    valid_samples: int,
    cache_dir: str,
    *,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    is_built_on_rank: Callable[[], bool] = _every_rank,
):
    """Return (train_ds, valid_ds) built by `BlendedMegatronDatasetBuilder` over `GPTDataset`.

    prefixes_or_blend: Megatron's `--data-path` list: prefixes `["a", "b"]` (weighted by size) or
        weights and prefixes `["0.7", "a", "0.3", "b"]`.
    split: train,valid,test weights over the documents of each prefix, e.g. "98,2,0".
    train_samples / valid_samples: samples of seq_length tokens to index; fewer than one epoch's
        worth is a prefix of the shuffled epoch, more repeats the data over several epochs.
    is_built_on_rank: only consulted when torch.distributed is initialised; ranks where it is False
        get None (Megatron's pretrain_gpt builds on TP rank 0 and broadcasts batches). Must be True
        on rank 0. The default builds on every rank.
    Must be called on every rank when torch.distributed is initialised (it contains barriers).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if train_samples < 1 or valid_samples < 0:
        raise ValueError(
            f"need train_samples >= 1 and valid_samples >= 0, got {train_samples}, {valid_samples}"
        )
    blend = get_blend_from_list(list(prefixes_or_blend))
    if not blend or not blend[0]:
        raise ValueError(f"prefixes_or_blend is empty: {prefixes_or_blend!r}")
    for prefix in blend[0]:
        if not IndexedDataset.exists(prefix):
            raise ValueError(f"prefixes_or_blend: no {prefix}.bin/.idx (run tools/preprocess_data.py)")
    os.makedirs(cache_dir, exist_ok=True)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        # The (S, S) boolean mask per sample is redundant for causal attention (the model builds it,
        # or the fused kernel never materialises it): at S = 4096 it would be 16 MB per sample.
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    # sizes = samples per split [train, valid, test]; test is not used by this stack.
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], is_built_on_rank, config
    ).build()
    return train_ds, valid_ds

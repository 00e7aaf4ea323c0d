"""Megatron-Core GPTDataset through build_gpt_datasets: shapes, label shift, determinism, and the same
samples when built by 2 gloo ranks (rank 0 builds the index cache, rank 1 loads it after a barrier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_step import platform
from megatron_step.data import StepTokenizer, build_gpt_datasets
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed

SEQ = 32

# Megatron-Core logs through its rank helper, which warns when torch.distributed is not initialised.
pytestmark = pytest.mark.filterwarnings("ignore:Could not determine rank:UserWarning")


def _build(prefix, tok, cache_dir, seed=3):
    return build_gpt_datasets([prefix], "90,10,0", SEQ, seed, tok, 50, 4, cache_dir)


def test_items_shapes_and_label_shift(indexed_prefix, tok, tmp_path):
    train, valid = _build(indexed_prefix, tok, str(tmp_path))
    assert len(train) >= 50 and len(valid) >= 4
    raw = IndexedDataset(indexed_prefix)  # keep alive: its slices are views of its mmap
    for ds in (train, valid):
        # GPTDataset concatenates its split's documents in a seeded shuffled order (document_index)
        stream = np.concatenate([raw[int(d)] for d in ds.document_index])
        item = ds[1]
        assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
        for k, dtype in [("tokens", torch.int64), ("labels", torch.int64), ("position_ids", torch.int64)]:
            assert item[k].shape == (SEQ,) and item[k].dtype == dtype
        assert item["loss_mask"].shape == (SEQ,) and item["loss_mask"].dtype == torch.float32
        assert torch.equal(item["labels"][:-1], item["tokens"][1:])
        assert torch.equal(item["position_ids"], torch.arange(SEQ))
        assert bool((item["loss_mask"] == 1).all())  # no pad in the data
        assert int(item["tokens"].max()) < tok.vocab_size
        # the S + 1 token window is a contiguous run of that stream: documents are packed, not padded
        window = torch.cat([item["tokens"], item["labels"][-1:]]).numpy()
        hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(stream, SEQ + 1).__eq__(window).all(1))
        assert hits.size >= 1


def test_deterministic_given_seed(indexed_prefix, tok, tmp_path):
    a, _ = _build(indexed_prefix, tok, str(tmp_path / "a"))
    b, _ = _build(indexed_prefix, tok, str(tmp_path / "b"))
    c, _ = _build(indexed_prefix, tok, str(tmp_path / "c"), seed=4)
    first = lambda ds: torch.stack([ds[i]["tokens"] for i in range(8)])
    assert torch.equal(first(a), first(b)) and not torch.equal(first(a), first(c))


def test_missing_prefix_is_a_clear_error(tok, tmp_path):
    with pytest.raises(ValueError, match="no .*nothing.bin/.idx"):
        build_gpt_datasets([str(tmp_path / "nothing")], "1,0,0", SEQ, 0, tok, 1, 0, str(tmp_path))


def _rank_body(rank, world_size, prefix, model, cache_dir):

    platform.setup(ParallelConfig(), seed=0)
    train, valid = _build(prefix, StepTokenizer(model), cache_dir)
    return train[0]["tokens"].tolist(), valid[0]["tokens"].tolist()


@pytest.mark.distributed
def test_two_ranks_build_same_samples(indexed_prefix, tok, tmp_path):
    ranks = run_distributed(_rank_body, 2, indexed_prefix, tok.model_path, str(tmp_path / "dist"))
    train, valid = _build(indexed_prefix, tok, str(tmp_path / "local"))
    expected = (train[0]["tokens"].tolist(), valid[0]["tokens"].tolist())
    assert ranks == [expected, expected]

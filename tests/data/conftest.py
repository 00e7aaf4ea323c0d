"""Shared, session-scoped data fixtures: a ~60 KB embedded corpus, a 400-piece BPE tokenizer trained on
it, and its train split as an indexed dataset. Built once (well under a second) for all data tests."""

from __future__ import annotations

import pytest

from megatron_step.data import StepTokenizer, build_embedded_corpus, preprocess, train_tokenizer

TINY_BYTES = 60_000  # ~10 stdlib files
VOCAB = 400  # 268 reserved (4 meta + 8 user symbols + 256 bytes) + 132 learned pieces


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return build_embedded_corpus(str(tmp_path_factory.mktemp("corpus")), max_bytes=TINY_BYTES, progress=False)


@pytest.fixture(scope="session")
def tok_model(corpus, tmp_path_factory):
    return train_tokenizer([corpus["train"]], str(tmp_path_factory.mktemp("tok") / "step"), VOCAB)


@pytest.fixture(scope="session")
def tok(tok_model):
    return StepTokenizer(tok_model)


@pytest.fixture(scope="session")
def indexed_prefix(corpus, tok, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("indexed") / "train")
    preprocess([corpus["train"]], tok, prefix, progress=False)
    return prefix

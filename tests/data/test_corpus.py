"""The embedded stdlib corpus: deterministic, disjoint hash split, size cap, idempotent rebuilds."""

from __future__ import annotations

import json
import os

from megatron_step.data import build_embedded_corpus
from tests.data.conftest import TINY_BYTES


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_records_and_size_cap(corpus):
    train, valid = _records(corpus["train"]), _records(corpus["valid"])
    assert train and valid
    for r in train + valid:
        assert set(r) == {"text", "source"} and r["text"].strip() and r["source"].endswith(".py")
        parts = r["source"].split("/")
        assert not {"test", "tests", "idlelib", "lib2to3", "site-packages"} & set(parts)
    assert sum(len(r["text"].encode()) for r in train + valid) <= TINY_BYTES
    # sorted walk: sources in file order are sorted within each split
    assert [r["source"] for r in train] == sorted(r["source"] for r in train)


def test_split_is_disjoint(corpus):
    train = {r["source"] for r in _records(corpus["train"])}
    valid = {r["source"] for r in _records(corpus["valid"])}
    assert train.isdisjoint(valid)


def test_deterministic_and_idempotent(corpus, tmp_path):
    other = build_embedded_corpus(str(tmp_path), max_bytes=TINY_BYTES, progress=False)
    for k in ("train", "valid"):
        with open(corpus[k], "rb") as a, open(other[k], "rb") as b:
            assert a.read() == b.read()
    mtime = os.stat(other["train"]).st_mtime_ns
    assert build_embedded_corpus(str(tmp_path), max_bytes=TINY_BYTES, progress=False) == other
    assert os.stat(other["train"]).st_mtime_ns == mtime  # same params: not rewritten
    bigger = build_embedded_corpus(str(tmp_path), max_bytes=2 * TINY_BYTES, progress=False)
    assert len(_records(bigger["train"])) > len(_records(corpus["train"]))
    with open(tmp_path / "manifest.json") as f:
        assert json.load(f)["params"]["max_bytes"] == 2 * TINY_BYTES

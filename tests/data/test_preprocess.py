"""jsonl / txt -> Megatron-Core indexed dataset: one sequence per document ending in eod, empty
documents skipped and counted, malformed lines reported with file and line number."""

from __future__ import annotations

import json
import os

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_step.data import MalformedInputError, preprocess

# Megatron-Core logs through its rank helper, which warns when torch.distributed is not initialised.
pytestmark = pytest.mark.filterwarnings("ignore:Could not determine rank:UserWarning")

DOCS = ["def f():\n    return 1\n", "", "Hello <think>world</think> 🎉", "   \n", "x = [1, 2, 3]"]


def _jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_jsonl_to_indexed_dataset(tok, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)] + [""])
    stats = preprocess([src], tok, str(tmp_path / "out"), progress=False)
    kept = [d for d in DOCS if d.strip()]
    ds = IndexedDataset(str(tmp_path / "out"))
    assert stats == {"files": 1, "documents": 3, "tokens": int(ds.sequence_lengths.sum()), "skipped": 2}
    assert len(ds) == 3 and list(ds.document_indices) == [0, 1, 2, 3]  # one sequence per document
    for i, text in enumerate(kept):
        seq = ds[i]
        assert seq[-1] == tok.eod and tok.eod not in seq[:-1]
        assert tok.decode(seq[:-1].tolist()) == text


def test_no_eod_and_txt_modes(tok, tmp_path):
    txt = tmp_path / "in.txt"
    txt.write_text("para one\nline two\n\n\n\npara two\n")
    s = preprocess([str(txt)], tok, str(tmp_path / "blocks"), append_eod=False, progress=False)
    ds = IndexedDataset(str(tmp_path / "blocks"))
    assert s["documents"] == 2 and tok.decode(ds[0].tolist()) == "para one\nline two\n"
    assert tok.eod not in ds[0]
    s = preprocess([str(txt)], tok.model_path, str(tmp_path / "whole"), text_document="file", progress=False)
    assert s["documents"] == 1


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"text": "unterminated', "bad JSON"),
        ('{"content": "x"}', "missing key 'text'"),
        ('{"text": 42}', "value of 'text' is int, not a string"),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tok, tmp_path, bad_line, reason):
    src = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", bad_line, {"text": "never read"}])
    with pytest.raises(MalformedInputError) as e:
        preprocess([src], tok, str(tmp_path / "out"), progress=False)
    assert str(e.value).startswith(f"{src}:3: {reason}")
    assert not os.path.exists(tmp_path / "out.bin") and not os.path.exists(tmp_path / "out.idx")

"""Tokenise text / jsonl into a Megatron-Core indexed dataset (`<prefix>.bin` + `<prefix>.idx`).

    from megatron_step.data import StepTokenizer, preprocess
    stats = preprocess(["corpus/train.jsonl"], StepTokenizer("tok/step.model"), "data/train")
    # -> data/train.bin, data/train.idx; stats = {"documents": ..., "tokens": ..., "skipped": ...}

Inputs, by extension:
  - `.jsonl` / `.json`: one JSON object per line; the document is `record[json_key]` (a string).
    Blank lines are ignored. A bad line raises `MalformedInputError` naming file, line and reason.
  - anything else (`.txt`): `text_document="block"` (default) makes every blank-line-separated block
    a document; `text_document="file"` makes the whole file one document.
Each document is written with `IndexedDatasetBuilder.add_document` as a single sequence, followed by
the tokenizer's eod id when `append_eod` (GPTDataset concatenates documents into fixed-length samples,
and eod is what marks where one ends). Documents with no non-whitespace text are skipped and counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from multiprocessing import get_context

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
from tqdm import tqdm

from megatron_step.data.tokenizer import HFTokenizer, StepTokenizer, load_tokenizer

__all__ = ["MalformedInputError", "iter_documents", "preprocess"]


class MalformedInputError(ValueError):
    """A line of an input file that is not a usable document: `path:line: reason`."""

    def __init__(self, path: str, lineno: int, reason: str) -> None:
        super().__init__(f"{path}:{lineno}: {reason}")
        self.path, self.lineno, self.reason = path, lineno, reason


def _is_json(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def iter_documents(path: str, json_key: str = "text", text_document: str = "block") -> Iterator[str]:
    """Yield the documents of one input file (empty ones included; the caller counts them)."""
    if text_document not in ("block", "file"):
        raise ValueError(f"text_document must be 'block' or 'file', got {text_document!r}")
    with open(path, encoding="utf-8") as f:
        if _is_json(path):
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MalformedInputError(path, lineno, f"bad JSON ({e})") from None
                if not isinstance(record, dict):
                    raise MalformedInputError(
                        path, lineno, f"expected a JSON object, got {type(record).__name__}"
                    )
                if json_key not in record:
                    raise MalformedInputError(
                        path, lineno, f"missing key {json_key!r} (keys: {sorted(record)[:10]})"
                    )
                text = record[json_key]
                if not isinstance(text, str):
                    raise MalformedInputError(
                        path, lineno, f"value of {json_key!r} is {type(text).__name__}, not a string"
                    )
                yield text
        elif text_document == "file":
            yield f.read()
        else:
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block)
                    block = []
            if block:
                yield "".join(block)


# Worker-process state for workers > 1: each worker loads the model once (by path) in its initializer.
_WORKER_TOKENIZER: StepTokenizer | HFTokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(model_path)


def _encode(text: str) -> list[int]:
    return _WORKER_TOKENIZER.encode(text)


def preprocess(
    input_paths: list[str],
    tokenizer: StepTokenizer | HFTokenizer | str,
    output_prefix: str,
    json_key: str = "text",
    append_eod: bool = True,
    workers: int = 1,
    *,
    text_document: str = "block",
    progress: bool = True,
) -> dict[str, int]:
    """Tokenise `input_paths` into `output_prefix.{bin,idx}`; return
    `{"files", "documents", "tokens", "skipped"}` (tokens include the appended eod ids).

    `tokenizer` may be a tokenizer object or a path (a .model, or a Hugging Face tokenizer directory).
    `workers > 1` encodes in a process pool
    (reading, validation and writing stay in this process, so errors and document order are the same
    as with one worker). On any error the partial .bin/.idx are removed.
    """
    if isinstance(input_paths, str):
        input_paths = [input_paths]
    if not input_paths:
        raise ValueError("input_paths is empty")
    for p in input_paths:
        if not os.path.isfile(p):
            raise ValueError(f"input_paths: {p!r} does not exist or is not a file")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if append_eod and tok.eod < 0:
        raise ValueError(f"append_eod=True but tokenizer {tok.model_path!r} has no eos/eod piece")

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    bin_path, idx_path = get_bin_path(output_prefix), get_idx_path(output_prefix)
    # uint16 below 65,500 pieces halves the .bin; Megatron's own preprocess_data.py picks it the same way.
    dtype = DType.optimal_dtype(tok.vocab_size)
    stats = {"files": len(input_paths), "documents": 0, "tokens": 0, "skipped": 0}
    eod = [tok.eod] if append_eod else []

    def texts() -> Iterator[str]:
        for path in input_paths:
            for text in iter_documents(path, json_key, text_document):
                if text.strip():
                    yield text
                else:
                    stats["skipped"] += 1

    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    pool = None
    try:
        if workers > 1:
            pool = get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok.model_path,))
            encoded = pool.imap(_encode, texts(), chunksize=32)  # imap keeps document order
        else:
            encoded = map(tok.encode, texts())
        bar = tqdm(
            encoded, desc=f"tokenise -> {os.path.basename(output_prefix)}", unit="doc", disable=not progress
        )
        for ids in bar:
            doc = np.asarray(ids + eod, dtype=dtype)
            builder.add_document(doc, [doc.size])  # one sequence per document
            stats["documents"] += 1
            stats["tokens"] += int(doc.size)
        builder.finalize(idx_path)
    except BaseException:
        builder.data_file.close()
        for p in (bin_path, idx_path):
            if os.path.exists(p):
                os.remove(p)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    if stats["documents"] == 0:
        # GPTDataset cannot sample from an empty dataset; say so here rather than at training time.
        for p in (bin_path, idx_path):
            os.remove(p)
        raise ValueError(f"no non-empty documents in {input_paths} ({stats['skipped']} empty skipped)")
    return stats

"""The records of a data file, one at a time with where each came from: JSONL (one JSON object per line;
`.jsonl`, `.json` and any other name) or Parquet (`.parquet`, one row per record, read with pyarrow).

    for where, record in iter_records("train.parquet"):      # where: "train.parquet:row 3"
        if isinstance(record, ChatError): ...                # a line that is not JSON (JSONL only)

Used by the SFT data (megatron_step.data.sft) and dataset RL (megatron_step.rl.dataset), which check
the fields themselves and name `where` in their messages. Blank JSONL lines are not records. A Parquet
row's null fields are left out (a column the row does not use is absent, as a key a JSON line omits);
nested columns (a `messages` list of {role, content} structs) come back as lists of dicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from megatron_step.data.chat import ChatError

__all__ = ["iter_records"]


def iter_records(path: str) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of `path`; a JSONL line that is not JSON gives a ChatError as
    its record (the caller stops or skips and counts it)."""
    if path.endswith(".parquet"):
        yield from _parquet(path)
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", ChatError(f"not JSON ({e.msg} at column {e.colno})")


def _parquet(path: str) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ChatError(f"{path}: reading Parquet needs pyarrow (pip install -r requirements.txt)") from None
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
        raise ChatError(f"{path}: not a Parquet file ({type(e).__name__}: {e})") from None
    row = 0
    for batch in file.iter_batches(batch_size=1024):  # a batch at a time: large files stream
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", {k: v for k, v in record.items() if v is not None}

"""The embedded corpus: the Python standard library's own `.py` sources as a pretraining text corpus.

    from megatron_step.data import build_embedded_corpus
    paths = build_embedded_corpus("runs/corpus")      # {"train": ".../train.jsonl", "valid": ...}

Every machine with Python 3.12 has it, so the CPU demo and the tests need no download. One document
per file, `{"text": <source>, "source": <path relative to the stdlib root>}` per jsonl line.

Reproducibility: the file set is walked in sorted order and the split is a hash of the relative path,
so the corpus is a pure function of (Python build, max_bytes, valid_fraction). The Python version is
in the manifest because stdlib sources change between patch releases.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig

from tqdm import tqdm

__all__ = ["build_embedded_corpus", "stdlib_sources"]

_FORMAT_VERSION = 1
# Directory names never descended into: third-party code, the (huge, repetitive) test suites, and
# IDLE / lib2to3 whose fixtures include deliberately odd source.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)


def stdlib_sources(root: str | None = None) -> list[tuple[str, str]]:
    """Sorted (relative posix path, absolute path) of the standard library's .py files."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        for f in files:
            if f.endswith(".py"):
                full = os.path.join(d, f)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    return sorted(out)


def _valid_bucket(rel: str) -> float:
    """Stable in [0, 1): a hash of the path, not Python's salted hash(), so every run agrees."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64


def build_embedded_corpus(
    out_dir: str,
    max_bytes: int = 8_000_000,
    valid_fraction: float = 0.02,
    progress: bool = True,
) -> dict[str, str]:
    """Write `out_dir/{train,valid}.jsonl` (+ `manifest.json`) and return their paths.

    max_bytes caps the UTF-8 size of all document text (train + valid): files are taken in sorted
    order and one that would overflow the cap is skipped. 8 MB of stdlib source is ~2.5M tokens at
    a 32k vocab: enough for a CPU demo. Calling again with the same arguments on the same Python
    returns the existing files without rewriting them.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "valid": os.path.join(out_dir, "valid.jsonl")}
    manifest_path = os.path.join(out_dir, "manifest.json")
    params = {
        "format_version": _FORMAT_VERSION,
        "python": sys.version.split()[0],
        "max_bytes": max_bytes,
        "valid_fraction": valid_fraction,
    }
    if os.path.isfile(manifest_path) and all(map(os.path.isfile, paths.values())):
        with open(manifest_path) as f:
            if json.load(f).get("params") == params:
                return paths

    # Select documents first (cheap), so the split can be checked before anything is written.
    docs: list[tuple[str, str]] = []
    total = 0
    for rel, full in stdlib_sources():
        if total >= max_bytes:
            break
        try:
            with open(full, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # a latin-1 test fixture or an unreadable file: not worth a document
        n = len(text.encode("utf-8"))
        if not text.strip() or total + n > max_bytes:
            continue  # empty __init__.py files; or a file that would overflow the cap
        docs.append((rel, text))
        total += n
    if len(docs) < 2:
        raise ValueError(f"max_bytes={max_bytes} leaves {len(docs)} document(s); need at least 2 to split")

    is_valid = [_valid_bucket(rel) < valid_fraction for rel, _ in docs]
    if not any(is_valid):
        # A small cap can leave ~2% of a handful of files = none; then the lowest-hash document is the
        # validation set, so valid is never empty (still a pure function of the selected files).
        is_valid[min(range(len(docs)), key=lambda i: _valid_bucket(docs[i][0]))] = True
    if all(is_valid):
        is_valid[max(range(len(docs)), key=lambda i: _valid_bucket(docs[i][0]))] = False

    os.makedirs(out_dir, exist_ok=True)
    counts = {"train": 0, "valid": 0}
    nbytes = {"train": 0, "valid": 0}
    # Write to temporaries and rename: an interrupted build never looks complete to the check above.
    tmp = {k: p + ".tmp" for k, p in paths.items()}
    with open(tmp["train"], "w", encoding="utf-8") as ft, open(tmp["valid"], "w", encoding="utf-8") as fv:
        for (rel, text), v in tqdm(
            list(zip(docs, is_valid)), desc="embedded corpus", unit="doc", disable=not progress
        ):
            split = "valid" if v else "train"
            (fv if v else ft).write(json.dumps({"text": text, "source": rel}, ensure_ascii=False) + "\n")
            counts[split] += 1
            nbytes[split] += len(text.encode("utf-8"))
    for k in paths:
        os.replace(tmp[k], paths[k])
    with open(manifest_path, "w") as f:
        json.dump(
            {
                "params": params,
                "documents": counts,
                "text_bytes": nbytes,
                "stdlib": sysconfig.get_paths()["stdlib"],
            },
            f,
            indent=2,
        )
    return paths

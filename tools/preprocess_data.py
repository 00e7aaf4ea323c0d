"""Tokenise .jsonl / .txt files into a Megatron-Core indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input runs/corpus/train.jsonl --tokenizer-model runs/tok/step.model \\
        --output-prefix runs/data/train
    python tools/preprocess_data.py --input a.jsonl b.jsonl --json-key content --tokenizer-model M \\
        --output-prefix runs/data/ab --workers 8
    python tools/preprocess_data.py --input book.txt --txt-document file --tokenizer-model M --output-prefix P

Every document ends with the tokenizer's eod id (unless --no-eod); documents with no text are skipped
and counted. A malformed jsonl line stops the run with `FILE:LINE: reason`. The PREFIX is what
`build_gpt_datasets` / Megatron's `--data-path` take.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

# Megatron-Core announces missing TE/apex at import time; expected here, not news.
warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step.data import MalformedInputError, preprocess  # noqa: E402
from megatron_step.data.tokenizer import load_tokenizer  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", required=True, help=".jsonl / .json (one object per line) or .txt")
    ap.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model (tools/train_tokenizer.py) or a Hugging Face tokenizer directory",
    )
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--json-key", default="text")
    ap.add_argument(
        "--txt-document",
        choices=["block", "file"],
        default="block",
        help="a .txt document is a blank-line-separated block (default) or the whole file",
    )
    ap.add_argument("--no-eod", action="store_true", help="do not append eod after each document")
    ap.add_argument("--workers", type=int, default=1, help="encoding processes (each loads the tokenizer)")
    args = ap.parse_args(argv)

    tok = load_tokenizer(args.tokenizer_model)
    t0 = time.perf_counter()
    try:
        stats = preprocess(
            args.input,
            tok,
            args.output_prefix,
            json_key=args.json_key,
            append_eod=not args.no_eod,
            workers=args.workers,
            text_document=args.txt_document,
        )
    except MalformedInputError as e:
        sys.exit(f"error: {e}")
    dt = time.perf_counter() - t0
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens "
        f"({stats['skipped']} empty skipped) from {stats['files']} file(s) in {dt:.1f}s "
        f"({stats['tokens'] / max(dt, 1e-9):,.0f} tokens/s)"
    )
    return stats


if __name__ == "__main__":
    main()

"""Train the SentencePiece tokenizer (BPE or unigram, byte fallback, Step special tokens).

    python tools/train_tokenizer.py --embedded-corpus runs/corpus --model-prefix runs/tok/step \
        --vocab-size 8192
    python tools/train_tokenizer.py --input a.txt b.jsonl --model-prefix runs/tok/step --vocab-size 32000
    python tools/train_tokenizer.py --input a.txt --model-prefix runs/tok/uni --vocab-size 16000 \
        --model-type unigram

`--embedded-corpus DIR` first writes the Python standard library's sources as jsonl to DIR (once; see
megatron_step/data/corpus.py) and trains on its train split. Inputs: .txt (one sentence per line) or
.jsonl (the `--json-key` field of each record). Prints the .model path and the special-token ids.
"""

from __future__ import annotations

import argparse
import warnings

# Megatron-Core announces missing TE/apex at import time; expected here, not news.
warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step.data import (  # noqa: E402
    USER_SYMBOLS,
    StepTokenizer,
    build_embedded_corpus,
    train_tokenizer,
)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_argument_group("input (at least one)")
    src.add_argument("--input", nargs="+", default=[], help=".txt / .jsonl files")
    src.add_argument(
        "--embedded-corpus", metavar="DIR", help="build the stdlib corpus in DIR and use its train split"
    )
    src.add_argument(
        "--corpus-max-bytes", type=int, default=8_000_000, help="size cap of the embedded corpus"
    )
    ap.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--character-coverage", type=float, default=0.9995)
    ap.add_argument("--input-sentence-size", type=int, default=0, help="sample this many lines (0 = all)")
    ap.add_argument("--num-threads", type=int, default=1, help=">1 is faster; 1 is bit-reproducible")
    args = ap.parse_args(argv)

    inputs = list(args.input)
    if args.embedded_corpus:
        inputs.append(build_embedded_corpus(args.embedded_corpus, max_bytes=args.corpus_max_bytes)["train"])
    if not inputs:
        ap.error("give --input FILE [FILE ...] and/or --embedded-corpus DIR")

    path = train_tokenizer(
        inputs,
        args.model_prefix,
        args.vocab_size,
        args.model_type,
        json_key=args.json_key,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.num_threads,
    )
    tok = StepTokenizer(path)
    print(f"wrote {path}: {tok.vocab_size} pieces (pad to {tok.padded_vocab_size()} for the embedding)")
    print(f"  pad={tok.pad} unk={tok.unk} bos={tok.bos} eos/eod={tok.eos}")
    print("  " + " ".join(f"{s}={tok.token_id(s)}" for s in USER_SYMBOLS))
    return path


if __name__ == "__main__":
    main()

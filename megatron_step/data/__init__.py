"""The text-pretraining data layer: tokenizer, embedded corpus, indexed-dataset preprocessing and
Megatron-Core GPT datasets.

    corpus = build_embedded_corpus("runs/corpus")                            # stdlib .py -> jsonl
    model = train_tokenizer([corpus["train"]], "runs/tok/step", 8000)        # SentencePiece BPE
    tok = StepTokenizer(model)
    preprocess([corpus["train"]], tok, "runs/data/train")                    # -> .bin/.idx
    train_ds, valid_ds = build_gpt_datasets(["runs/data/train"], "98,2,0", 256, 1234, tok,
                                            train_samples=1000, valid_samples=50, cache_dir="runs/cache")
"""

from megatron_step.data.corpus import build_embedded_corpus
from megatron_step.data.gpt_data import build_gpt_datasets
from megatron_step.data.preprocess import MalformedInputError, preprocess
from megatron_step.data.tokenizer import SPECIAL_TOKENS, USER_SYMBOLS, StepTokenizer, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "USER_SYMBOLS",
    "MalformedInputError",
    "StepTokenizer",
    "build_embedded_corpus",
    "build_gpt_datasets",
    "preprocess",
    "train_tokenizer",
]

"""From the `data:` section to (train, valid) datasets: builds the embedded corpus, tokenizer and
indexed data on first use (rank 0, cached under `data.data_dir`), or opens the user's indexed data.

    train_ds, valid_ds, info = prepare_datasets(cfg.data, seed=1234, train_samples=2400,
                                                valid_samples=32, model_vocab_size=2048)
    tok = run_tokenizer(cfg.data)        # the tokenizer those datasets were made with

Embedded corpus: train and held-out documents are written into one indexed dataset, train
documents first, and the split is given as the document counts ("n_train,n_valid,0"), so
Megatron-Core's document-range split reproduces exactly the held-out set.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from megatron_step.data.config import DataConfig
from megatron_step.data.corpus import build_embedded_corpus
from megatron_step.data.gpt_data import build_gpt_datasets
from megatron_step.data.preprocess import iter_documents, preprocess
from megatron_step.data.tokenizer import HFTokenizer, StepTokenizer, load_tokenizer, train_tokenizer


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _embedded_assets(d: DataConfig) -> tuple[str, str, str]:
    """(tokenizer model, indexed prefix, split) for the embedded corpus; built once, on rank 0."""
    root = os.path.abspath(d.data_dir)
    tok_prefix = os.path.join(root, f"tokenizer_v{d.tokenizer_vocab_size}")
    data_prefix = os.path.join(root, f"stdlib_text_document_v{d.tokenizer_vocab_size}")
    counts_file = data_prefix + ".split"
    if _is_rank0():
        corpus = build_embedded_corpus(os.path.join(root, "corpus"))
        tok_model = d.tokenizer_model or tok_prefix + ".model"
        if not os.path.exists(tok_model):
            train_tokenizer([corpus["train"]], tok_prefix, d.tokenizer_vocab_size)
        if not (os.path.exists(data_prefix + ".bin") and os.path.exists(counts_file)):
            stats = preprocess([corpus["train"], corpus["valid"]], load_tokenizer(tok_model), data_prefix)
            n_valid = sum(1 for text in iter_documents(corpus["valid"]) if text.strip())
            n_train = stats["documents"] - n_valid
            with open(counts_file, "w") as f:
                f.write(f"{n_train},{n_valid},0")
    _barrier()
    with open(counts_file) as f:
        split = f.read().strip()
    return d.tokenizer_model or tok_prefix + ".model", data_prefix, split


def run_tokenizer(d: DataConfig) -> StepTokenizer | HFTokenizer:
    """The run's tokenizer: `data.tokenizer_model` (a sentencepiece .model or a Hugging Face tokenizer
    directory), or the embedded one (built once, on rank 0)."""
    if d.tokenizer_model:
        return load_tokenizer(d.tokenizer_model)
    return StepTokenizer(_embedded_assets(d)[0])


def prepare_datasets(
    d: DataConfig,
    *,
    seed: int,
    train_samples: int,
    valid_samples: int,
    model_vocab_size: int,
    vocab_multiple: int = 128,
):
    """Returns (train_ds, valid_ds, info) of `train_samples` / `valid_samples` sequences. Call on
    every rank. `model_vocab_size` must hold the tokenizer's pieces; the error suggests a size
    rounded up to `vocab_multiple` (128 x tensor-parallel size keeps the vocab-parallel split even)."""
    if d.corpus == "embedded":
        tok_model, prefix, split = _embedded_assets(d)
        prefixes = [prefix]
    else:
        if not d.tokenizer_model or not os.path.exists(d.tokenizer_model):
            raise FileNotFoundError(
                f"data.tokenizer_model={d.tokenizer_model!r} not found; train one with "
                "tools/train_tokenizer.py"
            )
        tok_model, prefixes, split = d.tokenizer_model, d.data_path, d.split
    tokenizer = load_tokenizer(tok_model)
    if not tokenizer.has_pad:
        raise ValueError(
            f"data.tokenizer_model={tok_model!r} has no pad token: Megatron-Core's GPT datasets drop the "
            "loss of every label equal to the pad id, and without one that would be eos; add a pad token "
            '(tokenizer_config.json "pad_token")'
        )
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"pieces ({tok_model}); set model.vocab_size={tokenizer.padded_vocab_size(vocab_multiple)}"
        )
    train_ds, valid_ds = build_gpt_datasets(
        prefixes,
        split,
        d.seq_length,
        seed,
        tokenizer,
        train_samples=train_samples,
        valid_samples=valid_samples,
        cache_dir=os.path.join(os.path.abspath(d.data_dir), "index_cache"),
    )
    info = {
        "tokenizer": tok_model,
        "vocab": tokenizer.vocab_size,
        "prefixes": prefixes,
        "split": split,
        "train_samples": len(train_ds),
        "valid_samples": len(valid_ds),
    }
    return train_ds, valid_ds, info

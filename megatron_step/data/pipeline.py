"""From a run config to (train, valid) datasets: builds the embedded corpus, tokenizer and indexed
data on first use (rank 0, cached under `data.data_dir`), or opens the user's indexed data.

Embedded corpus: train and held-out documents are written into one indexed dataset, train
documents first, and the split is given as the document counts ("n_train,n_valid,0"), so
Megatron-Core's document-range split reproduces exactly the held-out set.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from megatron_step.config.run import RunConfig
from megatron_step.data.corpus import build_embedded_corpus
from megatron_step.data.gpt_data import build_gpt_datasets
from megatron_step.data.preprocess import iter_documents, preprocess
from megatron_step.data.tokenizer import StepTokenizer, train_tokenizer


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _embedded_assets(cfg: RunConfig) -> tuple[str, str, str]:
    """(tokenizer model, indexed prefix, split) for the embedded corpus; built once, on rank 0."""
    d = cfg.data
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
            stats = preprocess([corpus["train"], corpus["valid"]], StepTokenizer(tok_model), data_prefix)
            n_valid = sum(1 for text in iter_documents(corpus["valid"]) if text.strip())
            n_train = stats["documents"] - n_valid
            with open(counts_file, "w") as f:
                f.write(f"{n_train},{n_valid},0")
    _barrier()
    with open(counts_file) as f:
        split = f.read().strip()
    return d.tokenizer_model or tok_prefix + ".model", data_prefix, split


def prepare_datasets(cfg: RunConfig):
    """Returns (train_ds, valid_ds, info). Call on every rank."""
    d, t = cfg.data, cfg.train
    if d.corpus == "embedded":
        tok_model, prefix, split = _embedded_assets(cfg)
        prefixes = [prefix]
    else:
        if not d.tokenizer_model or not os.path.exists(d.tokenizer_model):
            raise FileNotFoundError(
                f"data.tokenizer_model={d.tokenizer_model!r} not found; train one with "
                "tools/train_tokenizer.py"
            )
        tok_model, prefixes, split = d.tokenizer_model, d.data_path, d.split
    tokenizer = StepTokenizer(tok_model)
    model_vocab = cfg.model_config().vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"pieces ({tok_model}); set model.vocab_size={tokenizer.padded_vocab_size(128 * cfg.parallel.tp)}"
        )
    gbs = t.global_batch_size
    train_ds, valid_ds = build_gpt_datasets(
        prefixes,
        split,
        d.seq_length,
        t.seed,
        tokenizer,
        train_samples=t.steps * gbs,
        valid_samples=max(1, t.eval_steps) * gbs,
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

"""The `data:` section of a pretraining or RL run: where the text comes from, the tokenizer, the
sequence length and the split (megatron_step.data.pipeline reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # "embedded": the corpus built from this machine's Python standard library (no download);
    # otherwise Megatron indexed-dataset prefixes in `data_path` ("weight prefix weight prefix ...").
    corpus: str = "embedded"
    data_path: list[str] = field(default_factory=list)
    # a sentencepiece .model or a Hugging Face tokenizer directory (tokenizer.json); None: train one
    tokenizer_model: str | None = None
    tokenizer_vocab_size: int = 2048  # when the embedded tokenizer is trained
    split: str = "98,2,0"  # train, valid, test shares of each prefix
    seq_length: int = 128
    data_dir: str = "runs/data"  # where the embedded corpus, tokenizer and .bin/.idx are cached

    def __post_init__(self):
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length={self.seq_length}: must be >= 2")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ValueError(f"data.split={self.split!r}: expected three numbers 'train,valid,test'")
        if self.corpus != "embedded" and not self.data_path:
            raise ValueError(f"data.corpus={self.corpus!r} needs data.data_path (indexed-dataset prefixes)")


__all__ = ["DataConfig"]

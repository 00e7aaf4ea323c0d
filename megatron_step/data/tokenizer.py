"""SentencePiece tokenizer: training (`train_tokenizer`) and the runtime wrapper (`StepTokenizer`).

    from megatron_step.data import train_tokenizer, StepTokenizer
    path = train_tokenizer(["corpus/train.jsonl"], "tok/step", vocab_size=32000)   # -> "tok/step.model"
    tok = StepTokenizer(path)
    ids = tok.encode("def f(x):\\n    return x")            # decode(encode(t)) == t for any text

`StepTokenizer` is what Megatron-Core's `GPTDatasetConfig.tokenizer` gets. In megatron-core 0.19.2 the
dataset code reads exactly these attributes of it (see `megatron/core/datasets/`):
  - `vocab_size` (int)         gpt_dataset.py GPTDatasetConfig.__post_init__: picks the token dtype code
  - `eod` (int)                gpt_dataset.py GPTDataset.__getitem__: the document separator passed to
                               `_get_ltor_masks_and_position_ids` (eod_mask_loss / reset_position_ids)
  - `pad` (int)                megatron_dataset.py MegatronDataset.__init__: labels equal to it get
                               loss_mask 0; falls back to -1 if the attribute raises
  - `eos` (int)                megatron_dataset.py: checked (with `eod`) for a collision with `pad`,
                               because `special_tokens_dict` is deliberately absent (see below)
  - `unique_identifiers` (dict) megatron_dataset.py: `json.dumps(..., default=lambda o:
                               o.unique_identifiers)` folds the tokenizer into the MD5 that names the
                               cached document/sample/shuffle index files; without it building fails
The config field is typed `MegatronTokenizerBase`, so we subclass it (its abstract methods are
implemented below) instead of duck typing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

__all__ = ["SPECIAL_TOKENS", "USER_SYMBOLS", "StepTokenizer", "train_tokenizer"]

# Fixed ids for the four SentencePiece "meta" pieces. pad is 0 because GPTDataset rewrites pad tokens
# to id 0 before the embedding lookup (`tokens[tokens == pad] = 0`): with pad == 0 that is a no-op.
SPECIAL_TOKENS: dict[str, str] = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
_META_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}

# User-defined symbols (ids 4..11): SentencePiece matches them verbatim in raw text, so each is always
# one id. Later stages need them: chat turns (<|im_start|>, <|im_end|>), reasoning RL (<think>,
# <answer>), multimodal pretraining (<image>) and masked objectives (<mask>).
USER_SYMBOLS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<image>",
    "<mask>",
)

# byte_fallback reserves one piece per byte value (<0x00>..<0xFF>), so any UTF-8 text encodes.
_N_BYTE_PIECES = 256
MIN_VOCAB_SIZE = len(_META_IDS) + len(USER_SYMBOLS) + _N_BYTE_PIECES + 1  # 269: at least one learned piece
_MODEL_TYPES = ("bpe", "unigram")


def _sentences(input_files: list[str], json_key: str) -> Iterator[str]:
    """Yield training sentences: non-empty lines of .txt files, or of the `json_key` field of each
    .jsonl record. SentencePiece's trainer treats each yielded string as one sentence, and newlines
    are not pieces (they encode through byte fallback), so documents are fed line by line."""
    for path in input_files:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".jsonl", ".json")):
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[json_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{lineno}: cannot read field {json_key!r}: {e!r}") from e
                    if not isinstance(text, str):
                        raise ValueError(
                            f"{path}:{lineno}: {json_key!r} is {type(text).__name__}, not a string"
                        )
                    yield from (s for s in text.split("\n") if s.strip())
            else:
                yield from (s.rstrip("\n") for s in f if s.strip())


def train_tokenizer(
    input_files: list[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    *,
    json_key: str = "text",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 0,
    num_threads: int = 1,
    seed: int = 0,
) -> str:
    """Train a SentencePiece BPE or unigram model on .txt / .jsonl files; return the .model path.

    Deterministic: same inputs and arguments give a byte-identical model (the sentence sampler is
    seeded, and `num_threads=1` by default so unigram EM sums in a fixed order).
    `input_sentence_size=0` trains on every sentence; set it (e.g. 10_000_000) for large corpora.
    """
    if not isinstance(input_files, list | tuple) or not input_files:
        raise ValueError(f"input_files must be a non-empty list of paths, got {input_files!r}")
    for p in input_files:
        if not os.path.isfile(p):
            raise ValueError(f"input_files: {p!r} does not exist or is not a file")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type must be one of {_MODEL_TYPES}, got {model_type!r}")
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (4 meta + {len(USER_SYMBOLS)} user symbols"
            f" + {_N_BYTE_PIECES} byte-fallback pieces + 1), got {vocab_size!r}"
        )
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)

    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(list(input_files), json_key),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        pad_id=_META_IDS["pad"],
        unk_id=_META_IDS["unk"],
        bos_id=_META_IDS["bos"],
        eos_id=_META_IDS["eos"],
        pad_piece=SPECIAL_TOKENS["pad"],
        unk_piece=SPECIAL_TOKENS["unk"],
        bos_piece=SPECIAL_TOKENS["bos"],
        eos_piece=SPECIAL_TOKENS["eos"],
        user_defined_symbols=list(USER_SYMBOLS),
        # Exact round trip for code: no NFKC, keep runs of spaces (indentation) and let them become
        # pieces ("▁▁▁▁"), no dummy "▁" prefix (segments tokenised separately concatenate cleanly).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        split_digits=True,
        minloglevel=2,
    )
    return model_prefix + ".model"


class StepTokenizer(MegatronTokenizerBase):
    """A loaded SentencePiece model. Special ids are read from the model (not assumed), so any
    SentencePiece model works; one without a pad piece reports `pad == -1`, which Megatron-Core's
    datasets also use for "no pad"."""

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise ValueError(f"model_path: {model_path!r} does not exist")
        # MegatronTokenizerBase stores `path` and sets each config key as an attribute.
        super().__init__(model_path, {"library": "sentencepiece", "model_type": "gpt"})
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        with open(model_path, "rb") as f:
            self._sha256 = hashlib.sha256(f.read()).hexdigest()

    # -- our API ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        """Id of a piece (e.g. "<think>"); raises KeyError if the model lacks it (SentencePiece
        itself would silently return the unk id)."""
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise KeyError(f"piece {piece!r} is not in tokenizer {self.model_path!r}")
        return i

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """Vocab size rounded up to `multiple`, the size of the embedding/output layers. Megatron pads
        to `make_vocab_size_divisible_by * tp` so each TP shard of the vocab is equal and aligned:
        pass `multiple=128 * tp`. E.g. 32_011 pieces, multiple 128 -> 32_128 rows."""
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        return -(-self.vocab_size // multiple) * multiple

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def eod(self) -> int:
        # End of document == eos: preprocess appends it after every document, GPTDataset reads it.
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    # -- MegatronTokenizerBase -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("chat templates belong to the post-training stage")

    @property
    def unique_identifiers(self) -> OrderedDict:
        # Content hash rather than path: a retrained model at the same path must not reuse the
        # dataset index cache, and a copied model elsewhere may.
        return OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("model_sha256", self._sha256),
                ("vocab_size", self.vocab_size),
            ]
        )

    # `special_tokens_dict` is intentionally not defined: Megatron-Core would compare the pad id with
    # its *values*, which are piece strings for HF-style tokenizers, and the check would be vacuous.
    # Without it, Megatron checks pad against eos and eod ids, which is the check that matters.

    def __repr__(self) -> str:
        return f"StepTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

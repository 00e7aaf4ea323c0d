"""Tokenizers: the project's SentencePiece model (`train_tokenizer`, `StepTokenizer`) and a Hugging Face
tokenizer directory (`HFTokenizer`), behind one interface; `load_tokenizer` picks by the path.

    from megatron_step.data import train_tokenizer, StepTokenizer
    path = train_tokenizer(["corpus/train.jsonl"], "tok/step", vocab_size=32000)   # -> "tok/step.model"
    tok = StepTokenizer(path)
    ids = tok.encode("def f(x):\\n    return x")            # decode(encode(t)) == t for any text
    tok = load_tokenizer("ckpt/hf")                          # a directory with tokenizer.json: HFTokenizer
    save_hf_tokenizer(tok, "runs/hf", chat_template)         # tokenizer.json + tokenizer_config.json

The interface both give: encode(text) (no special tokens added), decode(ids), token_id(piece),
id_to_piece(i), vocab_size, bos (None when an HF tokenizer has none), eos (== eod), pad, unk,
with_bos(ids) (the sequence the model reads: bos first, unless the tokenizer has none or the text
already began with it, as a template writing `{{ bos_token }}` makes it), `chat_template` (the
tokenizer's own Jinja template, or None: the embedded one is megatron_step.data.chat's default) and
`special_tokens` (bos_token, eos_token, ... as text: the variables a Hugging Face template is given).

Export: `save_hf_tokenizer` writes what `transformers.AutoTokenizer.from_pretrained` reads. For the
SentencePiece model it builds the equivalent `tokenizers` BPE (the vocabulary and scores of the model,
every merge whose parts and result are pieces, ranked by the result's score; byte fallback; spaces
as "▁"; the user symbols as added tokens), which encodes every text to the same ids as SentencePiece
(tests/data/test_hf_tokenizer.py checks it on the corpus, code and random strings). transformers'
own converter (`convert_slow_tokenizer`) needs the slow tokenizer class of a model family and the
protobuf package; the pieces are all in the SentencePiece processor's API, so we build it directly.
One difference is deliberate: the meta pieces (<s>, </s>, <pad>, <unk>) written as text are those
special tokens for the Hugging Face tokenizer (as every HF tokenizer treats its special tokens) and
plain characters for SentencePiece. The exported chat template starts with `{{ bos_token }}`, so
`apply_chat_template` gives the ids our stages build (bos + the rendered conversation).

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

__all__ = [
    "SPECIAL_TOKENS",
    "USER_SYMBOLS",
    "HFTokenizer",
    "StepTokenizer",
    "TokenizerError",
    "load_tokenizer",
    "save_hf_tokenizer",
    "train_tokenizer",
]

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


class TokenizerError(ValueError):
    """A tokenizer path or directory that cannot be used (the message names the file and what to do)."""


class _Common:
    """What both tokenizers share (see the module docstring)."""

    chat_template: str | None = None

    def with_bos(self, ids: list[int]) -> list[int]:
        if self.bos is None or (ids and ids[0] == self.bos):
            return list(ids)
        return [self.bos, *ids]

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """Vocab size rounded up to `multiple`, the size of the embedding/output layers. Megatron pads
        to `make_vocab_size_divisible_by * tp` so each TP shard of the vocab is equal and aligned:
        pass `multiple=128 * tp`. E.g. 32_011 pieces, multiple 128 -> 32_128 rows."""
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        return -(-self.vocab_size // multiple) * multiple

    @property
    def special_tokens(self) -> dict[str, str]:
        out = {}
        for name in ("bos", "eos", "pad", "unk"):
            i = getattr(self, name)
            if i is not None and i >= 0:
                out[f"{name}_token"] = self.id_to_piece(i)
        return out


class StepTokenizer(_Common, MegatronTokenizerBase):
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

    @property
    def has_pad(self) -> bool:
        return self.pad >= 0

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


# Files of a Hugging Face tokenizer directory that travel with it (save_hf_tokenizer copies them).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)


class HFTokenizer(_Common, MegatronTokenizerBase):
    """A Hugging Face tokenizer directory (`tokenizer.json`, `tokenizer_config.json` and what
    `transformers` writes beside them), loaded with `transformers.PreTrainedTokenizerFast`: any
    tokenizer.json of the `tokenizers` library, no remote code. Its chat template (tokenizer_config.json
    or chat_template.jinja) is `chat_template`. Encoding adds no special tokens (a template or
    `with_bos` places them); text naming a special token (e.g. "<|im_end|>") is that token."""

    def __init__(self, path: str) -> None:
        from transformers import PreTrainedTokenizerFast

        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise TokenizerError(
                f"{path}: no tokenizer.json; a Hugging Face tokenizer directory needs the fast-tokenizer "
                "file (tokenizer.save_pretrained(dir) writes it), or give a sentencepiece .model"
            )
        super().__init__(path, {"library": "huggingface", "model_type": "gpt"})
        self.model_path = path
        try:
            self.hf = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises several types for a broken directory
            raise TokenizerError(f"{path}: cannot load the tokenizer: {type(e).__name__}: {e}") from None
        self._tok = self.hf.backend_tokenizer
        if self.hf.eos_token_id is None:
            raise TokenizerError(
                f"{path}/tokenizer_config.json: no eos_token; generation and documents end with it: set "
                '"eos_token" (e.g. "</s>" or "<|im_end|>")'
            )
        self.chat_template = self.hf.chat_template if isinstance(self.hf.chat_template, str) else None
        digest = hashlib.sha256()
        for name in HF_TOKENIZER_FILES:
            f = os.path.join(path, name)
            if os.path.isfile(f):
                with open(f, "rb") as fh:
                    digest.update(name.encode() + fh.read())
        self._sha256 = digest.hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        if i is None:
            raise KeyError(f"piece {piece!r} is not in tokenizer {self.model_path!r}")
        return i

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    @property
    def bos(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos(self) -> int:
        return self.hf.eos_token_id

    @property
    def eod(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad(self) -> int:
        # No pad token: rows are padded with eos. Padding never carries loss here (SFT and RL masks are
        # explicit); pretraining's GPTDataset would mask every eos label, so it refuses such a
        # tokenizer (megatron_step.data.pipeline.prepare_datasets).
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    @property
    def has_pad(self) -> bool:
        return self.hf.pad_token_id is not None

    @property
    def unk(self) -> int | None:
        return self.hf.unk_token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("megatron_step.data.chat renders templates (it also gives the loss mask)")

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("files_sha256", self._sha256),
                ("vocab_size", self.vocab_size),
            ]
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> StepTokenizer | HFTokenizer:
    """A sentencepiece .model file -> StepTokenizer; a Hugging Face tokenizer directory -> HFTokenizer."""
    if os.path.isdir(path):
        return HFTokenizer(path)
    if os.path.isfile(path):
        return StepTokenizer(path)
    raise TokenizerError(
        f"data.tokenizer_model={path!r}: no such file or directory (a sentencepiece .model, or a Hugging "
        "Face tokenizer directory with tokenizer.json)"
    )


def _sentencepiece_as_hf(tok: StepTokenizer):
    """The `tokenizers.Tokenizer` that encodes as `tok` does (module docstring: how and why)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    with open(tok.model_path, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise TokenizerError(f"{tok.model_path}: only BPE sentencepiece models export (train_tokenizer's)")
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise TokenizerError(
            f"{tok.model_path}: normaliser {norm.name!r} (dummy prefix {norm.add_dummy_prefix}, extra "
            f"whitespace removal {norm.remove_extra_whitespaces}): only train_tokenizer's settings "
            "(identity, no dummy prefix, whitespace kept) export to tokenizer.json"
        )
    kind = proto.SentencePiece
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = []
    for p, score, t in pieces:
        if t != kind.NORMAL:
            continue
        for k in range(1, len(p)):
            left, right = p[:k], p[k:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    model = models.BPE(
        vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=pieces[tok.unk][0], byte_fallback=True,
        fuse_unk=True,
    )  # fmt: skip
    out = Tokenizer(model)
    # train_tokenizer's model: identity normalisation, no dummy prefix, spaces escaped as "▁"
    out.normalizer = normalizers.Replace(" ", "▁")
    out.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    out.add_tokens(
        [AddedToken(p, normalized=False, special=False) for p, _, t in pieces if t == kind.USER_DEFINED]
    )
    meta = (kind.CONTROL, kind.UNKNOWN)
    out.add_special_tokens([AddedToken(p, normalized=False, special=True) for p, _, t in pieces if t in meta])
    return out


def save_hf_tokenizer(
    tok: StepTokenizer | HFTokenizer, out_dir: str, chat_template: str | None = None
) -> list[str]:
    """Write `tok` into `out_dir` as a Hugging Face tokenizer directory with `chat_template` (Jinja text;
    None: the tokenizer's own). Returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(tok, HFTokenizer):
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast.from_pretrained(tok.model_path, local_files_only=True)
        if chat_template is not None:
            hf.chat_template = chat_template
        return list(hf.save_pretrained(out_dir))
    import shutil

    backend = _sentencepiece_as_hf(tok)
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tok.special_tokens,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if chat_template is not None:
        # the embedded stages read bos + the rendered text; the HF template writes the bos itself
        config["chat_template"] = "{{ bos_token }}" + chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    shutil.copy(tok.model_path, os.path.join(out_dir, "tokenizer.model"))
    return [os.path.join(out_dir, n) for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")]

"""SentencePiece tokenizer: exact round trip, special tokens as single ids, determinism, argument
validation, and the attributes Megatron-Core's GPTDataset reads from `GPTDatasetConfig.tokenizer`."""

from __future__ import annotations

import json

import pytest
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_step.data import SPECIAL_TOKENS, USER_SYMBOLS, StepTokenizer, train_tokenizer

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "  leading spaces,\ttabs and trailing  \n\n\n",
    "ünïcödé, 中文, emoji 🎉 and a NUL \x00 byte",
    "1234567890 digits",
    "<|im_start|>user\nhi<|im_end|><think>hmm</think><answer>42</answer><image><mask>",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_fixed_ids(tok):
    expected = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")] + list(USER_SYMBOLS)
    assert [tok.id_to_piece(i) for i in range(len(expected))] == expected
    assert (tok.pad, tok.unk, tok.bos, tok.eos, tok.eod) == (0, 1, 2, 3, 3)
    for i, sym in enumerate(USER_SYMBOLS, start=4):
        assert tok.encode(sym) == [i] and tok.token_id(sym) == i
    # user symbols are matched inside running text too
    assert tok.encode("a<think>b").count(tok.token_id("<think>")) == 1
    with pytest.raises(KeyError, match="<nope>"):
        tok.token_id("<nope>")


def test_vocab_size_and_padding(tok):
    assert tok.vocab_size == 400 == len(tok.vocab)
    assert tok.padded_vocab_size() == 512
    assert tok.padded_vocab_size(128 * 4) == 512  # TP=4: 4 equal shards of 128 rows
    assert tok.padded_vocab_size(100) == 400


def test_megatron_dataset_contract(tok):
    # what megatron/core/datasets/{gpt,megatron}_dataset.py read from config.tokenizer
    assert isinstance(tok, MegatronTokenizerBase)
    assert isinstance(tok.vocab_size, int) and isinstance(tok.eod, int) and isinstance(tok.pad, int)
    assert tok.pad not in (tok.eos, tok.eod)  # else Megatron disables pad masking with a warning
    desc = json.loads(json.dumps({"tokenizer": tok}, default=lambda o: o.unique_identifiers))
    assert desc["tokenizer"]["vocab_size"] == 400 and len(desc["tokenizer"]["model_sha256"]) == 64
    assert tok.detokenize(tok.tokenize("x = 1")) == "x = 1"


def test_training_is_deterministic(corpus, tok, tmp_path):
    again = StepTokenizer(train_tokenizer([corpus["train"]], str(tmp_path / "again"), 400))
    assert again.vocab == tok.vocab
    assert again.encode(TEXTS[0] + TEXTS[2]) == tok.encode(TEXTS[0] + TEXTS[2])


def test_unigram_trains(corpus, tmp_path):
    t = StepTokenizer(train_tokenizer([corpus["train"]], str(tmp_path / "uni"), 400, model_type="unigram"))
    assert t.decode(t.encode(TEXTS[2])) == TEXTS[2] and t.token_id("<mask>") == 11


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 100}, r"vocab_size .* got 100"),
        ({"vocab_size": 400, "model_type": "wordpiece"}, r"model_type .* got 'wordpiece'"),
        ({"vocab_size": 400, "input_files": ["/no/such/file.txt"]}, r"input_files: '/no/such/file.txt'"),
        ({"vocab_size": 400, "input_files": []}, r"input_files must be a non-empty list"),
    ],
)
def test_bad_arguments_name_field_and_value(corpus, tmp_path, kwargs, match):
    args = {"input_files": [corpus["train"]], "model_prefix": str(tmp_path / "m")} | kwargs
    with pytest.raises(ValueError, match=match):
        train_tokenizer(**args)

"""Hugging Face tokenizers: the project's sentencepiece model exported as tokenizer.json encodes every
text to the same ids, `transformers`' apply_chat_template on the export gives the ids our stages
build, and a tokenizer directory made with `tokenizers` (no bos, its own chat template) is read
through the same interface, its template used and the assistant mask right."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_step.data.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, encode_chat
from megatron_step.data.tokenizer import (
    HFTokenizer,
    StepTokenizer,
    TokenizerError,
    load_tokenizer,
    save_hf_tokenizer,
)

# a ChatML variant that differs from the default: a default system turn, and "<|im_sep|>" after roles
OWN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system<|im_sep|>You are helpful.<|im_end|>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_sep|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant<|im_sep|>{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 * 4?"},
    {"role": "assistant", "content": "4 * 4 = 16"},
]


def _texts(corpus) -> list[str]:
    with open(corpus["train"]) as f:
        docs = [json.loads(line)["text"] for line in f][:20]
    rng = random.Random(0)
    bits = [
        "  ",
        "    ",
        "\n",
        "\t",
        "é",
        "日本",
        "x",
        "12345",
        "def f(x):",
        " return",
        "<|im_end|>",
        "<think>",
    ]
    bits += ["😀", "a b", "the", " ", "\u00a0", "\r\n", "ß", "0.25", "}}"]
    noise = ["".join(rng.choice(bits) for _ in range(rng.randint(1, 25))) for _ in range(1500)]
    return docs + [line for d in docs for line in d.splitlines()] + noise


def test_the_exported_sentencepiece_model_encodes_and_decodes_every_text_as_sentencepiece(
    tok, corpus, tmp_path
):
    save_hf_tokenizer(tok, str(tmp_path / "hf"), DEFAULT_CHAT_TEMPLATE)
    hf = load_tokenizer(str(tmp_path / "hf"))
    assert isinstance(hf, HFTokenizer) and hf.vocab_size == tok.vocab_size
    assert (hf.bos, hf.eos, hf.pad, hf.unk) == (tok.bos, tok.eos, tok.pad, tok.unk)
    assert hf.special_tokens == tok.special_tokens == {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"
    }  # fmt: skip
    texts = _texts(corpus)
    bad = [t for t in texts if hf.encode(t) != tok.encode(t)]
    assert not bad, f"{len(bad)} of {len(texts)} texts encode differently, e.g. {bad[0][:60]!r}"
    assert all(hf.decode(tok.encode(t)) == tok.decode(tok.encode(t)) for t in texts)
    assert sum(1 for t in texts if any(tok.id_to_piece(i).startswith("<0x") for i in tok.encode(t))) > 100


def test_transformers_apply_chat_template_on_the_export_gives_our_ids(tok, tmp_path):
    save_hf_tokenizer(tok, str(tmp_path / "hf"), DEFAULT_CHAT_TEMPLATE)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = ChatTemplate.for_tokenizer(None, tok)
    prompt = CHAT[:2]
    want = tok.with_bos(tok.encode(ours.render(prompt, add_generation_prompt=True)))
    got = theirs.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got == want and want[0] == tok.bos
    ids, _ = encode_chat(tok, ours, CHAT)
    assert theirs.apply_chat_template(CHAT, tokenize=True, return_dict=False) == ids
    # and read back as an HF directory by our own stages: the template writes the bos, with_bos keeps one
    hf = load_tokenizer(str(tmp_path / "hf"))
    again = ChatTemplate.for_tokenizer(None, hf)
    assert again.source.endswith("(its chat_template)") and encode_chat(hf, again, CHAT) == encode_chat(
        tok, ours, CHAT
    )


def make_hf_dir(corpus, path) -> str:
    """A small byte-level BPE tokenizer trained with `tokenizers`: no bos, eos "<|endoftext|>", a pad,
    chat special tokens and OWN_TEMPLATE as its chat template."""
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    with open(corpus["train"]) as f:
        t.train_from_iterator((json.loads(line)["text"] for line in f), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.chat_template = OWN_TEMPLATE
    fast.save_pretrained(str(path))
    return str(path)


def test_a_tokenizers_directory_is_read_with_its_own_template_and_mask(corpus, tmp_path):
    hf = load_tokenizer(make_hf_dir(corpus, tmp_path / "own"))
    assert hf.bos is None and hf.eos == hf.token_id("<|endoftext|>") and hf.pad == hf.token_id("<|pad|>")
    assert hf.encode("<|im_end|>") == [hf.token_id("<|im_end|>")]  # special tokens in text are themselves
    text = "def f(x):\n    return x  # é 日本"
    assert hf.decode(hf.encode(text)) == text and hf.with_bos([7, 8]) == [7, 8]  # no bos to add
    template = ChatTemplate.for_tokenizer(None, hf)
    assert template.text == OWN_TEMPLATE
    ids, learn = encode_chat(hf, template, CHAT)
    # by hand: the trained tokens are each assistant turn's content and its <|im_end|>
    sep, end = hf.token_id("<|im_sep|>"), hf.token_id("<|im_end|>")
    trained = [hf.decode([i for i, m in zip(ids, learn, strict=True) if m][: len(hf.encode("5")) + 1])]
    assert trained == ["5<|im_end|>"]
    runs, cur = [], []
    for i, m in zip(ids, learn, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [hf.decode(r) for r in runs] == ["5<|im_end|>", "4 * 4 = 16<|im_end|>"]
    assert ids[ids.index(end) + 1] == hf.token_id("<|im_start|>") and sep in ids
    assert hf.decode(ids).startswith("<|im_start|>system<|im_sep|>Be brief.<|im_end|>")  # no bos, no default
    # a template file given in the config wins over the tokenizer's own
    f = tmp_path / "t.jinja"
    f.write_text(DEFAULT_CHAT_TEMPLATE)
    assert ChatTemplate.for_tokenizer(str(f), hf).text == DEFAULT_CHAT_TEMPLATE
    # and the directory saves and reloads (the export of an HF-tokenizer run)
    save_hf_tokenizer(hf, str(tmp_path / "again"))
    back = load_tokenizer(str(tmp_path / "again"))
    assert back.chat_template == OWN_TEMPLATE and back.encode(text) == hf.encode(text)


def test_bad_tokenizer_paths_say_what_is_wrong(corpus, tmp_path, tok_model):
    with pytest.raises(TokenizerError, match=r"nope': no such file or directory \(a sentencepiece .model"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty: no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    d = make_hf_dir(corpus, tmp_path / "noeos")
    with open(f"{d}/tokenizer_config.json") as f:
        config = json.load(f)
    config.pop("eos_token")
    with open(f"{d}/tokenizer_config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(TokenizerError, match=r"noeos/tokenizer_config.json: no eos_token"):
        load_tokenizer(d)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"broken: cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "broken"))
    assert isinstance(load_tokenizer(tok_model), StepTokenizer)

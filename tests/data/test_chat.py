"""Chat templates, the assistant-only mask and the SFT data checks (megatron_step.data.chat, .sft)."""

from __future__ import annotations

import json
import os

import pytest

from megatron_step.config.run import SFTRunConfig, load_run_config
from megatron_step.data.chat import ChatError, ChatTemplate, encode_chat
from megatron_step.data.sft import ChatDataset, SFTConfig, SFTDataError, read_conversations
from megatron_step.data.tokenizer import StepTokenizer

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples/sft/sft_tiny.yaml"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
    {"role": "user", "content": "And 4 * 2?"},
    {"role": "assistant", "content": "4 * 2 = 8."},
]


@pytest.fixture(scope="module")
def tok(embedded_data):
    return StepTokenizer(os.path.join(embedded_data, "tokenizer_v512.model"))


def test_the_mask_covers_each_assistant_turn_and_its_end_marker_only(tok):
    template = ChatTemplate.load(None)
    ids, learn = encode_chat(tok, template, CONVERSATION)
    assert ids[0] == tok.bos and learn[0] == 0 and len(ids) == len(learn)
    assert tok.decode(ids[1:]) == template.render(CONVERSATION)  # the pieces tokenize to the whole text
    # the trained tokens, run by run: exactly the two assistant turns with their <|im_end|>\n
    runs, cur = [], []
    for i, flag in zip(ids, learn):
        if flag:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    want = ["2 + 3 = 5. The answer is 5.<|im_end|>\n", "4 * 2 = 8.<|im_end|>\n"]
    assert [tok.decode(r) for r in runs] == want
    context = tok.decode([i for i, f in zip(ids, learn) if not f])
    assert "Be brief." in context and "And 4 * 2?" in context and "<|im_start|>assistant\n" in context
    assert "The answer" not in context


def test_a_template_whose_prefix_is_not_a_prefix_of_the_whole_is_refused(tok):
    # writes the number of messages first: rendering messages[:2] does not start rendering messages[:3]
    counting = ChatTemplate("{{ messages|length }}\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ChatError, match=r"messages\[:2\].*not a prefix"):
        encode_chat(tok, counting, CONVERSATION)


def test_template_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "t.jinja"
    bad.write_text("line one\n{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(ChatError, match=r"t\.jinja: line 3"):
        ChatTemplate.load(str(bad))
    with pytest.raises(ChatError, match="no such file"):
        ChatTemplate.load(str(tmp_path / "missing.jinja"))
    refusing = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    with pytest.raises(ChatError, match="user first"):
        refusing.render([{"role": "assistant", "content": "x"}])


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


GOOD = {"messages": CONVERSATION[1:3]}
BAD_LINES = [
    ("{not json", "not JSON"),
    ({"text": "hi"}, "no field 'messages'"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "robot"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"prompt": "q", "response": 3}, "field 'response': expected text"),
]


@pytest.mark.parametrize("line,why", BAD_LINES, ids=[w.split()[0] for _, w in BAD_LINES])
def test_a_bad_line_is_named_by_file_and_line_or_skipped_and_counted(tok, tmp_path, line, why):
    path = _write(tmp_path / "chats.jsonl", [GOOD, line, GOOD])
    template = ChatTemplate.load(None)
    with pytest.raises(SFTDataError, match=rf"chats\.jsonl:2: .*{why}.*skip_bad_lines"):
        read_conversations([path], SFTConfig(), tok, template)
    got = read_conversations([path], SFTConfig(skip_bad_lines=True), tok, template)
    assert got["skipped"] == 1 and len(got["samples"]) == 2 and got["reasons"][0].startswith(f"{path}:2: ")


def test_pairs_with_a_system_prompt_and_configured_keys(tok, tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{"q": "What is 1 + 1?", "a": "2", "sys": "Be brief."}])
    cfg = SFTConfig(prompt_key="q", response_key="a", system_key="sys")
    ((ids, learn),) = read_conversations([path], cfg, tok, ChatTemplate.load(None))["samples"]
    assert tok.decode(ids[1:]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert tok.decode([i for i, f in zip(ids, learn) if f]) == "2<|im_end|>\n"


def test_empty_and_missing_files(tok, tmp_path):
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(SFTDataError, match="no conversation to train on"):
        read_conversations([empty], SFTConfig(), tok, ChatTemplate.load(None))
    with pytest.raises(ValueError, match=r"sft.train_files: '.*nope.jsonl' is not a file"):
        load_run_config(CONFIG, [f"sft.train_files=[{tmp_path}/nope.jsonl]"], SFTRunConfig)


def test_samples_shift_the_mask_with_the_labels_and_cut_or_drop_long_ones(tok):
    ids, learn = encode_chat(tok, ChatTemplate.load(None), CONVERSATION)
    n = len(ids)
    (item,) = ChatDataset([(ids, learn)], tok, n + 4).items
    assert item["tokens"][: n - 1].tolist() == ids[:-1] and item["labels"][: n - 1].tolist() == ids[1:]
    assert item["loss_mask"][: n - 1].tolist() == [float(f) for f in learn[1:]]
    assert item["loss_mask"][n - 1 :].sum() == 0  # padding
    cut = ChatDataset([(ids, learn)], tok, n - 5)
    assert cut.info == {"samples": 1, "truncated": 1, "dropped_overlong": 0}
    with pytest.raises(SFTDataError, match="raise data.seq_length"):
        ChatDataset([(ids, learn)], tok, n - 5, overlong="drop")
    first_answer = learn.index(1)
    with pytest.raises(SFTDataError, match="no assistant token"):  # cut before the first answer token
        ChatDataset([(ids, learn)], tok, first_answer - 1)

"""megatron_step.data.records: Parquet files give the records their JSONL twins give (SFT conversations
and RL problems read the same), and a bad row or a file that is not Parquet is named."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_step.data.chat import ChatError, ChatTemplate
from megatron_step.data.records import iter_records
from megatron_step.data.sft import SFTConfig, SFTDataError, read_conversations
from megatron_step.rl.dataset import DatasetTask, RLDataConfig, RLDataError
from megatron_step.rl.sandbox import SandboxConfig

CHATS = [
    {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]},
    {"prompt": "Say hi.", "response": "hi", "system": "Be brief."},
    {
        "messages": [
            {"role": "system", "content": "Tutor."},
            {"role": "user", "content": "1 + 1?"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "and 2 + 2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]
PROBLEMS = [
    {"prompt": "What is 2 + 3?", "label": "5", "data_source": "arith"},
    {"prompt": "Say hi.", "label": "x"},  # a Parquet column has one type: text prompts here
]


def _both(tmp_path, rows, name):
    jsonl = tmp_path / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / f"{name}.parquet"
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every column (a row without one: null)
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), parquet)
    return str(jsonl), str(parquet)


def test_parquet_rows_are_the_jsonl_records(tmp_path, tok):
    a, b = _both(tmp_path, CHATS, "chats")
    assert [r for _, r in iter_records(b)] == [r for _, r in iter_records(a)]  # null columns left out
    assert [w for w, _ in iter_records(b)] == [f"{b}:row {i}" for i in (1, 2, 3)]
    cfg, template = SFTConfig(), ChatTemplate.load(None)
    ja, pb = read_conversations([a], cfg, tok, template), read_conversations([b], cfg, tok, template)
    assert ja["samples"] == pb["samples"] and len(pb["samples"]) == 3
    ra, rb = _both(tmp_path, PROBLEMS, "problems")
    code = SandboxConfig()
    ta = DatasetTask(RLDataConfig(train=[ra], eval=[ra]), code)
    tb = DatasetTask(RLDataConfig(train=[rb], eval=[rb]), code)
    strip = [(p.prompt, p.label, p.source) for p in ta.train(10, 0)]
    assert strip == [(p.prompt, p.label, p.source) for p in tb.train(10, 0)] and len(strip) == 2


def test_a_bad_row_and_a_file_that_is_not_parquet_are_named(tmp_path, tok):
    rows = [PROBLEMS[0], {"question": "no prompt", "label": "1"}]
    _, b = _both(tmp_path, rows, "bad")
    with pytest.raises(RLDataError, match=r"bad.parquet:row 2: no field 'prompt'"):
        DatasetTask(RLDataConfig(train=[b], eval=[b]), SandboxConfig())
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"prompt": "x", "label": "1"}\n')
    with pytest.raises(RLDataError, match=r"fake.parquet: not a Parquet file"):
        DatasetTask(RLDataConfig(train=[str(fake)], eval=[str(fake)]), SandboxConfig())
    with pytest.raises(SFTDataError, match=r"fake.parquet: not a Parquet file"):
        read_conversations([str(fake)], SFTConfig(), tok, ChatTemplate.load(None))
    skipped = DatasetTask(RLDataConfig(train=[b], eval=[b], skip_bad_lines=True), SandboxConfig())
    assert skipped.skipped == 2 and skipped.reasons[0].startswith(f"{b}:row 2: no field 'prompt'")
    assert isinstance(ChatError("x"), ValueError)

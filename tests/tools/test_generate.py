"""tools/generate.py and megatron_step/stages/generate.py: completions from a run directory and from its
Hugging Face export are the same tokens; `transformers` on the export (AutoTokenizer's
apply_chat_template, Step3p7TextModel with its KV cache, greedy) gives them too; TP=2 gives what one
process gives (greedy and keyed sampling); the CLI streams, writes JSONL and names bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.posttrain_e2e import transformers_greedy
from megatron_step import platform
from megatron_step.config.run import RLRunConfig, load_run_config
from megatron_step.convert.hf_checkpoint import export_to_hf
from megatron_step.rl.engine import SamplingParams
from megatron_step.rl.tasks import arithmetic_problems, prompt_text
from megatron_step.stages.evaluate import evaluate
from megatron_step.stages.generate import complete, load_policy
from megatron_step.testing import run_distributed
from megatron_step.training import checkpoint

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ["model.vocab_size=512", "data.tokenizer_vocab_size=512"]
CHATS = [
    [{"role": "user", "content": "Q: What is 3 + 4?\nA:"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: What is 2 * 5 - 1?\nA:"}],
]
TEXTS = ["Q: What is 1 + 1?\nA:", "Q: What is 5 - 2?\nA:"]


def _cfg(data_dir, *extra):
    return load_run_config(
        os.path.join(REPO, "examples/rl/rl_tiny.yaml"),
        [*OVERRIDES, f"data.data_dir={data_dir}", *extra],
        RLRunConfig,
    )


def export_body(rank, ws, data_dir, run_dir, hf_dir):
    cfg = _cfg(data_dir)
    platform.setup(cfg.parallel, seed=0)
    try:
        ckpt = checkpoint.checkpoint_dir(run_dir, checkpoint.latest_step(run_dir))
        tok = os.path.join(data_dir, "tokenizer_v512.model")
        export_to_hf(ckpt, hf_dir, cfg.model_config(), torch.float32, tok, progress=False, dialect="native")
    finally:
        platform.teardown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, embedded_data, golden_run):
    run_dir = os.path.join(golden_run("rl_sync"), "rl_sft")  # the arithmetic warm-up, "Q: ...\nA:" prompts
    hf_dir = str(tmp_path_factory.mktemp("generate") / "hf")
    run_distributed(export_body, 1, str(embedded_data), run_dir, hf_dir)
    return {"data": str(embedded_data), "run": run_dir, "hf": hf_dir}


def generate_body(rank, ws, data_dir, source, prompts, chat, sampled, extra):
    cfg = _cfg(data_dir, *extra)
    platform.setup(cfg.parallel, seed=cfg.train.seed)
    try:
        policy = load_policy(cfg, source)
        params = SamplingParams(max_new_tokens=14, greedy=not sampled, temperature=1.0, seed=5)
        return complete(policy, prompts, params, chat=chat, n=2 if sampled else 1)
    finally:
        platform.teardown()


def test_a_run_directory_its_hf_export_and_transformers_generate_the_same_tokens(setup):
    ours = run_distributed(generate_body, 1, setup["data"], setup["run"], CHATS + TEXTS, False, False, [])[0]
    from_hf = run_distributed(generate_body, 1, setup["data"], setup["hf"], CHATS + TEXTS, False, False, [])[
        0
    ]
    assert [o["ids"] for o in from_hf] == [o["ids"] for o in ours]
    assert [o["prompt_ids"] for o in from_hf] == [o["prompt_ids"] for o in ours]
    theirs = transformers_greedy(setup["hf"], CHATS, 14)
    assert [ids for ids, _ in theirs] == [o["prompt_ids"] for o in ours[:2]]  # apply_chat_template
    assert [new for _, new in theirs] == [o["ids"] for o in ours[:2]]
    assert all(o["finish"] in ("stop", "length") for o in ours) and all(o["ids"] for o in ours)
    # the warm-up learned "Q: ...\nA:" -> a worked answer: the raw prompts are answered
    assert sum("<answer>" in o["text"] for o in ours[2:]) >= 1, [o["text"] for o in ours]


def test_tensor_parallel_generation_matches_one_process(setup):
    for sampled in (False, True):
        one = run_distributed(generate_body, 1, setup["data"], setup["run"], CHATS, True, sampled, [])[0]
        two = run_distributed(
            generate_body, 2, setup["data"], setup["run"], CHATS, True, sampled, ["parallel.tp=2"]
        )
        assert [o["ids"] for o in two[0]] == [o["ids"] for o in one] == [o["ids"] for o in two[1]]
    assert len(one) == 4 and one[0]["ids"] != one[1]["ids"]  # two keyed samples of prompt 0 differ


def evaluate_body(rank, ws, data_dir, source, file):
    cfg = _cfg(data_dir, "rl.max_new_tokens=12", "rl.data.prompt_format=raw")
    try:
        return evaluate(cfg, source, [file], k=2, batch=8, progress=False)
    finally:
        platform.teardown()


def test_evaluate_takes_the_hf_export_and_gives_the_run_directorys_numbers(setup, tmp_path):
    rows = [
        {"prompt": prompt_text(p), "label": p.answer} for p in arithmetic_problems(6, seed=11, max_steps=1)
    ]
    file = tmp_path / "p.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = run_distributed(evaluate_body, 1, setup["data"], setup["run"], str(file))[0]
    b = run_distributed(evaluate_body, 1, setup["data"], setup["hf"], str(file))[0]
    assert b["step"] is None and "HF, native dialect" in b["checkpoint"] and a["step"] is not None
    assert a["overall"] == b["overall"] and a["overall"]["problems"] == 6


def _cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools/generate.py"),
        "--config",
        "examples/rl/rl_tiny.yaml",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_the_cli_streams_writes_jsonl_and_names_bad_input(setup, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": TEXTS[0]}) + "\n" + json.dumps({"messages": CHATS[0]}) + "\n")
    out = tmp_path / "out.jsonl"
    base = [*OVERRIDES, f"data.data_dir={setup['data']}"]
    r = _cli("--checkpoint", setup["hf"], "--file", str(prompts), "--max-new-tokens", "14", "--stream",
             "--out", str(out), *base)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ours = run_distributed(
        generate_body, 1, setup["data"], setup["hf"], [TEXTS[0], CHATS[0]], False, False, []
    )[0]
    assert [row["ids"] for row in rows] == [o["ids"] for o in ours]
    for row in rows:  # streamed pieces make up the text
        assert row["text"] in r.stdout
    assert "# [0.0]" in r.stdout and "# [1.0]" in r.stdout
    bad = _cli("--checkpoint", setup["hf"], "--messages", "[{not json", *base)
    assert bad.returncode == 1 and "data error: --messages: not JSON" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = _cli("--checkpoint", str(tmp_path / "nope"), "--prompt", "x", *base)
    assert missing.returncode == 1 and "nope: not a directory" in missing.stderr
    prompts.write_text('{"text": "no prompt key"}\n')
    nokey = _cli("--checkpoint", setup["hf"], "--file", str(prompts), *base)
    assert nokey.returncode == 1 and "prompts.jsonl:1: no 'prompt'" in nokey.stderr

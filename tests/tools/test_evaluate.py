"""tools/evaluate.py: avg@k / pass@k / greedy per data_source on a problem file, failed reward calls
counted, the same numbers under DP=2 as in one process, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_step import platform
from megatron_step.config.run import RLRunConfig, load_run_config
from megatron_step.rl.tasks import arithmetic_problems, prompt_text
from megatron_step.stages.evaluate import evaluate
from megatron_step.testing import run_distributed

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = [
    "model.vocab_size=512", "data.tokenizer_vocab_size=512", "rl.max_new_tokens=10",
    "rl.data.prompt_format=raw", "rl.data.rewards.broken=tests.rl._rewards_fixtures:broken_reward",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the reward workers import tests.rl._rewards_fixtures from here


@pytest.fixture(scope="module")
def setup(tmp_path_factory, embedded_data, golden_run):
    """The golden RL warm-up checkpoint and a problem file: 8 arithmetic problems with their answers,
    4 with an answer nobody gives, 2 scored by a reward that always raises."""
    root = tmp_path_factory.mktemp("evaluate")
    probs = arithmetic_problems(14, seed=7, max_steps=1, max_operand=5)
    rows = [{"prompt": prompt_text(p), "label": p.answer, "data_source": "right"} for p in probs[:8]]
    rows += [{"prompt": prompt_text(p), "label": "999999", "data_source": "wrong"} for p in probs[8:12]]
    rows += [{"prompt": prompt_text(p), "label": p.answer, "data_source": "broken"} for p in probs[12:]]
    path = root / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = os.path.join(golden_run("rl_sync"), "rl_sft")
    return {"data": str(embedded_data), "ckpt": sft, "file": str(path)}


def body(rank, world_size, data_dir, ckpt, file):
    cfg = load_run_config("examples/rl/rl_tiny.yaml", [*OVERRIDES, f"data.data_dir={data_dir}"], RLRunConfig)
    try:
        return evaluate(cfg, ckpt, [file], k=2, batch=8, progress=False)
    finally:
        platform.teardown()


def test_per_source_scores_and_failed_calls(setup):
    out = run_distributed(body, 1, setup["data"], setup["ckpt"], setup["file"])[0]
    s = out["sources"]
    assert (out["problems"], out["k"], sorted(s)) == (14, 2, ["broken", "right", "wrong"])
    assert s["wrong"] == {
        "problems": 4,
        "samples": 8,
        "greedy": 0.0,
        "avg@k": 0.0,
        "pass@k": 0.0,
        "failed": 0,
    }
    # every call of the broken reward failed: 1 greedy + 2 sampled per problem, counted, none correct
    assert (s["broken"]["failed"], s["broken"]["avg@k"], s["broken"]["pass@k"]) == (6, 0.0, 0.0)
    right = s["right"]
    assert right["failed"] == 0 and 0.0 <= right["avg@k"] <= right["pass@k"] <= 1.0
    assert out["overall"]["avg@k"] == pytest.approx(right["avg@k"] * 16 / 28)  # 16 of 28 samples
    assert out["overall"]["greedy"] == pytest.approx(right["greedy"] * 8 / 14)


def test_two_data_parallel_ranks_give_the_numbers_of_one_process(setup):
    one = run_distributed(body, 1, setup["data"], setup["ckpt"], setup["file"])[0]
    two = run_distributed(body, 2, setup["data"], setup["ckpt"], setup["file"])
    assert two[0] == two[1] == one


def _cli(*args) -> subprocess.CompletedProcess:
    """tools/evaluate.py in its own process (an in-process run would leave torch.distributed's
    environment -- RANK, MASTER_PORT -- in this one for every later test)."""
    cmd = [sys.executable, "tools/evaluate.py", "--config", "examples/rl/rl_tiny.yaml", *OVERRIDES, *args]
    # the repository on the path: the broken reward lives in tests.rl._rewards_fixtures
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_the_entry_point_names_a_missing_checkpoint_and_a_bad_line(setup, tmp_path):
    common = [f"data.data_dir={setup['data']}"]
    p = _cli(*common, "--checkpoint", str(tmp_path / "empty_run"), "--data", setup["file"])
    assert p.returncode == 1 and "empty_run: not a directory" in p.stderr.splitlines()[-1], p.stderr
    (tmp_path / "empty_run").mkdir()
    p = _cli(*common, "--checkpoint", str(tmp_path / "empty_run"), "--data", setup["file"])
    assert "empty_run: neither a run directory with checkpoints/ nor a Hugging Face" in p.stderr, p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q: 1 + 1?\\nA:", "label": "2"}\n{"prompt": "x"}\n')
    p = _cli(*common, "--checkpoint", setup["ckpt"], "--data", str(bad))
    last = p.stderr.splitlines()[-1]
    assert p.returncode == 1 and last.startswith("data error: ") and "bad.jsonl:2: no field 'label'" in last
    out = tmp_path / "r.json"
    p = _cli(*common, "--checkpoint", setup["ckpt"], "--data", setup["file"], "--k", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    assert "avg@1" in p.stdout and "right" in p.stdout and result["k"] == 1 and result["problems"] == 14

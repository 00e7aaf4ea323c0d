"""The SFT stage end to end at toy size: the embedded chat data trains (validation loss falls), a
stopped and resumed run equals the uninterrupted one bit for bit, bad data stops the entry point with
one line naming file and line, and (slow) DP=2 follows the 1-process run."""

from __future__ import annotations

import json
import os

import pytest

from megatron_step import platform
from megatron_step.config.run import SFTRunConfig, load_run_config
from megatron_step.stages.sft import train_sft
from megatron_step.testing import run_distributed
from megatron_step.testing.golden import compare, format_rows, read_run

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMINGS = ("seconds", "per_sec", "_ms", "tflops", "mfu")


def _overrides(data_dir, run_dir, *extra):
    return [
        "model.vocab_size=512",
        "data.tokenizer_vocab_size=512",
        f"data.data_dir={data_dir}",
        f"train.run_dir={run_dir}",
        "train.steps=6",
        "train.eval_interval=3",
        "train.eval_steps=2",
        "train.log_interval=1",
        "train.save_interval=3",
        "sft.embedded_train=128",
        "sft.embedded_valid=16",
        *extra,
    ]


def run(rank, world_size, overrides):
    cfg = load_run_config(os.path.join(REPO, "examples/sft/sft_tiny.yaml"), overrides, SFTRunConfig)
    try:
        return train_sft(cfg)
    finally:
        platform.teardown()


def _scalars(run_dir):
    a = read_run(run_dir)
    return {k: v for k, v in a.items() if not any(t in k for t in TIMINGS)}


def test_sft_trains_on_the_embedded_chats_and_resumes_bit_exactly(embedded_data, tmp_path):
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    out = run_distributed(run, 1, _overrides(embedded_data, straight))[0]
    assert out["data"]["train"]["samples"] == 128 and out["data"]["skipped"] == 0
    (first, a), (last, b) = out["val_curve"][0], out["val_curve"][-1]
    assert (first, last) == (3, 6) and b < a, out["val_curve"]  # the assistant-token loss falls
    with open(os.path.join(straight, "run_info.json")) as f:
        assert json.load(f)["data"]["chat_template"] == "the default chat template"
    part = run_distributed(run, 1, _overrides(embedded_data, cut, "train.exit_after=3"))[0]
    assert len(part["losses"]) == 3
    rest = run_distributed(run, 1, _overrides(embedded_data, cut, "train.resume=auto"))[0]
    assert rest["start"] == 3 and len(rest["losses"]) == 3
    x, y = _scalars(straight), _scalars(cut)
    assert "train/lm_loss" in x and "train/mtp_1_loss" in x and "val/lm_loss" in x, sorted(x)
    assert x == y, {k: (x[k], y.get(k)) for k in x if x[k] != y.get(k)}


def _entry(rank, world_size, argv):
    from posttrain.train_sft import main

    try:
        main(argv)
    except SystemExit as e:
        return str(e.code)
    finally:
        platform.teardown()
    return "no exit"


def test_a_bad_line_stops_the_entry_point_with_file_and_line(embedded_data, tmp_path):
    data = tmp_path / "chats.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    )
    data.write_text(good + "\n" + '{"messages": [{"role": "user"}]}\n')
    argv = ["--config", os.path.join(REPO, "examples/sft/sft_tiny.yaml")]
    argv += _overrides(embedded_data, str(tmp_path / "run"), f"sft.train_files=[{data}]")
    msg = run_distributed(_entry, 1, argv)[0]
    assert msg.startswith(f"data error: {data}:2: messages[0]: expected {{'role': ..., 'content': ...}}"), msg


@pytest.mark.slow  # make test-all: 2 runs (~1.5 min)
def test_sft_on_two_data_parallel_ranks_follows_one_process(embedded_data, tmp_path):
    curves = {}
    for world in (1, 2):
        run_dir = str(tmp_path / f"dp{world}")
        run_distributed(
            run, world, _overrides(embedded_data, run_dir, "train.steps=4", "train.save_interval=0")
        )
        curves[world] = read_run(run_dir, ["train/lm_loss", "train/grad_norm", "val/lm_loss"])
    rows = compare(curves[1], curves[2], rtol=1e-4)
    assert rows and all(r.ok for r in rows), format_rows(rows, ("1 process", "DP2"), only_bad=True)


def _rl(rank, world_size, overrides):
    from megatron_step.config.run import RLRunConfig
    from megatron_step.stages.rl import train_rl

    cfg = load_run_config(os.path.join(REPO, "examples/rl/rl_tiny.yaml"), overrides, RLRunConfig)
    try:
        return train_rl(cfg)
    finally:
        platform.teardown()


def test_a_tokenizers_directory_runs_sft_then_dataset_rl(embedded_data, tmp_path):
    """A Hugging Face tokenizer directory built with `tokenizers` (no bos, its own ChatML variant with
    "<|im_sep|>", eos "<|endoftext|>") through the SFT stage and then dataset RL on chat prompts: both
    use its template, the SFT loss falls, RL generation stops at its "<|im_end|>"."""
    from tests.data.test_hf_tokenizer import OWN_TEMPLATE, make_hf_dir

    hf = make_hf_dir({"train": os.path.join(embedded_data, "corpus", "train.jsonl")}, tmp_path / "tok")
    sft_dir, rl_dir = str(tmp_path / "sft"), str(tmp_path / "rl")
    out = run_distributed(run, 1, _overrides(embedded_data, sft_dir, f"data.tokenizer_model={hf}"))[0]
    (_, a), (_, b) = out["val_curve"][0], out["val_curve"][-1]
    assert b < a and out["data"]["chat_template"] == f"{hf} (its chat_template)"
    probs = tmp_path / "problems.jsonl"
    probs.write_text(
        "".join(
            json.dumps({"prompt": f"Q: What is {i} + 1?\nA:", "label": str(i + 1)}) + "\n" for i in range(20)
        )
    )
    rl = [
        "model.vocab_size=512", f"data.data_dir={embedded_data}", f"data.tokenizer_model={hf}",
        f"train.run_dir={rl_dir}", f"rl.init_from={sft_dir}", "train.steps=2", "train.eval_interval=2",
        "rl.task=dataset", f"rl.data.train=[{probs}]", "rl.prompts_per_step=2", "rl.group_size=2",
        "rl.eval_problems=2", "rl.eval_samples=0", "rl.max_new_tokens=8", "model.seq_length=128",
    ]  # fmt: skip
    run_distributed(_rl, 1, rl)
    with open(os.path.join(rl_dir, "run_info.json")) as f:
        info = json.load(f)
    assert info["rl_data"]["train"] > 0 and info["rl_data"]["chat_template"] == f"{hf} (its chat_template)"
    curves = read_run(rl_dir)
    assert sorted(curves["rl/response_length"]) == [1, 2] and sorted(curves["rl/accuracy_heldout"]) == [0, 2]
    # what the run rendered and stopped at, with this tokenizer
    from megatron_step.data.tokenizer import load_tokenizer
    from megatron_step.rl.dataset import DatasetTask, RLDataConfig
    from megatron_step.rl.rollouts import RolloutSampler
    from megatron_step.rl.sandbox import SandboxConfig

    tok = load_tokenizer(hf)
    task = DatasetTask(RLDataConfig(train=[str(probs)]), SandboxConfig(), tok)
    assert task.template.text == OWN_TEMPLATE
    assert task.prompt(task.train(1, 0)[0]).endswith("<|im_start|>assistant<|im_sep|>")
    assert RolloutSampler._stop_ids(task, tok) == (tok.token_id("<|im_end|>"),)


def test_packed_sft_trains_and_tensor_parallel_follows_one_process(embedded_data, tmp_path):
    """sft.pack=true: several conversations per row (each isolated, tests/data/test_packing.py); the
    training loss falls, fewer rows than conversations, and TP=2 (+SP) follows one process."""
    curves = {}
    for world, extra in ((1, []), (2, ["parallel.tp=2", "parallel.sequence_parallel=true"])):
        run_dir = str(tmp_path / f"tp{world}")
        out = run_distributed(
            run, world, _overrides(embedded_data, run_dir, "sft.pack=true", "train.save_interval=0", *extra)
        )[0]
        curves[world] = read_run(run_dir, ["train/lm_loss", "train/grad_norm", "val/lm_loss"])
        assert out["losses"][-1] < out["losses"][0] - 1.0, out["losses"]  # it learns
        info = out["data"]["train"]
        assert info["samples"] == 128 and info["rows"] < 0.8 * 128, info
    rows = compare(curves[1], curves[2], rtol=1e-4)
    assert rows and all(r.ok for r in rows), format_rows(rows, ("1 process", "TP2"), only_bad=True)

"""megatron_step.rl.dataset: the user's problem files -- read, checked (file:line: field), routed to
the reward their data_source names -- and an RL run on them."""

from __future__ import annotations

import json
import os

import pytest

from megatron_step import platform
from megatron_step.config.run import RLRunConfig, load_run_config
from megatron_step.rl.dataset import DatasetTask, RLDataConfig, RLDataError
from megatron_step.rl.reward_pool import RewardRunner
from megatron_step.rl.rollouts import POOL_SIZE
from megatron_step.rl.sandbox import SandboxConfig
from megatron_step.rl.tasks import ArithmeticTask, arithmetic_problems, prompt_text
from megatron_step.stages.rl import train_rl
from megatron_step.testing import run_distributed
from megatron_step.testing.golden import compare, format_rows, read_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = SandboxConfig(cpu_s=1, wall_s=20)
SQUARE = {"test": "def check(f):\n    assert f(3) == 9\n", "entry_point": "square"}


def write(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def task(tmp_path, rows, **kw) -> DatasetTask:
    cfg = RLDataConfig(train=[write(tmp_path / "train.jsonl", rows)], **kw)
    return DatasetTask(cfg, CODE)


def test_prompts_are_rendered_with_the_chat_template_or_kept_raw(tmp_path):
    rows = [
        {"prompt": "What is 2 + 3?", "label": 5},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "label": "x",
        },
    ]
    t = task(tmp_path, rows, eval=[write(tmp_path / "eval.jsonl", rows[:1])])
    chat = t.train(10, 0)
    assert chat[0].prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert chat[0].label == "5"  # a number is taken as its text
    assert chat[1].prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert t.stop_texts() == ["<|im_end|>"]
    raw = task(tmp_path, rows[:1], eval=[write(tmp_path / "eval.jsonl", rows[:1])], prompt_format="raw")
    assert raw.train(10, 0)[0].prompt == "What is 2 + 3?" and raw.stop_texts() == []
    with pytest.raises(RLDataError, match=r"train.jsonl:2: field 'prompt': chat messages need"):
        task(tmp_path, rows, prompt_format="raw")


def test_without_eval_files_a_hashed_tenth_is_held_out_and_never_trained_on(tmp_path):
    rows = [{"prompt": prompt_text(p), "label": p.answer} for p in arithmetic_problems(300, seed=1)]
    rows = list({r["prompt"]: r for r in rows}.values())  # distinct prompts
    t = task(tmp_path, rows, prompt_format="raw")
    train, held = {p.prompt for p in t.train(10**6, 0)}, {p.prompt for p in t.heldout(10**6, 0)}
    assert train and held and not train & held and len(train) + len(held) == len(rows)
    assert 0.03 < len(held) / len(rows) < 0.2


@pytest.mark.parametrize(
    "rows, match",
    [
        (["{not json"], r"train.jsonl:1: not JSON"),
        ([{"question": "2 + 3"}], r"train.jsonl:1: no field 'prompt'; its fields: \['question'\]"),
        ([{"prompt": "2 + 3"}], r"train.jsonl:1: no field 'label'"),
        ([{"prompt": "", "label": "5"}], r"train.jsonl:1: field 'prompt': expected non-empty text"),
        ([{"prompt": "a", "label": "1"}, {"prompt": "b", "label": None}], r"train.jsonl:2: field 'label'"),
        (
            [{"prompt": "a", "label": "{bad", "data_source": "mbpp"}],
            r"train.jsonl:1: field 'label': code reference is not JSON",
        ),
        (
            [{"prompt": "a", "label": "1", "data_source": 7}],
            r"train.jsonl:1: field 'data_source': expected text",
        ),
        ([], r"train.jsonl: empty file"),
    ],
)
def test_bad_records_are_named_by_file_line_and_field(tmp_path, rows, match):
    with pytest.raises(RLDataError, match=match):
        task(tmp_path, rows, rewards={"mbpp": "code"})


def test_a_missing_file_and_a_bad_reward_name_are_clear(tmp_path):
    with pytest.raises(RLDataError, match=r"nope.jsonl: no such file"):
        DatasetTask(RLDataConfig(train=[str(tmp_path / "nope.jsonl")]), CODE)
    with pytest.raises(ValueError, match=r"rl.data.rewards.mbpp='python': expected math, exact, code"):
        task(tmp_path, [{"prompt": "a", "label": "1"}], rewards={"mbpp": "python"})


def test_skip_bad_lines_counts_them(tmp_path):
    good = [{"prompt": f"q{i}", "label": str(i)} for i in range(40)]
    held = [write(tmp_path / "eval.jsonl", good[:2])]
    t = task(tmp_path, ["{not json", *good, {"prompt": "q"}], skip_bad_lines=True, eval=held)
    assert t.skipped == 2 and t.reasons[0].endswith(
        "train.jsonl:1: not JSON (Expecting property name enclosed in double quotes at column 2)"
    )
    assert (t.info()["train"], t.info()["heldout"]) == (40, 2)


def test_rewards_are_routed_by_data_source_and_code_outcomes_counted(tmp_path):
    rows = [
        {"prompt": "What is 1/2?", "label": "0.5", "data_source": "math"},
        {"prompt": "Name it", "label": "0.5", "data_source": "quiz"},
        {"prompt": "Write square(x)", "label": SQUARE, "data_source": "mbpp"},
    ]
    t = task(
        tmp_path, rows, eval=[write(tmp_path / "e.jsonl", rows)], rewards={"quiz": "exact", "mbpp": "code"}
    )
    math_p, quiz_p, code_p = t.heldout(3, 0)
    half = "<answer>\\frac{1}{2}</answer>"
    program = "```python\ndef square(x):\n    return x * x\n```"
    items = [
        ("", half, t.reference(math_p)),  # math-verify: 1/2 == 0.5
        ("", half, t.reference(quiz_p)),  # exact: not the same text
        ("", program, t.reference(code_p)),
        ("", "```python\ndef square(x):\n    return x\n```", t.reference(code_p)),
    ]
    with RewardRunner(t.reward(), timeout_s=30, workers=2) as runner:
        got = [(r.value, r.outcome, r.failed) for r in runner.run(items)]
    assert got == [(1.0, None, False), (0.0, None, False), (1.0, "pass", False), (0.0, "fail", False)]
    assert t.reward().outcomes == ("pass", "fail", "timeout", "crash")
    assert t.correct(code_p, program) and not t.correct(quiz_p, half)


def rl_body(rank, world_size, data_dir, run_dir, init_from, extra):
    overrides = [
        "model.vocab_size=512", "data.tokenizer_vocab_size=512", "train.steps=3", "train.micro_batch_size=4",
        "train.log_interval=1", "train.eval_interval=3", "rl.max_new_tokens=10", f"data.data_dir={data_dir}",
        f"train.run_dir={run_dir}", f"rl.init_from={init_from}", *extra,
    ]  # fmt: skip
    cfg = load_run_config(os.path.join(REPO, "examples/rl/rl_tiny.yaml"), overrides, RLRunConfig)
    try:
        return train_rl(cfg)
    finally:
        platform.teardown()


@pytest.mark.distributed
def test_an_rl_run_on_problem_files_routes_arithmetic_to_math_and_code_to_the_sandbox(
    tmp_path, embedded_data, golden_run, monkeypatch
):
    """The golden warm-up policy (arithmetic in the "Q: ...\\nA:" frame) on a file mixing arithmetic
    and code problems: the run trains, and every code rollout's sandbox outcome is counted."""
    monkeypatch.chdir(REPO)  # the reward workers import tests.rl._rewards_fixtures
    sft = os.path.join(golden_run("rl_sync"), "rl_sft")
    arith = [
        {"prompt": prompt_text(p), "label": p.answer, "data_source": "arith"}
        for p in arithmetic_problems(12, seed=3, max_steps=1, max_operand=5)
    ]
    code = [{"prompt": "Q: Write square(x).\nA:", "label": SQUARE, "data_source": "mbpp"}] * 4
    quiz = [{"prompt": "Q: What is 1 + 1?\nA:", "label": "-", "data_source": "quiz"}] * 2  # always right
    files = [write(tmp_path / "train.jsonl", arith + code), write(tmp_path / "eval.jsonl", arith[:4] + quiz)]
    extra = [
        "rl.prompts_per_step=4", "rl.group_size=2", "rl.eval_problems=6", "rl.eval_samples=0",
        "rl.task=dataset", f"rl.data.train=[{files[0]}]", f"rl.data.eval=[{files[1]}]",
        "rl.data.prompt_format=raw", "rl.data.rewards.mbpp=code", "rl.code.cpu_s=1", "rl.code.wall_s=20",
        "rl.reward_workers=2", "rl.data.rewards.quiz=tests.rl._rewards_fixtures:always_right",
    ]  # fmt: skip
    run_distributed(rl_body, 1, str(embedded_data), str(tmp_path / "run"), sft, extra)
    curves = read_run(str(tmp_path / "run"))
    outcomes = [curves[f"rl/reward_outcome_{x}"] for x in ("pass", "fail", "timeout", "crash")]
    per_step = [sum(c[s] for c in outcomes) for s in (1, 2, 3)]
    assert all(n == int(n) for n in per_step) and sum(per_step) > 0  # some code prompts were drawn
    assert set(curves["rl/reward_failed"].values()) == {0.0}
    assert sorted(curves["rl/accuracy_heldout"]) == [0, 3]
    # per source: 4 arithmetic + 2 quiz problems held out (no code problem, so no "mbpp" entry)
    whole, ar, qz = (curves[f"rl/accuracy_heldout{s}"] for s in ("", "/arith", "/quiz"))
    assert set(qz.values()) == {1.0} and all(abs(ar[s] * 4 + 2 - whole[s] * 6) < 1e-5 for s in whole)
    assert not any(k.startswith("rl/accuracy_heldout/mbpp") for k in curves)
    with open(tmp_path / "run" / "run_info.json") as f:
        info = json.load(f)
    assert info["rl_data"]["sources"] == ["arith", "mbpp", "quiz"] and info["rl_data"]["skipped"] == 0


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2])  # 2: DP=2 (two data-parallel ranks)
def test_the_embedded_problems_written_to_a_file_train_exactly_as_the_embedded_task(
    world, tmp_path, embedded_data, golden_run, monkeypatch
):
    """The dataset path against the embedded one: a file holding the embedded task's own prompt pool and
    held-out problems, in the order it draws them, prompts raw, scored by the embedded reward, gives
    the embedded run's every scalar bit for bit (same prompts, rewards, keys and updates)."""
    monkeypatch.chdir(REPO)  # the reward workers import tests.rl._dataset_fixtures
    sft = os.path.join(golden_run("rl_sync"), "rl_sft")
    task, seed = ArithmeticTask(), 1234  # rl_tiny.yaml's task_* and train.seed
    pool = [{"prompt": prompt_text(p), "label": p.answer} for p in task.train(POOL_SIZE, seed + 29)]
    held = [{"prompt": prompt_text(p), "label": p.answer} for p in task.heldout(6, seed)]
    files = [write(tmp_path / "pool.jsonl", pool), write(tmp_path / "held.jsonl", held)]
    dataset = [
        "rl.task=dataset", f"rl.data.train=[{files[0]}]", f"rl.data.eval=[{files[1]}]",
        "rl.data.prompt_format=raw", "rl.data.default_reward=tests.rl._dataset_fixtures:embedded_reward",
    ]  # fmt: skip
    shape = ("rl.prompts_per_step=2", "rl.group_size=3", "rl.eval_problems=6")
    runs = {"embedded": shape, "dataset": (*shape, *dataset)}
    for name, extra in runs.items():
        run_distributed(rl_body, world, str(embedded_data), str(tmp_path / name), sft, extra)
    timing = ("seconds", "per_sec", "tflops", "mfu")
    want, got = (read_run(str(tmp_path / name)) for name in runs)
    want = {k: v for k, v in want.items() if not any(t in k for t in timing)}
    got = {k: v for k, v in got.items() if k in want}
    assert set(got) == set(want) and len(want) > 20
    rows = compare(want, got, rtol=0.0)
    assert all(r.ok for r in rows), format_rows(rows, ("embedded", "dataset"), only_bad=True)


def test_a_source_routed_to_preference_is_scored_by_the_preference_model_only(tmp_path):
    """rl.data.rewards.<source>=preference: that source's responses get rl.preference_weight x the
    preference model's score (and nothing from the workers); other sources get none of it; a failed
    preference call fails only the responses it was to score."""
    import types

    from megatron_step.rl.rollouts import RolloutSampler

    rows = [
        {"prompt": "What is 2 + 3?", "label": "5", "data_source": "arith"},
        {"prompt": "Write a haiku.", "label": "-", "data_source": "chat", "solution": "Old pond, a frog."},
    ]
    t = task(tmp_path, rows, eval=[write(tmp_path / "eval.jsonl", rows)], rewards={"chat": "preference"})
    assert t.preference_sources() == {"chat"}
    arith, chat = sorted(t.train(10, 0), key=lambda p: p.source)
    assert t.reward()("", "anything", t.reference(chat)) == 0.0  # no verifiable part in the workers

    class Fake:
        calls: list = []

        def score_batch(self, items):
            self.calls.append(items)
            if items and items[0][1] == "boom":
                raise RuntimeError("the model failed")
            return [0.8] * len(items)

    s = RolloutSampler.__new__(RolloutSampler)
    s.task, s.preference, s.rl = t, Fake(), types.SimpleNamespace(preference_weight=0.5)
    batch = types.SimpleNamespace(problems=[arith, chat, arith])
    prefs = s._preference(batch, ["<answer>5</answer>", "A frog jumps.", "<answer>4</answer>"])
    assert prefs == [None, 0.8, None] and Fake.calls[-1] == [(t.prompt(chat), "A frog jumps.", chat.solution)]
    results = [types.SimpleNamespace(value=v, failed=False) for v in (1.0, 0.0, 0.0)]
    assert s._add_preference(results, prefs) == {"rl/reward_preference": 0.8}
    assert [(r.value, r.failed) for r in results] == [(1.0, False), (0.4, False), (0.0, False)]
    prefs = s._preference(types.SimpleNamespace(problems=[chat, arith]), ["boom", "<answer>5</answer>"])
    results = [types.SimpleNamespace(value=v, failed=False) for v in (0.0, 1.0)]
    s._add_preference(results, prefs)
    assert [(r.value, r.failed) for r in results] == [(0.0, True), (1.0, False)]
    # without a routed source the preference model scores every response, as before
    with_solutions = [{**r, "solution": "a worked answer"} for r in rows]
    plain = task(tmp_path, with_solutions, eval=[write(tmp_path / "eval.jsonl", with_solutions)])
    assert plain.preference_sources() is None
    s.task = plain
    batch = types.SimpleNamespace(problems=plain.train(10, 0))
    assert s._preference(batch, ["a", "b"]) == [0.8, 0.8]


def _rl_start(rank, world_size, data_dir, files):
    cfg = load_run_config(
        os.path.join(REPO, "examples/rl/rl_tiny.yaml"),
        ["model.vocab_size=512", "data.tokenizer_vocab_size=512", f"data.data_dir={data_dir}",
         f"train.run_dir={files[1]}", "rl.task=dataset", f"rl.data.train=[{files[0]}]",
         f"rl.data.eval=[{files[0]}]", "rl.data.rewards.chat=preference"],
        RLRunConfig,
    )  # fmt: skip
    try:
        train_rl(cfg)
    except ValueError as e:
        return str(e)
    finally:
        platform.teardown()
    return "started"


@pytest.mark.distributed
def test_a_preference_route_without_a_reward_model_is_refused_at_start(tmp_path, embedded_data):
    f = write(tmp_path / "p.jsonl", [{"prompt": "Hi", "label": "-", "data_source": "chat"}] * 4)
    msg = run_distributed(_rl_start, 1, str(embedded_data), (f, str(tmp_path / "run")))[0]
    assert "routes ['chat'] to preference, but rl.reward_model is not set" in msg, msg


def _mixed_sources(tmp_path) -> list[str]:
    """The mixed run's files: arithmetic (math reward) in Parquet, code problems (the sandbox) in JSONL,
    and a held-out Parquet file of arithmetic + a user callable's source ("quiz", always right)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arith = [
        {"prompt": prompt_text(p), "label": p.answer, "data_source": "arith"}
        for p in arithmetic_problems(12, seed=3, max_steps=1, max_operand=5)
    ]
    quiz = [{"prompt": "Q: What is 1 + 1?\nA:", "label": "-", "data_source": "quiz"}] * 2
    code = [{"prompt": "Q: Write square(x).\nA:", "label": SQUARE, "data_source": "mbpp"}] * 4
    pq.write_table(pa.Table.from_pylist(arith), str(tmp_path / "arith.parquet"))
    pq.write_table(pa.Table.from_pylist(arith[:4] + quiz), str(tmp_path / "eval.parquet"))
    code_file = write(tmp_path / "code.jsonl", code)
    files = [str(tmp_path / "arith.parquet"), code_file, str(tmp_path / "eval.parquet")]
    return [
        "rl.prompts_per_step=4", "rl.group_size=2", "rl.eval_problems=6", "rl.eval_samples=0",
        "rl.task=dataset", f"rl.data.train=[{files[0]},{files[1]}]", f"rl.data.eval=[{files[2]}]",
        "rl.data.prompt_format=raw", "rl.data.rewards.mbpp=code", "rl.code.cpu_s=1", "rl.code.wall_s=20",
        "rl.reward_workers=2", "rl.data.rewards.quiz=tests.rl._rewards_fixtures:always_right",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mixed_one_process(tmp_path_factory, embedded_data, golden_run):
    """The mixed-source run (Parquet + JSONL, three rewards, per-source held-out accuracy) in one
    process: the reference of the layout test below."""
    tmp = tmp_path_factory.mktemp("mixed")
    sft = os.path.join(golden_run("rl_sync"), "rl_sft")
    extra = _mixed_sources(tmp)
    cwd = os.getcwd()
    os.chdir(REPO)  # the reward workers import tests.rl._rewards_fixtures
    try:
        run_distributed(rl_body, 1, str(embedded_data), str(tmp / "run"), sft, extra)
    finally:
        os.chdir(cwd)
    return sft, extra, read_run(str(tmp / "run"))


MIXED_LAYOUTS = {
    "tp2_sp": ["parallel.tp=2"],
    "ep2": ["parallel.ep=2"],
    "pp2": ["parallel.pp=2"],
}


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name",
    ["tp2_sp", "ep2", pytest.param("pp2", marks=pytest.mark.slow)],  # pp2: ~1 min, slow suite
)
def test_dataset_rl_on_mixed_sources_follows_one_process_under_each_layout(
    name, mixed_one_process, embedded_data, tmp_path, monkeypatch
):
    """Dataset RL on the user's files under TP2 + SP, EP2 (two DP ranks in one expert group) and PP2:
    the same prompts are drawn, scored by the same rewards (math-verify, the code sandbox, a user
    callable) with the same sandbox outcomes, and every logged scalar -- losses, rewards, per-source
    held-out accuracy -- is within 1e-4 of one process over 3 steps."""
    monkeypatch.chdir(REPO)
    sft, extra, want = mixed_one_process
    layout = [*extra, *MIXED_LAYOUTS[name]]
    run_distributed(rl_body, 2, str(embedded_data), str(tmp_path / "run"), sft, layout)
    got = read_run(str(tmp_path / "run"))
    timing = ("seconds", "per_sec", "tflops", "mfu")
    # differences of one set of weights with itself (~1e-9 of rounding noise from another summation
    # order, which a relative tolerance cannot judge): an absolute one
    noise = ("policy/mismatch_kl", "policy/mismatch_k3", "routing/confidence_gap")
    # per-rank counts, averaged over the DP ranks (docs/metrics.md): the one process's / DP
    per_rank = ("rl/tokens_sampled", "rl/tokens_sampled_cumulative", "policy/tokens")
    keys = [k for k in want if k not in per_rank and not any(t in k for t in (*timing, *noise))]
    assert "rl/accuracy_heldout/quiz" in keys and "rl/reward_outcome_pass" in keys and len(keys) > 20
    rows = compare(got, want, rtol=1e-4, keys=keys)
    assert all(r.ok for r in rows), format_rows(rows, (name, "1 process"), only_bad=True)
    for k in noise:
        assert len(want[k]) == 3 and max(abs(got[k][s] - want[k][s]) for s in want[k]) < 1e-6, k
    outcomes = [f"rl/reward_outcome_{x}" for x in ("pass", "fail", "timeout", "crash")]
    assert [got[k] for k in outcomes] == [want[k] for k in outcomes]  # counted exactly, over all ranks
    dp = 2 if name == "ep2" else 1
    assert all({s: v * dp for s, v in got[k].items()} == want[k] for k in per_rank)

"""ERL (step-level erasable rollouts for tool use) and its lookup task: the task and tool are
deterministic and answerable by following the facts; a rolled-back step is regenerated on top of the
cached prefix (no earlier position fed again), the kept tokens' log-probs equal a fresh forward, tool
tokens are marked and teacher-forced, and the cache ends holding exactly the final sequence."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

import pytest
import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.rl.erl import ERLConfig, Step, default_step_score, generate_erl, token_at_char
from megatron_step.rl.lookup import (
    NO_RESULT,
    LookupProblem,
    SearchTool,
    extract_answer,
    extract_query,
    format_result,
    lookup_problems,
    lookup_reward,
    make_world,
    prompt_text,
    solution_segments,
    solution_text,
    split_of,
)
from megatron_step.rl.policy import pack, token_logp
from megatron_step.testing import run_distributed


# -- the task (fast, no model) -----------------------------------------------------------------------
def test_world_and_problems_are_deterministic():
    assert make_world(3) == make_world(3)
    assert make_world(3) != make_world(4)
    w = make_world(3)
    a = lookup_problems(w, 200, seed=1)
    assert a == lookup_problems(w, 200, seed=1)
    assert a[:50] == lookup_problems(w, 50, seed=1)  # a shorter list is a prefix of a longer one
    assert a != lookup_problems(w, 200, seed=2)


def test_splits_are_disjoint_and_defined_by_the_question():
    w = make_world(0)
    train = {p.key for p in lookup_problems(w, 3000, seed=0)}
    heldout = {p.key for p in lookup_problems(w, 500, seed=0, split="heldout")}
    assert heldout and not train & heldout
    assert all(split_of(k) == "heldout" for k in heldout) and all(split_of(k) == "train" for k in train)
    # every 2-hop question of the default world (40 people x 2 templates + 16 cities) is in one split
    assert len(train) + len(heldout) == 40 * 2 + 16


def test_answers_follow_the_facts_through_the_tool():
    w = make_world(0)
    tool = SearchTool(w)
    for p in lookup_problems(w, 100, seed=5, min_hops=2, max_hops=3):
        assert len(p.hops) in (2, 3) and p.key == p.prompt
        subject = p.hops[0][0]
        assert subject in p.prompt
        for s, r, o in p.hops:  # each hop is what the tool answers for the previous hop's object
            assert s == subject and tool.search(f"{s} {r}") == f"{s} {r} {o}"
            subject = o
        assert subject == p.answer
    assert tool.calls == sum(len(p.hops) for p in lookup_problems(w, 100, seed=5, min_hops=2, max_hops=3))


def test_tool_answers_exact_queries_only():
    w = make_world(0)
    tool = SearchTool(w)
    city = w.lookup("Alice", "born_in")
    assert city in w.cities
    assert tool.search("  Alice   born_in ") == f"Alice born_in {city}"
    for q in ("alice born_in", "Alice", "Alice born_in now", "", "Alice lives_in", "Nobody born_in"):
        assert tool.search(q) == NO_RESULT, q
    # every country's capital is one of its own cities
    for s, r, o in w.facts:
        if r == "capital":
            assert w.lookup(o, "in_country") == s


def test_solution_text_and_protocol():
    w = make_world(0)
    p = lookup_problems(w, 1, seed=1)[0]
    (s0, r0, o0), (s1, r1, o1) = p.hops
    segs = solution_segments(p)
    assert [forced for _, forced in segs] == [False, True, False, True, False]
    assert segs[1][0] == format_result(f"{s0} {r0} {o0}") == f" <result> {s0} {r0} {o0}</result>"
    assert segs[0][0] == f" First: <search> {s0} {r0}</search>" and segs[2][0].startswith(" Then: <search>")
    text = solution_text(p)
    assert text == "".join(t for t, _ in segs)
    assert extract_query(segs[0][0]) == f"{s0} {r0}" and extract_query(segs[2][0]) == f"{s1} {r1}"
    assert extract_answer(text) == p.answer and lookup_reward("", text, p.answer) == 1.0
    assert lookup_reward("", " <answer>Nowhere</answer>", p.answer) == 0.0
    assert lookup_reward("", "no tag", p.answer) == 0.0
    assert prompt_text(p) == f"Q: {p.prompt}\nA:"
    assert extract_query("no close tag <search>x") is None
    assert extract_query(" a <search>b</search> c </search>") == "b"
    assert extract_query(" Bob born_in</search>") == "Bob born_in"  # no <search>: everything before
    bad = LookupProblem(p.prompt, "Elsewhere", p.hops, p.key)
    with pytest.raises(ValueError, match="is not answer 'Elsewhere'"):
        solution_segments(bad)


def test_errors_name_the_argument():
    w = make_world(0)
    with pytest.raises(ValueError, match="n_people must be an int in"):
        make_world(0, n_people=0)
    with pytest.raises(ValueError, match=r"n_cities\(2\) must be >= n_countries\(3\)"):
        make_world(0, n_cities=2, n_countries=3)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        lookup_problems(w, 0, seed=0)
    with pytest.raises(ValueError, match="split must be one of"):
        lookup_problems(w, 1, seed=0, split="test")
    with pytest.raises(ValueError, match=r"max_hops\(2\) must be one of \[2, 3\] and >= min_hops\(3\)"):
        lookup_problems(w, 1, seed=0, min_hops=3, max_hops=2)
    with pytest.raises(ValueError, match="erl.scope='all'"):
        ERLConfig(scope="all")
    with pytest.raises(ValueError, match="erl.max_rollbacks=-1"):
        ERLConfig(max_rollbacks=-1)
    with pytest.raises(ValueError, match="erl.max_step_tokens=0"):
        ERLConfig(max_step_tokens=0)


# -- ERL pieces that need no model ---------------------------------------------------------------------
def _step(kind, text="", logprobs=(-0.1,), result=None, query=None, context="Q: Where was Alice born?"):
    return Step(0, 0, 0, [5] * len(logprobs), list(logprobs), text, kind, query, result, context=context)


def test_default_score_is_grounded_hit_plus_confidence():
    conf = math.exp(-0.5)
    found = _step("search", logprobs=(-0.5,), result="Alice born_in Rome", query="Alice born_in")
    assert found.found and found.grounded
    assert default_step_score(found) == pytest.approx(0.5 + 0.5 * conf)
    missing = _step("search", logprobs=(-0.5,), result=NO_RESULT, query="Alice lives_in")
    assert default_step_score(missing) == pytest.approx(0.5 * conf)
    # the tool knows Bob, but nothing the step could read mentions him: a guess, no hit
    guess = _step("search", logprobs=(-0.5,), result="Bob born_in Oslo", query="Bob born_in")
    assert guess.found and not guess.grounded and default_step_score(guess) == pytest.approx(0.5 * conf)
    assert not _step("search", query="Ali born_in", result="x").grounded  # whole words only
    ctx = "Q: Where was Alice born? <result> Alice born_in Rome</result>"
    answer = _step("answer", " <answer> Rome</answer>", (-0.2, -0.8), context=ctx)
    assert default_step_score(answer) == pytest.approx(0.5 + 0.5 * conf)
    assert default_step_score(_step("answer", " <answer> Romeo</answer>", context=ctx)) < 0.5
    assert default_step_score(_step("answer", " <answer> </answer>", context=ctx)) < 0.5  # empty
    assert default_step_score(_step("length")) < 0.5 and default_step_score(_step("stop")) < 0.5
    # at the default threshold a failed search is always rolled back, a found one kept unless unsure
    th = ERLConfig().threshold
    hit = dict(result="Alice born_in Rome", query="Alice born_in")
    assert default_step_score(_step("search", logprobs=(-1e-3,), result=NO_RESULT, query="Alice x")) < th
    assert default_step_score(_step("search", logprobs=(-2.0,), **hit)) >= th
    assert default_step_score(_step("search", logprobs=(-3.0,), **hit)) < th  # p ~ 0.05 < 0.1


def test_token_at_char_finds_the_token_holding_a_character():
    tok = ToyTokenizer()
    ids = tok.encode("Step 1: <search> Alice born_in </search>")
    text = tok.decode(ids)
    assert token_at_char(tok, ids, text.find("<search>")) == 2
    assert token_at_char(tok, ids, 0) == 0
    assert token_at_char(tok, ids, text.find("Alice") - 1) == 3  # the space before a word is its token's


# -- ERL on the tiny model (spawned process) --------------------------------------------------------------
@pytest.fixture(scope="module")
def erl_run():
    return run_distributed(rollback_scenarios, 1)[0]


def _check_reuse(out):
    assert out["fired"] and out["rollbacks"] == 1 and out["rolled_back_steps"] == 1, out
    p, to = out["prompt_len"], out["rollback_to"]
    assert out["prefix_reused"] == p + to  # the cache kept every position before the rollback point
    assert out["recomputed_before_rollback"] == 0  # none of them went through the model again
    # everything fed = the final cache + the rejected attempt's tokens after the rollback point (its
    # last token is never fed): no other position was recomputed
    assert out["total_fed"] == out["cache_length"] + out["rolled_back_tokens"] - 1, out
    assert out["regenerated"] == out["rolled_back_tokens"]
    assert out["kept_prefix_same"]
    assert out["max_logp_diff"] <= 1e-4 and out["max_entropy_diff"] <= 1e-4, out
    assert out["replay_logp_diff"] <= 1e-4, out  # recorded routing replays to the sampled log-probs
    assert out["forced_ok"] and out["forced_logp_zero"] and out["n_forced"] > 0, out
    # memory: the cache holds the final sequence's positions and nothing else, rollbacks or not
    assert out["ends_sampled"] and out["finish"] == "stop"
    assert out["cache_length"] == out["needed_positions"] == p + out["response_len"] - 1
    assert out["positions_missing"] == []
    assert out["routing_rows"] == out["cache_length"]
    assert out["used_bytes"] * out["max_len"] == out["cache_length"] * out["allocated_bytes"]


@pytest.mark.distributed
def test_rollback_of_the_first_step_reuses_the_prompt_cache(erl_run):
    out = erl_run["first_step"]
    _check_reuse(out)
    assert out["rollback_to"] == out["rollback_start"] == 0


@pytest.mark.distributed
def test_rollback_after_a_tool_call_reuses_the_cached_result(erl_run):
    out = erl_run["after_search"]
    _check_reuse(out)
    assert out["kinds"][0] == "search" and out["rollback_to"] == out["rollback_start"] > 0
    assert out["rolled_back_tokens"] > 1  # the rejected step's positions were fed, then overwritten


@pytest.mark.distributed
def test_query_scope_keeps_the_steps_reasoning(erl_run):
    out = erl_run["query_scope"]
    _check_reuse(out)
    assert out["rollback_to"] > out["rollback_start"]  # truncated inside the step, where <search> began


@pytest.mark.distributed
def test_default_score_rolls_back_failed_searches_within_the_budget(erl_run):
    out = erl_run["default"]
    # a random model's queries find nothing: every rollout spends its 2 rollbacks, each on a step
    # that scored under the threshold; with max_rollbacks=0 nothing is rolled back
    assert out["rollbacks"] == out["rolled_back_counts"] == [2] * len(out["rollbacks"])
    assert all(s < ERLConfig().threshold for s in out["rolled_back_scores"])
    assert out["tool_calls"] == out["tool_counter"] > 0
    assert out["plain_rollbacks"] == [0] * len(out["plain_rollbacks"])


# ---------------------------------------------------------------------------------------------
# process bodies (module-level so they pickle into spawned ranks)
# ---------------------------------------------------------------------------------------------
# word frequencies among the ids 4..511 (3 of 24 slots are "</search>", 1 is "</answer>")
WORDS = (
    ["</search>"] * 3
    + ["<search>"] * 3
    + ["</answer>", "<answer>", "Step", "1:", "Alice", "Bob", "Rome", "Valora", "born_in", "in_country"]
    + ["Alice", "born_in", "Rome", "in_country", "no", "result", "<result>", "</result>"]
)
_SPLIT = re.compile(r"</?\w+>|[^\s<]+")
EOS = -1  # never sampled: rollouts end by </answer>, by length or by max_steps


class ToyTokenizer:
    """Word-level codec over the tiny model's 512 ids: id >= 4 decodes to WORDS[(id - 4) % 24]; encode
    maps each word (tags split off) to the first id decoding to it."""

    def __init__(self, vocab: int = 512):
        self.vocab = vocab
        self.ids: dict[str, int] = {}
        for i in range(4, vocab):
            self.ids.setdefault(self.word(i), i)

    @staticmethod
    def word(i: int) -> str:
        return WORDS[(i - 4) % len(WORDS)] if i >= 4 else ""

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in _SPLIT.findall(text)]

    def decode(self, ids) -> str:
        return "".join(" " + self.word(i) for i in ids if i >= 4)


class RejectOnce:
    """score_fn: 0.0 for the first attempt matching `when(step, seen)` (seen: the earlier attempts),
    1.0 for every other: one rollback at a known place, whatever the model samples."""

    def __init__(self, when):
        self.when, self.seen, self.fired = when, [], False

    def __call__(self, step) -> float:
        hit = not self.fired and self.when(step, self.seen)
        self.seen.append(step)
        self.fired |= hit
        return 0.0 if hit else 1.0


def _model(seed=3):
    platform.setup(ParallelConfig(), seed=seed)
    cfg = dataclasses.replace(tiny(), routing_replay=True)
    return cfg, build_step_flash(cfg, ParallelConfig())


def _capture_positions(model):
    fed: list[int] = []

    def pre(mod, args, kwargs):
        if kwargs.get("inference_context") is not None:
            fed.extend(args[1][0].tolist())

    return fed, model.register_forward_pre_hook(pre, with_kwargs=True)


def _fresh_logprobs(model, g):
    """log pi of every response token from one no-cache forward over prompt + response."""
    seq = g.prompt_ids + g.response_ids
    x = torch.tensor([seq[:-1]])
    with torch.no_grad():
        logits = model(x, torch.arange(x.shape[1])[None], None).float()[0, len(g.prompt_ids) - 1 :]
    lp = torch.log_softmax(logits, -1)
    ent = -(lp.exp() * lp).sum(-1)
    return lp.gather(-1, torch.tensor(g.response_ids)[:, None]).squeeze(-1), ent


# scenario name -> (scope, predicate of the attempt to reject once, precondition on the rollout)
def _first_step(step, seen):
    return step.index == 0


def _after_search(step, seen):
    return step.index == 1 and any(s.index == 0 and s.kind == "search" for s in seen)


def _query_inside(step, seen):
    return step.kind == "search" and step.query_start is not None and step.query_start > step.start


SCENARIOS = {
    "first_step": ("step", _first_step),
    "after_search": ("step", _after_search),
    "query_scope": ("query", _query_inside),
}


def rollback_scenarios(rank, world_size):
    """Per scenario: the first seed whose rollout hits the rejection (searching seeds 0..29), its
    positions fed to the model, and the comparisons with a from-scratch forward."""

    cfg, model = _model()
    tok = ToyTokenizer(cfg.vocab_size)
    world = make_world(0)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, cfg.vocab_size, (6,), generator=g).tolist()
    engine = Engine(model, eos_id=EOS)
    cap = 48
    out = {}
    for name, (scope, when) in SCENARIOS.items():
        ecfg = ERLConfig(scope=scope, max_rollbacks=1, max_steps=4, max_step_tokens=12)
        for seed in range(30):
            fed, hook = _capture_positions(model)
            score = RejectOnce(when)
            gen = generate_erl(
                engine,
                [prompt],
                SearchTool(world),
                SamplingParams(max_new_tokens=cap, seed=seed),
                ecfg,
                score,
                tokenizer=tok,
            )[0]
            hook.remove()
            if score.fired:
                break
        steps = gen.info["steps"]
        rb = [s for s in steps if s["rolled_back"]]
        fresh_lp, fresh_ent = _fresh_logprobs(model, gen)
        m = torch.tensor(gen.info["sampled_mask"], dtype=torch.bool)
        lp = torch.tensor(gen.logprobs)
        ent = torch.tensor(gen.entropies)
        counts = Counter(fed)
        # where the rollback truncated the cache: the step start, or (query scope) where <search> began
        to = None
        if rb:
            r = rb[0]
            to = r["start"]
            if scope == "query":  # the token holding "<search>", found from the text alone
                words = [tok.decode(r["tokens"][: k + 1]) for k in range(len(r["tokens"]))]
                to += next(k for k, w in enumerate(words) if "<search>" in w)
        rb_tokens = len(rb[0]["tokens"]) - (to - rb[0]["start"]) if rb else 0
        last_sampled = max(i for i, x in enumerate(gen.info["sampled_mask"]) if x)
        item = {
            "prompt_ids": gen.prompt_ids,
            "response_ids": gen.response_ids,
            "rollout_logp": gen.logprobs,
            "routing": gen.routing,
        }
        batch = pack([item])
        model.train()
        with torch.no_grad():
            replay = token_logp(model, batch)[0, len(prompt) - 1 :]
        model.eval()
        kept = [s for s in steps if not s["rolled_back"]]
        forced_ok = True  # the result tokens after each kept search are exactly encode(format_result(...))
        for s in kept:
            if s["kind"] == "search":
                a = s["start"] + len(s["tokens"])
                want = tok.encode(format_result(s["result"]))
                got = gen.response_ids[a : a + len(want)]
                got_mask = gen.info["sampled_mask"][a : a + len(want)]
                forced_ok &= got == want[: len(got)] and not any(got_mask)
        out[name] = {
            "fired": score.fired,
            "seed": seed,
            "rollbacks": gen.info["rollbacks"],
            "rolled_back_steps": len(rb),
            "rollback_to": to,
            "rollback_start": rb[0]["start"] if rb else None,
            "prefix_reused": gen.info["prefix_reused"],
            "regenerated": gen.info["regenerated_tokens"],
            "rolled_back_tokens": rb_tokens,
            "kept_prefix_same": bool(rb)
            and gen.response_ids[rb[0]["start"] : to] == rb[0]["tokens"][: to - rb[0]["start"]],
            "prompt_len": len(prompt),
            "response_len": len(gen.response_ids),
            "finish": gen.finish,
            "ends_sampled": bool(gen.info["sampled_mask"][-1]),
            # positions the model had to read: the prompt and every kept token before the last sampled one
            "needed_positions": len(prompt) + last_sampled,
            "total_fed": len(fed),
            "n_forced": int((~m).sum()),
            "kinds": [s["kind"] for s in steps],
            "recomputed_before_rollback": sum(
                n - 1 for p, n in counts.items() if p < len(prompt) + (to or 0)
            ),
            "positions_missing": [p for p in range(len(prompt) + last_sampled) if p not in counts],
            "max_logp_diff": (fresh_lp[m] - lp[m]).abs().max().item(),
            "max_entropy_diff": (fresh_ent[m] - ent[m]).abs().max().item(),
            "forced_logp_zero": bool((lp[~m] == 0).all()),
            "replay_logp_diff": (replay[m] - lp[m]).abs().max().item(),
            "routing_rows": gen.routing[0].shape[0],
            "cache_length": gen.info["cache_length"],
            "used_bytes": engine.last_kv["used_bytes"],
            "allocated_bytes": engine.last_kv["allocated_bytes"],
            "max_len": len(prompt) + cap,
            "forced_ok": forced_ok,
        }
    # the default score on a random model: most searches find nothing, so rollbacks up to the budget
    tool = SearchTool(world)
    gens = generate_erl(
        engine,
        [prompt] * 2,
        tool,
        SamplingParams(max_new_tokens=cap, seed=1),
        ERLConfig(max_rollbacks=2, max_step_tokens=12),
        tokenizer=tok,
    )
    plain = generate_erl(
        engine,
        [prompt] * 2,
        SearchTool(world),
        SamplingParams(max_new_tokens=cap, seed=1),
        ERLConfig(max_rollbacks=0, max_step_tokens=12),
        tokenizer=tok,
    )
    out["default"] = {
        "rollbacks": [x.info["rollbacks"] for x in gens],
        "rolled_back_scores": [s["score"] for x in gens for s in x.info["steps"] if s["rolled_back"]],
        "rolled_back_counts": [sum(s["rolled_back"] for s in x.info["steps"]) for x in gens],
        "tool_calls": sum(x.info["tool_calls"] for x in gens),
        "tool_counter": tool.calls,
        "plain_rollbacks": [x.info["rollbacks"] for x in plain],
    }
    return out


# -- the RL stage's side: the task, the warm-up data, the packed loss mask (fast, no model) ----------
def test_lookup_task_is_a_task_with_a_tool_and_its_reward():
    from megatron_step.rl.config import RLConfig
    from megatron_step.rl.tasks import Task, make_task

    task = make_task(RLConfig(task="lookup"))
    assert isinstance(task, Task)
    p = task.train(1, seed=3)[0]
    assert task.correct(p, task.solution(p)) and not task.correct(p, " <answer> nowhere</answer>")
    assert task.reward()("", task.solution(p), task.reference(p)) == 1.0
    (s, r, o) = p.hops[0]
    assert task.tool().search(f"{s} {r}") == f"{s} {r} {o}"
    assert "".join(t for t, _ in task.segments(p)) == task.solution(p)
    assert not {q.key for q in task.heldout(50, 0)} & {q.key for q in task.train(500, 0)}


def test_warm_up_data_keeps_tool_results_out_of_the_loss():
    from megatron_step.rl.lookup import LookupTask
    from megatron_step.rl.sft import SFTDataset

    class Codec:  # one id per character
        bos, eos, pad = 1, 2, 0

        def encode(self, text):
            return [ord(c) for c in text]

    tok, task = Codec(), LookupTask()
    p = task.train(1, seed=0)[0]
    item = SFTDataset(tok, task, [p], seq_length=320)[0]
    n_prompt = len(tok.encode(task.prompt(p)))  # labels from index n_prompt on are the solution
    labels, mask = item["labels"][n_prompt:].tolist(), item["loss_mask"][n_prompt:].tolist()
    pieces = [(tok.encode(text), f) for text, f in task.segments(p)] + [([tok.eos], False)]
    k = sum(len(ids) for ids, _ in pieces)
    assert labels[:k] == [i for ids, _ in pieces for i in ids]
    assert mask[:k] == [0.0 if f else 1.0 for ids, f in pieces for _ in ids] and sum(mask[k:]) == 0
    assert item["loss_mask"][:n_prompt].sum() == 0 and 0.0 in mask and any(f for _, f in pieces)


def test_pack_keeps_tool_tokens_out_of_the_mask():
    item = {"prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10, 11], "sampled_mask": [1, 0, 0, 1]}
    b = pack([item, {"prompt_ids": [5, 6], "response_ids": [8, 9]}])
    assert b["mask"][0].tolist() == [0, 0, 1, 0, 0, 1]  # labels 2..5 are the response tokens
    assert b["mask"][1].tolist() == [0, 1, 1, 0, 0, 0]  # no sampled_mask: every response token


def test_erl_config_errors_name_the_field():
    from megatron_step.rl.config import RLConfig

    with pytest.raises(ValueError, match="rl.rollout=erl with rl.task='arithmetic'"):
        RLConfig(rollout="erl")
    with pytest.raises(ValueError, match="rl.task=lookup with rl.advantage=gae"):
        RLConfig(task="lookup", advantage="gae")
    from megatron_step.rl.config import SpeculativeConfig

    with pytest.raises(ValueError, match="tool rollouts too"):
        RLConfig(task="lookup", speculative=SpeculativeConfig(tokens=1))


def train_rl_lookup(rank, world_size, run_dir, extra):
    """posttrain/train_rl.py's stage on examples/rl/rl_lookup.yaml, shrunk: a 30-step warm-up, then
    2 RL steps of 2 prompts x 2 tool rollouts."""
    from megatron_step.config.run import RLRunConfig, load_run_config
    from megatron_step.stages.rl import train_rl

    overrides = [
        f"train.run_dir={run_dir}", f"rl.init_from={run_dir}/sft", "rl.sft_steps=30", "train.steps=2",
        "train.eval_interval=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.eval_problems=4",
        "rl.eval_samples=1", "train.micro_batch_size=4", *extra,
    ]  # fmt: skip
    cfg = load_run_config("examples/rl/rl_lookup.yaml", overrides, RLRunConfig)
    try:
        return train_rl(cfg)
    finally:
        platform.teardown()


@pytest.mark.slow  # ~5 min on 2 cores (warm-up, tool rollouts one position per call)
@pytest.mark.distributed
def test_train_rl_runs_erl_rollouts_on_the_lookup_task(tmp_path):
    from megatron_step.testing.golden import read_run

    run_dir = str(tmp_path / "erl")
    out = run_distributed(train_rl_lookup, 1, run_dir, ["rl.rollout=erl", "rl.erl.threshold=2.0"])[0]
    assert [s for s, _ in out["accuracy"]] == [0, 2] and out["reward_failures"] == 0
    curves = read_run(run_dir)
    for tag in ("erl/rollbacks_per_rollout", "erl/tool_calls", "erl/sampled_tokens", "policy/loss"):
        assert tag in curves, (tag, sorted(curves))
    # threshold 2 rejects every step: each rollout spends its rl.erl.max_rollbacks (3)
    assert set(curves["erl/rollbacks_per_rollout"].values()) == {3.0}, curves["erl/rollbacks_per_rollout"]
    # tool results are part of the response but not sampled
    assert all(v < curves["rl/response_length"][k] for k, v in curves["erl/sampled_tokens"].items())

"""ERL (step-level erasable rollouts for tool use) and its lookup task: the task and tool are
deterministic and answerable by following the facts; a rolled-back step is regenerated on top of the
cached prefix (no earlier position fed again), the kept tokens' log-probs equal a fresh forward, tool
tokens are marked and teacher-forced, and the cache ends holding exactly the final sequence."""

from __future__ import annotations

import math

import pytest

from megatron_step.rl.erl import ERLConfig, Step, _token_at_char, default_step_score
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
from megatron_step.testing import run_distributed
from tests.rl import _erl_bodies


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
    tok = _erl_bodies.ToyTokenizer()
    ids = tok.encode("Step 1: <search> Alice born_in </search>")
    text = tok.decode(ids)
    assert _token_at_char(tok, ids, text.find("<search>")) == 2
    assert _token_at_char(tok, ids, 0) == 0
    assert _token_at_char(tok, ids, text.find("Alice") - 1) == 3  # the space before a word is its token's


# -- ERL on the tiny model (spawned process) --------------------------------------------------------------
@pytest.fixture(scope="module")
def erl_run():
    return run_distributed(_erl_bodies.rollback_scenarios, 1)[0]


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

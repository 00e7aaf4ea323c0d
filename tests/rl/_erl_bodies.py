"""Process bodies for tests/rl/test_erl.py (module-level so they pickle into spawned ranks).

The model is the tiny Step 3.5 Flash preset with random weights. It cannot learn the lookup protocol in
a unit test, so the text side is a toy word-level tokenizer in which many ids decode to the same word
(`</search>` to about one id in eight): a near-uniform random model then closes a search within a few
tokens, and every path of ERL (tool call, teacher-forced result, rollback of a step or of its query)
runs on a real model within one short process."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig

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
    from megatron_step.rl.engine import Engine, SamplingParams
    from megatron_step.rl.erl import ERLConfig, generate_erl
    from megatron_step.rl.lookup import SearchTool, format_result, make_world
    from megatron_step.rl.policy import pack, token_logp

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

"""Erasable rollouts (E3RL): erasure reuses the prefix's KV cache (no prefix position recomputed, the
regenerated tokens' logits equal a from-scratch forward), memory stays that of a plain rollout, and
the erasure policy's uncertainty / threshold rules."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig
from megatron_step.rl.config import E3RLConfig
from megatron_step.rl.engine import Engine, Generation, SamplingParams
from megatron_step.rl.erasable import E3RLPolicy, generate_erasable
from megatron_step.rl.erasure_credit import attention_shares, segment_advantages
from megatron_step.testing import run_distributed
from tests.rl._engine_bodies import replay_logp


@pytest.mark.distributed
def test_erasure_reuses_the_prefix_cache_and_matches_a_fresh_forward():
    out = run_distributed(erase_and_reuse, 1)[0]
    assert out["erasures"] == [0, 0, 0, 2, 2, 2, 0, 0], out
    assert out["erased_segments"][3:6] == [[1, 1]] * 3
    assert out["regenerated"][3:6] == [10, 10, 10] and out["regenerated"][0] == 0
    assert out["prefix_reused"][3] == 2 * (7 + 5)  # two rollbacks to position 12 of the cache
    assert out["lengths"] == [20] * 8 and out["segments"][3] == [0, 5, 10, 15]
    # the 4-token prompt's rows sample 3 tokens while the 7-token prompts are still fed
    assert out["lead_in"] == [0] * 6 + [3, 3] and out["segments"][6] == [0, 8, 13, 18]
    assert out["prefix_recomputed"] == 0  # nothing before the erased segment went through the model again
    assert out["regen_fed"] == [1, 1, 1, 3, 3, 3]  # the erased segment's positions: fed 1 + 2 times
    assert out["max_logp_diff"] <= 1e-4 and out["max_entropy_diff"] <= 1e-4, out
    assert out["routing_rows"] == out["expected_routing_rows"]
    assert out["replay_logp_diff"] <= 1e-4, out


@pytest.mark.distributed
def test_scattered_erasures_regenerate_as_one_slice_after_moving_cache_rows():
    out = run_distributed(scattered_erasures, 1)[0]
    assert out["erasures"] == [0, 1, 0, 0, 1, 0]
    assert out["rows_moved"] == 2  # row 4 swapped next to row 1 (or the other way round)
    assert out["prefix_recomputed"] == 0
    assert out["max_logp_diff"] <= 1e-4, out


@pytest.mark.distributed
def test_kv_bytes_after_erasures_equal_a_plain_rollout():
    out = run_distributed(memory_after_erasures, 1)[0]
    assert out["erasures"] == [3, 3, 3, 3]
    assert out["lengths"] == out["plain_lengths"] == [20] * 4
    rows_moved = out["erasable"].pop("rows_moved")
    assert rows_moved == 0  # the whole group erases: already one slice
    assert out["erasable"] == out["plain"], out


def _policy(**kw):
    return E3RLPolicy(E3RLConfig(**kw))


def test_uncertainty_is_the_weighted_smoothed_mean_max_and_rise():
    p = _policy(smooth_window=2, w_mean=1.0, w_max=0.5, w_rate=2.0)
    x = [1.0, 3.0, 2.0]  # sliding means of 2: 2.0, 2.5 -> 2.25; max 3; mean 2
    assert p.uncertainty(x, None) == pytest.approx(2.25 + 0.5 * 3.0)
    assert p.uncertainty(x, 1.5) == pytest.approx(2.25 + 1.5 + 2.0 * 0.5)
    assert p.uncertainty(x, 2.5) == pytest.approx(2.25 + 1.5)  # a fall is not a rise
    assert _policy(smooth_window=8).uncertainty([2.0], None) == pytest.approx(2.0 + 0.25 * 2.0)


def test_signal_is_cross_entropy_or_entropy():
    assert _policy().token_signal([-0.5, -2.0], [1.0, 1.0]) == [0.5, 2.0]
    assert _policy(signal="entropy").token_signal([-0.5, -2.0], [1.0, 3.0]) == [1.0, 3.0]


def test_threshold_uses_group_stats_penalty_and_history():
    p = _policy(threshold_std=1.0, penalty_growth=0.5, history_power=1.0, max_erasures=2)
    u = [1.0, 1.0, 1.0, 3.0, 5.0, 5.0]
    groups = [0, 0, 0, 0, 1, 1]
    erase, th, stats = p.decide(u, groups, [0, 0, 0, 0, 0, 0], [[]] * 6)
    mu, sd = 1.5, (0.75) ** 0.5  # group 0: population std of 1, 1, 1, 3
    assert stats[0] == pytest.approx((mu, sd)) and th[3] == pytest.approx(mu + sd)
    assert erase == [False, False, False, True, False, False]  # group 1 has no spread: nothing erased
    # each erasure multiplies the bar by 1.5; at K no more erasures
    _, th1, _ = p.decide(u, groups, [0, 0, 0, 1, 0, 0], [[]] * 6, stats=stats)
    assert th1[3] == pytest.approx((mu + sd) * 1.5)
    e2, _, _ = p.decide([1, 1, 1, 100.0, 5, 5], groups, [0, 0, 0, 2, 0, 0], [[]] * 6, stats=stats)
    assert not e2[3]
    # history: a rollout twice as uncertain as its group so far gets a bar ~ (2 / 1.25) higher
    hist = [[1.0], [1.0], [1.0], [2.0], [], []]
    _, th2, _ = p.decide(u, groups, [0] * 6, hist, stats=stats)
    assert th2[3] == pytest.approx((mu + sd) * 2.0 / 1.25) and th2[0] == pytest.approx((mu + sd) / 1.25)


def test_segment_advantages_uniform_and_attention():
    g = Generation([1], [5, 6, 7, 8, 9], [0.0] * 5, [0.0] * 5, "length", info={"segments": [0, 2, 4]})
    assert segment_advantages([2.0], [g], E3RLConfig()) == [[2.0] * 5]
    got = segment_advantages([2.0], [g], E3RLConfig(advantage_rule="attention"), shares=[[0.5, 0.25, 0.25]])
    assert got == [[3.0, 3.0, 1.5, 1.5, 1.5]]  # scales 1.5, 0.75, 0.75 (mean 1)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rl.e3rl.segment_len=0"):
        E3RLConfig(segment_len=0)
    with pytest.raises(ValueError, match="rl.e3rl.signal='x'"):
        E3RLConfig(signal="x")


@pytest.mark.distributed
def test_attention_shares_per_kept_segment():
    out = run_distributed(shares, 1)[0]
    assert out["layers"] >= 1
    assert all(len(s) == 3 for s in out["got"])
    assert all(0 <= x <= 1 for s in out["got"] for x in s) and all(sum(s) <= 1 + 1e-6 for s in out["got"])
    assert out["got"][0] == pytest.approx(out["want"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# process bodies (module-level so they pickle into spawned ranks)
# ---------------------------------------------------------------------------------------------
class ForcedPolicy(E3RLPolicy):
    """Erases every rollout of `group` at segment `at` (its second kept segment when at=1), `times`
    times: erasures at a known place, whatever the uncertainties are."""

    def __init__(self, cfg, group=1, at=1, times=2, pick=None):
        super().__init__(cfg)
        self.group, self.at, self.times, self.pick = group, at, times, pick

    def decide(self, u, groups, erasures, histories, stats=None):
        if self.pick is not None:  # rows by their place in the batch (non-adjacent: cache rows move)
            erase = [
                i in self.pick and len(h) == self.at and e < self.times
                for i, (e, h) in enumerate(zip(erasures, histories))
            ]
            return erase, [0.0] * len(u), stats or {}
        erase = [
            g == self.group and len(h) == self.at and e < self.times
            for g, e, h in zip(groups, erasures, histories)
        ]
        return erase, [0.0] * len(u), stats or {}


def _model(seed=3):
    platform.setup(ParallelConfig(), seed=seed)
    cfg = dataclasses.replace(tiny(), routing_replay=True)
    return cfg, build_step_flash(cfg, ParallelConfig())


def _capture_positions(model):
    """Per (call, row of the cache): the positions fed, from the model's own inputs."""
    fed = []

    def pre(mod, args, kwargs):
        ctx = kwargs.get("inference_context")
        pos = args[1]
        off = ctx.batch_size_offset if ctx is not None else 0
        for j in range(pos.shape[0]):
            fed.append((id(ctx), off + j, pos[j].tolist()))

    return fed, model.register_forward_pre_hook(pre, with_kwargs=True)


def erase_and_reuse(rank, world_size):
    """Six rollouts of two 7-token prompts and two of a 4-token prompt in one batch (ragged prompts: the
    short ones get a lead-in); group 1's three rollouts erase their second segment twice. Checks, from
    the model's inputs: no position before the rolled-back segment is fed twice; the kept tokens'
    log-probs/entropies equal a from-scratch forward over prompt + final response; the recorded
    routing replays to the same log-probs."""

    cfg, model = _model()
    g = torch.Generator().manual_seed(0)
    p0 = torch.randint(4, cfg.vocab_size, (7,), generator=g).tolist()
    p1 = torch.randint(4, cfg.vocab_size, (7,), generator=g).tolist()
    p2 = torch.randint(4, cfg.vocab_size, (4,), generator=g).tolist()
    prompts = [p0] * 3 + [p1] * 3 + [p2] * 2
    groups = [0] * 3 + [1] * 3 + [2] * 2
    ecfg = E3RLConfig(segment_len=5, num_segments=4, max_erasures=5)
    engine = Engine(model, eos_id=-1)  # never stops early: every rollout has 4 full segments
    fed, hook = _capture_positions(model)
    gens = __import__("megatron_step.rl.erasable", fromlist=["x"]).generate_erasable(
        engine, prompts, groups, SamplingParams(seed=5), ForcedPolicy(ecfg)
    )
    hook.remove()
    # positions fed per (cache, row)
    counts: dict[tuple[int, int], Counter] = {}
    for ctx, row, pos in fed:
        counts.setdefault((ctx, row), Counter()).update(pos)
    ctx_ids = {c for c, _, _ in fed}
    assert len(ctx_ids) == 1  # one batch, one cache, prompts of 7 and 4 tokens
    big = ctx_ids.pop()
    rollback = len(p0) + ecfg.segment_len  # first position of segment 1
    prefix_recomputed = 0
    regen_fed = []
    for row in range(6):
        c = counts[(big, row)]
        prefix_recomputed += sum(n - 1 for p, n in c.items() if p < rollback)
        regen_fed.append(max(c[p] for p in range(rollback, rollback + ecfg.segment_len)))
    # kept tokens vs a from-scratch forward
    model.eval()
    worst_lp = worst_ent = 0.0
    with torch.no_grad():
        for gen in gens:
            seq = gen.prompt_ids + gen.response_ids
            x = torch.tensor([seq[:-1]])
            logits = model(x, torch.arange(x.shape[1])[None], None).float()[0, len(gen.prompt_ids) - 1 :]
            lp = torch.log_softmax(logits, -1)
            got = lp.gather(-1, torch.tensor(gen.response_ids)[:, None]).squeeze(-1)
            ent = -(lp.exp() * lp).sum(-1)
            worst_lp = max(worst_lp, (got - torch.tensor(gen.logprobs)).abs().max().item())
            worst_ent = max(worst_ent, (ent - torch.tensor(gen.entropies)).abs().max().item())
    _, batch, logp = replay_logp(model, gens)
    m = batch["mask"].bool()
    return {
        "erasures": [x.info["erasures"] for x in gens],
        "erased_segments": [[e["segment"] for e in x.info["erased"]] for x in gens],
        "regenerated": [x.info["regenerated_tokens"] for x in gens],
        "prefix_reused": [x.info["prefix_reused"] for x in gens],
        "lengths": [len(x.response_ids) for x in gens],
        "segments": [x.info["segments"] for x in gens],
        "lead_in": [x.info["lead_in"] for x in gens],
        "prefix_recomputed": prefix_recomputed,
        "regen_fed": regen_fed,
        "max_logp_diff": worst_lp,
        "max_entropy_diff": worst_ent,
        "replay_logp_diff": (logp[m] - batch["rollout_logp"][m]).abs().max().item(),
        "routing_rows": [x.routing[0].shape[0] for x in gens],
        "expected_routing_rows": [len(x.prompt_ids) + len(x.response_ids) - 1 for x in gens],
    }


def scattered_erasures(rank, world_size):
    """Rows 1 and 4 of one bucket erase (not adjacent: the cache rows are swapped to regenerate them
    as one slice). Kept log-probs must still equal a from-scratch forward; no position before the
    rolled-back segment is fed twice to any cache row."""

    cfg, model = _model()
    g = torch.Generator().manual_seed(5)
    p = torch.randint(4, cfg.vocab_size, (6,), generator=g).tolist()
    ecfg = E3RLConfig(segment_len=4, num_segments=4, max_erasures=1)
    engine = Engine(model, eos_id=-1)
    fed, hook = _capture_positions(model)
    gens = generate_erasable(
        engine, [p] * 6, [0] * 6, SamplingParams(seed=3), ForcedPolicy(ecfg, at=2, times=1, pick={1, 4})
    )
    hook.remove()
    counts: dict[int, Counter] = {}
    for _, row, pos in fed:
        counts.setdefault(row, Counter()).update(pos)
    rollback = 6 + 2 * 4
    model.eval()
    worst = 0.0
    with torch.no_grad():
        for gen in gens:
            seq = gen.prompt_ids + gen.response_ids
            x = torch.tensor([seq[:-1]])
            lp = torch.log_softmax(model(x, torch.arange(x.shape[1])[None], None).float()[0, 5:], -1)
            got = lp.gather(-1, torch.tensor(gen.response_ids)[:, None]).squeeze(-1)
            worst = max(worst, (got - torch.tensor(gen.logprobs)).abs().max().item())
    return {
        "erasures": [x.info["erasures"] for x in gens],
        "rows_moved": engine.last_kv["rows_moved"],
        "prefix_recomputed": sum(n - 1 for c in counts.values() for q, n in c.items() if q < rollback),
        "max_logp_diff": worst,
    }


def memory_after_erasures(rank, world_size):
    """KV bytes after K erasures vs a plain rollout of the same final length (same prompt, batch)."""

    cfg, model = _model()
    g = torch.Generator().manual_seed(1)
    p = torch.randint(4, cfg.vocab_size, (6,), generator=g).tolist()
    ecfg = E3RLConfig(segment_len=4, num_segments=5, max_erasures=3)
    engine = Engine(model, eos_id=-1)
    gens = generate_erasable(
        engine, [p] * 4, [0] * 4, SamplingParams(seed=1), ForcedPolicy(ecfg, group=0, at=2, times=3)
    )
    erasable = dict(engine.last_kv)
    plain = engine.generate([p] * 4, SamplingParams(max_new_tokens=ecfg.max_new_tokens, seed=1))
    return {
        "erasures": [x.info["erasures"] for x in gens],
        "lengths": [len(x.response_ids) for x in gens],
        "plain_lengths": [len(x.response_ids) for x in plain],
        "erasable": erasable,
        "plain": dict(engine.last_kv),
    }


def shares(rank, world_size):
    """attention_shares on erasable rollouts: one share per kept segment, each in [0, 1], summing to at
    most 1 (the rest is on the prompt), equal to a hand computation from the captured probabilities."""

    cfg, model = _model()
    g = torch.Generator().manual_seed(4)
    p = torch.randint(4, cfg.vocab_size, (5,), generator=g).tolist()
    ecfg = E3RLConfig(segment_len=4, num_segments=3)
    gens = generate_erasable(
        Engine(model, eos_id=-1), [p] * 2, [0] * 2, SamplingParams(seed=2), E3RLPolicy(ecfg)
    )
    got = attention_shares(model, gens)
    # by hand for rollout 0: average the full-attention layers' probabilities over heads
    full = [
        m for m in model.modules() if getattr(m, "window", "absent") is None and hasattr(m, "core_attention")
    ]
    probs = []
    hooks = [
        m.core_attention.scale_mask_softmax.register_forward_hook(lambda m_, a, o: probs.append(o))
        for m in full
    ]
    seq = gens[0].prompt_ids + gens[0].response_ids
    model.eval()
    with torch.no_grad():
        model(torch.tensor([seq[:-1]]), torch.arange(len(seq) - 1)[None], None)
    for h in hooks:
        h.remove()
    pm = torch.stack([x[0].mean(0) for x in probs]).mean(0)
    q = pm[4 + 8 : 4 + 12]  # the queries producing the last segment's tokens (prompt of 5: offset 4)
    want = [float(q[:, 5 + a : 5 + a + 4].sum(-1).mean()) for a in (0, 4, 8)]  # keys: the tokens
    return {"got": got, "want": want, "layers": len(full)}

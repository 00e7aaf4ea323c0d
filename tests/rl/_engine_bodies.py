"""Process bodies for tests/rl/test_engine.py (module-level so they pickle into spawned ranks)."""

from __future__ import annotations

import dataclasses

import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.platform import ParallelConfig
from megatron_step.rl.engine import Engine, KVCache, SamplingParams
from megatron_step.rl.policy import pack, set_replay, token_logp

PROMPT_LENS = (5, 12, 9)  # different lengths: the shortest is prefilled, the rest teacher-forced


def _model(replay=True, seed=3):
    platform.setup(ParallelConfig(), seed=seed)
    cfg = dataclasses.replace(tiny(), routing_replay=replay)
    return cfg, build_step_flash(cfg, ParallelConfig())


def _prompts(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def greedy_cache_vs_reforward(rank, world_size, new_tokens=24):
    """Greedy generation with the KV cache, and the same by full re-forward (no cache) with the
    logits compared at every step."""

    cfg, model = _model()
    prompts = _prompts(cfg)
    engine = Engine(model, eos_id=3)
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, greedy=True, stop_ids=()))
    model.eval()
    worst = 0.0
    ref_tokens = []
    with torch.no_grad():
        for p, g in zip(prompts, gens):
            seq = list(p)
            for t in range(len(g.response_ids)):
                x = torch.tensor([seq])
                logits = model(x, torch.arange(len(seq))[None], None).float()[0, -1]
                lp = torch.log_softmax(logits, -1)
                nxt = int(logits.argmax())
                worst = max(worst, abs(float(lp[g.response_ids[t]]) - g.logprobs[t]))
                seq.append(nxt)
                if nxt == 3:
                    break
            ref_tokens.append(seq[len(p) :])
    return {
        "cached": [g.response_ids for g in gens],
        "reforward": ref_tokens,
        "max_logprob_diff": worst,
        "window": cfg.sliding_window,
        "lens": [len(p) + len(g.response_ids) for p, g in zip(prompts, gens)],
    }


def _routing_maps(model, batch, replay: bool):
    """The (S*B, E) routing maps every MoE router of `model` produced in one training forward."""

    maps, hooks = [], []
    for m in model.modules():
        if getattr(m, "router_replay", None) is not None:
            hooks.append(m.register_forward_hook(lambda mod, args, out: maps.append(out[1].detach().clone())))
    set_replay(model, batch["routing"] if replay else None)
    try:
        with torch.no_grad():
            model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    finally:
        set_replay(model, None)
        for h in hooks:
            h.remove()
    return maps


def replay_logp(model, gens):
    """Pack generations as the trainer does and run a training-mode forward with their recorded
    routing replayed: (items, packed batch, per-token log-probs aligned with batch["mask"])."""

    items = [
        {
            "prompt_ids": g.prompt_ids,
            "response_ids": g.response_ids,
            "rollout_logp": g.logprobs,
            "routing": g.routing,
        }
        for g in gens
    ]
    batch = pack(items)
    model.train()
    with torch.no_grad():
        logp = token_logp(model, batch)
    return items, batch, logp


def logprobs_vs_training_forward(rank, world_size):
    """Sample (temperature 1) with routing recorded, then training-mode forwards: with the routing
    replayed the log-probs match the sampler's; after perturbing the routers (as a policy update
    would) free routing changes for some tokens while replayed routing still equals the rollout's."""

    cfg, model = _model()
    prompts = _prompts(cfg, seed=1)
    engine = Engine(model, eos_id=3)
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=16, seed=7))
    items, batch, logp = replay_logp(model, gens)
    m = batch["mask"].bool()
    diff = (logp[m] - batch["rollout_logp"][m]).abs().max().item()
    s, b = batch["tokens"].shape[1], batch["tokens"].shape[0]
    real = torch.zeros(s, b, dtype=torch.bool)
    for i, it in enumerate(items):
        real[: len(it["prompt_ids"]) + len(it["response_ids"]) - 1, i] = True
    real = real.reshape(-1)
    rollout_maps = []
    for idx in batch["routing"]:
        rm = torch.zeros(idx.shape[0], cfg.num_experts, dtype=torch.bool)
        rollout_maps.append(rm.scatter_(1, idx, True))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std())
    free = _routing_maps(model, batch, replay=False)
    replayed = _routing_maps(model, batch, replay=True)
    changed = sum(int((f[real] != r[real]).any(-1).sum()) for f, r in zip(free, rollout_maps))
    replay_equal = all(torch.equal(x[real], r[real]) for x, r in zip(replayed, rollout_maps))
    return {
        "max_abs_logp_diff": diff,
        "tokens": int(m.sum()),
        "layers": len(rollout_maps),
        "free_tokens_rerouted": changed,
        "replay_equals_rollout": replay_equal,
    }


def truncate_and_continue(rank, world_size):
    """Fill the cache with 20 positions, roll back to 12, feed 6 new tokens: their logits equal a
    from-scratch forward over the kept 12 + the 6 new; the model sees only the 6 new positions."""
    from megatron.core.inference.utils import InferenceMode

    cfg, model = _model(replay=False)
    model.eval()
    g = torch.Generator().manual_seed(2)
    first = torch.randint(4, cfg.vocab_size, (2, 20), generator=g)
    new = torch.randint(4, cfg.vocab_size, (2, 6), generator=g)
    seen = []
    hook = model.embedding.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))

    engine = Engine(model, eos_id=3)
    cache = KVCache(2, 40)
    with torch.no_grad(), InferenceMode.active():
        engine.forward(cache, first[:, :10])
        engine.forward(cache, first[:, 10:])
        used_before = cache.used_bytes()
        cache.truncate(12)
        seen.clear()
        got = engine.forward(cache, new)
    hook.remove()
    full = torch.cat([first[:, :12], new], 1)
    with torch.no_grad():
        want = model(full, torch.arange(18)[None].expand(2, 18), None).float()[:, 12:]
    return {
        "max_abs_diff": (got - want).abs().max().item(),
        "positions_fed_after_truncate": sum(seen),
        "length": cache.length,
        "used_bytes_20": used_before,
        "used_bytes_18": cache.used_bytes(),
        "bytes_per_position": cache.bytes_per_position(),
    }


# -- MTP speculative decoding -----------------------------------------------------------------------
SPEC_PROMPT_LENS = (5, 12, 9, 5, 7, 16)  # the 16-token prompt's tail is longer than a verify chunk


def spec_vs_plain(rank, world_size, new_tokens=20):
    """Plain decoding, then speculative decoding (MTP-3 drafts) of the same prompts: greedy and
    `accept="coupled"` sampling are token-identical to plain decoding, with their log-probs and
    routing; `accept="rejection"` sampling gives log-probs equal to a training forward's (routing
    replayed)."""
    cfg, model = _model(seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, cfg.vocab_size, (n,), generator=g).tolist() for n in SPEC_PROMPT_LENS]
    plain = Engine(model, eos_id=3)
    out = {}
    for name, accept, params, cached in (
        ("greedy", "rejection", SamplingParams(max_new_tokens=new_tokens, greedy=True), True),
        ("coupled", "coupled", SamplingParams(max_new_tokens=new_tokens, seed=5, top_k=50), True),
        ("rejection", "rejection", SamplingParams(max_new_tokens=new_tokens, seed=5), True),
        # Megatron-Core's single-position MTP step in place of the MTP layers' own caches
        ("greedy_single", "rejection", SamplingParams(max_new_tokens=new_tokens, greedy=True), False),
        ("coupled_single", "coupled", SamplingParams(max_new_tokens=new_tokens, seed=5, top_k=50), False),
        # chunks one position per call, as under core attentions that drop an explicit mask
        ("greedy_unmasked", "rejection", SamplingParams(max_new_tokens=new_tokens, greedy=True), True),
    ):
        spec = Engine(model, eos_id=3, speculative=3, accept=accept, mtp_cache=cached)
        assert spec.masked_chunks  # the local core attention (CPU)
        spec.masked_chunks = name != "greedy_unmasked"
        want, got = plain.generate(prompts, params), spec.generate(prompts, params)
        same = [a.response_ids == b.response_ids for a, b in zip(want, got)]
        lp = [abs(x - y) for a, b in zip(want, got) if a.response_ids == b.response_ids
              for x, y in zip(a.logprobs, b.logprobs)]  # fmt: skip
        routing = all(
            torch.equal(x, y)
            for a, b in zip(want, got) if a.response_ids == b.response_ids
            for x, y in zip(a.routing, b.routing)
        )  # fmt: skip
        items, batch, logp = replay_logp(model, got)
        m = batch["mask"].bool()
        out[name] = {
            "same": same,
            "max_logprob_diff": max(lp, default=0.0),
            "routing_equal": routing,
            "forward_logp_diff": (logp[m] - batch["rollout_logp"][m]).abs().max().item(),
            "proposed": spec.stats["spec_proposed"],
            "accepted": spec.stats["spec_accepted"],
            "forwards": (spec.stats["forwards"], plain.stats["forwards"]),
            "lens": [len(x.response_ids) for x in got],
        }
        plain.stats["forwards"] = 0
    return out


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's chi-square of `counts` against `probs` (bins with an expected count below 5 merged
    into one) and its p-value (upper regularised gamma)."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    return stat, float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def spec_distribution(rank, world_size, rows=3000):
    """The standard rejection rule samples the policy's own distribution. A 16-token vocabulary and a
    sharpened output layer (so the drafts' distribution q differs clearly from the policy's p):
    3000 rollouts of one prompt, 4 tokens each (drafts at depths 1 and 2 in the first step). Among
    those whose first token is the most common one, the second token (the first the drafts decide)
    is tested against p and against q; the third, among the most common (first, second) pair,
    against p."""
    from megatron.core.inference.utils import InferenceMode

    platform.setup(ParallelConfig(), seed=4)
    cfg = dataclasses.replace(tiny(), vocab_size=16)
    model = build_step_flash(cfg, ParallelConfig())
    with torch.no_grad():
        model.output_layer.weight.mul_(6.0)
    prompt = [5, 9, 2, 14]
    # single-position drafts, so that q below is exactly the drafter's distribution (the rule is the
    # same with the MTP layers' own caches)
    engine = Engine(model, eos_id=-1, speculative=3, mtp_cache=False)
    gens = engine.generate(
        [prompt] * rows, SamplingParams(max_new_tokens=4, seed=21), record_routing=False,
        keys=[(i,) for i in range(rows)],
    )  # fmt: skip
    toks = torch.tensor([g.response_ids for g in gens])  # (rows, 3)
    m1 = int(toks[:, 0].mode().values)
    pair = toks[toks[:, 0] == m1][:, :2]
    m2 = int(pair[:, 1].mode().values)
    model.eval()
    hidden = {}
    hook = model.decoder.register_forward_hook(lambda mod, a, o: hidden.__setitem__("h", o))
    with torch.no_grad():
        ctx = [prompt + [m1], prompt + [m1, m2]]
        p2, p3 = (torch.softmax(model(torch.tensor([c]), torch.arange(len(c))[None], None).float()[0, -1], -1)
                  for c in ctx)  # fmt: skip
        model(torch.tensor([prompt]), torch.arange(len(prompt))[None], None)
        with InferenceMode.active():
            _, q_logits = model.compute_mtp_single_step(
                hidden_states=hidden["h"][-1:], next_token_ids=torch.tensor([[m1]]),
                position_ids=torch.tensor([[0]]), depth=0,
            )  # fmt: skip
        q2 = torch.softmax(q_logits[0, 0].float(), -1)
    hook.remove()
    second = torch.bincount(pair[:, 1], minlength=16)
    third = torch.bincount(toks[(toks[:, 0] == m1) & (toks[:, 1] == m2)][:, 2], minlength=16)
    return {
        "second_vs_p": _chi2(second, p2),
        "second_vs_q": _chi2(second, q2),
        "third_vs_p": _chi2(third, p3),
        "n_second": int(second.sum()),
        "n_third": int(third.sum()),
        "tv_p_q": float((p2 - q2).abs().sum() / 2),
        "proposed": engine.stats["spec_proposed"],
        "accepted": engine.stats["spec_accepted"],
    }


def spec_bad_depth(rank, world_size):
    """More drafts than the model has MTP depths: a clear error naming the field."""
    _, model = _model()
    Engine(model, eos_id=3, speculative=4)


def mtp_cache_vs_training(rank, world_size, length=20):
    """The MTP layers over their own KV caches (the engine's drafter, `Engine._mtp_cached`), fed in
    two chunks, give the training forward's MTP hidden states at every position where the tokens
    they read exist -- the drafts are computed as the heads were trained."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    cfg, model = _model(seed=5)
    model.eval()
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(4, cfg.vocab_size, (2, length), generator=g)
    grabbed = {}
    hooks = [
        model.decoder.register_forward_hook(lambda m, a, o: grabbed.__setitem__("main", o)),
        model.mtp.register_forward_hook(lambda m, a, o: grabbed.__setitem__("mtp", o)),
    ]
    with torch.no_grad():
        model(seq, torch.arange(length)[None].expand(2, length), None)
    for h in hooks:
        h.remove()
    k = cfg.mtp_num_layers
    want = torch.chunk(grabbed["mtp"], k + 1, dim=0)[1:]  # per depth (S, B, H)
    engine = Engine(model, eos_id=3, speculative=k)
    worst = []
    with torch.no_grad(), InferenceMode.active():
        hidden = grabbed["main"]
        for d in range(k):
            ctx = StaticInferenceContext(max_batch_size=2, max_sequence_length=length)
            n = length - d - 1  # positions t whose token t + d + 1 exists
            nxt = seq[:, d + 1 : d + 1 + n]
            got = torch.cat([engine._mtp_cached(ctx, d, hidden[:7], nxt[:, :7]),
                             engine._mtp_cached(ctx, d, hidden[7:n], nxt[:, 7:])], 0)  # fmt: skip
            worst.append((got - want[d][:n]).abs().max().item())
            hidden = got
    return {"max_abs_diff": worst, "depths": k}

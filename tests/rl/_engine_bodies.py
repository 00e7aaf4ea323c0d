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

"""Erasable rollouts (E3RL): segment-wise generation that erases an uncertain segment and regenerates
it in place on top of the kept prefix's KV cache.

    policy = E3RLPolicy(E3RLConfig(segment_len=8, num_segments=6, max_erasures=5))
    gens = generate_erasable(engine, prompts, groups, SamplingParams(temperature=1.0), policy)
    gens[i].info["erasures"], gens[i].info["segments"]       # per rollout

How it works (one static cache for the batch; Megatron-Core's static cache keeps one length for all
rows, so segments are aligned on cache positions: prompts of different lengths are fed as in
`Engine.generate` -- the shortest prefilled, the rest one position per step while rows whose prompt
has ended already sample -- and segment 0 starts, for every row, where the longest prompt of the
call ends: the longest over every rank and batch chunk, agreed by one all-reduce on the world group,
so that segment boundaries, and with the keyed randomness the rollouts, do not depend on how the
prompts were batched or spread over ranks. The few tokens a shorter prompt's row samples before
that, its lead-in, are never erased and count with segment 0 for credit):

1. All rows decode segment n (S tokens) together. Each sampled token's cross-entropy (-log p of the
   sampled token) and entropy come from the sampling logits, as in `Engine.generate`.
2. The policy scores each row's segment (U_n) and compares it to a threshold Theta_n built from the
   statistics of U_n over the G rollouts of the same prompt (`groups`), the row's erasure count and
   its history (see `E3RLPolicy`).
3. Rows to erase are rolled back to the segment's first position and regenerate it, together, as one
   contiguous batch slice of the same cache (`batch_size_offset`): when they are not adjacent, cache
   rows are swapped first (a copy of their keys/values, `_Bucket.gather`). The kept prefix's
   keys/values are read where they are, nothing before the segment is fed to the model again, and the
   other rows' cache entries are not written. The logits that
   predicted the segment's first token were kept at the boundary, so the first regenerated token
   needs no forward either. A regenerated segment is scored again (with the grown penalty) and may be
   erased again, up to K erasures per rollout (Erase@K).
4. The cache never grows past prompt + S*N positions and holds exactly one copy of each live position:
   after any number of erasures it uses what a plain rollout of the same final length uses.

What is recorded per rollout (`Generation.info`): `segments` (response token boundaries of the kept
segments), `erasures`, `erased` (each erased segment: index, tokens, U, Theta), `regenerated_tokens`,
`prefix_reused` (kept positions read from the cache, not recomputed, summed over erasures) and
`segment_u` (U of each kept segment).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_step.rl.engine import Engine, Generation, KVCache, SamplingParams
from megatron_step.rl.erasure_policy import E3RLPolicy


@dataclass
class _Row:
    prompt: list[int]
    group: int
    key: tuple = ()  # the keyed randomness' row key; a token's is (*key, response index, erasures)
    resp: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    ent: list[float] = field(default_factory=list)
    done: bool = False
    finish: str = "length"
    erasures: int = 0
    seg_starts: list[int] = field(default_factory=list)  # response index where each kept segment starts
    seg_u: list[float] = field(default_factory=list)
    erased: list[dict] = field(default_factory=list)
    regenerated: int = 0
    prefix_reused: int = 0
    routing: list[torch.Tensor] = field(default_factory=list)  # per fed position: (layers, K)
    conf: list[torch.Tensor] = field(default_factory=list)  # per fed position: Sigma_k per MoE router
    logits: torch.Tensor | None = None  # next-token logits
    boundary: torch.Tensor | None = None  # logits that predicted the current segment's first token
    u: float = 0.0  # U of the current segment
    prev: float | None = None  # mean signal of the previous kept segment
    lead_in: int = 0  # tokens sampled while longer prompts of the batch were still being fed


class _Bucket:
    """Rows of equal prompt length sharing one static cache."""

    def __init__(
        self,
        engine: Engine,
        rows: list[_Row],
        params: SamplingParams,
        policy: E3RLPolicy,
        seed: int,
        record: bool,
        align: int,
    ):
        self.engine, self.rows, self.params, self.policy, self.seed = engine, list(rows), params, policy, seed
        self.cfg = policy.cfg
        self.align = align  # cache position where segment 0 starts (>= every prompt's length)
        self.cache = KVCache(len(rows), align + self.cfg.max_new_tokens)
        self.record = record and bool(engine.replays)
        self.measure = record and bool(engine.confidence)  # Sigma_k (rl.routing_confidence)
        self.stop = set(params.stop_ids) | {engine.eos_id}
        self.rows_moved = 0
        self.step = engine.lockstep  # every loop exit below is agreed on its group (rl.lockstep)
        self.scratch: KVCache | None = None  # a 1-row cache for forwards that only keep the group in step

    def sample(self, rows: list[_Row]):
        """(token, logprob, entropy) for `rows` from their current logits, keyed per row."""
        keys = [(*r.key, len(r.resp), r.erasures) for r in rows]
        # under PP the last stage samples and broadcasts (Engine.sample); other stages hold (0,) logits
        return self.engine.sample(torch.stack([r.logits for r in rows]), self.params, self.seed, keys)

    def idle_forward(self) -> None:
        """One forward of a padding token through the scratch cache: this rank has no row to feed
        but the ranks of its lockstep group do (their collectives need this rank's)."""
        if self.scratch is None or self.scratch.length + 1 > self.scratch.max_len:
            self.scratch = KVCache(1, 64)
        self.engine.forward(self.scratch, torch.tensor([[self.engine.pad_id]]))

    def forward(self, tokens_bS: torch.Tensor, a: int) -> torch.Tensor:
        """Feed rows [a, a + b) at the cache's current position; (b, S, V) logits."""
        rec = [] if self.record else None
        b, s = tokens_bS.shape
        self.cache.ctx.batch_size_offset = a
        if self.measure:
            self.engine._conf = []  # the engine's per-call Sigma_k rows
        try:
            logits = self.engine.forward(self.cache, tokens_bS, rec)
        finally:
            self.cache.ctx.batch_size_offset = 0
            conf, self.engine._conf = self.engine._conf, None
        if rec:
            for _, call in rec:  # per call: (start, per layer (s', b, K))
                stacked = torch.stack(call, 0)  # (layers, s', b, K)
                for j in range(b):
                    self.rows[a + j].routing.extend(stacked[:, :, j].unbind(1))
        for _, per_router in conf or []:  # per call: (start, per router (s', b))
            stacked = torch.stack(per_router, -1)  # (s', b, routers)
            for j in range(b):
                self.rows[a + j].conf.extend(stacked[:, j].unbind(0))
        return logits

    def prefill(self) -> None:
        """The shortest prompt length for every row at once, then one position per step up to the
        longest (Megatron-Core's static batching, as `Engine.generate`): rows still inside their prompt
        are fed its next token, the others already sample -- their lead-in, before segment 0."""
        lo, hi = min(len(r.prompt) for r in self.rows), self.align
        # agreed before any forward (collective: self.step.group): ranks whose shortest prompt is
        # shorter feed more positions, the others step with them through the scratch cache
        steps = self.step.max(hi - lo)
        toks = torch.tensor([r.prompt[:lo] for r in self.rows])
        logits = self.forward(toks, 0)[:, -1]
        self.engine.stats["prefill_tokens"] += toks.numel()
        for i, r in enumerate(self.rows):
            r.logits = logits[i]
        for pos in range(lo, hi):
            tok, lp, ent = self.sample(self.rows)
            feed = []
            for j, r in enumerate(self.rows):
                if pos < len(r.prompt):
                    feed.append(r.prompt[pos])
                elif r.done:
                    feed.append(self.engine.pad_id)
                else:
                    feed.append(self._take(r, int(tok[j]), float(lp[j]), float(ent[j])))
            out = self.forward(torch.tensor(feed)[:, None], 0)[:, -1]
            for j, r in enumerate(self.rows):
                r.logits = out[j]
        for r in self.rows:
            r.lead_in = len(r.resp)
        for _ in range(steps - (hi - lo)):
            self.idle_forward()

    def _take(self, r: _Row, t: int, lp: float, ent: float) -> int:
        """Append a sampled token to row r (marking it done at a stop token or the length cap)."""
        r.resp.append(t)
        r.logp.append(lp)
        r.ent.append(ent)
        if t in self.stop:
            r.done, r.finish = True, "stop"
        elif len(r.resp) >= self.cfg.max_new_tokens:
            r.done = True
        return t

    def decode_segment(self, a: int, b: int) -> None:
        """Rows [a, b) (not done) sample one segment from their current logits, the cache positioned at
        the segment's start."""
        S = self.cfg.segment_len
        rows = self.rows[a:b]  # empty: this rank only keeps its group in step
        for r in rows:
            if not r.done:
                r.seg_starts.append(len(r.resp))
        for _ in range(S):
            feed = []
            if rows:
                tok, lp, ent = self.sample(rows)
                feed = [
                    self.engine.pad_id if r.done else self._take(r, int(tok[j]), float(lp[j]), float(ent[j]))
                    for j, r in enumerate(rows)
                ]
            if not self.step.any(not all(r.done for r in rows)):  # collective: self.step.group
                break
            if not rows:
                self.idle_forward()
                continue
            out = self.forward(torch.tensor(feed)[:, None], a)[:, -1]
            self.engine.stats["decode_tokens"] += len(rows)
            for j, r in enumerate(rows):
                r.logits = out[j]

    def gather(self, todo: list[_Row], upto: int) -> tuple[int, int]:
        """Make the rows in `todo` one contiguous slice [a, b) of the batch by swapping cache rows
        (keys/values of positions < upto move with their row: a copy, never a recomputation). Picks
        the slice that needs the fewest swaps; adjacent rows (a prompt's group) usually need none."""
        n, want = len(todo), {id(r) for r in todo}
        inside = [id(r) in want for r in self.rows]
        a = min(range(len(self.rows) - n + 1), key=lambda k: n - sum(inside[k : k + n]))
        out_rows = [i for i, x in enumerate(inside) if x and not a <= i < a + n]
        free = [i for i in range(a, a + n) if not inside[i]]
        if out_rows:
            src, dst = torch.tensor(out_rows + free), torch.tensor(free + out_rows)
            for k, v in self.cache.ctx.key_value_memory_dict.values():
                k[:upto, dst] = k[:upto, src]  # advanced indexing: the right side is a copy
                v[:upto, dst] = v[:upto, src]
            for i, j in zip(out_rows, free):
                self.rows[i], self.rows[j] = self.rows[j], self.rows[i]
            self.rows_moved += 2 * len(out_rows)
        return a, a + n

    def score(self, r: _Row) -> float:
        s = r.seg_starts[-1]
        return self.policy.uncertainty(self.policy.token_signal(r.logp[s:], r.ent[s:]), r.prev)

    def run(self) -> None:
        cfg = self.cfg
        self.prefill()
        for n in range(cfg.num_segments):
            active = [r for r in self.rows if not r.done]
            if not self.step.any(bool(active)):  # collective: self.step.group
                break
            start_pos = self.cache.length  # every active row is at this position
            for r in active:
                r.boundary = r.logits.clone()
                r.prev = None
                if r.seg_starts:
                    x = self.policy.token_signal(r.logp[r.seg_starts[-1] :], r.ent[r.seg_starts[-1] :])
                    r.prev = sum(x) / len(x)
            self.decode_segment(0, len(self.rows))
            for r in active:
                r.u = self.score(r)
            groups = [r.group for r in active]
            hist = [r.seg_u[:] for r in active]
            erase, thetas, stats = self.policy.decide(
                [r.u for r in active], groups, [r.erasures for r in active], hist
            )
            while self.step.any(any(erase)):  # collective: self.step.group
                todo = [r for r, e in zip(active, erase) if e]
                if not todo:  # another rank regenerates: step with it
                    self.decode_segment(0, 0)
                    continue
                for r, e, th in zip(active, erase, thetas):
                    if not e:
                        continue
                    s = r.seg_starts.pop()
                    r.erased.append({"segment": n, "tokens": r.resp[s:], "u": r.u, "theta": th})
                    r.regenerated += len(r.resp) - s
                    r.prefix_reused += start_pos
                    del r.resp[s:], r.logp[s:], r.ent[s:]
                    del r.routing[start_pos:], r.conf[start_pos:]
                    r.done, r.finish = False, "length"
                    r.erasures += 1
                    r.logits = r.boundary.clone()
                a, b = self.gather(todo, start_pos + cfg.segment_len)
                self.cache.ctx.sequence_len_offset = start_pos
                self.decode_segment(a, b)
                for r in todo:
                    r.u = self.score(r)
                erase, thetas, _ = self.policy.decide(
                    [r.u for r in active], groups, [r.erasures for r in active], hist, stats=stats
                )
                erase = [e and any(r is x for x in todo) for r, e in zip(active, erase)]
            for r in active:
                r.seg_u.append(r.u)
            # every row still going fed the whole segment (first pass or regeneration): realign the
            # shared length on them
            self.cache.ctx.sequence_len_offset = start_pos + cfg.segment_len
        # live positions: the longest kept rollout's (its last token is never fed, as in `generate`);
        # entries past it are erased or padding and are dropped
        self.cache.ctx.sequence_len_offset = max(len(r.prompt) + len(r.resp) for r in self.rows) - 1


@torch.no_grad()
def generate_erasable(
    engine: Engine,
    prompts: list[list[int]],
    groups: list[int],
    params: SamplingParams,
    policy: E3RLPolicy,
    record_routing: bool = True,
    keys: list[tuple[int, ...]] | None = None,
) -> list[Generation]:
    """Sample one erasable rollout per prompt (repeat a prompt G times, with one group id, for a group).
    `params.max_new_tokens` is ignored: the length cap is segment_len * num_segments. `keys` as for
    `Engine.generate`; a token's uniform is keyed by (params.seed, *keys[i], position, erasures so far),
    so a regenerated segment draws fresh randomness and a rollout without erasures is the plain one.
    Ranks of `engine.lockstep` call this together (see `Engine.generate`); none may hold no prompt."""
    if len(prompts) != len(groups):
        raise ValueError(f"generate_erasable: {len(prompts)} prompts but {len(groups)} group ids")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_erasable: every prompt needs at least one token")
    keys = [(i,) for i in range(len(prompts))] if keys is None else [tuple(k) for k in keys]
    t0 = time.perf_counter()
    seed = engine.seed_of(params)
    rows = [_Row(list(p), g, k) for p, g, k in zip(prompts, groups, keys)]
    buckets = []
    mb = engine.max_batch
    n_buckets = engine.lockstep.max(-(-len(rows) // mb))  # collective: engine.lockstep.group
    # collective: engine.across_ranks (the world group unless the engine runs in a thread)
    align = engine.across_ranks.max(max((len(p) for p in prompts), default=1))
    with engine.inference():
        for k in range(n_buckets):
            part = rows[k * mb : (k + 1) * mb]
            # a rank with fewer buckets steps with a finished placeholder row
            bucket = _Bucket(
                engine, part or [_Row([engine.pad_id], -1, (0,), done=True)], params, policy, seed,
                record_routing and bool(part), align,
            )  # fmt: skip
            bucket.run()
            buckets.append(bucket)
    out = []
    for r in rows:
        info = {
            "erasures": r.erasures,
            "erased": r.erased,
            "segments": [0, *r.seg_starts[1:]] if r.seg_starts else [],  # the lead-in joins segment 0
            "lead_in": r.lead_in,
            "segment_u": r.seg_u,
            "regenerated_tokens": r.regenerated,
            "prefix_reused": r.prefix_reused,
        }
        g = Generation(r.prompt, r.resp, r.logp, r.ent, r.finish, info=info)
        if r.routing:
            n = len(r.prompt) + len(r.resp) - 1
            stacked = torch.stack(r.routing[:n], 0)  # (n, layers, K)
            g.routing = list(stacked.transpose(0, 1).contiguous().unbind(0))
        if r.conf:  # Sigma_k over the response positions p - 1 .. n - 1, as Engine.generate
            p, n = len(r.prompt), len(r.prompt) + len(r.resp) - 1
            c = torch.stack(r.conf[:n], 0)  # (n, routers)
            g.confidence = [
                (layer, float(c[p - 1 : n, k].sum()), float(n - p + 1))
                for k, layer in enumerate(engine.confidence.layers)
            ]
        out.append(g)
    engine.stats["seconds"] += time.perf_counter() - t0
    engine.last_kv = {
        "used_bytes": sum(b.cache.used_bytes() for b in buckets),
        "allocated_bytes": sum(b.cache.allocated_bytes() for b in buckets),
        "rows_moved": sum(b.rows_moved for b in buckets),  # cache rows swapped to batch regenerations
    }
    return out


__all__ = ["E3RLPolicy", "generate_erasable"]

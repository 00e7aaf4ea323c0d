"""Colocated generation over the *training* Megatron-Core model: batched prefill + decode with a KV
cache, sampling (temperature / top-k / top-p, stop tokens, max length), per-token log-probabilities
and entropies of the sampling distribution, per-token MoE routing decisions, and a cache that can be
truncated back to an earlier position and continued (erasable rollouts need it).

    engine = Engine(model, eos_id=tok.eos_id)            # model: the trainer's GPTModel (not a copy)
    gens = engine.generate([tok.encode(p) for p in prompts], SamplingParams(max_new_tokens=48))

Why our own decode loop over Megatron-Core's `StaticInferenceContext` instead of its engines:
the dynamic engine needs flash-attn (GPU only); the static engine's text-generation controller owns
the sampling loop, so it has no place for routing capture, per-token entropy or cache truncation.
The KV cache, RoPE slicing, window masking and MoE layers are all Megatron-Core's own inference
path (`Attention._adjust_key_value_for_inference`); routing capture is Megatron-Core's RouterReplay
(`moe_enable_routing_replay`, our `model.routing_replay`).

Prompts of different lengths (Megatron-Core's static-batching scheme, no attention masks needed):
the shortest prompt length is prefilled for the whole batch, then every step feeds one position
per sequence -- the prompt's own token while a sequence is still inside its prompt, the sampled one
after. The cache is shared by the batch (one length), so `truncate` rolls the whole batch back;
sequences that must keep their tokens are re-fed them (teacher forcing), as prompts are. So that a
spread of prompt lengths does not cost a decode step per token of it, `generate` runs length
buckets (`Engine.buckets`: sorted by length, a new bucket past `prompt_spread` tokens of spread),
each prefilled in one pass up to its shortest prompt; a bucket ends as soon as all its rows are done.
Finished rows are not refilled (the shared cache length does not allow it).

Randomness and layouts (megatron_step.rl.lockstep): a sampled token is drawn by inverse CDF from a
uniform keyed by (params.seed, the row's key, position, attempt) -- no generator state, so rollouts do
not depend on batching or on the layout -- and every loop exit is agreed over `Engine.lockstep`'s
group, so ranks joined by a forward's collectives (TP, EP, ...) make the same forward calls.

Pipeline parallelism (the engine is given every chunk of this rank: one, or one per virtual stage):
a forward runs the chunks in pipeline order -- each stage receives the previous stage's hidden states
(Megatron-Core's inference p2p helpers, `recv_from_prev_pipeline_rank_` / `send_to_next_pipeline_rank`,
on the pipeline group; with VPP the ring wraps from the last rank to the first), runs its layers
against its own KV cache (layer numbers are global, so one static cache holds every local chunk's
layers) and sends on; the last stage alone has logits (other stages get a (B, S, 0) placeholder), samples,
and broadcasts (token, log-prob, entropy) to the pipeline group (`Engine.sample`). Every stage then
holds the same tokens and takes the same loop exits; routing is recorded per stage for the MoE layers
it owns (the update replays it on the same stage).

MTP speculative decoding (`Engine(speculative=k)`, `_generate_chunk_spec`; docs/design.md §5.2):
each step drafts up to k tokens per row with the MTP heads (each depth over its own KV cache, as
trained; or Megatron-Core's single-position step), verifies them in one forward of the main model
(an explicit causal mask over cache + chunk), keeps the verified prefix by the standard rejection
rule (greedy: exact match; or `accept="coupled"`: plain decoding's tokens) and samples one more;
log-probs, entropies, routing and Sigma_k are those of each verified position, as if decoded one by
one. Drafts and verification run on the last pipeline stage and are broadcast to the pipeline group.

Log-probabilities: of the token under softmax(logits / temperature), before top-k / top-p
truncation -- the policy the trainer models is the temperature-scaled one (use temperature 1.0 for
RL so that it is the trainer's own π). Shapes: B sequences, S positions, V vocabulary, K top-k.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.communication_utils import (
    recv_from_prev_pipeline_rank_,
    send_to_next_pipeline_rank,
)
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.utils import InferenceMode
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.moe_layer import BaseMoELayer
from megatron.core.transformer.moe.router_replay import RouterReplayAction
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from megatron_step.rl.lockstep import Lockstep, keyed_uniforms
from megatron_step.rl.routing_confidence import RouterConfidence
from megatron_step.training.faults import crash_point


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False  # argmax (logprobs still of the temperature-scaled distribution)
    stop_ids: tuple[int, ...] = ()  # finishing tokens (kept in the response); eos is added by Engine
    # the run seed of the keyed randomness (megatron_step.rl.lockstep): with the row keys it fixes every
    # sampled token; None: one drawn from torch's global RNG per generate call
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"rl.sampling.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature <= 0:
            raise ValueError(
                f"rl.sampling.temperature={self.temperature}: must be > 0 (greedy=True for argmax)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rl.sampling.top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"rl.sampling.top_k={self.top_k}: must be >= 0")


@dataclass
class Generation:
    prompt_ids: list[int]  # the prompt as given
    response_ids: list[int]  # sampled tokens, the stop token included when one ended it
    logprobs: list[float]  # log pi_rollout(response_ids[t]) at the sampling temperature, per token
    entropies: list[float]  # entropy of that distribution at each sampled position (nats)
    finish: str  # "stop" (a stop token) | "length" (max_new_tokens)
    # routing[l]: (len(prompt) + len(response) - 1, K) experts chosen by MoE layer l for every
    # position fed to the model (the training forward's input tokens), None without MoE/recording
    routing: list[torch.Tensor] | None = None
    # per decoder MoE layer of this rank: (layer number, sum of Sigma_k over the response positions,
    # their count), with the engine's rl.routing_confidence on (megatron_step.rl.routing_confidence)
    confidence: list[tuple[int, float, float]] | None = None
    info: dict = field(default_factory=dict)


class KVCache:
    """Megatron-Core's static KV cache for one batch, with the operations RL needs.

    Buffers are allocated by the attention layers on first use: per layer (max_len, B, G, D) keys and
    values. `length` is the number of positions held; `truncate(n)` drops positions >= n (they are
    overwritten by the next forward, nothing before n is touched or recomputed)."""

    def __init__(self, batch: int, max_len: int, all_logits: bool = False):
        self.ctx = StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_len)
        # Megatron-Core's static context computes logits for the last position only (under
        # InferenceMode); speculative verification needs every fed position's
        self.ctx.config.materialize_only_last_token_logits = not all_logits
        self.batch, self.max_len = batch, max_len

    @property
    def length(self) -> int:
        return self.ctx.sequence_len_offset

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.truncate({length}): must be in [0, {self.length}]")
        self.ctx.sequence_len_offset = length

    def bytes_per_position(self) -> int:
        """Bytes of keys + values one position of the whole batch takes, summed over layers."""
        total = 0
        for k, v in self.ctx.key_value_memory_dict.values():
            total += (k[0].numel() * k.element_size()) + (v[0].numel() * v.element_size())
        return total

    def used_bytes(self) -> int:
        """Bytes holding live positions (length x bytes_per_position): what grows with a rollout."""
        return self.length * self.bytes_per_position()

    def allocated_bytes(self) -> int:
        return sum(
            k.numel() * k.element_size() + v.numel() * v.element_size()
            for k, v in self.ctx.key_value_memory_dict.values()
        )


def router_replays(model) -> list:
    """The MoE layers' RouterReplay objects (Megatron-Core's routing capture / replay), in layer order.
    `model`: one chunk, or this rank's chunks (virtual pipeline stages) in order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [
        m.router_replay for c in chunks for m in c.modules() if getattr(m, "router_replay", None) is not None
    ]


def index_routers(chunks) -> list:
    """Number this rank's routers across its chunks (`rank_index`): a rollout's routing is a list over
    all of them, and each chunk's forward replays its own slice (rl.policy.set_replay)."""
    replays = router_replays(list(chunks))
    for i, r in enumerate(replays):
        r.rank_index, r.rank_total = i, len(replays)
    return replays


def unwrap_chunks(model) -> list:
    """The Megatron-Core model chunks of `model`: one module, or a list of them, DDP-wrapped or not."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    return [getattr(c, "module", c) for c in chunks]


@contextlib.contextmanager
def sequence_parallel_off(chunks):
    """Sequence parallelism off for a forward that is not training (a decode step feeds one position,
    which TP ranks cannot split; a reward model reads every position's hidden state), with
    Megatron-Core's own switch, as its static text-generation controller does: under TP x EP the MoE
    layers keep it (their token dispatcher relies on it; they all-gather the sequence before the
    next layer)."""
    chunks = unwrap_chunks(chunks)
    cfg = chunks[0].config
    if not cfg.sequence_parallel:
        yield
        return
    exclude = [BaseMoELayer] if cfg.expert_model_parallel_size > 1 else None
    for c in chunks:
        set_model_to_sequence_parallel(c, False, exclude_modules=exclude)
    try:
        yield
    finally:
        for c in chunks:
            set_model_to_sequence_parallel(c, True, exclude_modules=exclude)


class Engine:
    """Generation over `model`: this rank's Megatron-Core GPTModel chunk, or its chunks (a list, one
    per virtual pipeline stage, DDP-wrapped or not). The engine holds references, not copies: the
    trainer's updates are what it samples from."""

    def __init__(
        self,
        model,
        eos_id: int,
        pad_id: int = 0,
        max_batch: int = 256,
        lockstep=None,
        prompt_spread=None,
        across_ranks=None,
        routing_confidence: str = "off",
        speculative: int = 0,
        accept: str = "rejection",
        drafter=None,
        mtp_cache: bool = True,
    ):
        self.chunks = unwrap_chunks(model)
        self.model = self.chunks[0]  # its config is the model's; `inference()` switches every chunk
        self.config = self.model.config
        self.pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        self.last_stage = bool(getattr(self.chunks[-1], "post_process", True))
        self.eos_id, self.pad_id, self.max_batch = eos_id, pad_id, max_batch
        # prompts are generated in length buckets whose longest prompt exceeds the shortest by at most
        # this many tokens (each extra token is one teacher-forced decode step for the whole bucket);
        # None: the call's max_new_tokens (a bucket costs ~ spread + max_new_tokens steps, so splitting
        # pays once the spread alone exceeds a bucket's decode); math.inf: one bucket (no split)
        self.prompt_spread = prompt_spread
        # ranks whose forwards are joined by collectives agree on every loop exit (rl.lockstep)
        self.lockstep = Lockstep.for_model() if lockstep is None else lockstep
        # what must not depend on how prompts are spread over ranks (E3RL's segment alignment) is
        # agreed over every rank; an engine driven from a thread (async RL) passes Lockstep(None)
        self.across_ranks = Lockstep.world() if across_ranks is None else across_ranks
        self.replays = index_routers(self.chunks)
        # Sigma_k of every generated position (rl.routing_confidence; Generation.confidence)
        self.confidence = RouterConfidence(self.chunks, routing_confidence)
        self._conf: list | None = None  # per forward of the generation in progress: (S, B) per router
        self.has_mtp = any(getattr(c, "mtp_process", False) for c in self.chunks)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "seconds": 0.0}
        self.device = next(self.model.parameters()).device
        self.last_kv: dict[str, int] = {}  # KV-cache bytes of the last generate call (used, allocated)
        # MTP speculative decoding (see `_generate_chunk_spec`): draft `speculative` tokens per step
        # with the MTP heads of `drafter` (default: this model's own last chunk, so a weight update
        # of the policy is a drafter refresh), verify them in one forward
        self.speculative, self.accept = int(speculative), accept
        # depth 0 drafts over the MTP layer's own KV cache (ours; `_mtp_cached`), else every depth
        # runs on its single position (Megatron-Core's `compute_mtp_single_step`)
        self.mtp_cache = bool(mtp_cache)
        if self.speculative:
            depth = self.config.mtp_num_layers or 0
            if not self.has_mtp and self.last_stage:
                raise ValueError("speculative decoding drafts with MTP heads; this model has none")
            if not 1 <= self.speculative <= depth:
                raise ValueError(
                    f"rl.speculative.tokens={self.speculative}: must be in [1, mtp_num_layers={depth}]"
                )
            if accept not in ("rejection", "coupled"):
                raise ValueError(f"rl.speculative.accept={accept!r}: one of rejection, coupled")
        self.drafter = unwrap_chunks(drafter)[-1] if drafter is not None else self.chunks[-1]
        # a chunk fed into a non-empty cache gets an explicit causal mask, which Megatron-Core's local
        # core attention applies (its softmax takes the mask; window layers build theirs). Other core
        # attentions (Transformer Engine's fused kernels) drop it once the static cache is past the
        # prefill (mask type no_mask), so there verification and MTP catch-up go one position per
        # call: the same numbers, more forwards
        self.masked_chunks = all(
            isinstance(m, DotProductAttention)
            for c in [*self.chunks, self.drafter]
            for m in c.modules()
            if hasattr(m, "core_attention") and m.core_attention is not None
            for m in [m.core_attention]
        )
        self.stats["spec_proposed"] = [0] * max(self.speculative, 0)
        self.stats["spec_accepted"] = [0] * max(self.speculative, 0)
        self.stats["forwards"] = 0
        self._on_tokens = None  # the streaming callback of the generate call in progress

    # -- low level: one forward through the cache ----------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        cache: KVCache,
        tokens_BS: torch.Tensor,
        routing: list | None = None,
        chunk: bool = False,
        **model_kwargs,
    ) -> torch.Tensor:
        """Feed `tokens_BS` at positions [cache.length, cache.length + S) and advance the cache.
        Returns fp32 logits (B, S, V). With `routing` (a list), appends each MoE layer's chosen
        experts for these positions, (S, B, K) per layer, one entry (start position, tensors) per
        model call.

        Megatron-Core's static cache takes a multi-token chunk only as the first (prefill) call --
        later calls drop the causal mask (decode semantics) -- so a chunk fed into a non-empty cache
        (after a truncation, or to teacher-force kept tokens) goes one position per call, unless
        `chunk`: then one call with an explicit causal mask over the cache and the chunk (what
        speculative verification needs; the cache must have `all_logits`). Sliding-window layers
        build their own window mask, aligned to the chunk's end, which is the same.
        `model_kwargs` go to the model call (e.g. `images` for the image-text model's prefill)."""
        tokens_BS = tokens_BS.to(self.device)
        b, s = tokens_BS.shape
        if cache.length + s > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked for {cache.length + s}")
        mask = None
        if cache.length > 0 and s > 1:
            if not chunk or not self.masked_chunks:
                return torch.cat(
                    [self.forward(cache, tokens_BS[:, i : i + 1], routing, **model_kwargs) for i in range(s)],
                    1,
                )
            n = cache.length + s  # True = hidden: key j > query position
            mask = torch.ones(s, n, dtype=torch.bool, device=self.device).triu(cache.length + 1)
            mask = mask[None, None].expand(b, 1, s, n)
        start = cache.length
        pos = torch.arange(start, start + s, device=tokens_BS.device).unsqueeze(0).expand(b, s)
        record = routing is not None and bool(self.replays)
        for r in self.replays:
            if record:
                r.set_router_replay_action(RouterReplayAction.RECORD)
        measure = self._conf is not None and bool(self.confidence)
        try:
            with (
                sequence_parallel_off(self.chunks),
                self.confidence.capture(rows=measure) if measure else contextlib.nullcontext(),
            ):
                logits = self._run_chunks(tokens_BS, pos, cache.ctx, model_kwargs, mask)
                self.stats["forwards"] += 1
        finally:
            for r in self.replays:
                r.clear_router_replay_action()
        if measure:
            self._conf.append((start, [row.view(s, b) for row in self.confidence.rows]))
        cache.ctx.sequence_len_offset += s
        if record:
            # the router sees tokens flattened from (S, B, H): row = s * B + b
            routing.append(
                (start, [r.get_recorded_indices().view(s, b, -1).to("cpu", copy=True) for r in self.replays])
            )
        return logits.float()

    def _run_chunks(self, tokens_BS, pos, ctx, model_kwargs, mask=None) -> torch.Tensor:
        """One forward through this rank's chunks in pipeline order (see the module docstring):
        logits (B, S, V) on the last stage, a (B, S, 0) placeholder elsewhere."""
        b, s = tokens_BS.shape
        out = None
        for chunk in self.chunks:
            if not chunk.pre_process:  # hidden states (S, B, H) from the previous stage (p2p, PP group)
                hidden = torch.empty(
                    (s, b, self.config.hidden_size), dtype=self.config.pipeline_dtype or torch.float32,
                    device=self.device,
                )  # fmt: skip
                recv_from_prev_pipeline_rank_(hidden)
                chunk.set_input_tensor(hidden)
            kw = model_kwargs if chunk.pre_process else {}
            out = chunk(tokens_BS, pos, mask, inference_context=ctx, runtime_gather_output=True, **kw)
            if not chunk.post_process:
                send_to_next_pipeline_rank(out.contiguous())  # p2p, PP group
        if not self.last_stage:
            return torch.empty((b, s, 0), device=self.device)
        return out

    @contextlib.contextmanager
    def inference(self):
        """Every chunk in eval mode (restored after), and Megatron-Core's InferenceMode where the model
        has MTP (GPTModel skips MTP while it is on). The flag is process-wide; a model without MTP does
        not need it, which lets a generation thread run beside training."""
        was_training = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()
        try:
            with InferenceMode.active() if self.has_mtp else contextlib.nullcontext():
                yield
        finally:
            for c, t in zip(self.chunks, was_training):
                c.train(t)

    @staticmethod
    def seed_of(params: SamplingParams) -> int:
        """The keyed randomness' run seed: `params.seed`, or one drawn from torch's global RNG."""
        if params.seed is not None:
            return params.seed
        return int(torch.randint(0, 2**62, (1,)).item())

    # -- sampling ---------------------------------------------------------------------------------------
    def sample(self, logits_BV: torch.Tensor, p: SamplingParams, seed: int, keys):
        """`_sample` on the stage that has the logits; under PP the last stage samples and broadcasts
        (token, logprob, entropy) to the pipeline group (one float64 (B, 3) broadcast: token ids are
        exact in float64). Megatron-Core's `broadcast_from_last_pipeline_stage` would do, but asserts
        CUDA tensors."""
        if self.pp == 1:
            return self._sample(logits_BV, p, seed, keys)
        box = torch.empty((len(keys), 3), dtype=torch.float64, device=self.device)
        if self.last_stage:
            tok, lp, ent = self._sample(logits_BV, p, seed, keys)
            box = torch.stack([tok.double(), lp.double(), ent.double()], 1).contiguous()
        dist.broadcast(
            box, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
        return box[:, 0].long(), box[:, 1].float(), box[:, 2].float()

    @staticmethod
    def _filter(logp_NV: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        """Top-k / top-p applied to temperature-scaled log-probs (N, V): dropped tokens get -inf."""
        filtered = logp_NV.clone()
        if p.top_k:
            kth = torch.topk(filtered, min(p.top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_lp, idx = torch.sort(filtered, descending=True, dim=-1)
            cum = sorted_lp.exp().cumsum(-1)
            drop = cum - sorted_lp.exp() > p.top_p  # keep the smallest prefix reaching top_p
            sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
            filtered = torch.full_like(filtered, float("-inf")).scatter(-1, idx, sorted_lp)
        return filtered

    @staticmethod
    def _inverse_cdf(weights_NV: torch.Tensor, u_N: torch.Tensor) -> torch.Tensor:
        """The token whose cumulative share of `weights_NV` (unnormalised, float64) first exceeds
        u (N,) in [0, 1): never a token of weight 0."""
        cdf = weights_NV.cumsum(-1)
        u = u_N.to(cdf.device)[:, None] * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)

    @staticmethod
    def _sample(logits_BV: torch.Tensor, p: SamplingParams, seed: int, keys):
        """(token, logprob, entropy) per row, each (B,). `keys[b]`: row b's key (prompt id, sample
        index, position, attempt) -- with `seed` it fixes the row's uniform (rl.lockstep), which picks
        the token by inverse CDF of the filtered distribution."""
        logp = torch.log_softmax(logits_BV / p.temperature, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        if p.greedy:
            tok = logits_BV.argmax(-1)
        else:
            weights = torch.softmax(Engine._filter(logp, p).double(), -1)
            tok = Engine._inverse_cdf(weights, keyed_uniforms(seed, keys))
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1), entropy

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        record_routing: bool = True,
        images: torch.Tensor | None = None,
        keys: list[tuple[int, ...]] | None = None,
        on_tokens=None,
    ) -> list[Generation]:
        """Sample one response per prompt (repeat a prompt G times for a group). `keys[i]`: prompt i's
        key for the keyed randomness, a tuple of ints unique within the call, e.g. (prompt id, sample
        index) (default: (i,)); a token's uniform is keyed by (params.seed, *keys[i], position, 0).
        `images` (B, 3, H, W), one per prompt, are given to the image-text model with the prefill
        (models/vlm.py): the prompts' `<image>` placeholders must lie within the shortest prompt.
        `on_tokens(i, response_ids)`: called whenever prompt i's response grows (streaming output).

        Every rank of `self.lockstep` must call this together: ranks may hold different numbers of
        prompts (none included) and need different numbers of steps; they all run the same number of
        chunks and forward calls, finished rows (or a placeholder row) fed padding."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("Engine.generate: every prompt needs at least one token")
        keys = [(i,) for i in range(len(prompts))] if keys is None else [tuple(k) for k in keys]
        if len(keys) != len(prompts):
            raise ValueError(f"Engine.generate: {len(prompts)} prompts but {len(keys)} keys")
        seed = self.seed_of(params)
        buckets = self.buckets([len(p) for p in prompts], params.max_new_tokens)
        n = self.lockstep.max(len(buckets))  # collective: self.lockstep.group
        out: list[Generation | None] = [None] * len(prompts)
        try:
            for c in range(n):
                idx = buckets[c] if c < len(buckets) else []  # a rank with fewer buckets steps idle
                imgs = None if images is None or not idx else images[idx]
                part = [prompts[i] for i in idx]
                if on_tokens is not None:
                    self._on_tokens = lambda r, ids, idx=idx: on_tokens(idx[r], ids)
                run = self._generate_chunk_spec if self.speculative else self._generate_chunk
                for i, g in zip(idx, run(part, params, seed, [keys[i] for i in idx], record_routing, imgs)):
                    out[i] = g
        finally:
            self._on_tokens = None
        return out

    def buckets(self, lengths: list[int], max_new_tokens: int) -> list[list[int]]:
        """Prompt indices grouped for generation: sorted by length, a new bucket whenever the spread
        would exceed `prompt_spread` (see __init__) or the bucket holds `max_batch` prompts."""
        spread = max_new_tokens if self.prompt_spread is None else self.prompt_spread
        out: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
            if not out or len(out[-1]) == self.max_batch or lengths[i] - lengths[out[-1][0]] > spread:
                out.append([])
            out[-1].append(i)
        return out

    def _generate_chunk(self, prompts, params, seed, keys, record_routing, images) -> list[Generation]:
        t0 = time.perf_counter()
        idle = not prompts  # this rank has nothing here but its group still steps: one padding row
        if idle:
            prompts, keys, images = [[self.pad_id]], [(0,)], None
        b = len(prompts)
        lens = [len(p) for p in prompts]
        lo, hi = min(lens), max(lens)
        cache = KVCache(b, hi + params.max_new_tokens)
        stop = set(params.stop_ids) | {self.eos_id}
        routing = [] if record_routing and self.replays and not idle else None
        self._conf = [] if self.confidence and not idle else None
        out = [Generation(list(p), [], [], [], "length") for p in prompts]
        done = [idle] * b
        with self.inference():
            prefix = torch.tensor([p[:lo] for p in prompts])
            extra = {} if images is None else {"images": images.to(self.device)}
            logits = self.forward(cache, prefix, routing, **extra)[:, -1]
            self.stats["prefill_tokens"] += b * lo
            crash_point("rollout")  # a crash drill's kill mid-rollout (megatron_step.training.faults)
            pos = lo  # position of the token chosen next
            while True:
                row_keys = [(*keys[i], len(out[i].response_ids), 0) for i in range(b)]
                tok, lp, ent = self.sample(logits, params, seed, row_keys)  # PP: from the last stage
                feed = []
                for i in range(b):
                    if pos < lens[i]:  # still inside its prompt: teacher-force the prompt token
                        feed.append(prompts[i][pos])
                    elif done[i]:
                        feed.append(self.pad_id)
                    else:
                        t = int(tok[i])
                        g = out[i]
                        g.response_ids.append(t)
                        g.logprobs.append(float(lp[i]))
                        g.entropies.append(float(ent[i]))
                        if self._on_tokens is not None:
                            self._on_tokens(i, g.response_ids)
                        if t in stop:
                            done[i], g.finish = True, "stop"
                        elif len(g.response_ids) >= params.max_new_tokens:
                            done[i] = True
                        feed.append(t)
                # rows inside their prompt are not done; collective on self.lockstep.group
                if not self.lockstep.any(not all(done)):
                    break
                if cache.length + 1 > cache.max_len:  # another rank still decodes: recycle a slot
                    cache.truncate(cache.length - 1)
                logits = self.forward(cache, torch.tensor(feed)[:, None], routing)[:, -1]
                self.stats["decode_tokens"] += b
                pos += 1
        if idle:
            return []
        self._attach_records(out, routing, cache.max_len)
        self.stats["seconds"] += time.perf_counter() - t0
        self.last_kv = {"used_bytes": cache.used_bytes(), "allocated_bytes": cache.allocated_bytes()}
        return out

    # -- MTP speculative decoding ----------------------------------------------------------------------
    def _broadcast_last(self, box: torch.Tensor) -> torch.Tensor:
        """`box` (float64; every stage allocates the same shape) from the last pipeline stage to the
        pipeline group under PP; returned as is otherwise."""
        if self.pp == 1:
            return box
        box = box.contiguous()
        dist.broadcast(
            box, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
        return box

    def _draft_token(self, logits_BV, params, seed, keys, start_t, d):
        """Draft depth d's token per row from its logits (B, V) and its filtered probabilities:
        greedy argmax, or by inverse CDF -- coupled: plain decoding's uniform for that response
        index; rejection: a stream of its own (attempt -1)."""
        b = logits_BV.shape[0]
        logp = torch.log_softmax(logits_BV.float() / params.temperature, -1)
        q = torch.softmax(self._filter(logp, params).double(), -1)
        if params.greedy:
            return logits_BV.argmax(-1), q
        attempt = 0 if self.accept == "coupled" else -1
        u = keyed_uniforms(seed, [(*keys[i], start_t[i] + d, attempt) for i in range(b)])
        return self._inverse_cdf(q, u), q

    def _draft(self, hidden_1BH, last_BL, start_t, params, seed, keys, depths):
        """`depths` (<= self.speculative) draft tokens per row, every depth on its single position
        (`mtp_cache=False`): depth d maps depth d-1's hidden state (the main model's for d = 0) and
        the embedding of the token before the one it predicts to its own hidden state and logits --
        Megatron-Core's `compute_mtp_single_step`, the call its dynamic engine makes. `start_t[i]`:
        the response index the first draft would take. Returns tokens (B, k) on every stage and their
        filtered sampling probabilities (B, k, V) (last stage; None elsewhere). Every rank of the
        lockstep group calls this at every step with the same `depths` (MTP layers may hold
        collectives)."""
        b, k = last_BL.shape[0], depths
        toks = torch.zeros((b, k), dtype=torch.float64, device=self.device)
        qs = None
        if self.last_stage and k:
            h, prev, qs = hidden_1BH, last_BL.to(self.device), []
            with sequence_parallel_off([self.drafter]):
                for d in range(k):
                    h, logits = self.drafter.compute_mtp_single_step(
                        hidden_states=h, next_token_ids=prev[:, None],
                        position_ids=torch.zeros_like(prev)[:, None], depth=d,
                    )  # fmt: skip
                    prev, q = self._draft_token(logits[0], params, seed, keys, start_t, d)
                    toks[:, d] = prev.double()
                    qs.append(q)
            qs = torch.stack(qs, 1)
        return self._broadcast_last(toks).long().cpu(), qs

    def _draft_cached(self, ctxs, h_pos, length, pending, want, seqs, start_t, params, seed, keys, depths):
        """`depths` draft tokens per row with every MTP depth attending over its own KV cache, as in
        training (`mtp_cache=True`, ours). Depth d at position t takes (its input hidden state at t --
        the main model's for d = 0, depth d-1's output otherwise -- and the embedding of token
        t + d + 1) and predicts token t + d + 2. A row's frontier T = `length` + len(pending) - 2 is
        the position whose main hidden state produced its last known token; there depth d's input
        token is the row's draft d (d >= 1), and its output's logits give draft d + 1.

        One chunk per depth for the batch, positions [m, max T + 1): m is the caches' common length,
        positions every depth keeps after a step -- those whose input tokens all rows have committed
        (< `length` - (k - 1)). `seqs[i]`: row i's committed tokens by position (prompt + response).
        Returns as `_draft`. Every rank of the lockstep group calls this with the same `depths`."""
        b, k = len(pending), depths
        toks = torch.zeros((b, k), dtype=torch.float64, device=self.device)
        qs = None
        keep = max(0, length - (self.speculative - 1))
        if self.last_stage and k:
            with sequence_parallel_off([self.drafter]):
                toks, qs = self._draft_cached_stage(ctxs, h_pos, length, pending, want, seqs, start_t, params,
                                                    seed, keys, k, keep, toks)  # fmt: skip
        return self._broadcast_last(toks).long().cpu(), qs

    def _draft_cached_stage(self, ctxs, h_pos, length, pending, want, seqs, start_t, params, seed, keys, k,
                            keep, toks):  # fmt: skip
        """`_draft_cached` on the last stage (sequence parallelism off)."""
        b = len(pending)
        m = min(min(c.sequence_len_offset for c in ctxs), keep)
        front = [length + len(pending[i]) - 2 if want[i] else -1 for i in range(b)]
        c = max(max(front) + 1, length, m + 1) - m  # at least one position: the call is collective
        rows = torch.arange(b, device=self.device)
        at = torch.tensor([max(f - m, 0) for f in front], device=self.device)
        ext = [list(x) for x in seqs]  # + each depth's draft
        hidden, qs = h_pos[m : m + c], []
        for d in range(k):
            nxt = torch.full((b, c), self.pad_id, dtype=torch.long)
            for i in range(b):
                row = ext[i][m + d + 1 : m + d + 1 + c]
                nxt[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            ctxs[d].sequence_len_offset = m
            hidden = self._mtp_cached(ctxs[d], d, hidden, nxt)  # (c, B, H)
            logits = self._mtp_logits(hidden[at, rows][None])[0]  # (B, V) at each row's frontier
            tok, q = self._draft_token(logits, params, seed, keys, start_t, d)
            for i in range(b):
                if front[i] >= 0:
                    ext[i].append(int(tok[i]))
            toks[:, d] = tok.double()
            qs.append(q)
            ctxs[d].sequence_len_offset = keep
        return toks, torch.stack(qs, 1)

    def _mtp_logits(self, h_SBH: torch.Tensor) -> torch.Tensor:
        """The drafter's output head on MTP hidden states, as `compute_mtp_single_step` applies it."""
        d = self.drafter
        weight = d.shared_embedding_or_output_weight() if d.share_embeddings_and_output_weights else None
        logits, _ = d.output_layer(h_SBH, weight=weight, runtime_gather_output=True)
        return d._scale_logits(logits)

    def _mtp_cached(self, ctx, depth: int, hidden_CBH: torch.Tensor, next_BC: torch.Tensor) -> torch.Tensor:
        """MTP layer `depth` over C positions [ctx length, + C) against its own KV cache `ctx` (a
        static context per depth: MTP layers number their attention from 1, like the decoder's),
        as in training, where the MTP layer attends over the whole sequence. Returns its hidden
        states (C, B, H) and advances `ctx`.

        Reaches into Megatron-Core 0.19.2 (pinned): `MultiTokenPredictionLayer._proj_and_transformer_layer`
        is the training path and the one that takes an inference context (`forward_single_position`
        passes none). The chunk gets an explicit causal mask over cache + chunk, as `forward`'s.
        Call with sequence parallelism off (`sequence_parallel_off`)."""
        layer, d = self.drafter.mtp.layers[depth], self.drafter
        b, c = next_BC.shape
        start = ctx.sequence_len_offset
        if start > 0 and c > 1 and not self.masked_chunks:  # see masked_chunks in __init__
            return torch.cat(
                [
                    self._mtp_cached(ctx, depth, hidden_CBH[j : j + 1], next_BC[:, j : j + 1])
                    for j in range(c)
                ],
                0,
            )
        pos = torch.arange(start, start + c, device=self.device).unsqueeze(0).expand(b, c)
        dec = d.embedding(input_ids=next_BC.to(self.device), position_ids=pos)  # (C, B, H)
        mask = None
        if start > 0 and c > 1:
            mask = torch.ones(c, start + c, dtype=torch.bool, device=self.device).triu(start + 1)
            mask = mask[None, None].expand(b, 1, c, start + c)
        rope = d.rotary_pos_emb(ctx.max_sequence_length) if getattr(d, "rotary_pos_emb", None) else None
        out = layer._proj_and_transformer_layer(
            hidden_states=hidden_CBH, decoder_input=dec, attention_mask=mask,
            rotary_pos_emb=rope, inference_params=ctx,
        )  # fmt: skip
        ctx.sequence_len_offset += c
        return out

    def _verify(self, logits_BSV, n, drafts, q_BkV, t0, remaining, params, seed, keys, stop):
        """Last stage: accept or reject each row's drafts against the model's own distribution.
        Row i fed n[i] known tokens then its drafts[i]; the logits at fed position n[i] - 1 + d are
        the policy's distribution for draft d. Greedy: a draft is accepted when it is the argmax.
        Sampled, `accept="rejection"` (the standard rule, exact in distribution): accepted with
        probability min(1, p(x) / q(x)); the first rejected position samples from max(0, p - q)
        renormalised. `accept="coupled"`: the draft and the policy's token share the uniform plain
        decoding uses for that index, and a draft is accepted when they agree -- the output is then
        plain decoding's token for token. After the accepted drafts, one more token is taken from
        the policy's distribution (plain decoding's draw). Returns a float64 box (B, 3 + 3 S):
        committed count, accepted drafts, drafts checked, then tokens, log-probs, entropies (S each)."""
        b, s = logits_BSV.shape[:2]
        box = torch.zeros((b, 3 + 3 * s), dtype=torch.float64, device=self.device)
        live = [i for i in range(b) if n[i] is not None]  # rows that sample this step
        if not live:
            return box
        # every (row, j) the row may need: j = 0 .. D (its drafts, then one more), at fed position
        # n - 1 + j; computed for all of them at once, then walked row by row
        pairs = [(i, j) for i in live for j in range(len(drafts[i]) + 1)]
        rows_i = torch.tensor([i for i, _ in pairs])
        rows_p = torch.tensor([n[i] - 1 + j for i, j in pairs])
        logits = logits_BSV[rows_i, rows_p]  # (N, V)
        logp = torch.log_softmax(logits / params.temperature, -1)
        ent = -(logp.exp() * logp).sum(-1)
        at = {pair: k for k, pair in enumerate(pairs)}
        if params.greedy:
            best = logits.argmax(-1).tolist()
        else:
            p = torch.softmax(self._filter(logp, params).double(), -1)  # (N, V)
            # plain decoding's draw at each (row, j): the coupled target, and the token after the drafts
            plain = self._inverse_cdf(p, keyed_uniforms(seed, [(*keys[i], t0[i] + j, 0) for i, j in pairs]))
            plain = plain.tolist()
            if self.accept == "rejection":
                u_acc = keyed_uniforms(seed, [(*keys[i], t0[i] + j, -2) for i, j in pairs]).tolist()
                x_of = torch.tensor([drafts[i][j] if j < len(drafts[i]) else 0 for i, j in pairs])
                qi = torch.tensor([min(j, max(len(drafts[i]) - 1, 0)) for i, j in pairs])
                p_x = p.gather(1, x_of[:, None].to(p.device)).squeeze(1)
                q_x = q_BkV[rows_i, qi, x_of] if q_BkV is not None else torch.ones_like(p_x)
                ratio = (p_x / q_x.to(p_x.device).clamp_min(1e-300)).tolist()
        for i in live:
            got, a, rejected, ended = [], 0, None, False
            checked = 0
            for d, x in enumerate(drafts[i]):
                k = at[(i, d)]
                checked += 1
                if params.greedy:
                    ok = best[k] == x
                elif self.accept == "coupled":
                    ok = plain[k] == x
                else:
                    ok = u_acc[k] < min(1.0, ratio[k])
                if not ok:
                    rejected = d
                    break
                got.append((x, k))
                a += 1
                if x in stop or len(got) >= remaining[i]:
                    ended = True
                    break
            if not ended:
                k = at[(i, a)]
                if params.greedy:
                    y = best[k]
                elif rejected is not None and self.accept == "rejection":
                    resid = (p[k] - q_BkV[i, a].to(p.device)).clamp_min(0)
                    u = keyed_uniforms(seed, [(*keys[i], t0[i] + a, -3)])
                    y = int(self._inverse_cdf((resid if resid.sum() > 0 else p[k])[None], u))
                else:  # coupled (rejected or not), or every draft kept: plain decoding's draw
                    y = plain[k]
                got.append((y, k))
            box[i, 0], box[i, 1], box[i, 2] = len(got), a, checked
            for c, (x, k) in enumerate(got):
                box[i, 3 + c], box[i, 3 + s + c], box[i, 3 + 2 * s + c] = x, logp[k, x], ent[k]
        return box

    def _generate_chunk_spec(self, prompts, params, seed, keys, record_routing, images) -> list[Generation]:
        """`_generate_chunk` with MTP speculative decoding. Every step each row feeds its known
        tokens not yet in the cache (prompt tail, or the last sampled token) followed by up to k
        drafts, all in one forward (causal mask over cache + chunk); the verified prefix of each row
        is committed with the log-prob and entropy of its own position (as if decoded one by one),
        and one more token is sampled where the drafts stop (`_verify`).

        The cache is shared by the batch (one length): after a step it keeps the positions every
        unfinished row verified (the smallest count); a row that verified more re-feeds its extra
        tokens next step, before its new drafts. Routing and Sigma_k are kept per row for the
        positions it verified (`_by_position`), so they equal a one-by-one decode's.

        Drafting: `_draft_cached` (default: each MTP depth over its own KV cache, as trained) or
        `_draft` (Megatron-Core's `compute_mtp_single_step`, the MTP layer on one position)."""
        t0_clock = time.perf_counter()
        idle = not prompts
        if idle:
            prompts, keys, images = [[self.pad_id]], [(0,)], None
        b, k = len(prompts), self.speculative
        S = k + 1
        lens = [len(p) for p in prompts]
        lo, hi = min(lens), max(lens)
        cache = KVCache(b, hi + params.max_new_tokens + S, all_logits=True)
        stop = set(params.stop_ids) | {self.eos_id}
        routing = [] if record_routing and self.replays and not idle else None
        self._conf = [] if self.confidence and not idle else None
        valid: list = [None]  # per model call: positions verified per row (None: all; the prefill)
        records = routing if routing is not None else self._conf  # one entry per model call
        out = [Generation(list(p), [], [], [], "length") for p in prompts]
        done = [idle] * b
        parts: list[torch.Tensor] = []  # the decoder's outputs of the model calls of one forward
        hook = None
        if self.last_stage:  # the decoder's output (S, B, H): the MTP heads' input
            hook = self.chunks[-1].decoder.register_forward_hook(lambda m, a, o: parts.append(o))
        h_BH = torch.zeros((b, self.config.hidden_size), device=self.device)
        has_h = [False] * b
        # mtp_cache: the main model's hidden state of every verified position (last stage), the MTP
        # layer's input; its own KV cache holds the positions whose next token every row has committed
        cached = self.mtp_cache and self.last_stage
        h_pos = (
            torch.zeros((cache.max_len, b, self.config.hidden_size), device=self.device) if cached else None
        )
        mtp_ctx = [
            StaticInferenceContext(max_batch_size=b, max_sequence_length=cache.max_len) for _ in range(k)
        ] if cached else None  # fmt: skip

        def commit(i, tok, lp, ent):
            g = out[i]
            g.response_ids.append(tok)
            g.logprobs.append(lp)
            g.entropies.append(ent)
            if self._on_tokens is not None:
                self._on_tokens(i, g.response_ids)
            if tok in stop:
                done[i], g.finish = True, "stop"
            elif len(g.response_ids) >= params.max_new_tokens:
                done[i] = True

        try:
            with self.inference():
                prefix = torch.tensor([p[:lo] for p in prompts])
                extra = {} if images is None else {"images": images.to(self.device)}
                cache.ctx.config.materialize_only_last_token_logits = True  # the prefill: last only
                logits = self.forward(cache, prefix, routing, **extra)[:, -1]
                cache.ctx.config.materialize_only_last_token_logits = False
                self.stats["prefill_tokens"] += b * lo
                tok, lp, ent = self.sample(logits, params, seed, [(*keys[i], 0, 0) for i in range(b)])
                pending = []
                for i in range(b):
                    if lens[i] == lo and not idle:
                        commit(i, int(tok[i]), float(lp[i]), float(ent[i]))
                        pending.append([int(tok[i])])
                        has_h[i] = True
                        if self.last_stage:
                            h_BH[i] = parts[-1][-1, i]
                    else:
                        pending.append(list(prompts[i][lo:]) or [self.pad_id])
                if cached:
                    h_pos[:lo] = parts[-1]
                while self.lockstep.any(not all(done)):  # collective on self.lockstep.group
                    # drafts per row: up to k, within the chunk and the row's remaining budget
                    want = [0] * b
                    for i in range(b):
                        room = params.max_new_tokens - len(out[i].response_ids) - 1
                        if not done[i] and has_h[i]:
                            want[i] = max(0, min(k, S - len(pending[i]), room))
                    depths = self.lockstep.max(max(want))  # the same MTP calls on every rank of the group
                    start_t = [len(g.response_ids) for g in out]
                    last = torch.tensor([pend[-1] for pend in pending])
                    if cached:
                        seqs = [prompts[i] + out[i].response_ids for i in range(b)]
                        drafts_all, q = self._draft_cached(
                            mtp_ctx,
                            h_pos,
                            cache.length,
                            pending,
                            want,
                            seqs,
                            start_t,
                            params,
                            seed,
                            keys,
                            depths,
                        )
                    else:
                        drafts_all, q = self._draft(h_BH[None], last, start_t, params, seed, keys, depths)
                    feed, n, drafts = [], [], []
                    for i in range(b):
                        pend = pending[i]
                        if done[i]:
                            feed.append([self.pad_id] * S)
                            n.append(None)
                            drafts.append([])
                            continue
                        n.append(None if len(pend) > S else len(pend))  # None: prompt tail only
                        drafts.append(drafts_all[i, : want[i]].tolist())
                        row = pend[:S] + drafts[-1]
                        feed.append(row + [self.pad_id] * (S - len(row)))
                    if cache.length + S > cache.max_len:  # this rank is done, another still decodes
                        cache.truncate(cache.max_len - S)
                    start = cache.length
                    parts.clear()
                    calls = len(records) if records is not None else 0
                    logits = self.forward(cache, torch.tensor(feed), routing, chunk=True)  # (B, S, V)
                    hidden = torch.cat(parts, 0) if parts else None  # (S, B, H), last stage
                    self.stats["decode_tokens"] += b * S
                    box = torch.zeros((b, 3 + 3 * S), dtype=torch.float64, device=self.device)
                    if self.last_stage:
                        t0 = [len(g.response_ids) for g in out]
                        remaining = [params.max_new_tokens - t for t in t0]
                        box = self._verify(logits, n, drafts, q, t0, remaining, params, seed, keys, stop)
                    box = self._broadcast_last(box).cpu()
                    v_B, rest = [0] * b, [None] * b
                    for i in range(b):
                        if done[i]:
                            continue
                        if n[i] is None:  # inside a prompt longer than the chunk: S prompt tokens fed
                            v_B[i], rest[i] = S, pending[i][S:]
                            continue
                        c, a, checked = int(box[i, 0]), int(box[i, 1]), int(box[i, 2])
                        for d in range(checked):  # on every stage: the counters are the box's
                            self.stats["spec_proposed"][d] += 1
                            self.stats["spec_accepted"][d] += d < a
                        for j in range(c):
                            commit(
                                i, int(box[i, 3 + j]), float(box[i, 3 + S + j]), float(box[i, 3 + 2 * S + j])
                            )
                        v_B[i], rest[i] = n[i] + a, [int(box[i, 3 + c - 1])]
                        if self.last_stage and not done[i]:
                            h_BH[i] = hidden[n[i] + a - 1, i]
                        has_h[i] = True
                    for call_start, call in (records or [])[calls:]:  # one call, or one per position
                        width = call[0].shape[0]
                        valid.append([max(0, min(width, v - (call_start - start))) for v in v_B])
                    if cached:
                        for i in range(b):
                            h_pos[start : start + v_B[i], i] = hidden[: v_B[i], i]
                    live = [i for i in range(b) if not done[i]]
                    adv = min(v_B[i] for i in live) if live else 0
                    for i in live:
                        pending[i] = feed[i][adv : v_B[i]] + rest[i]
                    cache.truncate(start + adv)
        finally:
            if hook is not None:
                hook.remove()
        if idle:
            return []
        self._attach_records(out, routing, cache.max_len, valid)
        self.stats["seconds"] += time.perf_counter() - t0_clock
        self.last_kv = {"used_bytes": cache.used_bytes(), "allocated_bytes": cache.allocated_bytes()}
        return out

    @staticmethod
    def _by_position(records, valid, length: int, b: int) -> list[torch.Tensor]:
        """Per-forward records (start, [tensor (S, B, ...) per router]) laid out by cache position:
        one (length, B, ...) tensor per router, later forwards overwriting earlier ones (a truncated
        cache re-feeds positions). `valid[f]`: forward f's number of valid positions per row (None:
        all of them) -- what a speculative step's rejected drafts leave is never written."""
        out = None
        for f, (start, tensors) in enumerate(records):
            if out is None:
                out = [torch.zeros((length, b, *t.shape[2:]), dtype=t.dtype) for t in tensors]
            s = tensors[0].shape[0]
            v = valid[f] if valid is not None and f < len(valid) else None
            for buf, t in zip(out, tensors):
                if v is None:
                    buf[start : start + s] = t
                else:
                    keep = torch.arange(s)[:, None] < torch.as_tensor(v)[None, :]  # (S, B)
                    buf[start : start + s][keep] = t[keep]
        return out or []

    def _attach_records(self, out: list[Generation], routing, length: int, valid=None) -> None:
        """Give each generation the routing of every position it fed and its Sigma_k sums."""
        b = len(out)
        if routing is not None:
            per_layer = self._by_position(routing, valid, length, b)
            for i, g in enumerate(out):
                n = len(g.prompt_ids) + len(g.response_ids) - 1  # positions fed for this sequence
                g.routing = [r[:n, i] for r in per_layer]
        if self._conf is not None:
            per_router = self._by_position(self._conf, valid, length, b)
            for i, g in enumerate(out):
                p, n = len(g.prompt_ids), len(g.prompt_ids) + len(g.response_ids) - 1
                g.confidence = [  # response positions p - 1 .. n - 1 (those the update trains on)
                    (layer, float(c[p - 1 : n, i].sum()), float(n - p + 1))
                    for layer, c in zip(self.confidence.layers, per_router)
                ]
            self._conf = None


__all__ = [
    "Engine",
    "Generation",
    "KVCache",
    "SamplingParams",
    "index_routers",
    "router_replays",
    "sequence_parallel_off",
    "unwrap_chunks",
]

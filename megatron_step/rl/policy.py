"""The trainer's side of RL: pack rollouts into a training batch, replay their MoE routing, the
`forward_step_func` that Megatron-Core's forward-backward schedule calls with a policy loss, and the
policy update (one optimizer step on a batch of prompt groups).

    update = PolicyUpdate(chunks, optimizer, scheduler, PolicyLossConfig("mispo"), micro_batch_size=8)
    metrics = update(groups)      # groups: list[list[Rollout]], this rank's share

Layout of a packed batch (B sequences, S = longest prompt + response - 1 positions):
    tokens[b, s]   = (prompt + response)[s]          input, right-padded with pad_id
    labels[b, s]   = (prompt + response)[s + 1]      next token
    mask[b, s]     = 1 where labels[b, s] is a response token the policy sampled (the positions RL
                     trains on; tool-written tokens, `sampled_mask` 0, are not)
    rollout_logp, old_logp, prox_logp, (ref_logp): (B, S), aligned with labels (0 outside the mask);
                     old_logp packed from the rollouts when they carry it (async generation),
                     else, like prox_logp, the update's own forward (megatron_step.rl.losses)
    advantages     = (B,), or (B, S) when items carry per-token advantages (segment-level credit)
    images         = (B, 3, H, W) when items carry an "image" (the image-text model, models/vlm.py)
    routing[l]     = (S * B, K) experts of MoE layer l, rows in the router's order s * B + b
                     (l over this rank's MoE layers, every local chunk in order: under PP a stage
                     replays the routing it recorded while generating)
Per-token log-probabilities come from Megatron-Core's own (vocab-parallel) cross-entropy on the
labels: logp = -CE, so TP needs no gathered logits.

Both passes of an update (pi_prox -- and pi_old where the rollouts do not carry it --, then the
policy loss) go through Megatron-Core's schedule (no
pipelining, 1F1B or interleaved), so PP and VPP need little of their own: the pipeline schedule
sends tensors of one shape (seq_length, micro_batch_size, hidden), so under PP every microbatch of a
step is packed to the step's longest sequence and `micro_batch_size` rows (padding rows train
nothing), and with VPP the microbatch count is padded to a multiple of pp (the interleaved
schedule's condition). Megatron-Core's `variable_seq_lengths` (shapes sent ahead) would avoid the
padding, but in 0.19.2 its shape exchange is always batched (batch_isend_irecv), and with pp = 2 under
the interleaved schedule the two directions then pair by posting order and the run dies (measured
here; see platform.parallel on batch_p2p_comm): fixed shapes work for every schedule.
"""

from __future__ import annotations

import contextlib
import functools
import time
import types

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router_replay import RouterReplayAction
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_step.models.step_flash import build_step_flash
from megatron_step.platform import to_device
from megatron_step.rl.buffer import Rollout
from megatron_step.rl.engine import index_routers, router_replays
from megatron_step.rl.lockstep import Lockstep
from megatron_step.rl.losses import PolicyLossConfig, group_advantages, policy_loss
from megatron_step.rl.routing_confidence import RouterConfidence
from megatron_step.training import checkpoint
from megatron_step.training.step import SkipGuard, dp_sum, forward_backward, from_last_stage, train_step


def pack(
    items: list[dict],
    pad_id: int = 0,
    replay: bool = True,
    multiple_of: int = 1,
    length: int | None = None,
    rows: int | None = None,
) -> dict:
    """items: dicts with prompt_ids, response_ids, and optionally rollout_logp and old_logp (per
    response token; old_logp on every item or none), sampled_mask (per response token, 0: written by
    a tool, outside `mask`), advantage, routing (per layer (n, K) as Generation.routing). Returns
    the batch described above, S rounded up to a multiple of `multiple_of` (sequence parallelism
    splits S over the TP ranks).
    `length` / `rows`: pad S and B up to these (fixed microbatch shapes for the pipeline schedule);
    padding rows have an empty mask and advantage 0, so they train nothing."""
    seqs = [list(it["prompt_ids"]) + list(it["response_ids"]) for it in items]
    b, s = max(len(seqs), rows or 0), max([len(x) - 1 for x in seqs] + [length or 0])
    s = -(-s // multiple_of) * multiple_of
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    labels = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros(b, s)
    with_old = [it.get("old_logp") is not None for it in items]
    if any(with_old) and not all(with_old):
        raise ValueError(f"pack: {sum(with_old)} of {len(items)} items carry old_logp (all or none)")
    per_token = {
        "rollout_logp": torch.zeros(b, s),
        **({"old_logp": torch.zeros(b, s)} if any(with_old) else {}),
    }
    for i, (it, seq) in enumerate(zip(items, seqs)):
        n = len(seq) - 1
        tokens[i, :n] = torch.tensor(seq[:-1])
        labels[i, :n] = torch.tensor(seq[1:])
        p = len(it["prompt_ids"])
        mask[i, p - 1 : n] = 1.0  # labels p-1 .. n-1 are the response tokens
        if it.get("sampled_mask") is not None:  # tool-written tokens (0) are context, not trained on
            mask[i, p - 1 : n] = torch.tensor(it["sampled_mask"], dtype=torch.float32)
        for key, out in per_token.items():
            if it.get(key) is not None:
                out[i, p - 1 : n] = torch.tensor(it[key], dtype=torch.float32)
    batch = {
        "tokens": tokens,
        "labels": labels,
        "mask": mask,
        **per_token,
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s),
    }
    if items[0].get("image") is not None:
        imgs = [it["image"] for it in items]
        batch["images"] = torch.stack(imgs + [torch.zeros_like(imgs[0])] * (b - len(items)))
    if "advantage" in items[0]:
        if any(isinstance(it["advantage"], (list, tuple)) for it in items):
            # per-token advantages (segment-level credit): (B, S), 0 outside the response
            adv = torch.zeros(b, s)
            for i, (it, seq) in enumerate(zip(items, seqs)):
                a, p = it["advantage"], len(it["prompt_ids"])
                adv[i, p - 1 : len(seq) - 1] = torch.tensor(
                    a if isinstance(a, (list, tuple)) else [float(a)] * (len(seq) - p), dtype=torch.float32
                )
            batch["advantages"] = adv
        else:
            batch["advantages"] = torch.tensor(
                [float(it["advantage"]) for it in items] + [0.0] * (b - len(items))
            )
    if replay and items[0].get("routing") is not None:
        layers = len(items[0]["routing"])
        k = items[0]["routing"][0].shape[-1]
        routing = []
        for layer in range(layers):
            # padded positions get experts 0..K-1: they are after every real token (causal) and
            # outside the mask, so their routing changes nothing that is trained on
            r = torch.arange(k).repeat(s, b, 1)  # (S, B, K)
            for i, it in enumerate(items):
                got = it["routing"][layer]
                r[: got.shape[0], i] = got
            routing.append(r.reshape(s * b, k))
        batch["routing"] = routing
    return batch


def set_replay(model, routing: list[torch.Tensor] | None) -> None:
    """Replay `routing` (per MoE layer of this rank, rows s * B + b) in the next forward of `model`,
    one chunk: it takes its routers' entries (`rank_index`, set by rl.engine.index_routers over the
    rank's chunks; without it the chunk is the whole rank's model). None clears."""
    replays = router_replays(model)
    for r in replays:
        r.clear_indices()
        r.clear_router_replay_action()
    if routing is None or not replays:
        return
    where = [getattr(r, "rank_index", i) for i, r in enumerate(replays)]
    total = getattr(replays[0], "rank_total", len(replays))
    if len(routing) != total:
        raise ValueError(f"routing has {len(routing)} layers, this rank's model {total} MoE routers")
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    shard = tp > 1 and model.config.sequence_parallel
    for r, i in zip(replays, where):
        idx = routing[i]
        if shard:  # with sequence parallelism each TP rank routes its S / tp positions: rows s-major
            idx = idx.chunk(tp, 0)[ps.get_tensor_model_parallel_rank()]
        r.set_target_indices(idx)
        r.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


@contextlib.contextmanager
def mtp_skipped(chunks, skip: bool = True):
    """Forwards of `chunks` (DDP-wrapped or not) without their MTP block: for log-prob passes, which
    read only the main head, and for training forwards when the MTP depths get no loss
    (rl.mtp_loss_weight = 0) -- their parameters then get no gradient. About a quarter of the tiny
    preset's forward (3 MTP layers and 3 output-head products beside 8 decoder layers).

    Reaches into Megatron-Core 0.19.2 (pinned): `GPTModel._postprocess` runs the MTP block when
    `self.mtp_process` and processes its loss when `config.mtp_num_layers`, both read at call time;
    the schedule sets the MTP loss scale only when `config.mtp_num_layers` is not None. The final
    layer norm's stage is fixed at build time, so clearing both for the forward changes nothing
    else. Not thread-safe: the config object is shared by the model's modules (async RL's replica
    is a separate model with its own config and no MTP)."""
    mods = [getattr(c, "module", c) for c in (chunks if isinstance(chunks, (list, tuple)) else [chunks])]
    mods = [m for m in mods if getattr(m, "config", None) is not None and m.config.mtp_num_layers]
    if not skip or not mods:
        yield
        return
    saved = [(m, m.mtp_process) for m in mods]
    configs = {id(m.config): (m.config, m.config.mtp_num_layers) for m in mods}
    try:
        for m in mods:
            m.mtp_process = False
        for cfg, _ in configs.values():
            cfg.mtp_num_layers = None
        yield
    finally:
        for m, flag in saved:
            m.mtp_process = flag
        for cfg, n in configs.values():
            cfg.mtp_num_layers = n


def model_output(model, batch: dict) -> torch.Tensor:
    """The forward of one chunk on a packed batch, routing replayed when the batch carries it: the
    per-token CE (B, S) of the labels on the last pipeline stage, hidden states elsewhere."""
    unwrapped = getattr(model, "module", model)
    set_replay(unwrapped, batch.get("routing"))
    try:
        extra = {"images": batch["images"]} if "images" in batch else {}
        if "mtp_loss_mask" in batch:  # the MTP depths' loss on these positions only (rl.mtp_loss_weight)
            extra["loss_mask"] = batch["mtp_loss_mask"]
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], **extra)
    finally:
        set_replay(unwrapped, None)  # the replayed indices are only needed by this forward


def token_logp(model, batch: dict) -> torch.Tensor:
    """(B, S) log pi(labels) under `model` (the whole model: PP = 1; train or eval mode as set),
    routing replayed when the batch carries it."""
    return -model_output(model, batch).float()


@torch.no_grad()
def record_old_logp(model, rollouts: list[Rollout], micro_batch_size: int, replay: bool = True) -> None:
    """Set each rollout's `old_logp`: log pi of its response tokens under `model` (the whole model,
    PP = 1), the weights that sampled it -- the async generator calls it on its replica right after
    sampling. Routing replayed from the rollout when `replay`, `micro_batch_size` rollouts per forward."""
    for i in range(0, len(rollouts), micro_batch_size):
        part = rollouts[i : i + micro_batch_size]
        items = [
            {
                "prompt_ids": r.prompt_ids,
                "response_ids": r.response_ids,
                "routing": r.routing,
                "image": r.image,
            }
            for r in part
        ]
        with mtp_skipped(model):
            logp = token_logp(model, to_device(pack(items, replay=replay))).cpu()
        for j, r in enumerate(part):
            p = len(r.prompt_ids)
            r.old_logp = logp[j, p - 1 : p - 1 + len(r.response_ids)].tolist()


def make_forward_step(cfg: PolicyLossConfig):
    """A Megatron-Core `forward_step_func` over packed batches (see `pack`) with `policy_loss`.
    The batch needs old_logp, rollout_logp, advantages, mask (prox_logp for stale rollouts, ref_logp
    for a KL term); its
    optional "loss_normalizer" replaces the microbatch's own token count (PolicyUpdate: the step mean)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model_output(model, batch)  # CE on the last pipeline stage, hidden states elsewhere

        def loss_func(ce_BS):
            logp_BS = -ce_BS.float()
            if batch.get("padding"):  # see PolicyUpdate: a zero loss, no metrics
                return (logp_BS * 0.0).sum(), {}
            loss, metrics = policy_loss(
                logp_BS,
                batch["old_logp"],
                batch["rollout_logp"],
                batch["advantages"],
                batch["mask"],
                cfg,
                ref_logp=batch.get("ref_logp"),
                normalizer=batch.get("loss_normalizer"),
                prox_logp=batch.get("prox_logp"),
            )
            metrics = {k: torch.tensor(float(v)) for k, v in metrics.items()}
            return loss, {"loss": loss.detach().clone(), **metrics}

        return out, loss_func

    return forward_step


def _logp_step(data_iterator, model, confidence=None):
    """forward_step_func of a log-prob pass (forward only): the log-probs as the loss function's data;
    with `confidence` (a RouterConfidence), Sigma_k summed over the batch's mask."""
    batch = next(data_iterator)
    with confidence.capture(batch["mask"]) if confidence else contextlib.nullcontext():
        out = model_output(model, batch)

    def loss_func(ce_BS):
        logp = -ce_BS.float()
        return (logp * 0.0).sum(), {"logp": logp}

    return out, loss_func


class PolicyUpdate:
    """One optimizer step of the policy loss on prompt groups (`__call__`): group advantages, packed
    microbatches with pi_old from the trainer's forward (and pi_ref from `reference`), Megatron-Core's
    forward-backward with routing replayed, the optimizer step (megatron_step.training.step.train_step).

    `reference`: the frozen reference model's chunks in the trainer's layout (see
    `build_reference`), needed when `loss.kl_coef > 0`: its log-probs of the same packed batches, the
    rollout routing replayed as in the policy's forwards (so the KL compares the two models on the
    same expert choices), give the per-token k3 term of megatron_step.rl.losses."""

    def __init__(
        self,
        chunks,
        optimizer,
        scheduler,
        loss: PolicyLossConfig,
        micro_batch_size: int,
        replay=True,
        reference=None,
        routing_confidence: str = "off",
        minibatches: int = 1,
        max_skipped: int = 3,
    ):
        if minibatches < 1:
            raise ValueError(f"rl.actor_minibatches={minibatches}: must be >= 1")
        self.minibatches = minibatches
        if loss.kl_coef > 0 and reference is None:
            raise ValueError(
                f"rl.loss.kl_coef={loss.kl_coef} needs a reference model (PolicyUpdate(reference=...); "
                "the RL stage builds it from rl.init_from)"
            )
        self.reference = None if reference is None else [getattr(c, "module", c) for c in reference]
        if self.reference is not None:
            index_routers(self.reference)
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.forward_step, self.loss = make_forward_step(loss), loss
        self.guard = SkipGuard(max_skipped, "the RL policy update")  # inf/nan steps skipped and counted
        self.batches = Microbatches(chunks, micro_batch_size, replay)
        self.padded = 0  # padding microbatches run so far (ranks with fewer trainable rollouts)
        index_routers([c.module for c in chunks])  # routing lists span this rank's chunks
        # Sigma_k of the training forward (pi_prox pass) on the response tokens: routing/confidence_train
        self.confidence = RouterConfidence(chunks, routing_confidence)
        # MTP depths trained on the responses: the model was built with MTP loss weights > 0
        config = chunks[0].module.config
        self.train_mtp = bool(config.mtp_num_layers) and config.mtp_loss_scaling_factor > 0

    def _normalize(self, micro: list[dict], n: int) -> None:
        """The step mean (see `normalize_step`); keeps the step's counts for `_step_metrics`."""
        self._step_units = normalize_step(micro, n, self.loss.token_level_mean)

    def _step_metrics(self, micro: list[dict], result, n: int) -> dict[str, float]:
        """This rank's policy/* metrics such that their DP mean is the step's: the loss and the per-token
        means weighted by each microbatch's tokens over the step's (traj_mask_rate by sequences), so
        they do not depend on how rollouts fall into microbatches and ranks; ratio_min / ratio_max the
        rank's extremes; tokens the rank's count. Last pipeline stage (where the loss ran)."""
        dp = ps.get_data_parallel_world_size(with_context_parallel=True)
        pairs = [(b, m) for b, m in zip(micro, result.metrics) if m]  # padding microbatches report nothing
        keys = list(pairs[0][1]) if pairs else []
        out = {}
        for key in keys:
            vals = [(b, float(m[key])) for b, m in pairs if key in m]
            if key == "loss":  # already divided by the step's count (see _normalize)
                out[key] = sum(v for _, v in vals) / n
            elif key in ("ratio_min", "ratio_max"):
                out[key] = (min if key == "ratio_min" else max)(v for _, v in vals)
            elif key == "tokens":
                out[key] = sum(v for _, v in vals)
            else:
                level = key != "traj_mask_rate"
                out[key] = sum(v * _units(b, level) for b, v in vals) * dp / max(self._step_units[level], 1.0)
        return {f"policy/{k}": v for k, v in out.items()}

    def _mtp_metrics(self, n_real: int) -> dict[str, float]:
        """train/mtp_{k}_loss (the mean over this rank's real microbatches of each depth's masked mean)
        and mtp/accuracy_{k} (the share of response tokens whose depth-k prediction is the sampled
        token: a drafter's acceptance rate under greedy verification), from Megatron-Core's MTP
        tracker; the last pipeline stage (where the MTP block runs), only when training MTP."""
        tracker = MTPLossLoggingHelper.tracker
        out = {}
        if self.train_mtp and tracker.get("loss_values") is not None and n_real:
            loss, correct, total = (
                tracker[k].tolist() for k in ("loss_values", "correct_values", "total_values")
            )
            for k in range(len(loss)):
                out[f"train/mtp_{k + 1}_loss"] = loss[k] / n_real
                out[f"mtp/accuracy_{k + 1}"] = correct[k] / max(total[k], 1.0)
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        return out

    def __call__(self, groups: list[list[Rollout]], advantages=None) -> dict[str, float]:
        """Train on `groups` (this rank's share); returns policy/* and train/* metrics of this rank.
        `advantages`: per response token, nested as `groups` (the critic's GAE, rl.critic); None: the
        GRPO group advantages of the rewards."""
        if advantages is None:
            rewards = torch.tensor([[r.reward for r in grp] for grp in groups])
            failed = torch.tensor([[r.reward_failed for r in grp] for grp in groups], dtype=torch.bool)
            # a failed reward call (raised, timed out, a sandbox that could not start) has no reward: its
            # group's baseline is over the others
            adv = group_advantages(rewards, valid=~failed if failed.any() else None)

        def advantage(i: int, j: int, r: Rollout):
            if advantages is not None:  # per token, as given
                return list(advantages[i][j])
            if r.adv_scale is None:  # the sequence's group advantage on every token
                return float(adv[i, j])
            # segment-level credit (E3RL attention rule): the sequence advantage times a per-token scale
            return [float(adv[i, j]) * x for x in r.adv_scale]

        k, g = self.minibatches, max((len(grp) for grp in groups), default=1)
        parts: list[list[dict]] = [[] for _ in range(k)]
        for i, grp in enumerate(groups):
            for j, r in enumerate(grp):
                if r.reward_failed:  # out of its group's statistics, and not trained on
                    continue
                item = {
                    "prompt_ids": r.prompt_ids,
                    "response_ids": r.response_ids,
                    "rollout_logp": r.rollout_logp,
                    "old_logp": r.old_logp,
                    "sampled_mask": r.sampled_mask,
                    "advantage": advantage(i, j, r),
                    "routing": r.routing,
                    "image": r.image,
                }
                # k > 1: rollout j of group i in minibatch (group id x G + j) mod k, in every DP layout
                parts[(r.group * g + j) % k if k > 1 else 0].append(item)
        if k > 1:  # minibatches empty on every rank are skipped (collective: the DP group)
            parts = [p for p, c in zip(parts, dp_sum([float(len(p)) for p in parts])) if c > 0]
        steps = []
        for items in parts:
            micro, n = self.batches.build(items)
            self.padded += sum(bool(b.get("padding")) for b in micro)
            self._normalize(micro, n)
            steps.append((micro, n, self._step_units))
        t0 = time.perf_counter()
        # pi_prox: the trainer's weights before the step's first minibatch; it is pi_old too where the
        # rollouts carry none (sync: they were sampled with these weights)
        self.confidence.reset()
        for micro, _, _ in steps:
            shape = self.batches.shape(micro)
            _store_logp(self.chunks, micro, "prox_logp", shape, confidence=self.confidence or None)
            for b in micro:
                if "prox_logp" in b and "old_logp" not in b:  # the last pipeline stage: where the loss runs
                    b["old_logp"] = b["prox_logp"]
            if self.reference is not None:  # pi_ref: the frozen reference model, the same schedule
                _store_logp(self.reference, micro, "ref_logp", shape)
            if self.train_mtp:  # the MTP loss on the response tokens (Megatron-Core's MTP block adds it)
                for b in micro:
                    b["mtp_loss_mask"] = b["mask"]
        per_step, grad_norms = [], []
        for micro, n, units in steps:  # one optimizer step per minibatch
            MTPLossLoggingHelper.clean_metrics_in_tracker()
            with mtp_skipped(self.chunks, skip=not self.train_mtp):  # weight 0: MTP is not run at all
                result = train_step(
                    self.chunks,
                    self.optimizer,
                    self.scheduler,
                    micro,
                    forward_step=self.forward_step,
                    guard=self.guard,
                    **self.batches.shape(micro),
                )
            mtp = self._mtp_metrics(sum(not b.get("padding") for b in micro))
            self._step_units = units
            # the loss' metrics live on the last pipeline stage: every stage logs them (collective, PP group)
            per_step.append(from_last_stage({**self._step_metrics(micro, result, n), **mtp}))
            grad_norms.append(float(result.grad_norm or 0.0))
        dt = time.perf_counter() - t0
        metrics = (
            {key: sum(m[key] for m in per_step) / len(per_step) for key in per_step[0]} if per_step else {}
        )
        if self.confidence:  # collective: DP (and TP under SP) groups; other stages' layers: end of step
            sp = self.chunks[0].module.config.sequence_parallel
            metrics.update(self.confidence.reduced(sp, "confidence_train"))
        n_tok = sum(float(b["mask"].sum()) for micro, _, _ in steps for b in micro)
        metrics.update(
            {
                "train/grad_norm": sum(grad_norms) / max(1, len(grad_norms)),
                "train/tokens_per_sec": n_tok / dt,
                "train/skipped_iterations": float(self.guard.total),
                "policy/padding_microbatches": float(self.padded),
            }
        )
        if k > 1:
            metrics["policy/minibatches"] = float(len(steps))
        return metrics


class Microbatches:
    """Rollout items -> this rank's microbatches of one optimizer step, in the shapes every layout
    needs: `micro_batch_size` items each, S a multiple of tp under sequence parallelism, one fixed
    (S, rows) shape under PP (the pipeline schedule's), and padding microbatches up to the count the
    lockstep group agrees on (every forward of an EP / TP / PP model is collective), a multiple of
    pp under the interleaved schedule. Used by the policy update and the critic (rl.critic)."""

    def __init__(self, chunks, micro_batch_size: int, replay: bool = True):
        self.mbs, self.replay = micro_batch_size, replay
        self.lockstep = Lockstep.for_model()  # ranks whose forwards share collectives (rl.lockstep)
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.interleaved = len(chunks) > 1
        config = chunks[0].module.config
        self.tp = ps.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1

    def build(self, items: list[dict]) -> tuple[list[dict], int]:
        """(microbatches on the device, their count n, padding included)."""
        fixed = {}  # the pipeline schedule's one shape: the longest sequence, micro_batch_size rows
        if self.pp > 1:
            longest = max((len(it["prompt_ids"]) + len(it["response_ids"]) - 1 for it in items), default=1)
            fixed = {"length": longest, "rows": self.mbs}
        micro = [
            to_device(pack(items[i : i + self.mbs], replay=self.replay, multiple_of=self.tp, **fixed))
            for i in range(0, len(items), self.mbs)
        ]
        n_real = len(micro)
        # at least one (a padding one on a rank without items): DDP's gradient all-reduce and the
        # schedule's shapes need a forward on every rank
        n = self.lockstep.max(max(n_real, 1))  # collective: self.lockstep.group
        if self.interleaved:  # the interleaved schedule runs microbatches in groups of pp
            n = -(-n // self.pp) * self.pp
        micro += [padding_batch(micro, {"multiple_of": self.tp, **fixed}) for _ in range(n - n_real)]
        return micro, n

    def shape(self, micro: list[dict]) -> dict:
        """The schedule's shape arguments for `micro`."""
        return {"seq_length": max(b["tokens"].shape[1] for b in micro), "micro_batch_size": self.mbs}


def padding_batch(micro: list[dict], shape: dict) -> dict:
    """A microbatch that trains nothing (mask and advantages 0, loss 0, no metrics): run by a rank
    with fewer microbatches than another of its lockstep group -- failed rewards are not trained
    on, so counts differ. The schedule still divides by the padded count: such a rank's rollouts
    weigh n_real / n_padded (undone by the step normalizer, `normalize_step`)."""
    if micro:
        b = {k: v.clone() if torch.is_tensor(v) else v for k, v in micro[0].items()}
        b.pop("routing", None)  # route freely: nothing is trained on it
    else:  # every rollout of this rank failed: two padding tokens
        item = {"prompt_ids": [0, 0], "response_ids": [0], "rollout_logp": [0.0], "advantage": 0.0}
        b = to_device(pack([item], **shape))
    b["mask"] = torch.zeros_like(b["mask"])
    b["advantages"] = torch.zeros_like(b["advantages"])
    b["padding"] = True
    return b


def normalize_step(micro: list[dict], n: int, token_level: bool) -> dict[bool, float]:
    """Make a loss a mean over the whole step: every token of every microbatch of every DP rank
    weighs the same (sequences, with token_level False), however they fall into microbatches.
    Megatron-Core's schedule divides each microbatch's loss by the microbatch count n and DDP the
    gradients by the DP size, so a microbatch's loss sum is divided by N / (n x dp), N the step's
    global count (one all-reduce over the DP group, before the forwards): batch["loss_normalizer"].
    Megatron-Core's own per-token mode (config.calculate_per_token_loss) would do the same but also
    changes how the MoE aux and MTP losses are scaled, and the SFT warm-up on the same model uses the
    plain microbatch mean. Returns the step's counts {True: tokens, False: sequences}."""
    real = [b for b in micro if not b.get("padding")]
    tokens, seqs = (sum(_units(b, level) for b in real) for level in (True, False))
    # collective: the DP x CP group (every rank gets here once per update)
    units = dict(zip((True, False), dp_sum([tokens, seqs]), strict=True))
    dp = ps.get_data_parallel_world_size(with_context_parallel=True)
    for b in micro:
        b["loss_normalizer"] = max(units[token_level], 1.0) / (n * dp)
    return units


def _units(batch: dict, tokens: bool) -> float:
    """A packed microbatch's response tokens, or its sequences with at least one."""
    mask = batch["mask"]
    return float(mask.sum()) if tokens else float((mask.sum(-1) > 0).sum())


@torch.no_grad()
def _store_logp(chunks, micro: list[dict], key: str, shape: dict, confidence=None) -> None:
    """batch[key] = log-probs of `chunks` on each microbatch (forward only, Megatron-Core's schedule),
    masked; set on the last pipeline stage, where the loss reads them. `confidence`: see _logp_step."""
    step = functools.partial(_logp_step, confidence=confidence) if confidence else _logp_step
    with mtp_skipped(chunks):  # only the main head's log-probs are read
        got = forward_backward(chunks, micro, forward_step=step, forward_only=True, **shape)
    for b, m in zip(micro, got):
        b[key] = m["logp"] * b["mask"]


def build_reference(model_cfg, parallel, run_dir: str) -> list:
    """The frozen reference model for the KL term: one module per (virtual) pipeline stage in the
    trainer's layout, the weights of `run_dir`'s latest checkpoint (the policy's starting point), no
    gradients, no optimizer. It costs one more copy of the model's weights per rank."""
    modules = [
        build_step_flash(model_cfg, parallel, vp_stage=v)
        for v in (range(parallel.vpp) if parallel.vpp else [None])
    ]
    for m in modules:
        m.requires_grad_(False)
    checkpoint.load_model_weights(run_dir, [types.SimpleNamespace(module=m) for m in modules])
    return modules


__all__ = [
    "PolicyUpdate",
    "build_reference",
    "make_forward_step",
    "model_output",
    "pack",
    "record_old_logp",
    "set_replay",
    "token_logp",
]

"""The trainer's side of RL: pack rollouts into a training batch, replay their MoE routing, the
`forward_step_func` that Megatron-Core's forward-backward schedule calls with a policy loss, and the
policy update (one optimizer step on a batch of prompt groups).

    update = PolicyUpdate(chunks, optimizer, scheduler, PolicyLossConfig("mispo"), micro_batch_size=8)
    metrics = update(groups)      # groups: list[list[Rollout]], this rank's share

Layout of a packed batch (B sequences, S = longest prompt + response - 1 positions):
    tokens[b, s]   = (prompt + response)[s]          input, right-padded with pad_id
    labels[b, s]   = (prompt + response)[s + 1]      next token
    mask[b, s]     = 1 where labels[b, s] is a response token (the positions RL trains on)
    old_logp, rollout_logp, (ref_logp): (B, S), aligned with labels (0 outside the mask)
    advantages     = (B,), or (B, S) when items carry per-token advantages (segment-level credit)
    images         = (B, 3, H, W) when items carry an "image" (the image-text model, models/vlm.py)
    routing[l]     = (S * B, K) experts of MoE layer l, rows in the router's order s * B + b
                     (l over this rank's MoE layers, every local chunk in order: under PP a stage
                     replays the routing it recorded while generating)
Per-token log-probabilities come from Megatron-Core's own (vocab-parallel) cross-entropy on the
labels: logp = -CE, so TP needs no gathered logits.

Both passes of an update (pi_old, then the policy loss) go through Megatron-Core's schedule (no
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

import time
import types

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from megatron_step.models.step_flash import build_step_flash
from megatron_step.platform import to_device
from megatron_step.rl.buffer import Rollout
from megatron_step.rl.engine import index_routers, router_replays
from megatron_step.rl.lockstep import Lockstep
from megatron_step.rl.losses import PolicyLossConfig, group_advantages, policy_loss
from megatron_step.training import checkpoint
from megatron_step.training.step import forward_backward, from_last_stage, train_step


def pack(
    items: list[dict],
    pad_id: int = 0,
    replay: bool = True,
    multiple_of: int = 1,
    length: int | None = None,
    rows: int | None = None,
) -> dict:
    """items: dicts with prompt_ids, response_ids, and optionally rollout_logp (per response token),
    advantage, routing (per layer (n, K) as Generation.routing). Returns the batch described above,
    S rounded up to a multiple of `multiple_of` (sequence parallelism splits S over the TP ranks).
    `length` / `rows`: pad S and B up to these (fixed microbatch shapes for the pipeline schedule);
    padding rows have an empty mask and advantage 0, so they train nothing."""
    seqs = [list(it["prompt_ids"]) + list(it["response_ids"]) for it in items]
    b, s = max(len(seqs), rows or 0), max([len(x) - 1 for x in seqs] + [length or 0])
    s = -(-s // multiple_of) * multiple_of
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    labels = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros(b, s)
    rollout = torch.zeros(b, s)
    for i, (it, seq) in enumerate(zip(items, seqs)):
        n = len(seq) - 1
        tokens[i, :n] = torch.tensor(seq[:-1])
        labels[i, :n] = torch.tensor(seq[1:])
        p = len(it["prompt_ids"])
        mask[i, p - 1 : n] = 1.0  # labels p-1 .. n-1 are the response tokens
        if it.get("rollout_logp") is not None:
            rollout[i, p - 1 : n] = torch.tensor(it["rollout_logp"], dtype=torch.float32)
    batch = {
        "tokens": tokens,
        "labels": labels,
        "mask": mask,
        "rollout_logp": rollout,
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


def model_output(model, batch: dict) -> torch.Tensor:
    """The forward of one chunk on a packed batch, routing replayed when the batch carries it: the
    per-token CE (B, S) of the labels on the last pipeline stage, hidden states elsewhere."""
    unwrapped = getattr(model, "module", model)
    set_replay(unwrapped, batch.get("routing"))
    try:
        extra = {"images": batch["images"]} if "images" in batch else {}
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], **extra)
    finally:
        set_replay(unwrapped, None)  # the replayed indices are only needed by this forward


def token_logp(model, batch: dict) -> torch.Tensor:
    """(B, S) log pi(labels) under `model` (the whole model: PP = 1; train or eval mode as set),
    routing replayed when the batch carries it."""
    return -model_output(model, batch).float()


def make_forward_step(cfg: PolicyLossConfig):
    """A Megatron-Core `forward_step_func` over packed batches (see `pack`) with `policy_loss`.
    The batch needs old_logp, rollout_logp, advantages, mask (and ref_logp for a KL term)."""

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
            )
            metrics = {k: torch.tensor(float(v)) for k, v in metrics.items()}
            return loss, {"loss": loss.detach().clone(), **metrics}

        return out, loss_func

    return forward_step


def _old_logp_step(data_iterator, model):
    """forward_step_func of the pi_old pass (forward only): the log-probs as the loss function's data."""
    batch = next(data_iterator)
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
    ):
        if loss.kl_coef > 0 and reference is None:
            raise ValueError(
                f"rl.loss.kl_coef={loss.kl_coef} needs a reference model (PolicyUpdate(reference=...); "
                "the RL stage builds it from rl.init_from)"
            )
        self.reference = None if reference is None else [getattr(c, "module", c) for c in reference]
        if self.reference is not None:
            index_routers(self.reference)
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.forward_step = make_forward_step(loss)
        self.mbs, self.replay = micro_batch_size, replay
        self.skipped = 0  # updates the optimizer skipped (inf/nan under a loss scaler)
        self.lockstep = Lockstep.for_model()  # ranks whose forwards share collectives (rl.lockstep)
        self.padded = 0  # padding microbatches run so far (ranks with fewer trainable rollouts)
        index_routers([c.module for c in chunks])  # routing lists span this rank's chunks
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.interleaved = len(chunks) > 1

    def padding(self, micro: list[dict], shape: dict) -> dict:
        """A microbatch that trains nothing (mask and advantages 0, loss 0, no metrics): run by a rank
        with fewer microbatches than another of its lockstep group -- failed rewards are not trained
        on, so counts differ -- because every forward of an EP / TP / PP model is collective. The
        schedule still divides by the padded count: such a rank's rollouts weigh n_real / n_padded."""
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

    def __call__(self, groups: list[list[Rollout]]) -> dict[str, float]:
        """Train on `groups` (this rank's share); returns policy/* and train/* metrics of this rank."""
        rewards = torch.tensor([[r.reward for r in grp] for grp in groups])
        adv = group_advantages(rewards)
        items = [
            {
                "prompt_ids": r.prompt_ids,
                "response_ids": r.response_ids,
                "rollout_logp": r.rollout_logp,
                # segment-level credit (E3RL attention rule): the sequence advantage times a per-token scale
                "advantage": (
                    float(adv[i, j]) if r.adv_scale is None else [float(adv[i, j]) * x for x in r.adv_scale]
                ),
                "routing": r.routing,
                "image": r.image,
            }
            for i, grp in enumerate(groups)
            for j, r in enumerate(grp)
            if not r.reward_failed  # a failed reward scores 0 in its group's statistics but is not trained on
        ]
        module = self.chunks[0].module
        tp = ps.get_tensor_model_parallel_world_size() if module.config.sequence_parallel else 1
        fixed = {}  # the pipeline schedule's one shape: the longest sequence, micro_batch_size rows
        if self.pp > 1:
            longest = max((len(it["prompt_ids"]) + len(it["response_ids"]) - 1 for it in items), default=1)
            fixed = {"length": longest, "rows": self.mbs}
        micro = [
            to_device(pack(items[i : i + self.mbs], replay=self.replay, multiple_of=tp, **fixed))
            for i in range(0, len(items), self.mbs)
        ]
        n_real = len(micro)
        n = self.lockstep.max(n_real)  # collective: self.lockstep.group
        if self.interleaved:  # the interleaved schedule runs microbatches in groups of pp
            n = -(-n // self.pp) * self.pp
        micro += [self.padding(micro, {"multiple_of": tp, **fixed}) for _ in range(n - n_real)]
        self.padded += n - n_real
        t0 = time.perf_counter()
        shape = {"seq_length": max(b["tokens"].shape[1] for b in micro), "micro_batch_size": self.mbs}
        # pi_old: the trainer's forward at the version that generated (this one)
        _store_logp(self.chunks, micro, "old_logp", shape)
        if self.reference is not None:  # pi_ref: the frozen reference model, the same schedule
            _store_logp(self.reference, micro, "ref_logp", shape)
        result = train_step(
            self.chunks, self.optimizer, self.scheduler, micro, forward_step=self.forward_step, **shape
        )
        self.skipped += not result.update_successful
        dt = time.perf_counter() - t0
        # the loss' metrics live on the last pipeline stage: every stage logs them (collective, PP group)
        metrics = from_last_stage(
            {f"policy/{key}": result.mean(key) for key in (result.metrics[0] if result.metrics else {})}
        )
        n_tok = sum(float(b["mask"].sum()) for b in micro)
        metrics.update(
            {
                "train/grad_norm": float(result.grad_norm or 0.0),
                "train/tokens_per_sec": n_tok / dt,
                "train/skipped_iterations": float(self.skipped),
                "policy/padding_microbatches": float(self.padded),
            }
        )
        return metrics


@torch.no_grad()
def _store_logp(chunks, micro: list[dict], key: str, shape: dict) -> None:
    """batch[key] = log-probs of `chunks` on each microbatch (forward only, Megatron-Core's schedule),
    masked; set on the last pipeline stage, where the loss reads them."""
    got = forward_backward(chunks, micro, forward_step=_old_logp_step, forward_only=True, **shape)
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
    "set_replay",
    "token_logp",
]

"""The one trainer step and the one data-parallel mean, shared by every training path here (text
pretraining, the RL update, MMRPT, the parity harness, the demos and the benchmarks), plus the
language-model `forward_step_func` and the DDP wrapping they all use.

    chunks = [wrap_ddp(model)]
    result = train_step(chunks, optimizer, scheduler, micro, seq_length=128, micro_batch_size=4)
    result.metrics            # per-microbatch metric dicts from the loss function (last pipeline stage)
    result.grad_norm, result.update_successful     # a skipped update (inf/nan under a loss scaler)
    logged = dp_mean({"train/lm_loss": loss})      # mean over the data-parallel ranks

A step: zero the DDP grad buffers and the optimizer's grads -> Megatron-Core's forward-backward
schedule over the microbatches (`forward_backward`, the one call of `get_forward_backward_func`) ->
`finalize_model_grads` (DP/TP/PP gradient reductions and the aux-loss-free expert-bias update) ->
`optimizer.step()` (clipping inside) -> the LR schedule, advanced only when the update was applied
(as Megatron-LM does; callers count the others as skipped iterations).

Non-finite steps: before `optimizer.step()`, every rank checks its reduced gradient buffers for
inf/nan (a non-finite loss makes them so) and the flags are OR-ed over the world; a bad step is
skipped on every rank (no parameter, optimizer-state or schedule change; the gradients are zeroed)
and reported as
`update_successful=False`. Megatron-Core's own `check_for_nan_in_grad` raises instead of skipping
and its rerun state machine needs Megatron-LM's training loop, hence this check. A `SkipGuard`
stops the run after `train.max_skipped_steps` skipped steps in a row. The aux-loss-free expert-bias
update inside `finalize_model_grads` reads routing counts, not gradients, so it runs either way; a
skipped step puts the bias back as it was before the step.

A microbatch is a dict {"tokens", "labels", optional "loss_mask", optional "position_ids"}, each
(B, S), and optional "images" (B, 3, H, W) for the image-text model; or a (tokens, labels) pair.

Process groups: `dp_mean` and `from_last_stage` take the group to reduce over (default: Megatron-Core's
data-parallel group incl. context parallelism, resp. the pipeline group), as set up by
megatron_step.platform.setup; nothing else here talks to other ranks except through Megatron-Core.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_step.platform import compute_device, to_device
from megatron_step.training.faults import crash_point, nan_fault

__all__ = [
    "SkipGuard",
    "StepResult",
    "dp_mean",
    "dp_sum",
    "forward_backward",
    "from_last_stage",
    "lm_forward_step",
    "moe_routers",
    "train_step",
    "wrap_ddp",
]


def packed_masks(segment_ids: torch.Tensor, loss_mask: torch.Tensor | None, mtp_depth: int):
    """For rows of packed samples (`segment_ids` (B, S)): the attention mask (B, 1, S, S), True where a
    query may not look (another sample, or a later position), and the loss mask for the MTP depths:
    Megatron-Core's depth k reads the mask k positions on, so the first `mtp_depth` positions of every
    sample are cleared there (those are the positions a previous sample's MTP would reach; they are
    the chat template's header, context anyway)."""
    s = segment_ids.shape[1]
    later = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).triu(1)
    attn = (segment_ids[:, :, None] != segment_ids[:, None, :]) | later
    if loss_mask is None or mtp_depth == 0:
        return attn[:, None], loss_mask
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    idx = torch.arange(s, device=segment_ids.device).expand_as(segment_ids)
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    offset = idx - first  # position within its sample
    return attn[:, None], loss_mask * (offset >= mtp_depth)


def _mtp_depth(model) -> int:
    m = model
    while hasattr(m, "module"):
        m = m.module
    return int(getattr(m.config, "mtp_num_layers", None) or 0)


def lm_forward_step(data_iterator, model):
    """Megatron-Core `forward_step_func` of the next-token loss (masked by `loss_mask` when given)."""
    batch = next(data_iterator)
    if not isinstance(batch, dict):
        batch = {"tokens": batch[0], "labels": batch[1]}
    batch = to_device(batch)  # batches are built on the CPU; a no-op there
    tokens, labels = batch["tokens"], batch["labels"]
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    mask = batch.get("loss_mask")
    mask = mask.float() if mask is not None else None
    extra = {"images": batch["images"]} if "images" in batch else {}
    attn, mtp_mask = None, mask
    if "segment_ids" in batch:  # packed rows (megatron_step.data.sft): each sample attends to itself
        attn, mtp_mask = packed_masks(batch["segment_ids"], mask, _mtp_depth(model))
    # (B, S) on the last stage; `loss_mask` is what Megatron-Core's MTP losses read
    per_token = model(tokens, pos, attn, labels=labels, loss_mask=mtp_mask, **extra)

    def loss_func(per_token_loss):
        if mask is None:
            loss = per_token_loss.float().mean()
        else:
            loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp_min(1.0)
        # clone: the schedule divides the returned loss in place by the number of microbatches
        return loss, {"lm_loss": loss.detach().clone()}

    return per_token, loss_func


def forward_backward(
    chunks: list,
    microbatches: list,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_step=lm_forward_step,
    forward_only: bool = False,
) -> list[dict]:
    """Megatron-Core's schedule (no pipelining, 1F1B, or interleaved with several chunks) over
    `microbatches`; returns the loss function's metric dicts (last pipeline stage; [] elsewhere)."""
    iters = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


@dataclass
class StepResult:
    metrics: list[dict]  # the loss function's dicts, one per microbatch (last pipeline stage; [] elsewhere)
    grad_norm: float | None  # before clipping; None without an optimizer step
    update_successful: bool  # False: the optimizer skipped the update (inf/nan grads under a loss scaler)
    seconds: dict[str, float] = field(default_factory=dict)  # forward_backward, finalize, optimizer
    observed: dict | None = None  # what `observe` returned

    def mean(self, key: str) -> float | None:
        """This rank's mean of metric `key` over the microbatches (None where there are none)."""
        values = [m[key] for m in self.metrics if key in m]
        return float(torch.stack(values).float().mean()) if values else None


def _poison_loss(forward_step):
    """`forward_step` whose loss (and so every gradient) is NaN: the test hook's "loss" fault."""

    def poisoned(data_iterator, model):
        out, loss_func = forward_step(data_iterator, model)

        def nan_loss(*args, **kwargs):
            loss, *rest = loss_func(*args, **kwargs)
            return (loss * float("nan"), *rest)

        return out, nan_loss

    return poisoned


def _grad_buffers(chunks) -> list[torch.Tensor]:
    """The gradients each chunk holds: DDP's contiguous grad buffers, else the parameters' grads."""
    out = []
    for c in chunks:
        bufs = [*getattr(c, "buffers", []), *getattr(c, "expert_parallel_buffers", [])]
        if bufs:
            out += [b.grad_data for b in bufs]
        else:
            out += [
                g for p in c.parameters() for g in (getattr(p, "main_grad", None), p.grad) if g is not None
            ]
    return out


def moe_routers(chunks):
    """The MoE routers in `chunks` (Megatron-Core's TopKRouter: token counts, the expert bias -- None
    without the aux-loss-free balancing)."""
    for c in chunks:
        for m in c.module.modules():
            if hasattr(m, "local_tokens_per_expert") and hasattr(m, "expert_bias"):
                yield m


def _non_finite(chunks) -> bool:
    """Whether any rank has an inf/nan gradient (collective: the world; every rank takes part in the
    step). A non-finite loss makes every gradient it reaches nan, so the gradients are what is read
    (loss functions also report metrics that may be inf by design, e.g. an empty minimum)."""
    bad = any(not bool(torch.isfinite(g).all()) for g in _grad_buffers(chunks))
    flag = torch.tensor([float(bad)], device=compute_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class SkipGuard:
    """Counts optimizer steps skipped for non-finite values; `limit` in a row (> 0) stops the run."""

    def __init__(self, limit: int, what: str = "training"):
        self.limit, self.what, self.total, self.in_a_row = limit, what, 0, 0

    def record(self, ok: bool) -> None:
        if ok:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.limit and self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.what}: {self.in_a_row} optimizer steps in a row skipped for inf/nan losses or "
                f"gradients (train.max_skipped_steps={self.limit}); stopping -- the last checkpoint is "
                "intact (lower the learning rate, or check the data)"
            )


def train_step(
    chunks: list,
    optimizer,
    scheduler,
    microbatches: list,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_step=lm_forward_step,
    observe=None,
    phase=None,
    guard: SkipGuard | None = None,
) -> StepResult:
    """One optimizer step over `microbatches` (this rank's share of the global batch).

    `optimizer` None: gradients only (zero, forward-backward, finalize), for a caller that inspects
    them (the parity harness). `observe()`: called between the backward pass and the gradient
    reductions, for what those consume (the routers' token counts); its value lands in
    `StepResult.observed`. `phase(name)`: an optional context-manager factory wrapped around each
    part (profilers); the parts are timed either way. A step with inf/nan gradients or losses is
    skipped (module docstring); `guard` counts it and stops the run after too many in a row."""
    fault = nan_fault()  # the test hook (megatron_step.training.faults); None unless asked for
    if fault == "loss":
        forward_step = _poison_loss(forward_step)
    phase = phase or (lambda name: contextlib.nullcontext())
    seconds = {}
    t0 = time.perf_counter()
    with phase("forward_backward"):
        for c in chunks:
            c.zero_grad_buffer()
        if optimizer is not None:
            optimizer.zero_grad()
        metrics = forward_backward(
            chunks,
            microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_step=forward_step,
        )
    observed = observe() if observe is not None else None
    crash_point("step")  # a crash drill's kill mid-step (megatron_step.training.faults)
    t1 = time.perf_counter()
    # the expert bias as it was: a skipped step puts it back (finalize updates it from the routing
    # counts, which are finite whatever the gradients are)
    biases = [r.expert_bias for r in moe_routers(chunks) if optimizer and r.expert_bias is not None]
    biases = [(b, b.detach().clone()) for b in biases]
    with phase("finalize"):
        finalize_model_grads(chunks)  # DP/TP/PP grad reductions + aux-loss-free expert-bias update
    t2 = time.perf_counter()
    seconds.update(forward_backward=t1 - t0, finalize=t2 - t1)
    if optimizer is None:
        return StepResult(metrics, None, True, seconds, observed)
    if fault == "grad" and (not dist.is_initialized() or dist.get_rank() == 0):
        _grad_buffers(chunks)[0].view(-1)[0] = float("nan")
    with phase("optimizer"):
        if _non_finite(chunks):  # skipped on every rank: nothing is updated
            ok, grad_norm = False, math.nan
            for c in chunks:
                c.zero_grad_buffer()
            optimizer.zero_grad()
            with torch.no_grad():
                for bias, before in biases:
                    bias.copy_(before)
        else:
            ok, grad_norm, _ = optimizer.step()
    if ok and scheduler is not None:
        scheduler.step(1)
    if guard is not None:
        guard.record(bool(ok))
    seconds["optimizer"] = time.perf_counter() - t2
    norm = None if grad_norm is None else float(grad_norm)
    return StepResult(metrics, norm, bool(ok), seconds, observed)


def _dp_group():
    return ps.get_data_parallel_group(with_context_parallel=True)


def dp_mean(
    metrics: dict[str, float], group=None, max_keys: tuple[str, ...] = (), is_count=None
) -> dict[str, float]:
    """Per key, the mean over the ranks of `group` (default: data parallel x context parallel) that
    report it -- ranks may differ in keys (an MMRPT rank whose masked sentences are all generic has no
    attribute term); keys in `max_keys` get the maximum instead (e.g. staleness/max), keys for which
    `is_count(key)` holds the sum (counts of events, e.g. failed reward calls: the run's total under
    any layout; a predicate, since a rank may lack a key the others count).
    Every rank of the group must call it. Sums run in float64 on the compute device (NCCL moves CUDA
    tensors)."""
    group = _dp_group() if group is None else group
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    if n == 1:
        return dict(metrics)
    key_sets: list = [None] * n
    dist.all_gather_object(key_sets, sorted(metrics), group=group)
    keys = sorted({k for ks in key_sets for k in ks})
    dev = compute_device()
    present = torch.tensor([float(k in metrics) for k in keys], dtype=torch.float64, device=dev)
    sums = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device=dev)
    peaks = torch.tensor(
        [float(metrics.get(k, -float("inf"))) for k in keys], dtype=torch.float64, device=dev
    )
    dist.all_reduce(sums, group=group)
    dist.all_reduce(present, group=group)
    if max_keys:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
    out = {}
    for i, k in enumerate(keys):
        if k in max_keys:
            out[k] = float(peaks[i])
        else:
            out[k] = float(sums[i]) if is_count and is_count(k) else float(sums[i]) / float(present[i])
    return out


def dp_sum(values: list[float], group=None) -> list[float]:
    """The sums of `values` over the ranks of `group` (default: data parallel x context parallel), one
    all-reduce in float64 on the compute device: e.g. a step's token count, for a mean over the step."""
    group = _dp_group() if group is None else group
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=compute_device())
    dist.all_reduce(t, group=group)
    return t.tolist()


def from_last_stage(metrics: dict[str, float], group=None) -> dict[str, float]:
    """The last pipeline stage's `metrics` on every stage of `group` (default: the pipeline group):
    the loss lives on the last stage, logging and stopping decisions happen everywhere."""
    group = ps.get_pipeline_model_parallel_group() if group is None else group
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return dict(metrics)
    box = [metrics if ps.is_pipeline_last_stage(ignore_virtual=True) else None]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
    return dict(box[0])


def wrap_ddp(model, distributed_optimizer: bool = True, layer_wise_params=None):
    """Megatron-Core DDP around one model chunk, as every training path here uses it: gradients
    reduced in fp32 into a contiguous buffer; `distributed_optimizer` shards them (reduce-scatter)
    for the distributed optimizer (ZeRO-1) instead of all-reducing them.

    `layer_wise_params` (a parameter predicate, see megatron_step.optim.factory.matrix_predicate):
    the matrices it selects get Megatron-Core's layer-wise buffer layout (whole matrices per DP
    rank, for LayerWiseDistributedOptimizer); the rest keep the ZeRO-1 layout."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
    )
    layout = None
    if distributed_optimizer and layer_wise_params is None:
        # the ZeRO-1 layout, computed here as Megatron-Core asks callers to (DDP would otherwise
        # compute the same one itself, with a warning)
        layout = DistributedOptimizer.compute_full_param_layout(
            [p for p in model.parameters() if p.requires_grad],
            None,  # overlap_grad_reduce is off: one bucket
            ps.get_data_parallel_world_size(with_context_parallel=True),
            ddp_config,
            expert_data_parallel_world_size=ps.get_expert_data_parallel_world_size(),
        )
    if layer_wise_params is not None:
        if not distributed_optimizer:
            raise ValueError("wrap_ddp: layer_wise_params needs distributed_optimizer=True")
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # read by Megatron-Core's buffer grouping
            p.is_managed_by_layer_wise_optimizer = bool(layer_wise_params(p))
        layout = LayerWiseDistributedOptimizer.compute_full_param_layout(
            params,
            None,  # one bucket: overlap_grad_reduce is off (DDP sets bucket_size None then too)
            ps.get_data_parallel_world_size(with_context_parallel=True),
            ddp_config,
            ps.get_expert_data_parallel_world_size(),
        )
    return DistributedDataParallel(
        config=model.config, ddp_config=ddp_config, module=model, full_param_layout=layout
    )

"""What every training path here shares (the trainer, the parity harness, the demo, the benchmarks):
the language-model `forward_step_func` that Megatron-Core's schedules call, and the DDP wrapping.

A microbatch is a dict {"tokens", "labels", optional "loss_mask", optional "position_ids"}, each
(B, S), and optional "images" (B, 3, H, W) for the image-text model; or a (tokens, labels) pair.
"""

from __future__ import annotations

import torch


def lm_forward_step(data_iterator, model):
    from megatron_step.platform import to_device

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
    per_token = model(tokens, pos, None, labels=labels, loss_mask=mask, **extra)  # (B, S) on the last stage

    def loss_func(per_token_loss):
        if mask is None:
            loss = per_token_loss.float().mean()
        else:
            loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp_min(1.0)
        # clone: the schedule divides the returned loss in place by the number of microbatches
        return loss, {"lm loss": loss.detach().clone()}

    return per_token, loss_func


def wrap_ddp(model, distributed_optimizer: bool = True, layer_wise_params=None):
    """Megatron-Core DDP around one model chunk, as every training path here uses it: gradients
    reduced in fp32 into a contiguous buffer; `distributed_optimizer` shards them (reduce-scatter)
    for the distributed optimizer (ZeRO-1) instead of all-reducing them.

    `layer_wise_params` (a parameter predicate, see megatron_step.optim.factory.matrix_predicate):
    the matrices it selects get Megatron-Core's layer-wise buffer layout (whole matrices per DP
    rank, for LayerWiseDistributedOptimizer); the rest keep the ZeRO-1 layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
    )
    layout = None
    if distributed_optimizer and layer_wise_params is None:
        # the ZeRO-1 layout, computed here as Megatron-Core asks callers to (DDP would otherwise
        # compute the same one itself, with a warning)
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

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

"""Process bodies for tests/optim (module-level so they pickle into spawned ranks)."""

from __future__ import annotations


def optimizer_layout(rank, world_size, optim_kw, freeze_norm_gains=False):
    """Which optimizer owns which parameter, for `OptimConfig(**optim_kw)` on the tiny preset; and
    whether frozen norm gains stay put over two steps."""
    import torch

    from megatron_step import platform
    from megatron_step.config.run import OptimConfig
    from megatron_step.models.step_flash import build_step_flash, tiny
    from megatron_step.models.step_flash import freeze_norm_gains as freeze
    from megatron_step.optim.factory import build_optimizer, leaf_optimizers, matrix_predicate, tag_routers
    from megatron_step.platform import ParallelConfig
    from megatron_step.testing.parity import global_batch, train_step
    from megatron_step.training.step import wrap_ddp

    platform.setup(ParallelConfig(), seed=5)
    o = OptimConfig(**optim_kw)
    cfg = tiny()
    model = build_step_flash(cfg, ParallelConfig())
    tag_routers(model, o.routers_to_adam)
    frozen = freeze(model) if freeze_norm_gains else []
    ddp = wrap_ddp(model, o.use_distributed_optimizer, layer_wise_params=matrix_predicate(o))
    opt = build_optimizer(o, [ddp], bf16=False)
    names = {id(p): n for n, p in model.named_parameters()}
    owner, lrs = {}, {}
    for leaf in leaf_optimizers(opt):
        inner = leaf.optimizer
        # a DistributedOptimizer's torch optimizer holds shard copies; its model params are listed
        # per group in model_fp32_groups (fp32 runs)
        groups = getattr(leaf, "model_fp32_groups", None) or [g["params"] for g in inner.param_groups]
        for group, params in zip(inner.param_groups, groups):
            for p in params:
                owner[names[id(p)]] = type(inner).__name__
                lrs[names[id(p)]] = group["max_lr"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = global_batch(cfg.vocab_size, 32)
    for _ in range(2):
        opt.zero_grad()
        train_step(ddp, data)
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    chain = [type(c).__name__ for c in getattr(opt, "chained_optimizers", [])]
    return {"owner": owner, "max_lr": lrs, "moved": moved, "frozen": frozen, "chain": chain}

"""Parallel-parity harness: run one training step of a Megatron-Core model under a given layout and
export loss + gradients in a layout-independent form, so any TP/EP/PP/DP layout can be compared
with the 1-process result.

    build = functools.partial(build_local_gpt, LocalGPTConfig())      # (ParallelConfig) -> model
    ref = run_distributed(run_layout, 1, build, {}, data, wdir, gdir1, True)
    got = run_distributed(run_layout, 2, build, {"tp": 2}, data, wdir, gdir2, False)
    ref_grads, got_grads = run_distributed(load_full, 1, build, [gdir1, gdir2])[0]

Gradients cross layouts through Megatron-Core's own dist-checkpointing: after the step each rank
copies its (DDP-reduced, TP-all-reduced) `main_grad` into the parameter and saves the model's sharded
state dict; a 1-process model then loads it, so Megatron-Core does the gathering / resharding
(including the SwiGLU fc1 interleave under TP) and the comparison is name-by-name on full tensors.
"""

from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from megatron_step import platform
from megatron_step.optim.config import OptimConfig
from megatron_step.optim.factory import build_optimizer, matrix_predicate, tag_routers
from megatron_step.platform import ParallelConfig
from megatron_step.testing.distributed import run_distributed
from megatron_step.training.step import dp_mean, train_step, wrap_ddp

GLOBAL_BATCH = 4  # sequences per step; microbatch size 1
SEED = 1234


def global_batch(vocab_size: int, seq_length: int) -> torch.Tensor:
    """(GLOBAL_BATCH, seq_length + 1) token ids: inputs are [:, :-1], labels [:, 1:]."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (GLOBAL_BATCH, seq_length + 1), generator=g)


def layout_step(model, data, optimizer=None) -> float | None:
    """One training step (megatron_step.training.step.train_step; gradients only without `optimizer`)
    over this rank's DP slice of the global batch; returns the DP-mean loss (last pipeline stage) or
    None (other stages). `data`: (GLOBAL_BATCH, S + 1) token ids, or for the image-text model a dict
    {"tokens": that, "images": (GLOBAL_BATCH, 3, H, W)}."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = data["tokens"] if isinstance(data, dict) else data
    lo, hi = dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp
    if isinstance(data, dict):
        micro = [
            {"tokens": rows[i, None, :-1], "labels": rows[i, None, 1:], "images": data["images"][i, None]}
            for i in range(lo, hi)
        ]
    else:
        micro = [(row[None, :-1], row[None, 1:]) for row in rows[lo:hi]]
    result = train_step([model], optimizer, None, micro, seq_length=rows.shape[1] - 1, micro_batch_size=1)
    if optimizer is not None:
        assert result.update_successful
    local = {"loss": result.mean("lm_loss")} if ps.is_pipeline_last_stage() else {}
    loss = dp_mean(local, group=ps.get_data_parallel_group())
    return loss.get("loss")


def grads_into_params(model) -> None:
    for p in model.module.parameters():
        g = getattr(p, "main_grad", None)
        p.data.copy_(g if g is not None else torch.zeros_like(p))


def run_layout(rank, world_size, build, parallel_kw, data, weights_dir, grads_dir, save_weights):
    """One step under `parallel_kw`; weights come from (or, with save_weights, go to) weights_dir;
    the reduced gradients go to grads_dir as a sharded checkpoint. Returns the DP-mean loss."""
    parallel = ParallelConfig(**parallel_kw)
    platform.setup(parallel, seed=SEED)
    model = wrap_ddp(build(parallel), distributed_optimizer=False)
    os.makedirs(weights_dir, exist_ok=True)
    os.makedirs(grads_dir, exist_ok=True)
    if save_weights:
        dist_checkpointing.save(model.module.sharded_state_dict(), weights_dir)
    else:
        state = dist_checkpointing.load(model.module.sharded_state_dict(), weights_dir)
        model.module.load_state_dict(state)
    loss = layout_step(model, data)
    grads_into_params(model)
    dist_checkpointing.save(model.module.sharded_state_dict(), grads_dir)
    return loss


def load_full(rank, world_size, build, ckpt_dirs):
    """Load each (grads) checkpoint into a 1-process model; return full tensors by name."""
    platform.setup(ParallelConfig(), seed=SEED)
    out = []
    for d in ckpt_dirs:
        model = build(ParallelConfig())
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), d))
        state = model.state_dict()
        out.append({k: v.detach().clone() for k, v in state.items() if "_extra_state" not in k})
    return out


def compare_layout(
    build, parallel_kw, data, reference: dict, grads_dir: str, world_size: int = 2, rtol: float = 1e-5
) -> dict:
    """Run `parallel_kw` on `world_size` ranks from the reference weights; assert its loss and every
    gradient match the reference (`reference` = {"loss", "weights", "grads"} from a 1-rank
    `run_layout`) within `rtol` (relative, per tensor, Frobenius norm). Returns the errors."""
    losses = run_distributed(
        run_layout, world_size, build, parallel_kw, data, reference["weights"], grads_dir, False
    )
    loss = next(x for x in losses if x is not None)
    assert abs(loss - reference["loss"]) <= rtol * abs(reference["loss"]), (loss, reference["loss"])
    ref, got = run_distributed(load_full, 1, build, [reference["grads"], grads_dir])[0]
    assert ref.keys() == got.keys(), set(ref) ^ set(got)
    dead = [k for k, v in ref.items() if v.abs().sum() == 0]
    assert not dead, f"reference gradients are all zero (the comparison would prove nothing): {dead}"
    errors = {k: ((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)).item() for k in ref}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative grad error {errors[worst]:.3e}"
    return {"loss": loss, "max_rel_grad_err": errors[worst], "worst": worst}


def make_reference(build, data, root) -> dict:
    """1-rank reference: saves the initial weights and the gradients of one step under `root`."""
    weights, grads = os.path.join(root, "weights"), os.path.join(root, "grads")
    (loss,) = run_distributed(run_layout, 1, build, {}, data, weights, grads, True)
    return {"loss": loss, "weights": weights, "grads": grads}


# ---------------------------------------------------------------------------------------------
# optimizer steps: K steps under a layout, compared on the resulting weights
# ---------------------------------------------------------------------------------------------
def run_steps(
    rank, world_size, build, parallel_kw, optim_kw, data, weights_dir, out_dir, steps, save_weights
):
    """`steps` optimizer steps (megatron_step.optim.factory, `optim_kw` -> OptimConfig) under
    `parallel_kw` from the weights in weights_dir (saved there first with save_weights); the final
    weights go to out_dir as a sharded checkpoint. Returns the DP-mean loss of every step."""
    parallel = ParallelConfig(**parallel_kw)
    platform.setup(parallel, seed=SEED)
    o = OptimConfig(**optim_kw)
    module = build(parallel)
    tag_routers(module, o.routers_to_adam)
    model = wrap_ddp(module, o.use_distributed_optimizer, layer_wise_params=matrix_predicate(o))
    if save_weights:
        os.makedirs(weights_dir, exist_ok=True)
        dist_checkpointing.save(model.module.sharded_state_dict(), weights_dir)
    else:
        model.module.load_state_dict(dist_checkpointing.load(model.module.sharded_state_dict(), weights_dir))
    optimizer = build_optimizer(o, [model], bf16=False)
    losses = [layout_step(model, data, optimizer) for _ in range(steps)]
    os.makedirs(out_dir, exist_ok=True)
    dist_checkpointing.save(model.module.sharded_state_dict(), out_dir)
    return losses


def make_step_reference(build, optim_kw, data, root, steps: int) -> dict:
    """1-rank reference for `compare_steps`: initial weights and the weights after `steps`."""
    weights, final = os.path.join(root, "weights"), os.path.join(root, "final")
    (losses,) = run_distributed(run_steps, 1, build, {}, optim_kw, data, weights, final, steps, True)
    return {"losses": losses, "weights": weights, "final": final, "steps": steps, "optim": optim_kw}


def compare_steps(build, parallel_kw, data, reference: dict, out_dir: str, world_size: int = 2, rtol=1e-5):
    """Run the reference's optimizer for its number of steps under `parallel_kw`; assert every loss
    and every final weight match the 1-rank reference within `rtol` (relative, Frobenius norm per
    tensor). Weights that moved are compared, and there must be some. Returns the errors."""
    runs = run_distributed(
        run_steps,
        world_size,
        build,
        parallel_kw,
        reference["optim"],
        data,
        reference["weights"],
        out_dir,
        reference["steps"],
        False,
    )
    losses = next(r for r in runs if r[0] is not None)
    for got, want in zip(losses, reference["losses"]):
        assert abs(got - want) <= rtol * abs(want), (losses, reference["losses"])
    init, ref, got = run_distributed(
        load_full, 1, build, [reference["weights"], reference["final"], out_dir]
    )[0]
    moved = [k for k in ref if not torch.equal(ref[k], init[k])]
    assert moved, "no weight moved in the reference run (the comparison would prove nothing)"
    errors = {k: ((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)).item() for k in ref}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative weight error {errors[worst]:.3e}"
    return {"losses": losses, "max_rel_weight_err": errors[worst], "worst": worst, "moved": len(moved)}


__all__ = [
    "compare_layout",
    "compare_steps",
    "global_batch",
    "load_full",
    "make_reference",
    "make_step_reference",
    "run_layout",
    "run_steps",
]

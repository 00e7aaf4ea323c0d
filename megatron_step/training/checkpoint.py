"""Checkpoints through Megatron-Core's dist_checkpointing: model, distributed-optimizer state,
LR schedule, step, consumed samples and RNG states, in any TP/EP/PP layout.

Layout and atomicity:
    <run_dir>/checkpoints/iter_0000200/        a complete dist-checkpoint
    <run_dir>/checkpoints/latest               "200" -- the last *complete* checkpoint
A save writes `iter_XXXXXXX.tmp/`, renames it to `iter_XXXXXXX/` once every rank has finished,
then replaces `latest` atomically (write + fsync + os.replace). A crash (even kill -9) at any point
leaves `latest` naming the previous complete checkpoint; a left-over `.tmp` directory is removed on
the next save.
"""

from __future__ import annotations

import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_step.optim.factory import leaf_optimizers

# Test hook: seconds to pause after the shards are written and before the checkpoint is committed,
# so a test can kill -9 a run in the middle of a save.
_PAUSE_ENV = "MEGATRON_STEP_SAVE_PAUSE_S"


# Distributed-optimizer state format: each DP rank writes its own buffers in parallel (no gather);
# resumable under a different DP size, but TP/PP/EP must match (model weights reshard freely).
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_dir(run_dir: str, step: int) -> str:
    """<run_dir>/checkpoints/iter_<step>: where step `step`'s complete checkpoint lives."""
    return os.path.join(_ckpt_root(run_dir), f"iter_{step:07d}")


def latest_step(run_dir: str) -> int | None:
    path = os.path.join(_ckpt_root(run_dir), "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected a step number, found {text!r}")
    return int(text)


def _model_sharded_state_dict(chunks) -> dict:
    # chunks are DDP wrappers; the state belongs to the wrapped GPTModel (no "module." prefix)
    if len(chunks) == 1:
        return {"model": chunks[0].module.sharded_state_dict()}
    # virtual pipeline: one entry per chunk, as Megatron-LM names them
    return {f"model{i}": c.module.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(chunks, loaded: dict, strict: bool = True, exclude: tuple[str, ...] = ()) -> None:
    """The loaded model state (as `_model_sharded_state_dict` names it) into the chunks; not
    `strict`: only keys starting with one of `exclude` (or extra states) may be missing."""
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for name, c in zip(names, chunks):
        missing, unexpected = c.module.load_state_dict(loaded[name], strict=strict)
        bad = [k for k in missing if not k.startswith(exclude) and not k.endswith("_extra_state")]
        if bad or unexpected:
            raise KeyError(f"loading {name}: missing {bad[:5]}, unexpected {list(unexpected)[:5]}")


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _rng_sharded(data) -> ShardedObject:
    # Every rank has its own RNG streams (TP/EP ranks are seeded differently): one object per rank.
    ws, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    return ShardedObject("rng_state", data, (ws,), (rank,), replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir: str, step: int, chunks, optimizer, scheduler, extra: dict) -> str:
    """Save on every rank (collective). Returns the committed directory."""
    root = _ckpt_root(run_dir)
    final = checkpoint_dir(run_dir, step)
    tmp = final + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # debris of an interrupted save
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.makedirs(tmp)
    _barrier()

    state = _model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(
        state["model"] if len(chunks) == 1 else state, metadata=_OPTIM_METADATA
    )
    state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    state["extra"] = {**extra, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    state["rng"] = _rng_sharded(_rng_state())
    dist_checkpointing.save(state, tmp)
    _barrier()

    pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
    if pause:
        time.sleep(pause)
    if rank0:
        os.rename(tmp, final)
        latest = os.path.join(root, "latest")
        with open(latest + ".tmp", "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest + ".tmp", latest)
    _barrier()
    return final


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam step counter, set to the checkpoint's step.

    Without TE/apex, megatron-core 0.19.2's DistributedOptimizer.load_state_dict stores the step of
    the param group (restored correctly in `param_groups[i]["step"]`) but leaves the per-parameter
    state with one *shared* tensor (or the dummy-init value). torch's Adam increments each
    parameter's step in place, so a shared tensor advances once per parameter per step and bias
    correction goes wrong after a resume. Written for megatron-core 0.19.2 (torch AdamW path)."""
    for opt in leaf_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def load_checkpoint(run_dir: str, chunks, optimizer, scheduler, step: int | None = None) -> dict:
    """Load `step` (default: latest) into model chunks, optimizer and scheduler; restore RNG.
    Returns {"step", "extra"}."""
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint under {_ckpt_root(run_dir)} (no 'latest' file); run without --resume first"
        )
    path = checkpoint_dir(run_dir, step)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: named by 'latest' but missing")
    common = dist_checkpointing.load_common_state_dict(path)
    # torch's Adam creates its state lazily, and DistributedOptimizer.state_dict() (used to build
    # the sharded state dict) asserts on an empty one. Megatron-Core's own remedy is a dummy step with
    # zero grads; it runs before the model weights are loaded, so their values do not matter.
    # (MACRO/Muon under the layer-wise optimizer: their init_state_fn does this inside
    # sharded_state_dict(is_loading=True); the AdamW part is a DistributedOptimizer as above.)
    for opt in leaf_optimizers(optimizer):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
    state = _model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(
        state["model"] if len(chunks) == 1 else state, is_loading=True, metadata=_OPTIM_METADATA
    )
    ws = dist.get_world_size() if dist.is_initialized() else 1
    same_layout = common["extra"].get("world_size") == ws
    if same_layout:  # RNG streams are per rank; after a re-layout they are re-seeded instead
        state["rng"] = _rng_sharded(None)
    loaded = dist_checkpointing.load(state, path)
    _load_model_state(chunks, loaded)
    with torch.no_grad():  # fp32 runs: main params are views of the model's leaf parameters
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    return {"step": common["step"], "extra": common["extra"], "path": path}


def load_model_weights(
    run_dir: str, chunks, step: int | None = None, optimizer=None, exclude: tuple[str, ...] = ()
) -> int:
    """Load only the model weights of `step` (default: latest) into `chunks` -- a new stage (RL from
    a pretrained/SFT checkpoint) starts with its own optimizer and schedule. Returns the step.

    Pass the stage's `optimizer` when it exists already: a mixed-precision (bf16) optimizer keeps fp32
    main copies of the parameters made when it was built, and its first step would otherwise write
    those (the initial weights) back over the loaded ones. (fp32 optimizers step views of the
    parameters themselves, so there it changes nothing.)

    `exclude`: key prefixes not loaded (they keep their values): the critic starts from the policy's
    backbone with its own value head in place of the output layer (megatron_step.rl.critic)."""
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {_ckpt_root(run_dir)} (no 'latest' file)")
    path = checkpoint_dir(run_dir, step)
    state = _model_sharded_state_dict(chunks)
    if exclude:
        state = {m: {k: v for k, v in sd.items() if not k.startswith(exclude)} for m, sd in state.items()}
    loaded = dist_checkpointing.load(state, path)
    _load_model_state(chunks, loaded, strict=not exclude, exclude=exclude)
    if optimizer is not None:
        optimizer.reload_model_params()
    return step

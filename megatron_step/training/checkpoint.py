"""Checkpoints through Megatron-Core's dist_checkpointing: model, distributed-optimizer state,
LR schedule, step, consumed samples and RNG states, in any TP/EP/PP layout.

Layout and atomicity:
    <run_dir>/checkpoints/iter_0000200/        a complete dist-checkpoint
    <run_dir>/checkpoints/iter_0000200/manifest.json   every file's size and CRC-32, written last
    <run_dir>/checkpoints/latest               "200" -- the last *complete* checkpoint
A save writes `iter_XXXXXXX.tmp/`, and once every rank has finished, writes its manifest, renames it
to `iter_XXXXXXX/`, then replaces `latest` atomically (write + fsync + os.replace). Re-saving a step
moves the complete copy aside (`.old`) and deletes it only after the new one is committed. A crash
(even kill -9) at any point leaves `latest` naming a complete checkpoint; left-over `.tmp`
directories are removed and a stranded `.old` is put back on the next save or load.

Loading (`resolve_latest`) verifies the newest checkpoint against its manifest (sizes, and CRC-32s
unless `verify="size"`); when a file is missing, truncated or changed it says which, in one line, and
falls back to the newest older checkpoint that verifies (or stops, without `fallback`). Checkpoints
written before manifests existed are accepted when Megatron-Core's own metadata files are there.

Whether a run continues its own checkpoints is `train.resume` (`resume_step`): "never" refuses to
start over an existing run unless `train.overwrite`; "auto" continues when there is a checkpoint;
"required" fails when there is none. `train.keep_last` keeps the newest N checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_step.optim.factory import leaf_optimizers
from megatron_step.training.faults import crash_point

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


class RunDirError(RuntimeError):
    """A run directory the run cannot start from as asked: it holds a run (train.resume=never), it
    holds none (required), or its checkpoints are damaged (no fallback). Entry points print it as a
    one-line `run error: ...`."""


MANIFEST = "manifest.json"
_MC_METADATA = ("metadata.json", ".metadata")  # what Megatron-Core's torch_dist format writes last


def latest_step(run_dir: str) -> int | None:
    """The step `latest` names (no verification; see `resolve_latest`), None without one."""
    path = os.path.join(_ckpt_root(run_dir), "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected a step number, found {text!r}")
    return int(text)


def saved_steps(run_dir: str) -> list[int]:
    """Steps with a committed `iter_XXXXXXX/` directory, oldest first (verified or not)."""
    root = _ckpt_root(run_dir)
    if not os.path.isdir(root):
        return []
    names = (n for n in os.listdir(root) if n.startswith("iter_") and n[5:].isdigit())
    return sorted(int(n[5:]) for n in names if os.path.isdir(os.path.join(root, n)))


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _files(path: str) -> list[str]:
    out = []
    for top, _, names in os.walk(path):
        out += [os.path.relpath(os.path.join(top, n), path) for n in names if n != MANIFEST]
    return sorted(out)


def _write_manifest(path: str, step: int) -> None:
    """Every file of the checkpoint directory `path`: size and CRC-32; written last (atomically)."""
    files = {}
    for rel in _files(path):
        full = os.path.join(path, rel)
        files[rel] = {"bytes": os.path.getsize(full), "crc32": _crc32(full)}
    with open(os.path.join(path, MANIFEST + ".tmp"), "w") as f:
        json.dump({"step": step, "files": files}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(path, MANIFEST + ".tmp"), os.path.join(path, MANIFEST))


def verify(path: str, crc: bool = True) -> str | None:
    """None when the checkpoint directory `path` is complete and unchanged; else what is wrong, naming
    the file (`crc`: compare CRC-32s too -- one read of every file -- else sizes only)."""
    if not os.path.isdir(path):
        return f"{path}: missing"
    manifest = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest):  # written before manifests: Megatron-Core's metadata must be there
        missing = [m for m in _MC_METADATA if not os.path.exists(os.path.join(path, m))]
        return f"{os.path.join(path, missing[0])}: missing (no {MANIFEST} either)" if missing else None
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{manifest}: unreadable ({e})"
    for rel, want in files.items():
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            return f"{full}: missing"
        size = os.path.getsize(full)
        if size != want["bytes"]:
            return f"{full}: {size} bytes, the manifest says {want['bytes']} (truncated or replaced)"
        if crc and _crc32(full) != want["crc32"]:
            return f"{full}: CRC-32 differs from the manifest's (the file was changed after the save)"
    return None


def _recover(root: str) -> None:
    """Put back a complete checkpoint moved aside by a re-save that crashed before its replacement
    was committed (rank 0)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.endswith(".old"):
            old, base = os.path.join(root, name), os.path.join(root, name[: -len(".old")])
            if os.path.isdir(base):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, base)


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _from_rank0(value):
    """`value` as rank 0 has it, on every rank (collective: the world)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _say(msg: str) -> None:
    print(f"checkpoint: {msg}", file=sys.stderr, flush=True)


def resolve_latest(run_dir: str, fallback: bool = True, verify_crc: bool = True) -> int | None:
    """The newest checkpoint of `run_dir` that verifies (collective when distributed: rank 0 checks,
    every rank gets its answer), None when there is none. A bad one is named in one line; then the
    next older one is tried (`fallback`), or the run stops (RunDirError)."""
    result = None
    if _rank0():
        try:
            result = _newest_good(run_dir, fallback, verify_crc)
        except RunDirError as e:
            result = str(e)
    result = _from_rank0(result)
    if isinstance(result, str):
        raise RunDirError(result)
    return result


def _newest_good(run_dir: str, fallback: bool, verify_crc: bool) -> int | None:
    root = _ckpt_root(run_dir)
    _recover(root)
    try:
        named = latest_step(run_dir)
    except ValueError as e:
        named = None
        _say(f"{e}; looking for the newest complete checkpoint instead")
    steps = saved_steps(run_dir)
    if named is not None and named not in steps:
        steps.append(named)  # reported as missing below
    for step in sorted(steps, reverse=True):
        bad = verify(checkpoint_dir(run_dir, step), crc=verify_crc)
        if bad is None:
            return step
        if not fallback:
            raise RunDirError(
                f"checkpoint of step {step} is damaged -- {bad} (train.checkpoint_fallback=false)"
            )
        path = checkpoint_dir(run_dir, step)
        if os.path.isdir(path):  # kept for inspection, out of the way of saves and retention
            os.rename(path, path + ".damaged")
            bad += f" (moved to {os.path.basename(path)}.damaged)"
        _say(f"step {step} is damaged -- {bad}; falling back to an older checkpoint")
    if steps:
        raise RunDirError(f"{root}: no complete checkpoint (every one failed verification, see above)")
    return None


def resume_step(t, extra_dirs: tuple[str, ...] = ()) -> int | None:
    """The step a stage continues from per `t` (TrainConfig: resume, overwrite, checkpoint_fallback),
    or None to start from the beginning (collective when distributed). `extra_dirs`: other checkpoint
    directories of the run (the critic's) that `overwrite` deletes too."""
    have = saved_steps(t.run_dir) or latest_step_safe(t.run_dir) is not None
    if t.resume == "never":
        if have and not t.overwrite:
            newest = max(saved_steps(t.run_dir) or [latest_step_safe(t.run_dir) or 0])
            raise RunDirError(
                f"train.run_dir={t.run_dir!r} holds a run (checkpoints up to step {newest}): "
                "train.resume=auto continues it, train.overwrite=true starts it over (deleting its "
                "checkpoints and TensorBoard events), or choose another train.run_dir"
            )
        if t.overwrite:
            _barrier()  # every rank has looked before rank 0 deletes
            if _rank0():
                for d in (_ckpt_root(t.run_dir), os.path.join(t.run_dir, "tensorboard"), *extra_dirs):
                    shutil.rmtree(d, ignore_errors=True)
            _barrier()
        return None
    step = resolve_latest(
        t.run_dir, fallback=t.checkpoint_fallback, verify_crc=t.checkpoint_verify == "crc32"
    )
    if step is None and t.resume == "required":
        raise RunDirError(f"train.resume=required: no checkpoint under {_ckpt_root(t.run_dir)}")
    return step


def latest_step_safe(run_dir: str) -> int | None:
    """`latest_step`, None for an unreadable `latest` file."""
    try:
        return latest_step(run_dir)
    except ValueError:
        return None


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


def py_rng_state(state) -> tuple:
    """A `random.Random` state from a checkpoint as `setstate` takes it (the checkpoint may give lists
    for its tuples)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


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


def _rank_sharded(data) -> ShardedObject:
    # state each rank keeps for itself (a DP rank's sampling counters): one object per rank
    ws, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    return ShardedObject("rank_state", data, (ws,), (rank,), replica_id=0)


def save_checkpoint(
    run_dir: str, step: int, chunks, optimizer, scheduler, extra: dict, rank_state=None, keep_last: int = 0
) -> str:
    """Save on every rank (collective). `extra`: picklable state shared by the ranks (rank 0's is
    kept); `rank_state`: this rank's own (`load_checkpoint` gives each rank its own back when the
    world size is the same). `keep_last` > 0: delete all but the newest that many checkpoints after
    the commit. Returns the committed directory."""
    root = _ckpt_root(run_dir)
    final = checkpoint_dir(run_dir, step)
    tmp = final + ".tmp"
    if _rank0():
        os.makedirs(root, exist_ok=True)
        _recover(root)
        for name in os.listdir(root):  # debris of an interrupted save
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()

    state = _model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(
        state["model"] if len(chunks) == 1 else state, metadata=_OPTIM_METADATA
    )
    state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    ws = dist.get_world_size() if dist.is_initialized() else 1
    state["extra"] = {**extra, "world_size": ws, "rank_state": rank_state is not None}
    state["rng"] = _rng_sharded(_rng_state())
    if rank_state is not None:
        state["rank_state"] = _rank_sharded(rank_state)
    dist_checkpointing.save(state, tmp)
    _barrier()

    pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
    if pause:
        time.sleep(pause)
    crash_point("save")  # a crash drill's kill: shards written, nothing committed
    if _rank0():
        _write_manifest(tmp, step)
        if os.path.exists(final):  # a re-save of this step: the complete copy goes only after the new one
            os.rename(final, final + ".old")
        os.rename(tmp, final)
    crash_point("commit")  # a crash drill's kill: committed, `latest` not yet replaced
    if _rank0():
        latest = os.path.join(root, "latest")
        with open(latest + ".tmp", "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest + ".tmp", latest)
        shutil.rmtree(final + ".old", ignore_errors=True)
        if keep_last > 0:
            for old in [s for s in saved_steps(run_dir) if s != step][: -(keep_last - 1) or None]:
                shutil.rmtree(checkpoint_dir(run_dir, old), ignore_errors=True)
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


def load_checkpoint(
    run_dir: str, chunks, optimizer, scheduler, step: int | None = None, rng: bool = True
) -> dict:
    """Load `step` (default: the newest that verifies, `resolve_latest`) into model chunks, optimizer
    and scheduler; restore each rank's RNG (`rng`, same world size only). Returns {"step", "extra",
    "path", "rank_state"} (rank_state: this rank's `save_checkpoint(rank_state=)`, None when none was
    saved or the world size changed)."""
    step = resolve_latest(run_dir) if step is None else step
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
        if common["extra"].get("rank_state"):
            state["rank_state"] = _rank_sharded(None)
    loaded = dist_checkpointing.load(state, path)
    _load_model_state(chunks, loaded)
    with torch.no_grad():  # fp32 runs: main params are views of the model's leaf parameters
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(common["scheduler"])
    if same_layout and rng:
        _set_rng_state(loaded["rng"])
    rank_state = loaded["rank_state"] if "rank_state" in state else None
    return {"step": common["step"], "extra": common["extra"], "path": path, "rank_state": rank_state}


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
    step = resolve_latest(run_dir) if step is None else step
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

"""Every patch megatron-step applies to Megatron-Core / torch so the *same* model and training code
runs on a CPU box with `gloo`. Written for megatron-core 0.19.2 and torch 2.14.

Rules:
- Patches are applied only when CUDA is absent (`apply_cpu_patches` refuses otherwise), so a GPU run
  is never altered. A test checks that.
- Prefer config/spec choices over patches: `use_cpu_initialization=True`, `moe_grouped_gemm=False`,
  the project's own RMSNorm (`megatron_step.models.norm`) instead of TENorm/WrappedTorchNorm,
  `model_parallel_cuda_manual_seed(..., inference_rng_tracker=True)` for RNG. What is left is here.
- Each patch names the symbol, the reason and the megatron-core version it was written for.

Why not a global `TorchFunctionMode` that rewrites `device="cuda"`: it intercepts every torch op
(measured 20-50% CPU overhead on a small model). The hard-coded `"cuda"` factory calls live in a
dozen Megatron-Core modules, so instead each such module gets a *view* of the `torch` module whose
tensor factories map a CUDA device to CPU; all other ops run untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_step.platform.capabilities import detect

WRITTEN_FOR_MCORE = "0.19.2"


@dataclass(frozen=True)
class Patch:
    symbol: str  # what is replaced
    reason: str  # why Megatron-Core needs it on CPU
    apply: Callable[[], Callable[[], None]]  # applies the patch, returns its undo


# ---------------------------------------------------------------------------------------------
# CPU stand-ins for CUDA streams and events. Megatron-Core uses them for overlap (DDP grad sync,
# the all-to-all dispatcher's D2H copies, async dist-checkpoint save) and for timing. On CPU every
# op is synchronous, so waits are no-ops and an event records wall-clock time.
# ---------------------------------------------------------------------------------------------
class CpuStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or CpuEvent()
        event.record(self)
        return event

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class CpuEvent:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **kwargs):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: CpuEvent) -> float:
        """Milliseconds, like `torch.cuda.Event.elapsed_time`."""
        return (end._t - self._t) * 1000.0


_DEFAULT_STREAM = CpuStream()


def _set_attrs(obj, **new) -> Callable[[], None]:
    old = {k: getattr(obj, k) for k in new}
    for k, v in new.items():
        setattr(obj, k, v)

    def undo():
        for k, v in old.items():
            setattr(obj, k, v)

    return undo


def _patch_current_device():
    # ~200 allocation sites do `torch.empty(..., device=torch.cuda.current_device())`; a CPU device
    # object is valid wherever a device index is used that way, and in `.to(...)`.
    return _set_attrs(torch.cuda, current_device=lambda: torch.device("cpu"))


def _patch_streams():
    return _set_attrs(
        torch.cuda,
        Stream=CpuStream,
        Event=CpuEvent,
        current_stream=lambda device=None: _DEFAULT_STREAM,
        default_stream=lambda device=None: _DEFAULT_STREAM,
        stream=lambda s=None: contextlib.nullcontext(s),
        synchronize=lambda device=None: None,
    )


def _patch_tensor_cuda():
    # `.cuda()` calls in the optimizer (state reload), language_module (tied-embedding sync),
    # tensor_parallel.data and utils. On CPU the tensor simply stays where it is.
    def _cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    def _record_stream(self, stream):
        # DDP / dispatcher mark buffers as used on a side stream; with CpuStream there is none.
        return None

    return _set_attrs(torch.Tensor, cuda=_cuda, record_stream=_record_stream)


# ---------------------------------------------------------------------------------------------
# Module-scoped torch view for hard-coded `device="cuda"` tensor factories.
# ---------------------------------------------------------------------------------------------
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint")


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "cuda" else dev


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    factory.__doc__ = fn.__doc__
    return factory


class _TorchCpuView(types.ModuleType):
    """Looks like `torch`; its tensor factories send a CUDA device to CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):  # only called on a miss; cache so the next lookup is a dict hit
        value = getattr(torch, name)
        setattr(self, name, value)
        return value


# Megatron-Core 0.19.2 modules with `device="cuda"` / `device='cuda'` factory calls on the paths we
# run (training step, schedules, optimizers, grad clipping, MoE dispatch, masks, inference).
CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens counters
    "megatron.core.optimizer.grad_scaler",  # loss-scale tensors
    "megatron.core.optimizer.optimizer",  # found_inf / scale tensors
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.layer_wise_optimizer",
    "megatron.core.optimizer.clip_grads",  # total-norm buffers
    "megatron.core.distributed.param_and_grad_buffer",  # NCCL warm-up tensor
    "megatron.core.transformer.moe.token_dispatcher",  # over-budget flag
    "megatron.core.transformer.utils",  # causal / window masks
    "megatron.core.tensor_parallel.data",  # broadcast_data size buffers
    "megatron.core.utils",  # param hashes, l2 reductions
)


def _patch_factory_modules():
    view = _TorchCpuView()
    undos = []
    for name in CUDA_FACTORY_MODULES:
        mod = importlib.import_module(name)
        undos.append(_set_attrs(mod, torch=view))

    def undo():
        for u in reversed(undos):
            u()

    return undo


def _patch_tensor_type_checks():
    # `Tensor.type()` string checks ('torch.cuda.FloatTensor') in the distributed optimizer and the
    # float16 optimizer decide which params get fp32 main copies; a CPU tensor reports
    # 'torch.FloatTensor' and would hit their "unsupported type" error. Scope: only those modules,
    # by mapping the CPU type names onto the CUDA ones inside their param-group builders.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    def wrap(fn):
        def wrapped(*args, **kwargs):
            with _cuda_type_names():
                return fn(*args, **kwargs)

        wrapped.__wrapped__ = fn
        return wrapped

    dist_opt = distrib_optimizer.DistributedOptimizer
    undos = [
        _set_attrs(
            dist_opt,
            _build_model_and_main_param_groups=classmethod(
                wrap(dist_opt._build_model_and_main_param_groups.__func__)
            ),
        ),
        _set_attrs(
            optimizer.Float16OptimizerWithFloat16Params,
            __init__=wrap(optimizer.Float16OptimizerWithFloat16Params.__init__),
        ),
    ]
    # clip_grad_by_total_norm_fp32 asserts grad.type() == 'torch.cuda.FloatTensor'; optimizer.py
    # imported it by name, so both references are replaced.
    clip = wrap(clip_grads.clip_grad_by_total_norm_fp32)
    undos.append(_set_attrs(clip_grads, clip_grad_by_total_norm_fp32=clip))
    undos.append(_set_attrs(optimizer, clip_grad_by_total_norm_fp32=clip))

    def undo():
        for u in reversed(undos):
            u()

    return undo


_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """`Tensor.type()` that reports a CPU tensor under its CUDA type name ('torch.cuda.FloatTensor')."""
    if dtype is None:
        name = _TENSOR_TYPE(self)  # may re-enter this function through __torch_function__
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            name = name.replace("torch.", "torch.cuda.", 1)
        return name
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _cuda_type_names():
    if torch.Tensor.type is _cuda_type_name:  # re-entered (wrapped functions call each other)
        yield
        return
    torch.Tensor.type = _cuda_type_name
    try:
        yield
    finally:
        torch.Tensor.type = _TENSOR_TYPE


def _patch_dispatcher_splits():
    # MoEAlltoAllTokenDispatcher computes the all-to-all split sizes as tensors and turns them into
    # numpy arrays (which the c10d binding accepts as a list of ints) with `maybe_move_tensor_to_cpu`
    # -- but only `if tensor.is_cuda`. On CPU they stay tensors and gloo's all_to_all_single rejects
    # them. The replacement does the numpy conversion for CPU tensors too.
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return _set_attrs(token_dispatcher, maybe_move_tensor_to_cpu=maybe_move_tensor_to_cpu)


PATCHES: tuple[Patch, ...] = (
    Patch(
        "torch.cuda.current_device",
        "~200 Megatron-Core allocation sites pass it as `device=`; without a driver it raises.",
        _patch_current_device,
    ),
    Patch(
        "torch.cuda.{Stream,Event,current_stream,default_stream,stream,synchronize}",
        "DDP grad-sync overlap, the all-to-all dispatcher, dist-checkpoint save and timers create "
        "CUDA streams/events; CPU ops are synchronous so no-op stand-ins are exact.",
        _patch_streams,
    ),
    Patch(
        "torch.Tensor.{cuda,record_stream}",
        "`.cuda()` in optimizer state reload, tied-embedding sync, tensor_parallel.data; "
        "`record_stream` on side streams. On CPU the tensor stays put.",
        _patch_tensor_cuda,
    ),
    Patch(
        "<module>.torch for " + ", ".join(m.rsplit(".", 1)[-1] for m in CUDA_FACTORY_MODULES),
        "hard-coded `device='cuda'` tensor factories; a module-scoped torch view maps them to CPU "
        "(cheaper than a global TorchFunctionMode).",
        _patch_factory_modules,
    ),
    Patch(
        "DistributedOptimizer._build_model_and_main_param_groups, "
        "Float16OptimizerWithFloat16Params.__init__, clip_grad_by_total_norm_fp32",
        "they dispatch on `param.type()` == 'torch.cuda.*Tensor' strings and reject CPU tensors.",
        _patch_tensor_type_checks,
    ),
    Patch(
        "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
        "the all-to-all dispatcher's split sizes stay torch tensors on CPU; gloo's "
        "all_to_all_single needs int sequences (numpy, as on GPU).",
        _patch_dispatcher_splits,
    ),
)

_undo: list[Callable[[], None]] = []


def applied() -> bool:
    return bool(_undo)


def apply_cpu_patches() -> None:
    """Apply every patch once. Refuses when CUDA is present: GPU runs must never be altered."""
    if detect().cuda or torch.cuda.is_available():
        raise RuntimeError(
            "apply_cpu_patches() called on a machine with CUDA; the CPU layer must never alter GPU "
            "runs. Use megatron_step.platform.setup(), which only patches when CUDA is absent."
        )
    if _undo:
        return
    # __shortversion__: megatron-core appends the git hash of whatever repo it is installed in (a
    # .venv inside this repo gets *our* hash) to __version__.
    from megatron.core.package_info import __shortversion__ as version

    if version != WRITTEN_FOR_MCORE:
        import warnings

        warnings.warn(
            f"megatron_step CPU patches were written for megatron-core {WRITTEN_FOR_MCORE}, "
            f"found {version}; re-check megatron_step/platform/cpu_patches.py",
            stacklevel=2,
        )
    for patch in PATCHES:
        _undo.append(patch.apply())


def remove_cpu_patches() -> None:
    while _undo:
        _undo.pop()()

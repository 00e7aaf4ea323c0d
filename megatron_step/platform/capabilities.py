"""What this machine can do: CUDA, Transformer Engine, DALI, apex.

Everything that branches on hardware asks here, so a CPU box and a GPU node take the same code
path except where a capability decides otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Capabilities:
    cuda: bool  # a usable CUDA device (driver + device), not merely a CUDA build of torch
    device_count: int
    compute_capability: tuple[int, int] | None  # (9, 0) on Hopper
    transformer_engine: bool  # `import transformer_engine.pytorch` works (needs CUDA)
    dali: bool  # nvidia.dali imports (it also decodes on CPU)
    apex: bool

    @property
    def fp8(self) -> bool:
        """FP8 GEMMs through TE need Hopper (sm_90) or newer."""
        return self.cuda and self.transformer_engine and (self.compute_capability or (0, 0)) >= (8, 9)

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda else "gloo"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _te_imports() -> bool:
    if not _importable("transformer_engine"):
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises OSError/RuntimeError without a driver
        return False
    return True


@functools.cache
def detect() -> Capabilities:
    """Probe once per process. `torch.cuda.is_available()` is False on CPU even with a CUDA wheel."""
    cuda = torch.cuda.is_available()
    return Capabilities(
        cuda=cuda,
        device_count=torch.cuda.device_count() if cuda else 0,
        compute_capability=torch.cuda.get_device_capability() if cuda else None,
        transformer_engine=cuda and _te_imports(),
        dali=_importable("nvidia.dali"),
        apex=_importable("apex"),
    )

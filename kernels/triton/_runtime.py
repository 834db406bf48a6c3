"""Where kernels run: a CUDA GPU, or Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Triton 3.x decides between compiling and interpreting when ``@triton.jit`` is applied, from
the environment at that moment. :class:`LazyKernel` defers the decoration to the first launch
and keeps one variant per mode, so importing these modules before setting the variable (or
toggling it in tests) still gives the mode in force at launch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from graphsurgeon.errors import GraphSurgeonError

NEEDS_GPU = "needs a CUDA GPU (or TRITON_INTERPRET=1 to run Triton's interpreter on the CPU)"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def check_device(what: str, *tensors: Any) -> None:
    """Raise GraphSurgeonError unless the tensors can be handed to a Triton kernel here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise GraphSurgeonError(f"{what}: Triton is not installed (pip install triton)") from None
    on_cuda = [t.is_cuda for t in tensors if t is not None]
    if interpreting():
        if any(on_cuda):
            raise GraphSurgeonError(f"{what}: TRITON_INTERPRET=1 runs kernels on CPU tensors")
        return
    if not cuda_available():
        raise GraphSurgeonError(f"{what}: {NEEDS_GPU}")
    if not all(on_cuda):
        raise GraphSurgeonError(f"{what}: tensors must be on the CUDA device")


class LazyKernel:
    """``@triton.jit`` applied at first launch, per mode (compiled or interpreted)."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._variants: dict[bool, Any] = {}

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        import triton

        mode = interpreting()
        kernel = self._variants.get(mode)
        if kernel is None:
            kernel = self._variants[mode] = triton.jit(self.fn)
        return kernel[grid]

"""Where kernels run: a CUDA GPU, or Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Triton 3.x decides between compiling and interpreting when ``@triton.jit`` is applied, from
the environment at that moment; its own library functions (``tl.sum``, ``tl.cdiv``...) are
decorated when ``triton.language`` is imported, so **the variable must be set before triton is
imported**. :func:`check_device` says so if it was not. :class:`LazyKernel` defers the
decoration of our kernels to their first launch, so importing these modules early is fine.
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
        if not _library_interpreted():
            raise GraphSurgeonError(
                f"{what}: TRITON_INTERPRET=1 was set after triton was imported; set it before"
            )
        return
    if not cuda_available():
        raise GraphSurgeonError(f"{what}: {NEEDS_GPU}")
    if not all(on_cuda):
        raise GraphSurgeonError(f"{what}: tensors must be on the CUDA device")


def _library_interpreted() -> bool:
    """Whether triton.language's own jit functions were built for the interpreter."""
    from triton.language import standard

    return type(standard.cdiv).__name__ == "InterpretedFunction"


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

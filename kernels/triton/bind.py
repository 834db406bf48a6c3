"""Run a lowered model (``lower-kernels`` output) as a torch module with the Triton kernels.

The ``graphsurgeon`` custom ops are registered with the ONNX -> torch bridge
(:func:`graphsurgeon.training.register_op`); every other node runs as the bridge's torch op.
Imported lazily (it needs torch, Triton and the bridge), e.g. by the bundle runtime::

    run = load_lowered(model)                  # on the CUDA GPU, activations in fp16
    outputs = run({"input": array})            # {output name: numpy array}

Without a CUDA GPU (and without ``TRITON_INTERPRET=1``) the first call raises a
GraphSurgeonError saying so; use ``raise-kernels`` and onnxruntime there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from graphsurgeon.kernels.triton import autotune, ops
from graphsurgeon.kernels.triton._runtime import NEEDS_GPU, cuda_available, interpreting

from graphsurgeon.errors import GraphSurgeonError

GS_DOMAIN = "graphsurgeon"
_registered = False


def _attr(node: Any, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _matmul_nbits(ctx: Any, node: Any, inputs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    a, b, scales = inputs[:3]
    zp = inputs[3] if len(inputs) > 3 else None
    y = ops.matmul_nbits(
        a, b, scales.to(a.dtype), zp, _attr(node, "K"), _attr(node, "N"), _attr(node, "bits"),
        _attr(node, "block_size"),
    )  # fmt: skip
    return [y]


def _sparse24(ctx: Any, node: Any, inputs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    a, values, meta = inputs[:3]
    bias = inputs[3] if len(inputs) > 3 else None
    bias = bias.to(a.dtype) if bias is not None else None
    k, n = _attr(node, "K"), _attr(node, "N")
    return [ops.sparse24_matmul(a, values.to(a.dtype), meta, k, n, bias)]


def _bsr(ctx: Any, node: Any, inputs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    a, data, indices, indptr = inputs[:4]
    bias = inputs[4] if len(inputs) > 4 else None
    bias = bias.to(a.dtype) if bias is not None else None
    k, n = _attr(node, "K"), _attr(node, "N")
    return [ops.bsr_matmul(a, data.to(a.dtype), indices, indptr, k, n, bias)]


def _int8(ctx: Any, node: Any, inputs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    a, b = inputs[:2]
    a_zero = inputs[2] if len(inputs) > 2 else None
    b_zero = inputs[3] if len(inputs) > 3 else None
    return [ops.int8_matmul(a, b, a_zero, b_zero)]


OPS: dict[str, Callable[..., list[torch.Tensor]]] = {
    "MatMulW4A16": _matmul_nbits,
    "MatMulW8A16": _matmul_nbits,
    "SparseMatMul24": _sparse24,
    "BsrMatMul": _bsr,
    "MatMulInt8": _int8,
}


def register() -> None:
    """Register the custom ops with the ONNX -> torch bridge (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from graphsurgeon.training import register_op
    except ImportError as e:
        raise GraphSurgeonError(
            f"running a lowered model needs the ONNX -> torch bridge (graphsurgeon.training): {e}"
        ) from None
    for op_type, fn in OPS.items():
        register_op(GS_DOMAIN, op_type, fn)
    _registered = True


def load_lowered(
    model: ir.Model,
    *,
    device: str | None = None,
    half: bool = True,
    profile: str | None = None,
    tuned_dir: str | Path | None = None,
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A callable ``feeds -> outputs`` (numpy in, numpy out, the model's names) that runs
    ``model`` with the Triton kernels on ``device`` (default: cuda, or cpu when
    ``TRITON_INTERPRET=1``). ``half`` runs float activations and weights in float16 (the "A16"
    of the kernels; float outputs are returned as float32). ``profile`` and ``tuned_dir``
    choose the tuned launch configs (a bundle passes its profile and ``triton/tuned``)."""
    if profile is not None:
        autotune.use_profile(profile)
    if tuned_dir is not None:
        autotune.use_cache_dir(tuned_dir)
    if device is None:
        if interpreting():
            device = "cpu"
        elif cuda_available():
            device = "cuda"
        else:
            raise GraphSurgeonError(f"load_lowered: {NEEDS_GPU}")
    register()
    from graphsurgeon.training import to_torch

    # trainable=True then frozen: the bridge hooks pruning masks onto trainable weights only,
    # and refuses masks on frozen ones
    module = to_torch(model).requires_grad_(False).to(device).eval()
    if half:
        module = module.half()
    float_dtype = torch.float16 if half else torch.float32

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {}
        for name, array in feeds.items():
            t = torch.as_tensor(np.asarray(array), device=device)
            tensors[name] = t.to(float_dtype) if t.is_floating_point() else t
        with torch.no_grad():
            outs = module(**tensors)
        return {
            name: (t.float() if t.is_floating_point() else t).cpu().numpy()
            for name, t in outs.items()
        }

    return run


def bundle_files(profile: Any = None) -> dict[str, Path]:
    """What a bundle ships for the Triton backend, as ``{path in the bundle: file}``: the
    kernel sources (``triton/kernels/*.py``, with the numpy reference that defines them) and
    the tuned configs of ``profile`` (a HardwareProfile or its name) if any were tuned."""
    here = Path(__file__).resolve().parent
    files = {f"triton/kernels/{p.name}": p for p in sorted(here.glob("*.py"))}
    files["triton/kernels/reference.py"] = here.parent / "reference.py"
    name = getattr(profile, "name", profile)
    tuned = autotune.cache_path(name if isinstance(name, str) else None)
    if tuned.is_file():
        files[f"triton/tuned/{tuned.name}"] = tuned
    return files

"""QDQ as fake quantization with a straight-through estimator (quantization-aware training).

``QuantizeLinear`` computes ``q = clamp(round(x / s) + z, qmin, qmax)``. Rounding has zero
gradient almost everywhere, so training uses the straight-through estimator (Bengio et al.
2013): the forward pass rounds, the backward pass treats rounding as the identity, and the
clamp keeps its true gradient (zero outside the range, so saturated values stop pulling). In
torch ``q`` stays a float tensor holding integers; ``DequantizeLinear`` maps it back with
``(q - z) * s``.

Quantized weights (an int8 initializer read by a ``DequantizeLinear``, as ``quantize-int8``
writes them) are trained through a float *shadow*: the Parameter is ``w = (q - z) * s`` and the
int initializer's value in the graph is ``fake(w) = clamp(round_ste(w / s) + z)``. Writing back
re-quantizes the shadow with the same scale and zero point, so the model keeps its exact QDQ
form, file size and int8 kernels, and an untrained shadow gives back the same integers. (The
alternative, writing a float weight plus a QuantizeLinear, would double the weight bytes and
move the quantization into run time.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from graphsurgeon.training.ops import Tensor, attr, op, torch_dtype
from graphsurgeon.training.ops_nn import conv

_RANGES = {
    torch.int8: (-128, 127),
    torch.uint8: (0, 255),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
}
_INT_IR = {
    ir.DataType.INT8,
    ir.DataType.UINT8,
    ir.DataType.INT16,
    ir.DataType.INT32,
}


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _per_axis(t: Tensor, rank: int, axis: int) -> Tensor:
    """A per-axis scale or zero point shaped to broadcast along ``axis`` of a rank-``rank``
    tensor (a scalar stays as it is)."""
    if t.dim() == 0:
        return t
    if t.dim() == 1 and rank > 1:
        view = [1] * rank
        view[axis % rank] = t.numel()
        return t.reshape(view)
    return t


def fake_quantize(
    x: Tensor, scale: Tensor, zero: Tensor | None, qdtype: torch.dtype, axis: int
) -> Tensor:
    """``clamp(round_ste(x / s) + z)`` as a float tensor on the integer grid."""
    qmin, qmax = _RANGES[qdtype]
    s = _per_axis(scale, x.dim(), axis)
    q = round_ste(x / s)
    if zero is not None:
        q = q + _per_axis(zero, x.dim(), axis).to(q.dtype)
    return torch.clamp(q, qmin, qmax)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None, axis: int) -> Tensor:
    s = _per_axis(scale, q.dim(), axis)
    x = q.to(scale.dtype)
    if zero is not None:
        x = x - _per_axis(zero, q.dim(), axis).to(scale.dtype)
    return x * s


def _check_blocked(node: ir.Node) -> None:
    if attr(node, "block_size", 0):
        from graphsurgeon.training.bridge import UnsupportedOpError

        raise UnsupportedOpError(node, "blocked quantization (block_size)")


@op("QuantizeLinear")
def _quantize_linear(ctx, node, x):
    _check_blocked(node)
    zero = x[2] if len(x) > 2 else None
    if zero is not None:
        qdtype = zero.dtype
    elif attr(node, "output_dtype"):
        qdtype = torch_dtype(attr(node, "output_dtype"))
    else:
        qdtype = torch.uint8
    return [fake_quantize(x[0], x[1], zero, qdtype, attr(node, "axis", 1))]


@op("DequantizeLinear")
def _dequantize_linear(ctx, node, x):
    _check_blocked(node)
    zero = x[2] if len(x) > 2 else None
    return [dequantize(x[0], x[1], zero, attr(node, "axis", 1))]


@op("MatMulIntegerToFloat", domain="com.microsoft")
def _matmul_integer_to_float(ctx, node, x):
    x = list(x) + [None] * (7 - len(x))
    a, b, a_scale, b_scale, a_zero, b_zero, bias = x[:7]
    y = dequantize(a, a_scale, a_zero, -1) @ dequantize(b, b_scale, b_zero, -1)
    return [y if bias is None else y + bias]


@op("DynamicQuantizeLinear")
def _dynamic_quantize_linear(ctx, node, x):
    """uint8 with a range that always holds zero, computed from the tensor itself (ONNX spec);
    the range is treated as a constant for the gradient, the rounding as the identity."""
    t = x[0]
    low = torch.clamp(t.detach().min(), max=0.0)
    high = torch.clamp(t.detach().max(), min=0.0)
    scale = ((high - low) / 255.0).to(t.dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-low / scale), 0, 255).to(torch.uint8)
    return [fake_quantize(t, scale, zero, torch.uint8, 1), scale, zero]


def _shifted(q: Tensor, zero: Tensor | None, axis: int) -> Tensor:
    out = q.to(torch.float32)
    if zero is not None:
        out = out - _per_axis(zero, q.dim(), axis).to(torch.float32)
    return out


@op("MatMulInteger")
def _matmul_integer(ctx, node, x):
    """``(A - a_zp) @ (B - b_zp)``; int32 in ONNX, kept in float here so gradients pass (exact
    while the sums stay below 2^24)."""
    x = list(x) + [None] * (4 - len(x))
    return [_shifted(x[0], x[2], -2) @ _shifted(x[1], x[3], -1)]


@op("ConvInteger")
def _conv_integer(ctx, node, x):
    x = list(x) + [None] * (4 - len(x))
    return conv(ctx, node, [_shifted(x[0], x[2], 1), _shifted(x[1], x[3], 0)])


@op("MatMulNBits", domain="com.microsoft")
def _matmul_nbits(ctx, node, x):
    weight = ctx.packed_weight(node)  # decoded [K, N], a buffer: the packing is not trained
    y = x[0] @ weight.to(device=x[0].device, dtype=x[0].dtype)
    bias = x[5] if len(x) > 5 else None
    return [y if bias is None else y + bias]


# -- quantized weights ----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class QuantSpec:
    """How an int initializer maps to the float weight it stands for."""

    scale: np.ndarray
    zero: np.ndarray | None
    axis: int
    dtype: ir.DataType

    def _view(self, a: np.ndarray, rank: int) -> np.ndarray:
        if a.ndim == 1 and rank > 1:
            shape = [1] * rank
            shape[self.axis % rank] = a.size
            return a.reshape(shape)
        return a

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        zero = 0 if self.zero is None else self._view(self.zero.astype(np.float64), q.ndim)
        w = (q.astype(np.float64) - zero) * self._view(self.scale.astype(np.float64), q.ndim)
        return w.astype(self.scale.dtype)

    def quantize(self, w: np.ndarray) -> np.ndarray:
        """The integers the trained shadow stands for: the forward pass's rounding, in numpy
        with the same float32 arithmetic so that write-back matches what was trained."""
        scale = self._view(self.scale, w.ndim)
        q = np.round(w.astype(scale.dtype) / scale)
        if self.zero is not None:
            q = q + self._view(self.zero, w.ndim).astype(q.dtype)
        lo, hi = _RANGES[torch_dtype(self.dtype)]
        return np.clip(q, lo, hi).astype(self.dtype.numpy())

    def key(self) -> tuple:
        """Equal for readers that agree on scale, zero point, axis and type."""
        zero = None if self.zero is None else (self.zero.dtype.str, self.zero.tobytes())
        return (self.scale.dtype.str, self.scale.tobytes(), zero, self.axis, self.dtype)

    def fake(self, w: Tensor) -> Tensor:
        scale = torch.tensor(self.scale, device=w.device)
        zero = None if self.zero is None else torch.tensor(self.zero, device=w.device)
        return fake_quantize(w, scale, zero, torch_dtype(self.dtype), self.axis)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def quantized_weights(graph: ir.Graph) -> dict[str, QuantSpec]:
    """Int initializers every reader of which dequantizes with constant scale and zero point
    (DequantizeLinear input 0, MatMulIntegerToFloat's B), keyed by initializer name."""
    specs: dict[str, QuantSpec] = {}
    for name, value in graph.initializers.items():
        if value.const_value is None or value.dtype not in _INT_IR or value.is_graph_input():
            continue
        found: dict[tuple | None, QuantSpec | None] = {}
        for use in value.uses():
            spec = _reader_spec(use.node, use.idx, value.dtype)
            found[None if spec is None else spec.key()] = spec
        if len(found) == 1 and None not in found:
            specs[name] = next(iter(found.values()))
    return specs


def _reader_spec(node: ir.Node, index: int, dtype: ir.DataType) -> QuantSpec | None:
    if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and index == 0:
        if attr(node, "block_size", 0):
            return None
        scale = _const(node.inputs[1])
        zero = _const(node.inputs[2]) if len(node.inputs) > 2 else None
        if scale is None or (zero is None and len(node.inputs) > 2 and node.inputs[2] is not None):
            return None
        return QuantSpec(scale, zero, attr(node, "axis", 1), dtype)
    if node.op_type == "MatMulIntegerToFloat" and node.domain == "com.microsoft" and index == 1:
        inputs = list(node.inputs) + [None] * 6
        scale, zero = _const(inputs[3]), _const(inputs[5])
        if scale is None or (zero is None and inputs[5] is not None):
            return None
        return QuantSpec(scale, zero, -1, dtype)
    return None

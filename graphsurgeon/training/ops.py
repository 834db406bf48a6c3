"""ONNX ops in torch: the table the bridge interprets a graph with.

An op is ``fn(ctx, node, inputs) -> list[Tensor]``: ``ctx`` is the :class:`GraphModule`
running it (``ctx.opset`` is the default-domain opset, so ops whose operands moved from
attributes to inputs across opsets read both forms), ``node`` the ``onnx_ir`` node and
``inputs`` its input tensors (None for an omitted optional input). Everything is written with
differentiable torch functions so gradients reach the weights; shape plumbing (Shape, Gather
on shapes, Concat of dims) runs eagerly on int64 tensors, as in onnxruntime.

NN ops (convolutions, pooling, norms) are in :mod:`graphsurgeon.training.ops_nn`, QDQ and packed
weights in :mod:`graphsurgeon.training.fake_quant`; :func:`register_op` adds or replaces ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
OpFn = Callable[[Any, ir.Node, list[Tensor | None]], list[Tensor]]
OPS: dict[tuple[str, str], OpFn] = {}

__all__ = ["OPS", "attr", "op", "register_op", "torch_dtype"]


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def register_op(domain: str, op_type: str, fn: OpFn) -> None:
    """Teach the bridge an op (or replace one): ``fn(ctx, node, inputs) -> list[Tensor]``."""
    OPS[(_domain(domain), op_type)] = fn


def lookup(node: ir.Node) -> OpFn | None:
    return OPS.get((_domain(node.domain), node.op_type))


def op(*op_types: str, domain: str = "") -> Callable[[OpFn], OpFn]:
    def wrap(fn: OpFn) -> OpFn:
        for op_type in op_types:
            register_op(domain, op_type, fn)
        return fn

    return wrap


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """An attribute's python value (tensors as numpy), or ``default``."""
    a = node.attributes.get(name)
    if a is None:
        return default
    value = a.value
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return value


_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT64: torch.int64,
    ir.DataType.BOOL: torch.bool,
}


def torch_dtype(dtype: int | ir.DataType) -> torch.dtype:
    dt = ir.DataType(dtype)
    if dt not in _DTYPES:
        from graphsurgeon.errors import GraphSurgeonError

        raise GraphSurgeonError(f"data type {dt.name} has no torch equivalent in the bridge")
    return _DTYPES[dt]


def ints(t: Tensor | None) -> list[int] | None:
    """A 1-D int tensor operand (shapes, axes) as a python list."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(node: ir.Node, inputs: list[Tensor | None], index: int, since: int, ctx: Any):
    """Axes given as input ``index`` from opset ``since`` on, else as the ``axes`` attribute."""
    if ctx.opset >= since:
        return ints(inputs[index]) if len(inputs) > index else None
    return attr(node, "axes")


# -- elementwise ------------------------------------------------------------------------------
def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda ctx, node, x: [fn(x[0], x[1])]


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda ctx, node, x: [fn(x[0])]


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # C semantics, as onnxruntime


for _name, _fn in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "MatMul": torch.matmul,
}.items():
    register_op("", _name, _binary(_fn))

for _name, _fn in {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Not": torch.logical_not,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "HardSwish": F.hardswish,
    "Mish": F.mish,
    "Identity": lambda x: x,
}.items():
    register_op("", _name, _unary(_fn))


@op("Pow")
def _pow(ctx, node, x):
    return [torch.pow(x[0], x[1]).to(x[0].dtype)]  # ONNX: the result has the base's type


@op("Mod")
def _mod(ctx, node, x):
    if attr(node, "fmod", 0):
        return [torch.fmod(x[0], x[1])]
    return [torch.remainder(x[0], x[1])]


@op("Gelu")
def _gelu(ctx, node, x):
    return [F.gelu(x[0], approximate=attr(node, "approximate", "none"))]


@op("LeakyRelu")
def _leaky(ctx, node, x):
    return [F.leaky_relu(x[0], attr(node, "alpha", 0.01))]


@op("Elu")
def _elu(ctx, node, x):
    return [F.elu(x[0], attr(node, "alpha", 1.0))]


@op("HardSigmoid")
def _hard_sigmoid(ctx, node, x):
    return [torch.clamp(attr(node, "alpha", 0.2) * x[0] + attr(node, "beta", 0.5), 0, 1)]


@op("PRelu")
def _prelu(ctx, node, x):
    return [torch.where(x[0] >= 0, x[0], x[0] * x[1])]


@op("Clip")
def _clip(ctx, node, x):
    if ctx.opset < 11:
        return [torch.clamp(x[0], attr(node, "min"), attr(node, "max"))]
    low = x[1] if len(x) > 1 else None
    high = x[2] if len(x) > 2 else None
    return [torch.clamp(x[0], low, high)]


@op("Where")
def _where(ctx, node, x):
    return [torch.where(x[0], x[1], x[2])]


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def run(ctx, node, x):
        out = x[0]
        for t in x[1:]:
            out = fn(out, t)
        return [out]

    return run


register_op("", "Sum", _variadic(torch.add))
register_op("", "Max", _variadic(torch.maximum))
register_op("", "Min", _variadic(torch.minimum))


@op("Mean")
def _mean(ctx, node, x):
    return [_variadic(torch.add)(ctx, node, x)[0] / len(x)]


@op("Dropout")
def _dropout(ctx, node, x):  # inference semantics, as the ONNX graph runs
    return [x[0], torch.ones_like(x[0], dtype=torch.bool)]


@op("Cast")
def _cast(ctx, node, x):
    return [x[0].to(torch_dtype(attr(node, "to")))]


@op("CastLike")
def _cast_like(ctx, node, x):
    return [x[0].to(x[1].dtype)]


# -- shapes -----------------------------------------------------------------------------------
@op("Shape")
def _shape(ctx, node, x):
    dims = list(x[0].shape)
    start, end = attr(node, "start", 0), attr(node, "end")
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@op("Size")
def _size(ctx, node, x):
    return [torch.tensor(x[0].numel(), dtype=torch.int64)]


@op("Reshape")
def _reshape(ctx, node, x):
    shape = ints(x[1]) if ctx.opset >= 5 else attr(node, "shape")
    if not attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x[0].reshape(shape)]


@op("Flatten")
def _flatten(ctx, node, x):
    axis = attr(node, "axis", 1)
    t = x[0]
    axis = axis + t.dim() if axis < 0 else axis
    return [t.reshape(math.prod(t.shape[:axis]), math.prod(t.shape[axis:]))]


@op("Transpose")
def _transpose(ctx, node, x):
    perm = attr(node, "perm") or list(reversed(range(x[0].dim())))
    return [x[0].permute(perm)]


@op("Concat")
def _concat(ctx, node, x):
    return [torch.cat([t for t in x if t is not None], dim=attr(node, "axis"))]


@op("Split")
def _split(ctx, node, x):
    axis = attr(node, "axis", 0)
    sizes = ints(x[1]) if ctx.opset >= 13 and len(x) > 1 else attr(node, "split")
    if sizes is None:
        n = len(node.outputs)
        dim = x[0].shape[axis]
        chunk = -(-dim // n)  # opset 18 num_outputs: the last chunk may be smaller
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    return list(torch.split(x[0], sizes, dim=axis))


@op("Slice")
def _slice(ctx, node, x):
    t = x[0]
    if ctx.opset >= 10:
        starts, ends = ints(x[1]), ints(x[2])
        axes = ints(x[3]) if len(x) > 3 else None
        steps = ints(x[4]) if len(x) > 4 else None
    else:
        starts, ends, axes, steps = (
            attr(node, "starts"),
            attr(node, "ends"),
            attr(node, "axes"),
            None,
        )
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = axis % t.dim()
        begin, stop, stride = slice(start, end, step).indices(t.shape[axis])
        if stride > 0:
            t = t[(slice(None),) * axis + (slice(begin, stop, stride),)]
        else:
            index = torch.arange(begin, stop, stride, dtype=torch.int64, device=t.device)
            t = t.index_select(axis, index)
    return [t]


@op("Gather")
def _gather(ctx, node, x):
    data, index = x[0], x[1].to(device=x[0].device, dtype=torch.int64)
    axis = attr(node, "axis", 0) % data.dim()
    index = torch.where(index < 0, index + data.shape[axis], index)
    out = data.index_select(axis, index.reshape(-1))
    return [out.reshape((*data.shape[:axis], *index.shape, *data.shape[axis + 1 :]))]


@op("GatherElements")
def _gather_elements(ctx, node, x):
    data, index = x[0], x[1].to(device=x[0].device, dtype=torch.int64)
    axis = attr(node, "axis", 0) % data.dim()
    index = torch.where(index < 0, index + data.shape[axis], index)
    return [torch.gather(data, axis, index)]


@op("Unsqueeze")
def _unsqueeze(ctx, node, x):
    axes = _axes(node, x, 1, 13, ctx)
    rank = x[0].dim() + len(axes)
    out = x[0]
    for axis in sorted(a % rank for a in axes):
        out = out.unsqueeze(axis)
    return [out]


@op("Squeeze")
def _squeeze(ctx, node, x):
    axes = _axes(node, x, 1, 13, ctx)
    if axes is None:
        return [x[0].squeeze()]
    return [x[0].squeeze(tuple(a % x[0].dim() for a in axes))]


@op("Expand")
def _expand(ctx, node, x):
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(ints(x[1])))
    return [x[0].expand(shape)]


@op("Tile")
def _tile(ctx, node, x):
    return [x[0].repeat(ints(x[1]))]


@op("ConstantOfShape")
def _constant_of_shape(ctx, node, x):
    value = attr(node, "value")
    fill = np.zeros(1, np.float32) if value is None else value
    return [torch.full(ints(x[0]), fill.reshape(-1)[0].item(), dtype=torch_dtype(_np_ir(fill)))]


@op("Range")
def _range(ctx, node, x):
    start, limit, delta = (t.item() for t in x[:3])
    return [torch.arange(start, limit, delta, dtype=x[0].dtype)]


@op("Constant")
def _constant(ctx, node, x):
    return [ctx.constant(node)]


def constant_value(node: ir.Node) -> np.ndarray:
    """The numpy value of a Constant node, whichever attribute holds it."""
    for name, dtype in (
        ("value", None),
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        value = attr(node, name)
        if value is not None:
            return np.asarray(value, dtype=dtype)
    from graphsurgeon.training.bridge import UnsupportedOpError

    raise UnsupportedOpError(node, "a Constant with a string or sparse value")


def _np_ir(array: np.ndarray) -> ir.DataType:
    return ir.DataType.from_numpy(array.dtype)


@op("Trilu")
def _trilu(ctx, node, x):
    k = int(x[1].item()) if len(x) > 1 and x[1] is not None else 0
    return [torch.triu(x[0], k) if attr(node, "upper", 1) else torch.tril(x[0], k)]


@op("CumSum")
def _cumsum(ctx, node, x):
    axis = int(x[1].item())
    t = x[0].flip(axis) if attr(node, "reverse", 0) else x[0]
    out = torch.cumsum(t, axis)
    if attr(node, "exclusive", 0):
        out = out - t
    return [out.flip(axis) if attr(node, "reverse", 0) else out]


@op("Pad")
def _pad(ctx, node, x):
    t = x[0]
    pads = ints(x[1]) if ctx.opset >= 11 else attr(node, "pads")
    value = x[2].item() if ctx.opset >= 11 and len(x) > 2 and x[2] is not None else 0.0
    if ctx.opset < 11:
        value = attr(node, "value", 0.0)
    axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(t.dim()))
    n = len(axes)
    full = [0] * (2 * t.dim())
    for i, axis in enumerate(axes):
        axis %= t.dim()
        full[axis], full[axis + t.dim()] = pads[i], pads[i + n]
    torch_pads: list[int] = []
    for axis in reversed(range(t.dim())):  # torch: last dim first, (begin, end) pairs
        torch_pads += [full[axis], full[axis + t.dim()]]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[
        attr(node, "mode", "constant")
    ]
    if mode == "constant":
        return [F.pad(t, torch_pads, value=value)]
    return [F.pad(t, torch_pads, mode=mode)]


@op("Einsum")
def _einsum(ctx, node, x):
    return [torch.einsum(attr(node, "equation"), *x)]


# -- reductions -------------------------------------------------------------------------------
def _reduce(fn: Callable[[Tensor, list[int], bool], Tensor], axes_input_since: int) -> OpFn:
    def run(ctx, node, x):
        t = x[0]
        axes = _axes(node, x, 1, axes_input_since, ctx)
        keep = bool(attr(node, "keepdims", 1))
        if not axes:
            if attr(node, "noop_with_empty_axes", 0):
                return [t]
            axes = list(range(t.dim()))
        return [fn(t, [a % max(t.dim(), 1) for a in axes], keep)]

    return run


_REDUCTIONS: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceMean": lambda t, a, k: t.mean(dim=a, keepdim=k),
    "ReduceSum": lambda t, a, k: t.sum(dim=a, keepdim=k),
    "ReduceMax": lambda t, a, k: t.amax(dim=a, keepdim=k),
    "ReduceMin": lambda t, a, k: t.amin(dim=a, keepdim=k),
    "ReduceProd": lambda t, a, k: _prod(t, a, k),
    "ReduceL1": lambda t, a, k: t.abs().sum(dim=a, keepdim=k),
    "ReduceL2": lambda t, a, k: t.square().sum(dim=a, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda t, a, k: t.square().sum(dim=a, keepdim=k),
    "ReduceLogSumExp": lambda t, a, k: torch.logsumexp(t, dim=a, keepdim=k),
}


def _prod(t: Tensor, axes: list[int], keep: bool) -> Tensor:
    for axis in sorted(axes, reverse=True):
        t = t.prod(dim=axis, keepdim=keep)
    return t


for _name, _fn in _REDUCTIONS.items():
    register_op("", _name, _reduce(_fn, 13 if _name == "ReduceSum" else 18))


def _arg(fn: Callable[..., Tensor]) -> OpFn:
    def run(ctx, node, x):
        t, axis = x[0], attr(node, "axis", 0)
        keep = bool(attr(node, "keepdims", 1))
        if attr(node, "select_last_index", 0):
            flipped = fn(t.flip(axis), dim=axis, keepdim=keep)
            return [t.shape[axis] - 1 - flipped]
        return [fn(t, dim=axis, keepdim=keep)]

    return run


register_op("", "ArgMax", _arg(torch.argmax))
register_op("", "ArgMin", _arg(torch.argmin))


# -- softmax ----------------------------------------------------------------------------------
def _softmax(fn: Callable[..., Tensor]) -> OpFn:
    def run(ctx, node, x):
        t = x[0]
        if ctx.opset >= 13:
            return [fn(t, dim=attr(node, "axis", -1))]
        axis = attr(node, "axis", 1) % t.dim()  # older opsets: coerced to 2-D at axis
        flat = t.reshape(math.prod(t.shape[:axis]), -1)
        return [fn(flat, dim=1).reshape(t.shape)]

    return run


register_op("", "Softmax", _softmax(torch.softmax))
register_op("", "LogSoftmax", _softmax(torch.log_softmax))

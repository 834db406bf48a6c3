"""How each op couples channels: one handler per op family, registered with ``_handles``.
A handler links the channels it can map and raises ``Unsafe`` (with the reason) otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphsurgeon.channel_deps.groups import (
    Occurrence,
    Unsafe,
    _Builder,
    _Coarsen,
    _coarsen,
    _handles,
)
from graphsurgeon.channel_deps.values import (
    _const,
    _dims,
    _ints_input_or_attr,
    _name,
    _operand_const,
    _rank,
    slice_bounds,
    split_sizes,
)


@_handles(
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Gelu",
    "Elu",
    "Selu",
    "Celu",
    "HardSigmoid",
    "HardSwish",
    "Softplus",
    "Softsign",
    "Mish",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
    "Log",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Sin",
    "Cos",
    "Identity",
    "Cast",
    "Dropout",
    "ThresholdedRelu",
)
def _unary(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    if index != 0:
        raise Unsafe(f"{node.op_type} ({_name(node)}): channels on input {index}")
    b.passthrough(node, occ)


@_handles("Clip")
def _clip(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    for bound in node.inputs[1:]:
        if bound is not None and (_const(bound) is None or _const(bound).size != 1):
            raise Unsafe(f"Clip ({_name(node)}) bounds are not constant scalars")
    _unary(b, node, side, index, occ)


# Elementwise ops with numpy broadcasting: channels line up across their inputs.
_ELEMENTWISE = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sum",
    "Max",
    "Min",
    "Mean",
    "Pow",
    "PRelu",
    "Where",
    "Equal",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "And",
    "Or",
    "Xor",
    "Mod",
)


@_handles(*_ELEMENTWISE)
def _elementwise(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    b.broadcast(node, side, index, occ, list(range(len(node.inputs))))


@_handles("BatchNormalization", "InstanceNormalization")
def _batchnorm(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    if index != 0:
        raise Unsafe(f"{node.op_type} ({_name(node)}): channels on a parameter input")
    if any(_const(v) is None for v in node.inputs[1:] if v is not None):
        raise Unsafe(f"{node.op_type} ({_name(node)}) parameters are not constant")
    if occ.axis != 1 and node.op_type == "InstanceNormalization":
        raise Unsafe(f"InstanceNormalization ({_name(node)}) normalizes over the axis")
    b.passthrough(node, occ)
    if occ.axis == 1 and all(n is not node for n, _ in b.group.batchnorms):
        b.group.batchnorms.append((node, b.visited[(node.inputs[0], 1)]))


@_handles("LayerNormalization")
def _layernorm(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    if index != 0:
        raise Unsafe(f"LayerNormalization ({_name(node)}): channels on a parameter input")
    rank = _rank(node.inputs[0])
    first = node.attributes.get_int("axis", -1) % rank
    if occ.axis >= first:
        if any(_const(v) is None for v in node.inputs[1:] if v is not None):
            raise Unsafe(f"LayerNormalization ({_name(node)}) scale/bias are not constant")
        b.group.values_kept = False  # statistics over fewer channels
    b.passthrough(node, occ)


@_handles("Softmax", "LogSoftmax", "Hardmax")
def _softmax(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    rank = _rank(node.inputs[0])
    axis = node.attributes.get_int("axis", -1 if b.opset >= 13 else 1) % rank
    if occ.axis == axis or (b.opset < 13 and occ.axis >= axis):
        raise Unsafe(f"{node.op_type} ({_name(node)}) normalizes over the channel axis")
    b.passthrough(node, occ)


@_handles("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
def _pool(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    if occ.axis != 1:
        raise Unsafe(f"{node.op_type} ({_name(node)}) pools over the channel axis")
    b.passthrough(node, occ)


@_handles(
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSumExp",
)
def _reduce(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    rank = _rank(node.inputs[0])
    axes = _ints_input_or_attr(node, 1, "axes")
    if not axes:
        raise Unsafe(f"{node.op_type} ({_name(node)}) reduces every axis")
    axes = sorted(a % rank for a in axes)
    keep = node.attributes.get_int("keepdims", 1)
    in_axis = occ.axis if side == "in" else None
    if side == "out":
        kept = [a for a in range(rank) if keep or a not in axes]
        in_axis = kept[occ.axis]
    if in_axis in axes:
        raise Unsafe(f"{node.op_type} ({_name(node)}) reduces over the channel axis")
    out_axis = in_axis if keep else in_axis - sum(a < in_axis for a in axes)
    b.link(node.inputs[0], in_axis, occ.units, occ.positions)
    b.link(node.outputs[0], out_axis, occ.units, occ.positions)


@_handles("Transpose")
def _transpose(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    rank = _rank(node.inputs[0])
    perm = list(node.attributes.get_ints("perm", list(range(rank))[::-1]))
    in_axis = occ.axis if side == "in" else perm[occ.axis]
    b.link(node.inputs[0], in_axis, occ.units, occ.positions)
    b.link(node.outputs[0], perm.index(in_axis), occ.units, occ.positions)


@_handles("Unsqueeze", "Squeeze")
def _squeeze(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    if index != 0:
        raise Unsafe(f"{node.op_type} ({_name(node)}): channels used as axes")
    in_rank, out_rank = _rank(node.inputs[0]), _rank(node.outputs[0])
    axes = _ints_input_or_attr(node, 1, "axes")
    if node.op_type == "Unsqueeze":
        added = sorted(a % out_rank for a in axes or [])
        kept = [a for a in range(out_rank) if a not in added]  # output axes of the input axes
    else:
        dims = _dims(node.inputs[0])
        removed = [a % in_rank for a in axes] if axes else [a for a, d in enumerate(dims) if d == 1]
        kept = [a for a in range(in_rank) if a not in removed]  # input axes kept, in order
    if node.op_type == "Unsqueeze":
        in_axis = occ.axis if side == "in" else kept.index(occ.axis)
        out_axis = kept[in_axis]
    else:
        in_axis = occ.axis if side == "in" else kept[occ.axis]
        if in_axis not in kept:
            raise Unsafe(f"Squeeze ({_name(node)}) removes the channel axis")
        out_axis = kept.index(in_axis)
    b.link(node.inputs[0], in_axis, occ.units, occ.positions)
    b.link(node.outputs[0], out_axis, occ.units, occ.positions)


@_handles("Reshape", "Flatten")
def _reshape(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    if index != 0:
        raise Unsafe(f"{node.op_type} ({_name(node)}): channels used as a shape")
    x, y = node.inputs[0], node.outputs[0]
    what = f"{node.op_type} ({_name(node)})"
    shape = _operand_const(node.inputs[1]) if node.op_type == "Reshape" else None
    if node.op_type == "Reshape" and shape is None:
        raise Unsafe(f"{what}: shape computed at runtime: run fix-shapes and fold-constants first")
    y_dims = _dims(y)
    if shape is not None and len(shape) == len(y_dims):  # what the constant itself proves
        x_dims = _dims(x)
        for i, entry in enumerate(shape.tolist()):
            if entry > 0:
                y_dims[i] = int(entry)
            elif entry == 0 and i < len(x_dims) and x_dims[i] is not None:
                y_dims[i] = x_dims[i]
    src, dst = (_dims(x), y_dims) if side == "in" else (y_dims, _dims(x))
    axis, positions = b.coarse_map(src, occ.axis, dst, occ, what)
    out_axis = axis if side == "in" else occ.axis
    if shape is not None:
        entry = int(shape[out_axis])
        if entry == 0 or (entry != -1 and entry != y_dims[out_axis]):
            raise Unsafe(f"{what}: shape entry {entry} for the channel axis cannot be rewritten")
    b.link(y if side == "in" else x, axis, occ.units, positions)


def _segments(node: ir.Node, sizes: list[int]) -> list[tuple[int, int]]:
    starts = np.cumsum([0, *sizes[:-1]])
    return [(int(s), int(s + n)) for s, n in zip(starts, sizes, strict=True)]


def _split_units(occ: Occurrence, lo: int, hi: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Units of ``occ`` inside ``[lo, hi)`` with positions relative to ``lo``."""
    inside = (occ.positions >= lo) & (occ.positions < hi)
    full, some = inside.all(axis=1), inside.any(axis=1)
    if (some & ~full).any():
        raise Unsafe(f"{what}: a channel block straddles a boundary")
    return occ.units[full], occ.positions[full] - lo


@_handles("Concat")
def _concat(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    rank = _rank(node.outputs[0])
    axis = node.attributes.get_int("axis", 0) % rank
    if occ.axis != axis:
        b.broadcast(node, side, index, occ, list(range(len(node.inputs))))
        return
    sizes = [_dims(v)[axis] for v in node.inputs]
    if any(s is None for s in sizes):
        raise Unsafe(f"Concat ({_name(node)}): input sizes on the axis unknown")
    segments = _segments(node, sizes)
    if side == "in":
        lo = segments[index][0]
        b.link(node.outputs[0], axis, occ.units, occ.positions + lo)
        return
    for value, (lo, hi) in zip(node.inputs, segments, strict=True):
        units, positions = _split_units(occ, lo, hi, f"Concat ({_name(node)})")
        if len(units) and _const(value) is not None:
            raise Unsafe(f"Concat ({_name(node)}) concatenates a constant on the channel axis")
        b.link(value, axis, units, positions)


@_handles("Split")
def _split(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    if side == "in" and index != 0:
        raise Unsafe(f"Split ({_name(node)}): channels used as sizes")
    rank = _rank(node.inputs[0])
    axis = node.attributes.get_int("axis", 0) % rank
    if occ.axis != axis:
        b.link(node.inputs[0], occ.axis, occ.units, occ.positions)
        for out in node.outputs:
            b.link(out, occ.axis, occ.units, occ.positions)
        return
    segments = _segments(node, split_sizes(node))
    if side == "out":
        lo = segments[index][0]
        b.link(node.inputs[0], axis, occ.units, occ.positions + lo)
        return
    for out, (lo, hi) in zip(node.outputs, segments, strict=True):
        units, positions = _split_units(occ, lo, hi, f"Split ({_name(node)})")
        b.link(out, axis, units, positions)


@_handles("Slice")
def _slice(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    if index != 0:
        raise Unsafe(f"Slice ({_name(node)}): channels used as bounds")
    bounds = slice_bounds(node, b.opset)
    x, y = node.inputs[0], node.outputs[0]
    if occ.axis not in bounds:
        b.link(x, occ.axis, occ.units, occ.positions)
        b.link(y, occ.axis, occ.units, occ.positions)
        return
    lo, hi = bounds[occ.axis]
    if side == "out":
        b.link(x, occ.axis, occ.units, occ.positions + lo)
        return
    units, positions = _split_units(occ, lo, hi, f"Slice ({_name(node)})")
    b.link(y, occ.axis, units, positions)


@_handles("Conv")
def _conv(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    weight = _operand_const(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if index != 0 or weight is None or (bias is not None and _operand_const(bias) is None):
        raise Unsafe(
            f"Conv ({_name(node)}): channels reach a weight, or the weight is not constant"
        )
    if occ.axis != 1:
        raise Unsafe(f"Conv ({_name(node)}) convolves over the channel axis")
    groups = node.attributes.get_int("group", 1)
    c_out, per_group = weight.shape[0], weight.shape[1]
    x, y = node.inputs[0], node.outputs[0]
    if groups > 1 and per_group == 1:  # depthwise: input c feeds outputs c*m .. c*m+m-1
        m = c_out // groups
        if side == "in":
            out = (occ.positions[:, :, None] * m + np.arange(m)).reshape(len(occ.units), -1)
            b.link(y, 1, occ.units, out)
        else:
            if not _whole_blocks(occ.positions, m):
                total = b.group.units
                for f in range(2, total + 1):
                    coarse = _coarsen(occ, f) if total % f == 0 else None
                    if coarse is not None and _whole_blocks(np.sort(coarse, axis=1), m):
                        raise _Coarsen(f)
                raise Unsafe(
                    f"depthwise Conv ({_name(node)}): channel blocks do not cover whole groups"
                )
            b.link(x, 1, occ.units, occ.positions[:, ::m] // m)
        (b.group.consumers if side == "in" else b.group.producers).append((node, occ))
        return
    if groups > 1:  # grouped: every unit must hit every group equally often
        per = per_group if side == "in" else c_out // groups
        counts = np.stack([np.bincount(p // per, minlength=groups) for p in occ.positions])
        if not (counts == counts[:, :1]).all():
            raise Unsafe(
                f"grouped Conv ({_name(node)}, group={groups}): removal would unbalance its groups"
            )
    (b.group.consumers if side == "in" else b.group.producers).append((node, occ))


def _whole_blocks(sorted_positions: np.ndarray, m: int) -> bool:
    """Each row is a union of whole blocks ``{c*m, ..., c*m+m-1}``."""
    n, k = sorted_positions.shape
    if k % m:
        return False
    r = sorted_positions.reshape(n, k // m, m)
    return bool((r == r[:, :, :1] + np.arange(m)).all() and (r[:, :, 0] % m == 0).all())


@_handles("ConvTranspose")
def _conv_transpose(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    weight = _operand_const(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if index != 0 or weight is None or (bias is not None and _operand_const(bias) is None):
        raise Unsafe(f"ConvTranspose ({_name(node)}): weight not constant")
    if node.attributes.get_int("group", 1) != 1:
        raise Unsafe(f"grouped ConvTranspose ({_name(node)})")
    if occ.axis != 1:
        raise Unsafe(f"ConvTranspose ({_name(node)}) convolves over the channel axis")
    (b.group.consumers if side == "in" else b.group.producers).append((node, occ))


@_handles("Gemm")
def _gemm(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    a, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if (
        _operand_const(w) is None
        or (c is not None and _operand_const(c) is None)
        or (side == "in" and index != 0)
    ):
        raise Unsafe(f"Gemm ({_name(node)}): B or C is not constant")
    k_axis = 0 if node.attributes.get_int("transA", 0) else 1
    if side == "in" and occ.axis == k_axis:
        b.group.consumers.append((node, occ))
    elif side == "out" and occ.axis == 1:
        b.group.producers.append((node, occ))
    else:  # the M (row) axis passes through
        b.link(a, 1 - k_axis, occ.units, occ.positions)
        b.link(node.outputs[0], 0, occ.units, occ.positions)


@_handles("MatMul")
def _matmul(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    a, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    ra, rb, ry = _rank(a), _rank(w), _rank(y)
    if ra < 2 or rb < 2:
        raise Unsafe(f"MatMul ({_name(node)}) with a 1-D operand")
    if _const(a) is not None:
        raise Unsafe(f"MatMul ({_name(node)}) with a constant left operand")
    w_const = _operand_const(w) is not None
    u, p = occ.units, occ.positions
    if side == "in" and index == 0:
        ax = occ.axis
        if ax == ra - 1:  # contracted
            if w_const:
                b.group.consumers.append((node, occ))
            else:
                b.link(w, rb - 2, u, p)
            return
        if ax == ra - 2:
            b.link(y, ry - 2, u, p)
            return
        out_axis = ax + ry - ra
    elif side == "in":
        ax = occ.axis
        if ax == rb - 2:
            b.link(a, ra - 1, u, p)
            return
        if ax == rb - 1:
            b.link(y, ry - 1, u, p)
            return
        out_axis = ax + ry - rb
    else:
        out_axis = occ.axis
        if out_axis == ry - 1:
            if w_const:
                b.group.producers.append((node, occ))
            else:
                b.link(w, rb - 1, u, p)
            return
        if out_axis == ry - 2:
            b.link(a, ra - 2, u, p)
            return
    # a batch axis (e.g. attention heads) couples both operands and the output
    size = _dims(y)[out_axis]
    for value, rank in ((a, ra), (w, rb)):
        axis = out_axis - (ry - rank)
        if axis < 0 or _dims(value)[axis] == 1:
            continue
        if _dims(value)[axis] != size:
            raise Unsafe(f"MatMul ({_name(node)}): batch axis size unknown")
        if _const(value) is None:
            b.link(value, axis, u, p)
    b.link(y, out_axis, u, p)


@_handles("Gather")
def _gather(b: _Builder, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
    data, idx = node.inputs[0], node.inputs[1]
    axis = node.attributes.get_int("axis", 0) % len(data.shape)
    if side == "in" or _const(data) is None or occ.axis < axis + _rank(idx):
        raise Unsafe(f"Gather ({_name(node)}) indexes along the channels")
    b.group.producers.append((node, occ))

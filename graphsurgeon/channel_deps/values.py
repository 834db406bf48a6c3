"""Reading constants, shapes and attributes of the IR, as the channel analysis needs them
(small constant subgraphs evaluated, dims refined through Reshape/Concat shape arithmetic).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class Unsafe(Exception):
    """The group cannot be proven safe to prune; ``str(self)`` says why."""


# -- small helpers ----------------------------------------------------------------------
def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _dims(value: ir.Value) -> list[int | None]:
    if value.shape is None:
        raise Unsafe(f"shape of {value.name!r} unknown (run shape inference)")
    return [d if isinstance(d, int) else None for d in value.shape]


def _rank(value: ir.Value) -> int:
    return len(_dims(value))


_SHAPE_OPS = frozenset(
    {
        "ConstantOfShape",
        "Mul",
        "Add",
        "Sub",
        "Div",
        "Equal",
        "Where",
        "Concat",
        "Unsqueeze",
        "Squeeze",
        "Cast",
        "Gather",
        "Reshape",
        "Slice",
        "Not",
        "Range",
        "Max",
        "Min",
    }
)


_BROADCAST_OPS = frozenset(
    {"Where", "Add", "Sub", "Mul", "Div", "And", "Or", "Not", "Equal", "Cast", "Greater", "Less"}
)


def _small_const(value: ir.Value | None, depth: int = 0, limit: int = 4096) -> np.ndarray | None:
    """The value of a small tensor computed from constants only (shape plumbing the folder
    keeps, such as ConstantOfShape), evaluated with ONNX's reference implementation."""
    array = _const(value)
    if array is not None or value is None or depth > 12:
        return array
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op_type == "Shape" and node.inputs[0] is not None and node.inputs[0].shape is not None:
        dims = [d if isinstance(d, int) else None for d in node.inputs[0].shape]
        if None in dims or node.attributes:
            return None
        return np.asarray(dims, dtype=np.int64)
    if node.op_type not in _SHAPE_OPS:
        return None
    inputs = [None if v is None else _small_const(v, depth + 1, limit) for v in node.inputs]
    if any(a is None for a, v in zip(inputs, node.inputs, strict=True) if v is not None):
        return None
    if any(a.size > limit for a in inputs if a is not None):
        return None
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    feeds = {v.name: a for v, a in zip(node.inputs, inputs, strict=True) if v is not None}
    opset = node.graph.opset_imports.get("", 13) if node.graph is not None else 13
    graph = helper.make_graph(
        [ir.serde.serialize_node(node)],
        "eval",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in feeds.items()
        ],
        [helper.make_empty_tensor_value_info(node.outputs[0].name)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])
    except Exception:  # whatever the reference cannot evaluate stays unknown
        return None


def constant_value(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant, also one computed from constants (for weight ranking)."""
    return _operand_const(value)


def _operand_const(value: ir.Value | None) -> np.ndarray | None:
    """A constant operand, also one computed from constants (``Unsqueeze(bn_scale)``)."""
    return _small_const(value, limit=1 << 22)


def _refined_dims(value: ir.Value, depth: int = 0) -> list[int | None]:
    """Static dims, also where shape inference gave up on a broadcast of shape plumbing
    (the attention mask ``Expand(mask, ConstantOfShape(...))`` of exported transformers)."""
    dims = _dims(value)
    node = value.producer()
    if None not in dims or node is None or depth > 8:
        return dims
    if node.op_type == "Expand":
        shape = _small_const(node.inputs[1])
        if shape is None:
            return dims
        parts = [_refined_dims(node.inputs[0], depth + 1), [int(d) for d in shape]]
    elif node.op_type in _BROADCAST_OPS:
        parts = [_refined_dims(v, depth + 1) for v in node.inputs if v is not None]
    else:
        return dims
    rank = max(len(p) for p in parts)
    if rank != len(dims):
        return dims
    out: list[int | None] = []
    for axis in range(rank):
        seen = [p[axis - rank + len(p)] for p in parts if axis - rank + len(p) >= 0]
        big = {d for d in seen if d is not None and d != 1}
        if len(big) > 1:
            return dims
        if big:
            out.append(big.pop())  # every operand is 1 or this size
        elif None in seen:
            out.append(dims[axis])
        else:
            out.append(1)
    return [d if d is not None else o for d, o in zip(dims, out, strict=True)]


def refine_shapes(model: ir.Model) -> bool:
    """Fill dims that shape inference left symbolic where :func:`_refined_dims` proves them
    (annotations only; run shape inference again to carry them downstream)."""
    changed = False
    for node in model.graph:
        if node.op_type != "Expand" and node.op_type not in _BROADCAST_OPS:
            continue
        for value in node.outputs:
            if value.shape is None or all(isinstance(d, int) for d in value.shape):
                continue
            try:
                dims = _refined_dims(value)
            except Unsafe:
                continue
            if None not in dims:
                value.shape = ir.Shape(dims)
                changed = True
    return changed


def _name(node: ir.Node) -> str:
    return node.name or node.op_type


def _ints_input_or_attr(node: ir.Node, index: int, attr: str) -> list[int] | None:
    """An int list given as input ``index`` (newer opsets) or attribute ``attr`` (older)."""
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = _const(node.inputs[index])
        if array is None:
            raise Unsafe(f"{node.op_type} {_name(node)}: {attr} computed at runtime")
        return [int(x) for x in array.reshape(-1)]
    a = node.attributes.get(attr)
    return None if a is None else [int(x) for x in a.as_ints()]


def output_weight_axis(node: ir.Node) -> int | None:
    """Axis of the layer's weight that indexes its output channels."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if op == "MatMul":
        return -1
    return None


def split_sizes(node: ir.Node) -> list[int]:
    rank = _rank(node.inputs[0])
    axis = node.attributes.get_int("axis", 0) % rank
    sizes = _ints_input_or_attr(node, 1, "split")
    if sizes is None:
        total = _dims(node.inputs[0])[axis]
        n = len(node.outputs)
        if total is None:
            raise Unsafe(f"Split ({_name(node)}) size unknown")
        chunk = -(-total // n)
        sizes = [min(chunk, total - i * chunk) for i in range(n)]
    return sizes


def slice_bounds(node: ir.Node, opset: int) -> dict[int, tuple[int, int]]:
    """Sliced axes -> clamped [start, end) (step 1 only)."""
    rank = _rank(node.inputs[0])
    dims = _dims(node.inputs[0])
    if opset >= 10:
        starts, ends = _ints_input_or_attr(node, 1, "starts"), _ints_input_or_attr(node, 2, "ends")
        axes = _ints_input_or_attr(node, 3, "axes")
        steps = _ints_input_or_attr(node, 4, "steps")
    else:
        starts, ends = (
            _ints_input_or_attr(node, 99, "starts"),
            _ints_input_or_attr(node, 99, "ends"),
        )
        axes, steps = _ints_input_or_attr(node, 99, "axes"), None
    if starts is None or ends is None:
        raise Unsafe(f"Slice ({_name(node)}) bounds unknown")
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    out: dict[int, tuple[int, int]] = {}
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        a %= rank
        if st != 1:
            raise Unsafe(f"Slice ({_name(node)}) with step {st}")
        d = dims[a]
        if d is None:
            raise Unsafe(f"Slice ({_name(node)}) axis size unknown")
        s = min(max(s + d if s < 0 else s, 0), d)
        e = min(max(e + d if e < 0 else e, 0), d)
        out[a] = (s, max(s, e))
    return out

"""Channel dependency graph: which channels of which tensors must be removed together.

Like Torch-Pruning's DepGraph, over the ONNX IR. A *group* starts from one layer's output
channels (Conv, ConvTranspose, Gemm, MatMul with a constant weight) and is closed under the
ops that tie channels of one tensor to channels of another: elementwise ops with broadcasting
(residual Add/Sum/Mul, activations, Clip, the Erf-Gelu chain, division by scalars), Concat with
offsets, Split and Slice, BatchNormalization and LayerNormalization, pooling, Transpose,
Squeeze/Unsqueeze, Reshape/Flatten where the mapping is proven from static shapes (the
attention head split ``[b,s,384] -> [b,s,12,32]`` and back), MatMul between activations (a
batch axis like the heads couples both operands, the contracted axis couples Q with K), and the
layers that read the channels (a consumer Conv/Gemm/MatMul loses the matching input rows).

Each tensor axis a group reaches is an :class:`Occurrence`: the group's *units* (a unit is
the smallest block removed at once: one channel, one attention head, one slice of a channel
shuffle) and, per unit, its positions on that axis. Every edge is symmetric, so a group is a
connected component and two groups never share a position.

Removing a set of units deletes their positions from every occurrence: weights, biases, BN/LN
parameters and broadcast constants are sliced; Reshape shapes, Split sizes and Slice bounds
are rewritten (:func:`remove_channels`). A group is *unsafe* when anything is not understood
(an unknown op, a graph input or output carrying the channels, a Reshape whose shape is
computed at runtime, a reduction over the channels): it is reported with the reason and never
touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

Key = tuple[ir.Value, int]
Removal = dict[Key, np.ndarray]  # (value, axis) -> sorted positions removed on that axis

__all__ = [
    "ChannelGroup",
    "Occurrence",
    "build_groups",
    "constant_value",
    "output_weight_axis",
    "refine_shapes",
    "remove_channels",
]


class Unsafe(Exception):
    """The group cannot be proven safe to prune; ``str(self)`` says why."""


class _Coarsen(Exception):
    """The group must be rebuilt with units ``factor`` times larger (e.g. whole heads)."""

    def __init__(self, factor: int) -> None:
        super().__init__(factor)
        self.factor = factor


@dataclass
class Occurrence:
    value: ir.Value
    axis: int
    units: np.ndarray  # [n] group units present on this axis
    positions: np.ndarray  # [n, k] their positions on the axis

    def same(self, other: Occurrence) -> bool:
        return np.array_equal(self.units, other.units) and np.array_equal(
            self.positions, other.positions
        )


@dataclass
class ChannelGroup:
    leader: ir.Node  # the layer whose output channels seeded the group
    units: int
    occurrences: list[Occurrence] = field(default_factory=list)
    producers: list[tuple[ir.Node, Occurrence]] = field(default_factory=list)
    consumers: list[tuple[ir.Node, Occurrence]] = field(default_factory=list)
    batchnorms: list[tuple[ir.Node, Occurrence]] = field(default_factory=list)
    #: Removing a unit leaves the kept channels' values unchanged (False after a LayerNorm
    #: over the channels: its mean and variance then run over fewer channels).
    values_kept: bool = True
    unsafe: str | None = None

    @property
    def channels(self) -> int:
        """Channels of the leader's output (units times their width there)."""
        for node, occ in self.producers:
            if node is self.leader:
                return int(occ.positions.size)
        return self.units

    def removal(self, units: Iterable[int]) -> Removal:
        """Positions to delete on every occurrence when ``units`` are removed."""
        chosen = np.asarray(sorted(set(int(u) for u in units)), dtype=np.int64)
        out: Removal = {}
        for occ in self.occurrences:
            rows = np.isin(occ.units, chosen)
            if rows.any():
                out[(occ.value, occ.axis)] = np.unique(occ.positions[rows].ravel())
        return out


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


def _seed(node: ir.Node) -> tuple[ir.Value, int, np.ndarray] | None:
    """Output value, channel axis and base positions [units, k] of a prunable layer."""
    if node.domain not in ("", "ai.onnx") or not node.outputs:
        return None
    op, out = node.op_type, node.outputs[0]
    weight = _operand_const(node.inputs[1]) if len(node.inputs) > 1 else None
    if (
        weight is None
        or out.shape is None
        or (node.inputs[0] is not None and _const(node.inputs[0]) is not None)
    ):
        return None
    if op == "Conv" and weight.ndim >= 3:
        c, g = weight.shape[0], node.attributes.get_int("group", 1)
        if g > 1 and weight.shape[1] > 1:  # grouped: one unit = the same index in every group
            return out, 1, np.arange(c).reshape(g, c // g).T
        return out, 1, np.arange(c)[:, None]
    if op == "ConvTranspose" and weight.ndim >= 3 and node.attributes.get_int("group", 1) == 1:
        return out, 1, np.arange(weight.shape[1])[:, None]
    if op == "Gemm" and weight.ndim == 2:
        n = weight.shape[0] if node.attributes.get_int("transB", 0) else weight.shape[1]
        return out, 1, np.arange(n)[:, None]
    if op == "MatMul" and weight.ndim >= 2:
        return out, len(out.shape) - 1, np.arange(weight.shape[-1])[:, None]
    return None


# -- building groups ----------------------------------------------------------------------
def build_groups(model: ir.Model) -> list[ChannelGroup]:
    """One group per set of coupled layer output channels, in graph order.

    Unsafe groups are returned too, with ``unsafe`` set to the reason and the occurrences found
    before the problem showed up.
    """
    groups: list[ChannelGroup] = []
    covered: set[Key] = set()
    for node in model.graph:
        seed = _seed(node)
        if seed is None or (seed[0], seed[1]) in covered or seed[2].size <= 1:
            continue
        group = _build(model, node, seed)
        covered.update((o.value, o.axis) for o in group.occurrences)
        covered.add((seed[0], seed[1]))
        groups.append(group)
    _check_disjoint(groups)
    return groups


def _build(
    model: ir.Model, leader: ir.Node, seed: tuple[ir.Value, int, np.ndarray]
) -> ChannelGroup:
    value, axis, base = seed
    factor = 1
    while True:
        units = base.shape[0] // factor
        builder = _Builder(model, ChannelGroup(leader, units))
        try:
            builder.link(value, axis, np.arange(units), base.reshape(units, -1))
            builder.run()
        except _Coarsen as c:
            if base.shape[0] % (factor * c.factor):
                builder.group.unsafe = "no channel block size fits every reshape"
                return builder.group
            factor *= c.factor
            continue
        except Unsafe as e:
            builder.group.unsafe = str(e)
        return builder.group


def _check_disjoint(groups: list[ChannelGroup]) -> None:
    """Safety net: two groups sharing a position would be pruned inconsistently."""
    seen: dict[Key, tuple[ChannelGroup, set[int]]] = {}
    for group in groups:
        for occ in group.occurrences:
            key = (occ.value, occ.axis)
            mine = set(occ.positions.ravel().tolist())
            if key in seen and seen[key][0] is not group and seen[key][1] & mine:
                reason = f"shares channels of {occ.value.name!r} with another group"
                group.unsafe = group.unsafe or reason
                seen[key][0].unsafe = seen[key][0].unsafe or reason
            elif key in seen:
                seen[key][1].update(mine)
            else:
                seen[key] = (group, mine)


class _Builder:
    def __init__(self, model: ir.Model, group: ChannelGroup) -> None:
        self.model = model
        self.group = group
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.visited: dict[Key, Occurrence] = {}
        self.axis_of: dict[ir.Value, int] = {}
        self.queue: list[Occurrence] = []
        self.done: set[tuple[ir.Node, str, int, int]] = set()

    # -- traversal --------------------------------------------------------------------
    def link(self, value: ir.Value, axis: int, units: np.ndarray, positions: np.ndarray) -> None:
        """``value``'s axis carries these units at these positions."""
        if len(units) == 0:
            return
        rank = _rank(value)
        axis = axis % rank
        units = np.asarray(units, dtype=np.int64)
        order = np.argsort(units, kind="stable")
        positions = np.asarray(positions, dtype=np.int64).reshape(len(units), -1)
        occ = Occurrence(value, axis, units[order], np.sort(positions[order], axis=1))
        key = (value, axis)
        if key in self.visited:
            old = self.visited[key]
            merged = _merge(old, occ)
            if merged is None:
                raise Unsafe(f"channels reach {value.name!r} through two different mappings")
            if merged is old:
                return
            # more units of the group on this tensor (seen partly through a Split or Concat)
            self.group.occurrences[self.group.occurrences.index(old)] = merged
            self.visited[key] = merged
            self.queue.append(merged)
            return
        if value in self.axis_of:
            raise Unsafe(f"channels land on two axes of {value.name!r}")
        if value.is_graph_output():
            raise Unsafe(f"channels reach graph output {value.name!r}")
        if value.is_graph_input() or value.is_initializer() or value.producer() is None:
            raise Unsafe(f"channels come from graph input {value.name!r}")
        size = _dims(value)[axis]
        if size is None:
            raise Unsafe(f"channel axis {axis} of {value.name!r} has no static size")
        if occ.positions.size and (occ.positions.min() < 0 or occ.positions.max() >= size):
            raise Unsafe(f"channel mapping out of range at {value.name!r}")
        self.visited[key] = occ
        self.axis_of[value] = axis
        self.group.occurrences.append(occ)
        self.queue.append(occ)

    def run(self) -> None:
        while self.queue:
            occ = self.queue.pop(0)
            producer = occ.value.producer()
            if producer is not None:
                self._handle(producer, "out", list(producer.outputs).index(occ.value), occ)
            for use in occ.value.uses():
                self._handle(use.node, "in", use.idx, occ)
        group = self.group
        for roles in (group.producers, group.consumers, group.batchnorms):
            latest = {n: self.visited[(o.value, o.axis)] for n, o in roles}
            roles[:] = list(latest.items())

    def _handle(self, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
        marker = (node, side, index, occ.axis, len(occ.units))
        if marker in self.done:
            return
        self.done.add(marker)
        if node.graph is not self.model.graph:
            raise Unsafe(f"channels of {occ.value.name!r} are read inside a subgraph")
        if node.domain not in ("", "ai.onnx"):
            raise Unsafe(
                f"custom op {node.domain}::{node.op_type} ({_name(node)}) reads the channels"
            )
        handler = _HANDLERS.get(node.op_type)
        if handler is None:
            raise Unsafe(f"{node.op_type} ({_name(node)}) reads the channels; not understood")
        handler(self, node, side, index, occ)

    # -- shared mappings --------------------------------------------------------------
    def passthrough(self, node: ir.Node, occ: Occurrence) -> None:
        """Input 0 and output 0 have the same channels on the same axis."""
        extra = [o for o in node.outputs[1:] if o.uses() or o.is_graph_output()]
        if extra:
            raise Unsafe(f"{node.op_type} ({_name(node)}) has a used second output")
        self.link(node.inputs[0], occ.axis, occ.units, occ.positions)
        self.link(node.outputs[0], occ.axis, occ.units, occ.positions)

    def broadcast(
        self, node: ir.Node, side: str, index: int, occ: Occurrence, inputs: list[int]
    ) -> None:
        """Elementwise with numpy broadcasting over ``inputs``: every full-size operand couples;
        constants of full size are sliced; size-1 and missing axes broadcast."""
        out = node.outputs[0]
        out_rank = _rank(out)
        out_axis = occ.axis + (out_rank - _rank(occ.value)) if side == "in" else occ.axis
        size = _dims(out)[out_axis]
        for i in inputs:
            value = node.inputs[i]
            if value is None:
                continue
            rank = _rank(value)
            axis = out_axis - (out_rank - rank)
            if axis < 0:
                continue
            dim = _refined_dims(value)[axis]
            if dim == 1:
                continue
            if dim != size:
                raise Unsafe(
                    f"{node.op_type} ({_name(node)}): operand {value.name!r} size unknown on the channel axis"
                )
            if _operand_const(value) is None:
                self.link(value, axis, occ.units, occ.positions)
        self.link(out, out_axis, occ.units, occ.positions)

    def coarse_map(
        self, src: list[int | None], axis: int, dst: list[int | None], occ: Occurrence, what: str
    ) -> tuple[int, np.ndarray]:
        """Map positions on ``src[axis]`` through a row-major reshape to one axis of ``dst``.

        A unit maps only if its elements fill whole slabs of a single ``dst`` axis; otherwise
        the group is rebuilt with coarser units (``_Coarsen``) if some block size works.
        """
        found = _reshape_map(src, axis, dst, occ.positions)
        if found is not None:
            return found
        total = self.group.units
        for f in range(2, total + 1):
            if total % f:
                continue
            coarse = _coarsen(occ, f)
            if coarse is not None and _reshape_map(src, axis, dst, coarse) is not None:
                raise _Coarsen(f)
        raise Unsafe(f"{what}: channels cannot be followed through the reshape {src} -> {dst}")


def _merge(old: Occurrence, new: Occurrence) -> Occurrence | None:
    """``old`` extended by ``new``'s units; ``old`` itself if nothing is new; None if the two
    place a unit differently."""
    if old.positions.shape[1] != new.positions.shape[1]:
        return None
    where = {int(u): i for i, u in enumerate(old.units)}
    for u, row in zip(new.units.tolist(), new.positions, strict=True):
        if u in where and not np.array_equal(old.positions[where[u]], row):
            return None
    extra = ~np.isin(new.units, old.units)
    if not extra.any():
        return old
    units = np.concatenate([old.units, new.units[extra]])
    positions = np.concatenate([old.positions, new.positions[extra]])
    order = np.argsort(units, kind="stable")
    merged = Occurrence(old.value, old.axis, units[order], positions[order])
    if len(np.unique(merged.positions)) != merged.positions.size:
        return None
    return merged


def _coarsen(occ: Occurrence, f: int) -> np.ndarray | None:
    order = np.argsort(occ.units, kind="stable")
    units, positions = occ.units[order], occ.positions[order]
    if len(units) % f or not np.array_equal(
        units.reshape(-1, f) // f, np.repeat((units[::f] // f)[:, None], f, 1)
    ):
        return None
    return positions.reshape(len(units) // f, -1)


def _reshape_map(
    src: list[int | None], axis: int, dst: list[int | None], positions: np.ndarray
) -> tuple[int, np.ndarray] | None:
    tail = src[axis:]
    if any(d is None for d in tail):
        raise Unsafe(f"reshape {src} -> {dst}: dims after the channel axis are not static")
    inner = math.prod(src[axis + 1 :])
    total = math.prod(tail)
    start = None
    for j in range(len(dst) - 1, -1, -1):
        if any(d is None for d in dst[j:]):
            break
        if math.prod(dst[j:]) == total:
            start = j  # keep the smallest j: leading 1s still belong to the tail
        elif math.prod(dst[j:]) > total:
            break
    if start is None:
        return None
    tail_dst = [int(d) for d in dst[start:]]
    n = positions.shape[0]
    flat = (positions[:, :, None] * inner + np.arange(inner)).reshape(n, -1)
    coords = np.unravel_index(flat, tail_dst)
    for m, size in enumerate(tail_dst):
        rest = total // size
        ordered = np.sort(coords[m], axis=1)
        new = np.ones(ordered.shape, dtype=bool)
        new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        counts = new.sum(axis=1)
        if (counts * rest == flat.shape[1]).all() and (counts == counts[0]).all():
            return start + m, ordered[new].reshape(n, int(counts[0]))
    return None


# -- op handlers: (builder, node, side "in"/"out", port index, occurrence) ----------------
Handler = Callable[[_Builder, ir.Node, str, int, Occurrence], None]
_HANDLERS: dict[str, Handler] = {}


def _handles(*ops: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return register


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


# -- removing channels ----------------------------------------------------------------
def remove_channels(model: ir.Model, removal: Removal) -> None:
    """Delete the positions in ``removal`` from every tensor and parameter that holds them."""
    removal = {k: v for k, v in removal.items() if len(v)}
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    touched: dict[ir.Node, None] = {}
    for value, _ in removal:
        if value.producer() is not None:
            touched[value.producer()] = None
        for use in value.uses():
            touched[use.node] = None
    editor = _Editor(model, removal, opset)
    for node in list(model.graph):
        if node in touched:
            editor.edit(node)
    for (value, axis), removed in removal.items():
        dims = list(value.shape)
        dims[axis] = int(dims[axis]) - len(removed)
        value.shape = ir.Shape(dims)


class _Editor:
    def __init__(self, model: ir.Model, removal: Removal, opset: int) -> None:
        self.model, self.removal, self.opset = model, removal, opset

    def rem(self, value: ir.Value | None, axis: int) -> np.ndarray | None:
        if value is None or value.shape is None:
            return None
        return self.removal.get((value, axis % len(value.shape)))

    def replace_const(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Give input ``index`` of ``node`` a new constant value (copy-on-write if shared)."""
        value = node.inputs[index]
        graph = self.model.graph
        if (
            value.is_initializer()
            and len(value.uses()) == 1
            and not value.is_graph_input()
            and not value.is_graph_output()
        ):
            value.const_value = ir.tensor(array, name=value.name)
            value.shape = ir.Shape(array.shape)
            return
        base = value.name or f"{node.op_type.lower()}_const"
        name, n = f"{base}_pruned", 1
        while name in graph.initializers:
            n += 1
            name = f"{base}_pruned{n}"
        new = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        graph.register_initializer(new)
        node.replace_input_with(index, new)
        _drop_dead_producers(graph, value)

    def slice_const(
        self, node: ir.Node, index: int, cuts: list[tuple[int, np.ndarray | None]]
    ) -> None:
        value = node.inputs[index] if index < len(node.inputs) else None
        array = _operand_const(value)
        if array is None:
            return
        changed = False
        for axis, removed in cuts:
            if removed is not None and len(removed) and array.ndim and array.shape[axis] > 1:
                array = np.delete(array, removed, axis=axis)
                changed = True
        if changed:
            self.replace_const(node, index, np.ascontiguousarray(array))

    def edit(self, node: ir.Node) -> None:
        method = getattr(self, f"_edit_{node.op_type.lower()}", None)
        if method is not None:
            method(node)
        elif node.op_type in _BROADCAST_EDITS:
            self._broadcast_consts(node)

    def _broadcast_consts(self, node: ir.Node) -> None:
        out = node.outputs[0]
        out_rank = len(out.shape)
        for i, value in enumerate(node.inputs):
            array = _operand_const(value)
            if array is None:
                continue
            shift = out_rank - array.ndim
            self.slice_const(node, i, [(a, self.rem(out, a + shift)) for a in range(array.ndim)])

    def _edit_conv(self, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rem_in, rem_out = self.rem(x, 1), self.rem(y, 1)
        weight = _operand_const(node.inputs[1])
        groups = node.attributes.get_int("group", 1)
        per_group = weight.shape[1]
        if groups > 1 and per_group == 1:
            new_groups = groups - (0 if rem_in is None else len(rem_in))
            node.attributes["group"] = ir.AttrInt64("group", new_groups)
            self.slice_const(node, 1, [(0, rem_out)])
        elif groups > 1:
            c_out = weight.shape[0]
            co = c_out // groups
            keep_out = np.setdiff1d(np.arange(c_out), rem_out if rem_out is not None else [])
            removed_in = set() if rem_in is None else set(rem_in.tolist())
            rows = []
            for g in range(groups):
                local = [i for i in range(per_group) if g * per_group + i not in removed_in]
                mine = keep_out[(keep_out >= g * co) & (keep_out < (g + 1) * co)]
                rows.append(weight[mine][:, local])
            self.replace_const(node, 1, np.ascontiguousarray(np.concatenate(rows)))
        else:
            self.slice_const(node, 1, [(0, rem_out), (1, rem_in)])
        if len(node.inputs) > 2:
            self.slice_const(node, 2, [(0, rem_out)])

    def _edit_convtranspose(self, node: ir.Node) -> None:
        rem_in, rem_out = self.rem(node.inputs[0], 1), self.rem(node.outputs[0], 1)
        self.slice_const(node, 1, [(0, rem_in), (1, rem_out)])
        if len(node.inputs) > 2:
            self.slice_const(node, 2, [(0, rem_out)])

    def _edit_gemm(self, node: ir.Node) -> None:
        trans_a, trans_b = (
            node.attributes.get_int("transA", 0),
            node.attributes.get_int("transB", 0),
        )
        rem_k = self.rem(node.inputs[0], 0 if trans_a else 1)
        rem_n, rem_m = self.rem(node.outputs[0], 1), self.rem(node.outputs[0], 0)
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        self.slice_const(node, 1, [(k_axis, rem_k), (n_axis, rem_n)])
        c = _operand_const(node.inputs[2]) if len(node.inputs) > 2 else None
        if c is not None and c.ndim == 1:
            self.slice_const(node, 2, [(0, rem_n)])
        elif c is not None and c.ndim == 2:
            self.slice_const(node, 2, [(0, rem_m), (1, rem_n)])

    def _edit_matmul(self, node: ir.Node) -> None:
        a, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        weight = _operand_const(w)
        if weight is None:
            return
        rb, ry = weight.ndim, len(y.shape)
        cuts = [(rb - 2, self.rem(a, -1)), (rb - 1, self.rem(y, -1))]
        cuts += [(ax, self.rem(y, ax + ry - rb)) for ax in range(rb - 2)]
        self.slice_const(node, 1, cuts)

    def _edit_batchnormalization(self, node: ir.Node) -> None:
        removed = self.rem(node.inputs[0], 1)
        for i in range(1, len(node.inputs)):
            self.slice_const(node, i, [(0, removed)])

    _edit_instancenormalization = _edit_batchnormalization

    def _edit_layernormalization(self, node: ir.Node) -> None:
        x = node.inputs[0]
        rank = len(x.shape)
        for i in (1, 2):
            array = _const(node.inputs[i]) if len(node.inputs) > i else None
            if array is None:
                continue
            shift = rank - array.ndim
            self.slice_const(node, i, [(a, self.rem(x, a + shift)) for a in range(array.ndim)])

    def _edit_reshape(self, node: ir.Node) -> None:
        shape = _operand_const(node.inputs[1]).copy()
        y = node.outputs[0]
        changed = False
        for axis, entry in enumerate(shape.tolist()):
            removed = self.rem(y, axis)
            if removed is not None and entry != -1:
                shape[axis] = int(y.shape[axis]) - len(removed)
                changed = True
        if changed:
            self.replace_const(node, 1, shape)

    def _edit_split(self, node: ir.Node) -> None:
        rank = len(node.inputs[0].shape)
        axis = node.attributes.get_int("axis", 0) % rank
        removed = self.rem(node.inputs[0], axis)
        if removed is None:
            return
        sizes = split_sizes(node)
        new = [
            hi - lo - int(((removed >= lo) & (removed < hi)).sum())
            for lo, hi in _segments(node, sizes)
        ]
        if self.opset >= 13:
            node.attributes.pop("num_outputs", None)
            array = np.asarray(new, dtype=np.int64)
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                self.replace_const(node, 1, array)
            else:
                node.resize_inputs(2)
                self._set_new_input(node, 1, array)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", new)

    def _edit_slice(self, node: ir.Node) -> None:
        bounds = slice_bounds(node, self.opset)
        x = node.inputs[0]
        new_bounds = {}
        for axis, (lo, hi) in bounds.items():
            removed = self.rem(x, axis)
            if removed is not None:
                new_bounds[axis] = (lo - int((removed < lo).sum()), hi - int((removed < hi).sum()))
        if not new_bounds:
            return
        rank = len(x.shape)
        if self.opset >= 10:
            axes = _ints_input_or_attr(node, 3, "axes") or list(range(len(bounds)))
            starts = _ints_input_or_attr(node, 1, "starts")
            ends = _ints_input_or_attr(node, 2, "ends")
            for i, a in enumerate(axes):
                if a % rank in new_bounds:
                    starts[i], ends[i] = new_bounds[a % rank]
            self.replace_const(
                node, 1, np.asarray(starts, dtype=_operand_const(node.inputs[1]).dtype)
            )
            self.replace_const(
                node, 2, np.asarray(ends, dtype=_operand_const(node.inputs[2]).dtype)
            )
        else:
            axes = _ints_input_or_attr(node, 99, "axes") or list(range(len(bounds)))
            starts = _ints_input_or_attr(node, 99, "starts")
            ends = _ints_input_or_attr(node, 99, "ends")
            for i, a in enumerate(axes):
                if a % rank in new_bounds:
                    starts[i], ends[i] = new_bounds[a % rank]
            node.attributes["starts"] = ir.AttrInt64s("starts", starts)
            node.attributes["ends"] = ir.AttrInt64s("ends", ends)

    def _edit_gather(self, node: ir.Node) -> None:
        data, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
        axis = node.attributes.get_int("axis", 0) % len(data.shape)
        shift = len(idx.shape) - 1
        cuts = [(a, self.rem(y, a + shift)) for a in range(axis + 1, len(data.shape))]
        self.slice_const(node, 0, cuts)

    def _edit_concat(self, node: ir.Node) -> None:
        out = node.outputs[0]
        rank = len(out.shape)
        axis = node.attributes.get_int("axis", 0) % rank
        for i, value in enumerate(node.inputs):
            if _const(value) is not None:
                cuts = [(a, self.rem(out, a)) for a in range(rank) if a != axis]
                self.slice_const(node, i, cuts)

    def _set_new_input(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        graph = self.model.graph
        base = f"{node.name or node.op_type.lower()}_split"
        name, n = base, 1
        while name in graph.initializers:
            n += 1
            name = f"{base}{n}"
        new = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.INT64),
            const_value=ir.tensor(array, name=name),
        )
        graph.register_initializer(new)
        node.replace_input_with(index, new)


def _drop_dead_producers(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the constant plumbing that computed ``value`` once nothing reads it."""
    stack = [value]
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None or any(o.uses() or o.is_graph_output() for o in node.outputs):
            if v.is_initializer() and not v.uses() and not v.is_graph_input():
                del graph.initializers[v.name]
            continue
        inputs = [i for i in node.inputs if i is not None]
        graph.remove(node, safe=True)
        stack.extend(inputs)


_BROADCAST_EDITS = frozenset(_ELEMENTWISE)

"""Removing a group's units: slice weights, biases, norm parameters and broadcast constants,
and rewrite Reshape shapes, Split sizes and Slice bounds (``remove_channels``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphsurgeon.channel_deps.groups import Removal
from graphsurgeon.channel_deps.handlers import _ELEMENTWISE, _segments
from graphsurgeon.channel_deps.values import (
    _const,
    _ints_input_or_attr,
    _operand_const,
    slice_bounds,
    split_sizes,
)


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

"""``cast-precision``: store layer weights in float16 or bfloat16, halving their bytes.

The weight is stored in the narrow type and a ``Cast`` back to float32 sits in front of the
layer, so the compute stays float32 ("fp32 islands" everywhere). ``compute: true`` instead
runs the layer itself in float16 (activations Cast in, the output Cast back), for devices
with fp16 units. Why storage is the default: ORT's
CPU provider has float16 kernels for few ops (no x86 fp16 Conv/Gemm, no bf16 MatMul), so a
float16 graph would be Cast back and forth around nearly every layer anyway, adding rounding of
the activations for no speed. Storing narrow and computing wide runs in stock ORT on any CPU,
keeps the activations exact, and ORT's constant folding turns the Casts into float32
initializers at load time. Rounding a weight to fp16 changes it by at most 2^-11 relative
(bf16: 2^-8).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
from graphsurgeon.passes._lowbit import unique_name

from graphsurgeon.layers import find_layers
from graphsurgeon.options import Choice, LayerPassOptions, option
from graphsurgeon.packed import DECODED_WEIGHT_KEY
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register

_TYPES = {
    "float16": (ir.DataType.FLOAT16, np.float16, float(np.finfo(np.float16).max), 6),
    "bfloat16": (
        ir.DataType.BFLOAT16,
        ml_dtypes.bfloat16,
        float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
        13,
    ),
}


class CastPrecisionOptions(LayerPassOptions):
    dtype: Literal["float16", "bfloat16"] = option(
        "float16",
        "Storage type of the weights: float16 (10-bit mantissa, range +-65504) or bfloat16 "
        "(7-bit mantissa, float32's range).",
        Choice(["float16", "bfloat16"]),
    )
    biases: bool = option(True, "Also store biases (Conv/Gemm input C) in the narrow type.")
    compute: bool = option(
        False,
        "Also compute the layer in float16: its activation input is Cast to float16 and its "
        "output back to float32 (Conv, ConvTranspose, Gemm, MatMul; float16 only). For GPUs "
        "and CPUs with fp16 units; on others onnxruntime may run it through float32 anyway.",
        Choice([False, True]),
    )


@register
class CastPrecision(GSPass):
    """Store each selected layer's float32 weight (and bias) as float16/bfloat16 + ``Cast``.

    Cases: any layer whose weight is a float32 initializer read by that node alone: Conv,
    ConvTranspose, Gemm, MatMul, recurrent layers, embeddings (Gather). Per-layer overrides
    give each layer its own type. Refused: weights already packed or shared, graph inputs,
    float16 weights outside float16's range (they would become inf), bfloat16 below opset 13.
    """

    name = "cast-precision"
    kind = "lossy"
    Options = CastPrecisionOptions
    strength_option: ClassVar[str | None] = None  # sensitivity: one trial per layer

    def call(self, model: ir.Model) -> PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        modified = False
        summary: dict[str, str] = {}
        for layer in find_layers(model):
            if not self.selects(layer.node):
                continue
            opts = self.options_for(layer.id)
            assert isinstance(opts, CastPrecisionOptions)
            dtype, np_type, limit, min_opset = _TYPES[opts.dtype]
            if opset < min_opset:
                self.skip(layer.node, f"Cast from {opts.dtype} needs opset >= {min_opset}")
                continue
            reason = _refusal(layer.weight_value, limit)
            if reason is not None:
                self.skip(layer.node, reason)
                continue
            if opts.compute:
                reason = _compute_refusal(layer, opts.dtype)
                if reason is not None:
                    self.skip(layer.node, reason)
                    continue
            indices = [layer.weight_index]
            bias = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}.get(layer.op_type)
            if (
                opts.biases
                and bias is not None
                and len(layer.node.inputs) > bias
                and _refusal(layer.node.inputs[bias], limit) is None
            ):
                indices.append(bias)
            if opts.compute:
                _compute_narrow(layer.node, indices, dtype, np_type)
                summary[layer.id] = f"{opts.dtype} compute"
            else:
                for index in indices:
                    _store_narrow(layer.node, index, dtype, np_type)
                summary[layer.id] = opts.dtype
            modified = True
        self.note("cast", summary)
        return PassResult(model, modified)


def _refusal(value: ir.Value | None, limit: float) -> str | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return "weight is not a plain initializer (already packed?)"
    if value.is_graph_input() or value.is_graph_output():
        return "weight is a graph input or output"
    if len(value.uses()) != 1:
        return "weight is shared by several nodes"
    if value.dtype != ir.DataType.FLOAT:
        return f"weight dtype {value.dtype} (float32 only)"
    if float(np.max(np.abs(value.const_value.numpy()), initial=0.0)) > limit:
        return "weight values outside the narrow type's range"
    return None


_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _compute_refusal(layer, dtype: str) -> str | None:
    if dtype != "float16":
        return "compute in bfloat16: onnxruntime's CPU provider has no bf16 Conv/Gemm/MatMul"
    if layer.op_type not in _COMPUTE_OPS:
        return f"compute mode covers Conv, ConvTranspose, Gemm and MatMul, not {layer.op_type}"
    node = layer.node
    if len(node.outputs) != 1 or node.outputs[0].dtype != ir.DataType.FLOAT:
        return "compute mode needs one float32 output"
    for i, value in enumerate(node.inputs):
        if value is None or i == layer.weight_index or value.const_value is not None:
            continue
        if value.dtype != ir.DataType.FLOAT:
            return f"input {i} is {value.dtype}, not float32"
    return None


def _compute_narrow(node: ir.Node, constants: list[int], dtype: ir.DataType, np_type: type) -> None:
    """Run ``node`` in ``dtype``: narrow constants in place, Cast the activations in, Cast
    the output back to float32 under its old name (consumers and graph outputs unchanged)."""
    graph = node.graph
    assert graph is not None
    for index in constants:
        old = node.inputs[index]
        assert old is not None and old.const_value is not None
        array = old.const_value.numpy().astype(np_type)
        name = unique_name(graph, f"{old.name}_{dtype.name.lower()}")
        narrow = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
        narrow.shape, narrow.dtype = ir.Shape(array.shape), dtype
        graph.register_initializer(narrow)
        node.replace_input_with(index, narrow)
        del graph.initializers[old.name]
    for index, value in enumerate(node.inputs):
        if value is None or index in constants or value.dtype != ir.DataType.FLOAT:
            continue
        cast_out = ir.Value(name=unique_name(graph, f"{value.name}_{dtype.name.lower()}"))
        cast_out.dtype, cast_out.shape = dtype, value.shape
        graph.insert_before(
            node,
            ir.node(
                "Cast", [value], attributes={"to": dtype}, name=cast_out.name, outputs=[cast_out]
            ),
        )
        node.replace_input_with(index, cast_out)
    out = node.outputs[0]
    wide = ir.Value(name=unique_name(graph, f"{out.name}_float"), shape=out.shape)
    wide.dtype = ir.DataType.FLOAT
    out.replace_all_uses_with(wide, replace_graph_outputs=True)
    if wide.is_graph_output():  # the graph output keeps its name
        name = out.name
        out.name = unique_name(graph, f"{name}_{dtype.name.lower()}")
        wide.name = name
    out.dtype = dtype
    cast = ir.node(
        "Cast", [out], attributes={"to": ir.DataType.FLOAT}, name=wide.name, outputs=[wide]
    )
    graph.insert_after(node, cast)


def _store_narrow(node: ir.Node, index: int, dtype: ir.DataType, np_type: type) -> None:
    graph = node.graph
    assert graph is not None
    old = node.inputs[index]
    assert old is not None and old.const_value is not None
    array = old.const_value.numpy().astype(np_type)
    name = unique_name(graph, f"{old.name}_{dtype.name.lower()}")
    narrow = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
    narrow.shape, narrow.dtype = ir.Shape(array.shape), dtype
    graph.register_initializer(narrow)
    out = ir.Value(name=unique_name(graph, f"{name}_float"), shape=old.shape)
    out.dtype = ir.DataType.FLOAT
    cast = ir.node(
        "Cast", [narrow], attributes={"to": ir.DataType.FLOAT}, name=out.name, outputs=[out]
    )
    cast.metadata_props[DECODED_WEIGHT_KEY] = "weight"
    graph.insert_before(node, cast)
    node.replace_input_with(index, out)
    del graph.initializers[old.name]

"""Model and per-layer statistics: nodes, params, bytes, MACs and FLOPs.

MACs follow the usual convention (one multiply-accumulate per weight use); FLOPs are
``2 * MACs`` plus one add per output element when there is a bias. They need the output
shapes, so they are known only where shape inference gives static dims (use ``--shape``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from graphsurgeon.layers import Layer, constant_of, find_layers
from graphsurgeon.shapes import static_dims


@dataclass
class LayerStats:
    id: str
    op: str
    weight_shape: list[int]
    output_shape: list[int] | None
    params: int
    bytes: int
    macs: int | None
    flops: int | None


@dataclass
class ModelStats:
    nodes: int
    params: int
    bytes: int
    flops: int | None  # None when some layer's FLOPs are unknown (dynamic shapes)
    layers: dict[str, LayerStats] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _numel(shape: list[int] | None) -> int | None:
    return None if shape is None else math.prod(shape)


def _out_shape(layer: Layer) -> list[int] | None:
    out = layer.node.outputs[0] if layer.node.outputs else None
    return static_dims(out.shape) if out is not None else None


def layer_macs(layer: Layer) -> int | None:
    """Multiply-accumulates of one layer for the shapes annotated on the graph."""
    w = list(layer.weight.shape)
    node, op = layer.node, layer.op_type
    out = _out_shape(layer)
    if op == "Gather":
        return 0
    if op in ("Conv", "ConvInteger"):
        n = _numel(out)
        return None if n is None else n * math.prod(w[1:])
    if op == "ConvTranspose":
        x = static_dims(node.inputs[0].shape) if node.inputs[0] is not None else None
        n = _numel(x)
        return None if n is None else n * math.prod(w[1:])
    if op == "Gemm":
        n = _numel(out)
        if n is None:
            return None
        if layer.weight_index == 1:
            trans_b = node.attributes.get_int("transB", 0)
            k = w[1] if trans_b else w[0]
        else:
            trans_a = node.attributes.get_int("transA", 0)
            k = w[0] if trans_a else w[1]
        return n * k
    if op in (
        "MatMul",
        "MatMulNBits",
        "MatMulInteger",
        "MatMulIntegerToFloat",
    ):  # MatMulNBits: weight [K, N] (packed)
        n = _numel(out)
        if n is None:
            return None
        k = w[0] if len(w) == 1 else w[-2] if layer.weight_index == 1 else w[-1]
        return n * k
    if op in ("LSTM", "GRU", "RNN"):
        x = static_dims(node.inputs[0].shape) if node.inputs[0] is not None else None
        r = constant_shape(node.inputs[2]) if len(node.inputs) > 2 else None
        if x is None or r is None:
            return None
        seq, batch = x[0], x[1]
        if node.attributes.get_int("layout", 0) == 1:
            batch, seq = x[0], x[1]
        # W: [dirs, gates*H, I], R: [dirs, gates*H, H]; every step multiplies both.
        return seq * batch * (math.prod(w) + math.prod(r))
    return None


def constant_shape(value: ir.Value | None) -> list[int] | None:
    tensor = constant_of(value)
    return None if tensor is None else list(tensor.shape)


def layer_stats(layer: Layer) -> LayerStats:
    weight = layer.weight
    params, nbytes = weight.size, weight.nbytes
    bias = layer.bias
    if bias is not None:
        params, nbytes = params + bias.size, nbytes + bias.nbytes
    if layer.op_type in ("LSTM", "GRU", "RNN") and len(layer.node.inputs) > 2:
        recurrent = constant_of(layer.node.inputs[2])
        if recurrent is not None:
            params, nbytes = params + recurrent.size, nbytes + recurrent.nbytes
    macs = layer_macs(layer)
    out = _out_shape(layer)
    flops = None
    if macs is not None:
        flops = 2 * macs + ((_numel(out) or 0) if bias is not None else 0)
    return LayerStats(
        id=layer.id,
        op=layer.op_type,
        weight_shape=list(weight.shape),
        output_shape=out,
        params=int(params),
        bytes=int(nbytes),
        macs=macs,
        flops=flops,
    )


def _constants_and_node_count(model: ir.Model) -> tuple[list[ir.TensorProtocol], int]:
    tensors: list[ir.TensorProtocol] = []
    nodes = 0
    for graph in model.graphs():
        tensors.extend(
            v.const_value for v in graph.initializers.values() if v.const_value is not None
        )
        for node in graph:
            nodes += 1
            if node.op_type == "Constant" and node.domain == "":
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    tensors.append(attr.as_tensor())
    return tensors, nodes


def model_stats(model: ir.Model, layers: list[Layer] | None = None) -> ModelStats:
    """Statistics for the shapes currently annotated on ``model`` (run shape inference first)."""
    layers = find_layers(model) if layers is None else layers
    tensors, nodes = _constants_and_node_count(model)
    per_layer = {layer.id: layer_stats(layer) for layer in layers}
    flops_known = [s.flops for s in per_layer.values()]
    return ModelStats(
        nodes=nodes,
        params=int(sum(t.size for t in tensors)),
        bytes=int(sum(t.nbytes for t in tensors)),
        flops=None if any(f is None for f in flops_known) else int(sum(flops_known)),  # type: ignore[arg-type]
        layers=per_layer,
    )


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Op type counts over all graphs; ops outside the default domain are ``domain::Op``."""
    counts: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] += 1
    return dict(counts.most_common())

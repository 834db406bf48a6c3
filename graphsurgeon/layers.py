"""Layers: the weight-bearing nodes that compression and search act on.

A layer is a Conv, ConvTranspose, Gemm, MatMul with a constant operand, LSTM, GRU or RNN, or a
Gather on a constant floating-point table (an embedding). "Constant" means an initializer, a
``Constant`` node, or a ``DequantizeLinear`` of either (a quantized weight is still a weight).
Packed weights count too (see :mod:`graphsurgeon.packed`): a com.microsoft ``MatMulNBits``
is a layer, so is a fused com.microsoft ``Attention`` / ``QAttention`` (its Q/K/V weight),
and so is any node whose weight a tagged decode subgraph rebuilds.

Each layer gets a stable id, stored in the node's ``metadata_props`` so that it survives saving,
reloading and rewrites: a node that replaces a layer (BatchNorm folded into a Conv, say) and
keeps the same weight initializer inherits the old id.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import onnx_ir as ir

from graphsurgeon.packed import (
    DECODED_WEIGHT_KEY,
    decoded_weight,
    gather_block_weight,
    matmulnbits_weight,
)

LAYER_ID_KEY = "graphsurgeon.layer_id"
LAYER_OP_TYPES = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "Gather"}
    | {"MatMulInteger", "ConvInteger"}  # dynamic int8 (quantize-dynamic): weight is input 1
)
_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


@dataclass(frozen=True)
class Layer:
    id: str
    node: ir.Node
    weight_index: int  # which input of ``node`` carries the weight
    weight: ir.TensorProtocol

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def weight_value(self) -> ir.Value:
        value = self.node.inputs[self.weight_index]
        assert value is not None
        return value

    @property
    def bias(self) -> ir.TensorProtocol | None:
        index = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "LSTM": 3, "GRU": 3, "RNN": 3}.get(
            self.op_type
        )
        if index is None or len(self.node.inputs) <= index:
            return None
        return constant_of(self.node.inputs[index])


def constant_of(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant tensor behind ``value``, looking through one DequantizeLinear."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return tensor
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.domain == "":
        return ir.convenience.get_const_tensor(producer.inputs[0]) if producer.inputs else None
    return decoded_weight(value)  # packed codes rebuilt by a tagged constant subgraph


def _weight_tensor(node: ir.Node, index: int) -> ir.TensorProtocol | None:
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        return matmulnbits_weight(node)
    if node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft":
        return gather_block_weight(node)
    return constant_of(node.inputs[index])


def _weight_index(node: ir.Node) -> int | None:
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        return 1 if matmulnbits_weight(node) is not None else None
    if node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft":
        return 0 if gather_block_weight(node) is not None else None  # a packed embedding
    if node.op_type == "MatMulIntegerToFloat" and node.domain == "com.microsoft":
        return 1 if constant_of(node.inputs[1]) is not None else None  # static int8 MatMul
    if node.op_type in ("Attention", "QAttention") and node.domain == "com.microsoft":
        # fused self-attention (fuse-attention / quantize-dynamic): input 1 is the Q/K/V weight
        return 1 if len(node.inputs) > 1 and constant_of(node.inputs[1]) is not None else None
    if DECODED_WEIGHT_KEY in node.metadata_props:
        return None  # a step that decodes a packed weight (its codebook Gather is no embedding)
    if node.domain not in ("", "ai.onnx") or node.op_type not in LAYER_OP_TYPES:
        return None
    op = node.op_type
    candidates = {"Gemm": (1, 0), "MatMul": (1, 0), "MatMulInteger": (1, 0), "Gather": (0,)}.get(
        op, (1,)
    )
    for index in candidates:
        if index < len(node.inputs):
            tensor = constant_of(node.inputs[index])
            if tensor is None:
                continue
            producer = node.inputs[index].producer()
            dequantized = producer is not None and producer.op_type == "DequantizeLinear"
            if op == "Gather" and tensor.dtype not in _FLOAT_TYPES and not dequantized:
                continue  # integer tables are shape plumbing, not embeddings (unless int8 ones)
            return index
    return None


def _iter_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)


def _base_id(node: ir.Node) -> str:
    name = node.name.strip("/") if node.name else ""
    name = re.sub(r"\s+", "_", name)
    return name or node.op_type.lower()


def find_layers(model: ir.Model, inherit: Mapping[str, str] | None = None) -> list[Layer]:
    """Find every layer and give it a stable id (assigned once, then read back).

    ``inherit`` maps weight value names to the ids they had before a rewrite, so that a
    replacement node keeps the id of the layer it replaced.
    """
    found: list[tuple[ir.Node, int]] = []
    for node in _iter_nodes(model):
        index = _weight_index(node)
        if index is not None:
            found.append((node, index))
    used: set[str] = set()
    pending: list[tuple[ir.Node, int]] = []
    for node, index in found:
        current = node.metadata_props.get(LAYER_ID_KEY)
        if current and current not in used:
            used.add(current)
        else:
            pending.append((node, index))
    for node, index in pending:
        weight_name = node.inputs[index].name if node.inputs[index] is not None else None
        candidate = (inherit or {}).get(weight_name or "")
        if not candidate or candidate in used:
            base = _base_id(node)
            candidate, n = base, 2
            while candidate in used:
                candidate, n = f"{base}_{n}", n + 1
        node.metadata_props[LAYER_ID_KEY] = candidate
        used.add(candidate)
    layers = []
    for node, index in found:
        tensor = _weight_tensor(node, index)
        assert tensor is not None
        layers.append(Layer(node.metadata_props[LAYER_ID_KEY], node, index, tensor))
    return layers


def layer_id(node: ir.Node) -> str | None:
    """The layer id of ``node`` if it is a layer that has been through :func:`find_layers`."""
    return node.metadata_props.get(LAYER_ID_KEY)


def weight_ids(layers: list[Layer]) -> dict[str, str]:
    """Weight name -> layer id, the snapshot :func:`find_layers` inherits from."""
    return {layer.weight_value.name: layer.id for layer in layers if layer.weight_value.name}

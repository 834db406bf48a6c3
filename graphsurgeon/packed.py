"""Packed weights: float weights stored in fewer bytes and rebuilt at run time.

Compression passes store a weight as packed codes plus a small decode: ``MatMulNBits``
(com.microsoft) holds its int2/4/8 weight itself; elsewhere a small constant subgraph
(codebook lookup, fp16 ``Cast``...) rebuilds the float weight; each of its nodes carries
:data:`DECODED_WEIGHT_KEY`, the last one with the value ``"weight"``. :class:`PackedWeight` is what the layer finder reports for both:
the weight's logical shape and dtype (so MACs stay right) and the bytes actually stored
(so statistics show the shrink); ``numpy()`` gives the decoded values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

DECODED_WEIGHT_KEY = "graphsurgeon.decoded_weight"


class PackedWeight:
    """A read-only tensor view: logical shape and dtype, stored bytes, decoded values."""

    def __init__(
        self,
        name: str | None,
        shape: list[int],
        dtype: ir.DataType,
        sources: list[ir.TensorProtocol],
        decode: Callable[[], np.ndarray],
    ) -> None:
        self.name = name
        self.shape = ir.Shape(shape)
        self.dtype = dtype
        self.sources = sources
        self._decode = decode

    @property
    def size(self) -> int:
        return math.prod(self.shape.numpy())

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, scales, codebooks."""
        return int(sum(t.nbytes for t in self.sources))

    def numpy(self) -> np.ndarray:
        return self._decode()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def tobytes(self) -> bytes:
        return self.numpy().tobytes()

    def __repr__(self) -> str:
        return f"PackedWeight({self.name!r}, {list(self.shape)}, {self.dtype}, {self.nbytes} bytes)"


def decoded_weight(value: ir.Value) -> PackedWeight | None:
    """The packed weight behind ``value`` if a tagged decode subgraph of constants makes it."""
    node = value.producer()
    if node is None or node.metadata_props.get(DECODED_WEIGHT_KEY) != "weight":
        return None
    dims = [d for d in value.shape or () if isinstance(d, int)]
    if value.shape is None or len(dims) != len(value.shape) or value.dtype is None:
        return None
    nodes: list[ir.Node] = []
    sources: dict[str, ir.Value] = {}
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        nodes.append(current)
        for inp in current.inputs:
            if inp is None:
                continue
            if inp.const_value is not None:
                sources[inp.name or str(id(inp))] = inp
                continue
            producer = inp.producer()
            if producer is None:
                return None  # reads a graph input: not a constant
            if producer not in seen:
                seen.add(producer)
                stack.append(producer)
    order = {n: i for i, n in enumerate(node.graph)} if node.graph is not None else {}
    nodes.sort(key=lambda n: order.get(n, 0))
    opsets = dict(node.graph.opset_imports) if node.graph is not None else {"": 21}

    def decode() -> np.ndarray:
        from onnx.reference import ReferenceEvaluator

        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes],
            "decode",
            [],
            [onnx.helper.make_tensor_value_info(value.name, int(value.dtype), dims)],
            [ir.serde.serialize_tensor(v.const_value) for v in sources.values()],
        )
        model = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
        )
        return ReferenceEvaluator(model).run(None, {})[0]

    return PackedWeight(
        value.name, dims, value.dtype, [v.const_value for v in sources.values()], decode
    )


def matmulnbits_weight(node: ir.Node) -> PackedWeight | None:
    """The ``[K, N]`` weight of a com.microsoft ``MatMulNBits`` node with constant inputs."""
    inputs = list(node.inputs) + [None] * 6
    b, scales, zero_points, g_idx = inputs[1], inputs[2], inputs[3], inputs[4]
    if b is None or b.const_value is None or scales is None or scales.const_value is None:
        return None
    if g_idx is not None or (zero_points is not None and zero_points.const_value is None):
        return None
    k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
    bits = node.attributes.get_int("bits", 4)
    block = node.attributes.get_int("block_size")
    if k is None or n is None or block is None:
        return None
    sources = [b.const_value, scales.const_value]
    if zero_points is not None:
        sources.append(zero_points.const_value)

    def decode() -> np.ndarray:
        blocks = -(-k // block)
        codes = _unpack(b.const_value.numpy().reshape(n, -1), bits)[:, : blocks * block]
        scale = scales.const_value.numpy().astype(np.float32).reshape(n, blocks)
        if zero_points is None:
            zero = np.full((n, blocks), 1 << (bits - 1), np.float32)
        elif zero_points.const_value.dtype == ir.DataType.UINT8:
            zp = _unpack(zero_points.const_value.numpy().reshape(n, -1), bits)
            zero = zp[:, :blocks].astype(np.float32)
        else:
            zero = zero_points.const_value.numpy().astype(np.float32).reshape(n, blocks)
        codes = codes.reshape(n, blocks, block).astype(np.float32)
        w = (codes - zero[..., None]) * scale[..., None]
        return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)

    return PackedWeight(b.name, [k, n], scales.dtype or ir.DataType.FLOAT, sources, decode)


def gather_block_weight(node: ir.Node) -> PackedWeight | None:
    """The ``[rows, cols]`` table of a com.microsoft ``GatherBlockQuantized`` node (4-bit codes
    packed two per uint8 along the rows, block scales, optional packed zero points; without
    them the zero point is 8) with constant inputs, gathered along axis 0."""
    inputs = list(node.inputs) + [None] * 4
    data, scales, zero_points = inputs[0], inputs[2], inputs[3]
    if data is None or data.const_value is None or scales is None or scales.const_value is None:
        return None
    if zero_points is not None and zero_points.const_value is None:
        return None
    attrs = node.attributes
    if attrs.get_int("bits", 4) != 4 or attrs.get_int("gather_axis", 0) != 0:
        return None
    if attrs.get_int("quantize_axis", 1) != 1 or data.const_value.dtype != ir.DataType.UINT8:
        return None
    block = attrs.get_int("block_size", 128)
    rows, packed_cols = data.const_value.shape.numpy()
    cols = 2 * packed_cols
    sources = [data.const_value, scales.const_value]
    if zero_points is not None:
        sources.append(zero_points.const_value)

    def decode() -> np.ndarray:
        blocks = cols // block
        codes = _unpack(data.const_value.numpy(), 4).astype(np.float32)
        scale = scales.const_value.numpy().astype(np.float32).reshape(rows, blocks)
        if zero_points is None:
            zero = np.full((rows, blocks), 8.0, np.float32)
        else:
            zero = _unpack(zero_points.const_value.numpy(), 4)[:, :blocks].astype(np.float32)
        w = (codes.reshape(rows, blocks, block) - zero[..., None]) * scale[..., None]
        return w.reshape(rows, cols)

    return PackedWeight(data.name, [rows, cols], scales.dtype or ir.DataType.FLOAT, sources, decode)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of packing ``8/bits`` codes per byte, low bits first, along the last axis."""
    shifts = np.arange(8 // bits, dtype=np.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)

"""Saving a model with embedded weights without holding the whole file in memory.

``onnx.save`` builds a second ModelProto (a copy of every weight) and then its serialized
bytes (a third copy). Protobuf lets us avoid both: a message is the concatenation of its
encoded fields, in any order. So we serialize the model with its big initializers detached,
then write the ``graph`` field (ModelProto field 7) ourselves: its header, the small graph,
and each big initializer as a GraphProto field 5 entry, one tensor at a time. Peak extra
memory is about one tensor instead of two models; ``onnx.load`` reads the result as usual,
and the bytes are the same for the same model (deterministic).
"""

from __future__ import annotations

import os

import onnx_ir as ir

_MODEL_GRAPH_FIELD = 7
_GRAPH_INITIALIZER_FIELD = 5
_LEN_DELIMITED = 2
STREAM_MIN_BYTES = 1 << 16  # smaller tensors go through the normal serializer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint((field << 3) | _LEN_DELIMITED)


def _tensor_proto(value: ir.Value):
    tensor = value.const_value
    assert tensor is not None
    if (
        isinstance(tensor, ir.serde.TensorProtoTensor)
        and tensor.raw.name == value.name
        and not tensor.metadata_props
    ):
        return tensor.raw  # the parsed proto itself: no copy
    tensor.name = value.name
    return ir.serde.serialize_tensor(tensor)


def save_embedded(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` with all weights embedded, streaming the big ones."""
    graph = model.graph
    original = list(graph.initializers.values())
    big = [
        v
        for v in original
        if v.const_value is not None
        and v.const_value.nbytes >= STREAM_MIN_BYTES
        and not isinstance(v.const_value, ir.ExternalTensor)
        and v not in graph.inputs  # old-IR models list initializers as inputs; keep them simple
    ]
    if not big:
        ir.save(model, path)
        return
    for value in big:
        graph.initializers.pop(value.name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        graph.initializers.clear()
        for value in original:  # restore in the original order
            graph.initializers.add(value)
    small_graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()
    sizes = [_tensor_proto(v).ByteSize() for v in big]
    graph_len = len(small_graph) + sum(
        len(_key(_GRAPH_INITIALIZER_FIELD)) + len(_varint(s)) + s for s in sizes
    )
    with open(path, "wb") as f:
        f.write(head)
        f.write(_key(_MODEL_GRAPH_FIELD) + _varint(graph_len))
        f.write(small_graph)
        for value, size in zip(big, sizes, strict=False):
            data = _tensor_proto(value).SerializeToString()
            assert len(data) == size, "tensor changed while saving"
            f.write(_key(_GRAPH_INITIALIZER_FIELD) + _varint(size))
            f.write(data)
            del data

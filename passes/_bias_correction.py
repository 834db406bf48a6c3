"""Empirical bias correction of quantized layers (Nagel et al., "Data-Free Quantization", 2019).

Rounding weights and activations shifts a layer's output mean: ``E[y_q] != E[y_fp]``. The
shift per output channel is folded into the bias, ``b' = b + E[y_fp] - E[y_q]``.

Each layer's own shift is measured on the float model's input to that layer, so that all
layers can be corrected at once without one correction counting another's. Conv, Gemm and
MatMul are linear in their input, so the batch mean commutes with them:
``E_batch[f(x)] = f(E_batch[x])``. The layer is run once on the mean float input with the
float weight and bias, once on the mean fake-quantized input ``DQ(Q(x))`` with ``DQ(W_q)``
and the dequantized bias; the difference, averaged over every axis but the channel axis, is
the shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphsurgeon.layers import constant_of

_CHANNEL_AXIS = {"Conv": 1, "ConvTranspose": 1, "Gemm": -1, "MatMul": -1}


@dataclass
class Correction:
    """Where to add a layer's shift, found in the quantized graph."""

    node: ir.Node  # the quantized layer
    x_index: int  # which input is the activation
    bias: ir.Value  # the float or int32 bias initializer that absorbs the shift
    bias_scale: np.ndarray | None  # DequantizeLinear scale of an int32 bias, else None


def dequantized(value: ir.Value | None) -> np.ndarray | None:
    """The float tensor behind ``value``: a constant, or DequantizeLinear of constants."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy().astype(np.float32)
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear":
        return None
    return _dq(node, ir.convenience.get_const_tensor(node.inputs[0]))


def _dq(node: ir.Node, data: ir.TensorProtocol | None) -> np.ndarray | None:
    scale = _const(node, 1)
    if data is None or scale is None:
        return None
    zero = _const(node, 2)
    q = data.numpy().astype(np.float64)
    axis = node.attributes.get_int("axis", 1)
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[axis] = -1
    zp = 0.0 if zero is None else zero.astype(np.float64).reshape(shape)
    return ((q - zp) * scale.astype(np.float64).reshape(shape)).astype(np.float32)


def _const(node: ir.Node, index: int) -> np.ndarray | None:
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    tensor = ir.convenience.get_const_tensor(node.inputs[index])
    return None if tensor is None else tensor.numpy()


def fake_quantized(x: np.ndarray, value: ir.Value) -> np.ndarray | None:
    """``DQ(Q(x))`` with the quantization parameters of the Q -> DQ pair that produces
    ``value`` in the quantized graph (round half to even, like QuantizeLinear)."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        return None
    scale, zero = _const(q, 1), _const(q, 2)
    if scale is None or scale.size != 1:
        return None
    zp = 0 if zero is None else int(zero.reshape(-1)[0])
    info = np.iinfo(zero.dtype if zero is not None else np.uint8)
    s = float(scale.reshape(-1)[0])
    codes = np.clip(np.round(x.astype(np.float64) / s) + zp, info.min, info.max)
    return ((codes - zp) * s).astype(np.float32)


def find_bias(node: ir.Node, weight_index: int) -> tuple[ir.Value, np.ndarray | None] | None:
    """The bias initializer a shift can be added to, and its int32 scale if quantized.

    Conv/ConvTranspose/Gemm: input 2 (float, or int32 behind a DequantizeLinear). MatMul: the
    constant operand of the one Add that reads its output.
    """
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return None
        return _bias_target(node.inputs[2])
    users = node.outputs[0].uses()
    if node.op_type != "MatMul" or len(users) != 1 or node.outputs[0].is_graph_output():
        return None
    add = users[0].node
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - users[0].idx]
    found = _bias_target(other) if other is not None else None
    weight = constant_of(node.inputs[weight_index])
    if found is None or weight is None:
        return None
    n, bias = weight.shape[-1], found[0].const_value
    if bias is None or bias.size != n or (len(bias.shape) and bias.shape[-1] != n):
        return None  # not one value per output channel
    return found


def _bias_target(value: ir.Value) -> tuple[ir.Value, np.ndarray | None] | None:
    if value.const_value is not None and value.is_initializer():
        return (value, None) if len(value.uses()) == 1 else None
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or len(value.uses()) != 1:
        return None
    data = node.inputs[0]
    scale = _const(node, 1)
    zero = _const(node, 2)
    if data is None or not data.is_initializer() or len(data.uses()) != 1 or scale is None:
        return None
    if zero is not None and np.any(zero != 0):
        return None
    return data, scale.astype(np.float64)


def layer_shift(
    node: ir.Node, x_index: int, mean_x: np.ndarray, mean_xq: np.ndarray, weights: tuple
) -> np.ndarray:
    """``E[y_fp] - E[y_q]`` per output channel; ``weights`` is ((W, b), (W_dq, b_dq))."""
    proto = ir.serde.serialize_node(node)
    nodes, inits = [], []
    for tag, x_mean, (w, b) in (("fp", mean_x, weights[0]), ("q", mean_xq, weights[1])):
        names = ["", ""] + ([f"b_{tag}"] if b is not None else [])
        names[x_index] = f"x_{tag}"
        names[1 - x_index if node.op_type in ("MatMul", "Gemm") else 1] = f"w_{tag}"
        inits += [nh.from_array(x_mean, f"x_{tag}"), nh.from_array(w, f"w_{tag}")]
        if b is not None:
            inits.append(nh.from_array(b, f"b_{tag}"))
        copy = oh.make_node(proto.op_type, names, [f"y_{tag}"], domain=proto.domain)
        copy.attribute.extend(proto.attribute)
        nodes.append(copy)
    outputs = [
        oh.make_tensor_value_info(f"y_{t}", onnx.TensorProto.FLOAT, None) for t in ("fp", "q")
    ]
    graph = oh.make_graph(nodes, "shift", [], outputs, inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    y_fp, y_q = session.run(None, {})
    diff = y_fp.astype(np.float64) - y_q.astype(np.float64)
    axis = _CHANNEL_AXIS[node.op_type] % diff.ndim
    return diff.mean(axis=tuple(i for i in range(diff.ndim) if i != axis))


def apply_shift(bias: ir.Value, scale: np.ndarray | None, shift: np.ndarray) -> None:
    """``b += shift`` on a float bias; on an int32 bias ``b_q += round(shift / scale)``."""
    old = bias.const_value.numpy()
    if scale is None:
        new = (old.astype(np.float64) + shift.reshape(old.shape)).astype(old.dtype)
    else:
        step = np.round(shift / scale.reshape(-1)).reshape(old.shape)
        info = np.iinfo(old.dtype)
        new = np.clip(old.astype(np.int64) + step, info.min, info.max).astype(old.dtype)
    bias.const_value = ir.tensor(new, name=bias.name)

"""quantize-dynamic with per-layer ``per_channel``: one onnxruntime call per setting.

A two-layer MatMul chain with one layer per tensor and one per output channel: the scales in
the quantized graph have the granularity asked for, and onnxruntime's output equals a numpy
reference of dynamic int8 (uint8 activations from each input's own range, int8 weights,
integer products rescaled by ``s_x * s_w``) built from those very scales and codes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphsurgeon.passes.quantization import QuantizeDynamic
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers

RNG = np.random.default_rng(17)


def chain() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x[6,12] -fc1 W1[12,8]- h -fc2 W2[8,5]- y; W2's columns differ in scale by 100x, so one
    scale per tensor wastes most of the int8 range on the small columns."""
    w1 = RNG.uniform(-1, 1, (12, 8)).astype(np.float32)
    w2 = (RNG.uniform(-1, 1, (8, 5)) * np.array([0.01, 0.1, 1.0, 0.05, 0.5])).astype(np.float32)
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            oh.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
        ],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [6, 12])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [6, 5])],
        [nh.from_array(w1, "W1"), nh.from_array(w2, "W2")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    model = ir.from_proto(proto)
    find_layers(model)
    return model, {"W1": w1, "W2": w2}


def constant(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def dynamic_matmul(x: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear(x) then MatMulInteger with symmetric int8 weights, rescaled."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s_x = np.float32((hi - lo) / 255)
    zero = np.clip(np.round(-lo / s_x), 0, 255)
    xq = np.clip(np.round(x / s_x) + zero, 0, 255)
    acc = (xq - zero).astype(np.int64) @ codes.astype(np.int64)
    return (acc * (s_x * scale)).astype(np.float32)


def test_per_layer_per_channel_matches_numpy_reference() -> None:
    model, weights = chain()
    x = RNG.uniform(-2, 3, (6, 12)).astype(np.float32)
    reference = run(make_session(model), {"x": x})["y"]
    quant = QuantizeDynamic({"overrides": {"fc2": {"per_channel": True}}})
    assert quant(model).modified
    assert quant.notes == {"quantized_layers": 2, "per_channel_layers": 1}
    codes = {k: constant(model, f"{k}_quantized") for k in weights}
    scales = {k: constant(model, f"{k}_scale") for k in weights}
    assert scales["W1"].size == 1 and scales["W2"].shape == (5,)  # per tensor / per column
    for k, w in weights.items():  # symmetric int8: |W - q s| <= s / 2 per scale group
        assert np.all(np.abs(w - codes[k] * scales[k]) <= scales[k] / 2 + 1e-7)
    h = dynamic_matmul(x, codes["W1"], scales["W1"])
    expected = dynamic_matmul(h, codes["W2"], scales["W2"])
    got = run(make_session(model, optimize=True), {"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(got - reference).max() < 0.02 * np.abs(reference).max()
    assert {layer.id for layer in find_layers(model)} == {"fc1", "fc2"}


def test_per_channel_beats_per_tensor_on_uneven_columns() -> None:
    errors = {}
    for per_channel in (False, True):
        model, _ = chain()
        x = RNG.uniform(-2, 3, (6, 12)).astype(np.float32)
        reference = run(make_session(model), {"x": x})["y"]
        QuantizeDynamic({"per_channel": per_channel})(model)
        got = run(make_session(model), {"x": x})["y"]
        errors[per_channel] = np.abs(got - reference)[:, 0].max() / np.abs(reference[:, 0]).max()
    assert errors[True] < errors[False] / 3, errors  # the 0.01-scale column


def test_per_channel_is_the_only_new_per_layer_key() -> None:
    QuantizeDynamic({"overrides": {"fc.*": {"per_channel": True, "enabled": False}}})
    with pytest.raises(GraphSurgeonError, match="whole pass"):
        QuantizeDynamic({"overrides": {"fc1": {"reduce_range": True}}})
    assert "Attention" in QuantizeDynamic().options.op_types

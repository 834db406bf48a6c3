"""Regressions found by ``test_backend_models.py``, reduced to small synthetic models.

* fold-constants on opsets before 12/13: onnxscript's folder emits ``Constant(value_ints)``
  and ``Unsqueeze``/``Split`` with axes as inputs whatever the model's opset;
* shape inference turned sequence-typed values into tensors (onnxruntime refused the model);
* string outputs crashed the exact comparison and the drift report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphsurgeon as gs
from graphsurgeon.shapes import ShapeInferencePass
from graphsurgeon.verify import compare_exact, drift


def _save(tmp_path: Path, nodes: list, inputs: list, outputs: list, opset: int) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    path = tmp_path / f"opset{opset}.onnx"
    onnx.save(model, path)
    return path


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.mark.parametrize("opset", [9, 11, 12, 13])
def test_folded_shape_is_valid_for_the_model_opset(tmp_path: Path, opset: int) -> None:
    """Shape of a static input folds to a Constant in the form the model's opset knows."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Expand", ["z", "s"], ["y"])]
    path = _save(tmp_path, nodes, [x, z], [y], opset)
    model = gs.load(path)
    gs.run_pipeline(model, "fold-constants")
    assert "Shape" not in {n.op_type for n in model.graph}
    gs.save(model, tmp_path / "folded.onnx")
    feeds = {"x": np.zeros((2, 3, 4), np.float32), "z": np.full((1, 1, 1), 5, np.float32)}
    assert compare_exact(_run(path, feeds), _run(tmp_path / "folded.onnx", feeds)) is None


@pytest.mark.parametrize("opset", [12, 13])
def test_sequence_folds_only_where_the_opset_allows(tmp_path: Path, opset: int) -> None:
    """ConcatFromSequence(new_axis=1) becomes Unsqueeze+Concat only from opset 13 on."""
    xs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in "ab"]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2])
    nodes = [
        helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
        helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=-1, new_axis=1),
    ]
    path = _save(tmp_path, nodes, xs, [y], opset)
    model = gs.load(path)
    gs.run_pipeline(model, "fold-constants")
    folded = "ConcatFromSequence" not in {n.op_type for n in model.graph}
    assert folded == (opset >= 13)
    gs.save(model, tmp_path / "folded.onnx")
    feeds = {"a": np.ones((2, 3), np.float32), "b": np.zeros((2, 3), np.float32)}
    assert compare_exact(_run(path, feeds), _run(tmp_path / "folded.onnx", feeds)) is None


def test_shape_inference_keeps_sequence_types(tmp_path: Path) -> None:
    """A pipeline that does not fold must still save a model onnxruntime loads."""
    xs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in "ab"]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [
        helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
        helper.make_node("SequenceAt", ["seq", "i"], ["y"]),
    ]
    index = helper.make_tensor_value_info("i", TensorProto.INT64, [])
    path = _save(tmp_path, nodes, [*xs, index], [y], 12)
    model = gs.load(path)
    seq = next(n for n in model.graph if n.op_type == "SequenceConstruct").outputs[0]
    assert seq.type is None  # no value_info: inference must find the sequence type
    ShapeInferencePass()(model)
    assert str(seq.type) == "Sequence(Tensor(FLOAT))"
    model = gs.load(path)
    gs.run_pipeline(model, "eliminate-dead-code")
    gs.save(model, tmp_path / "out.onnx")
    feeds = {"a": np.ones((2, 3), np.float32), "b": np.zeros((2, 3), np.float32)}
    feeds["i"] = np.array(1, np.int64)
    assert compare_exact(_run(path, feeds), _run(tmp_path / "out.onnx", feeds)) is None


def test_string_outputs_compare() -> None:
    a = {"y": np.array(["monday", "tuesday"], dtype=object)}
    b = {"y": np.array(["monday", "friday"], dtype=object)}
    assert compare_exact(a, a) is None
    assert compare_exact(a, b) == ("y", float("inf"))
    assert drift(a, a)["y"] == {"max_abs": 0.0, "cosine": 1.0}
    assert drift(a, b)["y"]["cosine"] == 0.0

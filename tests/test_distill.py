"""distill: fine-tuning against the pipeline's original model.

The digits CNN pruned to 90% (prune-only accuracy near chance) must recover most of its
accuracy in a short run; masks stay zero; a QDQ model stays QDQ (quantization-aware training)
and runs in onnxruntime; bad input (no teacher, a missing teacher file, bad feature layers,
steps <= 0) gets one clear line; without --calib it warns and trains on generated inputs.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
import torch
from graphsurgeon.passes.distill import Distill
from graphsurgeon.passes.pruning import read_mask

import graphsurgeon as gs
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers
from graphsurgeon.options import search_spaces
from graphsurgeon.registry import get_pass

torch.set_num_threads(1)


def accuracy(model, test) -> float:
    data = np.load(test)
    logits = run(make_session(model), {"input": data["input"]})["logits"]
    return float((logits.argmax(1) == data["labels"]).mean())


def prune_then(extra: list, sparsity: float = 0.9) -> list:
    return [{"name": "prune-magnitude", "options": {"sparsity": sparsity}}, *extra]


def test_registered_surgery_with_search_spaces() -> None:
    assert get_pass("distill") is Distill and Distill.kind == "surgery"
    assert Distill.needs_original
    spaces = search_spaces(Distill.Options)
    assert {"steps", "lr", "temperature", "feature_layers", "feature_weight"} <= set(spaces)
    assert spaces["feature_layers"].values == ["none", "auto", "all"]


def test_distill_recovers_a_90_percent_pruned_cnn(digits) -> None:
    pruned = gs.run_pipeline(gs.load(digits["model"]), prune_then([])).model
    prune_only = accuracy(pruned, digits["test"])
    model = gs.load(digits["model"])
    result = gs.run_pipeline(
        model, prune_then([{"name": "distill", "options": {"steps": 80}}]), calib=digits["train"]
    )
    record = result.records[-1]
    assert record.modified
    notes = record.notes
    assert notes["loss_after"] < 0.5 * notes["loss_before"]
    assert notes["steps"] == 80 and notes["data"].startswith("calibration")
    recovered = accuracy(result.model, digits["test"])
    assert prune_only < 0.5 and recovered > 0.85, (prune_only, recovered)
    for layer in find_layers(result.model):  # the masks held: still 90% zeros
        mask = read_mask(result.model, layer.id)
        weight = layer.weight.numpy()
        assert np.all(weight[~mask] == 0) and 1 - mask.mean() == pytest.approx(0.9, abs=0.01)


def test_distill_on_qdq_is_quantization_aware_training(digits) -> None:
    model = gs.load(digits["model"])
    spec = [
        {"name": "prune-magnitude", "options": {"sparsity": 0.8}},
        "quantize-int8",
        {"name": "distill", "options": {"steps": 30, "feature_layers": "none"}},
    ]
    result = gs.run_pipeline(model, spec, calib=digits["train"])
    ops = {node.op_type for node in result.model.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weight = result.model.graph.initializers["features.3.weight_quantized"].const_value
    assert weight.dtype == ir.DataType.INT8
    notes = result.records[-1].notes
    assert notes["loss_after"] < notes["loss_before"]
    before = gs.run_pipeline(gs.load(digits["model"]), spec[:2], calib=digits["train"]).model
    assert accuracy(result.model, digits["test"]) > accuracy(before, digits["test"])


def test_feature_layers_by_id_and_a_bad_id(digits) -> None:
    model = gs.load(digits["model"])
    ids = [layer.id for layer in find_layers(model)]
    spec = prune_then([{"name": "distill", "options": {"steps": 3, "feature_layers": [ids[1]]}}])
    result = gs.run_pipeline(model, spec, calib=digits["train"])
    assert result.records[-1].notes["feature_layers"] == [ids[1]]
    bad = prune_then([{"name": "distill", "options": {"steps": 3, "feature_layers": ["nope"]}}])
    with pytest.raises(GraphSurgeonError, match="feature_layers: no layer 'nope' in the student"):
        gs.run_pipeline(gs.load(digits["model"]), bad, calib=digits["train"])


def test_targets_limit_what_trains(digits) -> None:
    model = gs.load(digits["model"])
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    spec = [
        {
            "name": "distill",
            "options": {"steps": 3, "teacher": str(digits["model"])},
            "targets": {"layers": ["classifier/classifier.3/Gemm"]},
        }
    ]
    result = gs.run_pipeline(model, spec, calib=digits["train"])
    changed = {
        n
        for n, v in result.model.graph.initializers.items()
        if not np.array_equal(v.const_value.numpy(), before[n])
    }
    assert changed == {"classifier.3.weight", "classifier.3.bias"}


def test_no_teacher_outside_a_pipeline_and_missing_teacher_file(digits, tmp_path) -> None:
    model = gs.load(digits["model"])
    with pytest.raises(GraphSurgeonError, match="distill needs a teacher"):
        Distill({"steps": 2})(model)
    missing = tmp_path / "teacher.onnx"
    with pytest.raises(GraphSurgeonError, match=r"options\.teacher: no such file"):
        Distill({"steps": 2, "teacher": str(missing)})(model)


def test_steps_must_be_positive() -> None:
    with pytest.raises(GraphSurgeonError, match=r"step 1 \(distill\): options\.steps"):
        gs.compile_pipeline([{"name": "distill", "options": {"steps": 0}}])


def test_generated_inputs_warn(digits) -> None:
    model = gs.load(digits["model"])
    spec = prune_then([{"name": "distill", "options": {"steps": 2}}], sparsity=0.5)
    with pytest.warns(UserWarning, match="no --calib data"):
        result = gs.run_pipeline(model, spec)
    assert result.records[-1].notes["data"] == "generated"


def test_the_teacher_is_the_pipeline_input_kept_only_when_asked(digits, monkeypatch) -> None:
    """The teacher is the model before pruning (a pruned teacher would give a loss near 0),
    and the pipeline keeps a copy only when a pass needs it."""
    import graphsurgeon.pipeline as pipeline

    made = []
    original = pipeline._Original
    monkeypatch.setattr(pipeline, "_Original", lambda m: made.append(1) or original(m))
    gs.run_pipeline(gs.load(digits["model"]), prune_then([]))
    assert made == []
    spec = prune_then([{"name": "distill", "options": {"steps": 1, "lr": 1e-9}}])
    result = gs.run_pipeline(gs.load(digits["model"]), spec, calib=digits["train"])
    assert made == [1]
    assert result.records[-1].notes["loss_before"] > 1.0


def test_registering_the_training_passes_does_not_import_torch() -> None:
    """torch is needed to train, not to list passes or run other pipelines (CLI start-up)."""
    code = (
        "import sys; from graphsurgeon.registry import all_passes; "
        "assert {'distill', 'regrow', 'prune-iterative'} <= set(all_passes()); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-500:]


def test_inputs_without_a_batch_axis_train_whole_feeds() -> None:
    """x[3, 4] has no batch axis: feeds are whole inputs, never mixed row by row."""
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    from graphsurgeon.training import distill_model
    from graphsurgeon.training.loop import _data, _symbolic_batch

    rng = np.random.default_rng(0)

    def model(w: np.ndarray) -> ir.Model:
        graph = oh.make_graph(
            [oh.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
            "g",
            [oh.make_tensor_value_info("x", 1, [3, 4])],
            [oh.make_tensor_value_info("y", 1, [3, 2])],
            [nh.from_array(w, "W")],
        )
        proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
        return ir.from_proto(proto)

    teacher = model(rng.standard_normal((4, 2)).astype(np.float32))
    student = model(np.zeros((4, 2), np.float32))
    feeds = [{"x": rng.standard_normal((3, 4)).astype(np.float32)} for _ in range(4)]
    assert not _symbolic_batch(student) and _data(feeds, None, 32, 3, False).pool is None
    stats = distill_model(student, teacher, feeds, steps=60, lr=0.05, progress=False)
    assert stats["loss_after"] < 0.1 * stats["loss_before"]

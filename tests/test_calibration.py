"""Calibration activations: the values asked for, on every sample, and the model untouched."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import graphsurgeon as gs
from graphsurgeon.calibration import calibration_feeds, collect_activations
from graphsurgeon.data import load_npz
from graphsurgeon.execution import make_session, run
from graphsurgeon.shapes import ShapeInferencePass


def test_collect_activations_matches_outputs_and_leaves_the_model_as_it_was(digits) -> None:
    model = gs.load(digits["model"])
    ShapeInferencePass()(model)
    before = ir.to_proto(model).SerializeToString()
    data = load_npz(digits["test"], model)
    feeds = calibration_feeds(model, data, max_samples=40)
    relu = next(n for n in model.graph if n.op_type == "Relu").outputs[0].name
    acts = collect_activations(model, feeds, ["input", relu, "logits"])
    assert ir.to_proto(model).SerializeToString() == before
    assert acts["input"].shape == (40, 1, 8, 8) and acts[relu].shape[0] == 40
    np.testing.assert_array_equal(acts["input"], data.arrays["input"][:40])
    logits = run(make_session(model), {"input": data.arrays["input"][:40]})["logits"]
    np.testing.assert_allclose(acts["logits"], logits, rtol=1e-6, atol=1e-6)
    assert (acts[relu] >= 0).all()

"""The example plugin of docs/extending.md: registered like an entry point, run in a
pipeline on the digits CNN, checked against a numpy reference and in onnxruntime."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphsurgeon import load, run_pipeline
from graphsurgeon.metrics import evaluate
from graphsurgeon.registry import _REGISTRY, _register_loaded, get_pass

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin" / "gs_example_plugin.py"


def _plugin():
    spec = importlib.util.spec_from_file_location("gs_example_plugin", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def plugin():
    module = _plugin()
    _register_loaded(module.ClipWeights, "clip-weights = gs_example_plugin:ClipWeights")
    yield module
    _REGISTRY.pop("clip-weights", None)  # other tests see the built-ins only


def test_example_plugin_registers_and_runs(digits, plugin) -> None:
    assert get_pass("clip-weights") is plugin.ClipWeights
    model = load(digits["model"])
    before = {
        v.name: v.const_value.numpy().copy()
        for v in model.graph.initializers.values()
        if v.const_value is not None
    }
    result = run_pipeline(
        model, {"steps": [{"name": "clip-weights", "options": {"percentile": 99.0}}]}
    )
    assert result.modified
    changed = 0
    for v in model.graph.initializers.values():
        w0 = before.get(v.name)
        w1 = v.const_value.numpy()
        if w0 is None or w0.shape != w1.shape or np.array_equal(w0, w1):
            continue
        limit = np.percentile(np.abs(w0), 99.0)
        np.testing.assert_allclose(w1, np.clip(w0, -limit, limit))
        changed += 1
    assert changed >= 3
    scores = evaluate(model, digits["test"], "accuracy")
    assert scores["accuracy"] > 0.9  # still a working classifier in onnxruntime
    assert isinstance(model, ir.Model)

"""The pipelines shipped in examples/pipelines compile, and the digits one does what it says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import graphsurgeon as gs
from graphsurgeon.data import load_npz
from graphsurgeon.execution import make_session, run
from graphsurgeon.pipeline import compile_pipeline, iter_pass_steps

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "examples" / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_shipped_pipeline_compiles(path: Path) -> None:
    steps = compile_pipeline(path)
    assert list(iter_pass_steps(steps))


def test_digits_int8_pipeline_keeps_accuracy_and_the_float_layer(digits) -> None:
    model = gs.load(digits["model"])
    result = gs.run_pipeline(
        model, PIPELINES[0].parent / "digits_int8.yaml", calib=digits["train"], verify="numeric"
    )
    ops = [n.op_type for n in result.model.graph]
    assert "QuantizeLinear" in ops and "BatchNormalization" not in ops
    last = next(n for n in result.model.graph if n.name.endswith("classifier.3/Gemm"))
    assert all(
        v.producer() is None or v.producer().op_type != "DequantizeLinear" for v in last.inputs[1:]
    )
    test = load_npz(digits["test"], result.model)
    feed = {k: v for k, v in test.arrays.items()}
    logits = run(make_session(result.model, optimize=True), feed)["logits"]
    accuracy = float(np.mean(np.argmax(logits, 1) == test.labels))
    assert accuracy >= 0.97  # float: 0.9933

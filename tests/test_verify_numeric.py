"""Verification inside pipelines: a wrong "exact" pass is caught and named, a lossy pass gets
its drift measured, a structurally broken graph is refused. The passes here are deliberately
wrong test doubles, run through the real pipeline runner on the digits CNN."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import graphsurgeon as gs
from graphsurgeon.errors import VerificationError
from graphsurgeon.layers import find_layers
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.pipeline import PassStep
from graphsurgeon.targets import Targets


def _scale_first_conv(model: ir.Model, factor: float) -> None:
    layer = next(layer for layer in find_layers(model) if layer.op_type == "Conv")
    weights = layer.weight.numpy() * np.float32(factor)
    layer.weight_value.const_value = ir.tensor(weights, name=layer.weight_value.name)


class ClaimsExact(GSPass):
    """Changes a weight but declares itself exact."""

    name = "claims-exact"
    kind = "exact"

    def call(self, model: ir.Model) -> PassResult:
        _scale_first_conv(model, 1.5)
        return PassResult(model, True)


class RoundWeights(GSPass):
    """A lossy pass: rounds every layer weight to two decimals."""

    name = "round-weights"
    kind = "lossy"

    def call(self, model: ir.Model) -> PassResult:
        for layer in find_layers(model):
            w = np.round(layer.weight.numpy(), 2).astype(np.float32)
            layer.weight_value.const_value = ir.tensor(w, name=layer.weight_value.name)
        return PassResult(model, True)


class RenamesOutput(GSPass):
    name = "renames-output"
    kind = "exact"

    def call(self, model: ir.Model) -> PassResult:
        model.graph.outputs[0].name = "renamed"
        return PassResult(model, True)


def _steps(*classes: type[GSPass]) -> list[PassStep]:
    return [PassStep(f"{i} ({c.name})", c, {}, Targets()) for i, c in enumerate(classes, 1)]


def test_exact_pass_that_changes_outputs_is_named(digits) -> None:
    model = gs.load(digits["model"])
    with pytest.raises(VerificationError) as info:
        gs.run_pipeline(model, _steps(ClaimsExact), calib=digits["test"], verify="numeric")
    text = str(info.value)
    assert "claims-exact" in text and "'logits'" in text and "step 1" in text


def test_exact_pass_with_structural_checks_only_is_not_caught(digits) -> None:
    """The numeric check is what catches a wrong exact pass; structural checks cannot."""
    model = gs.load(digits["model"])
    result = gs.run_pipeline(model, _steps(ClaimsExact), verify="structural")
    assert result.records[0].verified == "structural"


def test_lossy_pass_reports_drift(digits) -> None:
    model = gs.load(digits["model"])
    result = gs.run_pipeline(model, _steps(RoundWeights), calib=digits["test"], verify="numeric")
    drift = result.records[0].drift["logits"]
    assert 0 < drift["max_abs"] < 10
    assert 0.9 < drift["cosine"] < 1.0
    assert 0.0 <= drift["top1_agreement"] <= 1.0
    # Drift is measured against the outputs before the pass: recompute it independently.
    original = gs.load(digits["model"])
    from graphsurgeon.data import load_npz
    from graphsurgeon.execution import make_session, run

    feed = load_npz(digits["test"], original).feeds(8, batch_size=8)[0]
    ref = run(make_session(original), feed)["logits"]
    got = run(make_session(result.model), feed)["logits"]
    assert drift["max_abs"] == pytest.approx(float(np.max(np.abs(ref - got))), rel=1e-6)
    assert result.drift_vs_original["logits"]["max_abs"] == pytest.approx(drift["max_abs"])


def test_structural_check_refuses_renamed_output(digits) -> None:
    model = gs.load(digits["model"])
    with pytest.raises(VerificationError, match="outputs changed"):
        gs.run_pipeline(model, _steps(RenamesOutput), verify="structural")


def test_numeric_verification_runs_lowered_custom_ops_on_the_reference_evaluator(digits) -> None:
    """onnxruntime cannot load ``graphsurgeon`` custom ops; verification evaluates them with
    the kernels' numpy references instead, so ``lower-kernels`` (exact) is checked too."""
    import graphsurgeon as gs
    from graphsurgeon import execution

    model = gs.load(digits["model"])
    result = gs.run_pipeline(
        model, ["cleanup", "prune-nm", "lower-kernels"], calib=digits["test"], verify="numeric"
    )
    lowered = next(r for r in result.records if r.name == "lower-kernels")
    assert lowered.modified and lowered.verified == "numeric"
    assert any(n.domain == "graphsurgeon" for n in model.graph)
    session = execution.make_session(model)
    assert not hasattr(session, "get_providers")  # the reference evaluator, not onnxruntime

"""graphsurgeon sensitivity / compare and the metrics module: Python API on the digits CNN and
hand-built graphs, JSON schemas and bad input through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.cli import main
from graphsurgeon.compare import compare_models, sqnr_db
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.layers import find_layers
from graphsurgeon.metrics import evaluate, load_metric
from graphsurgeon.options import FloatRange, LayerPassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.sensitivity import layer_sensitivity, strength_values

CLI = [sys.executable, "-m", "graphsurgeon.cli"]
RNG = np.random.default_rng(3)


def gs_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def bad(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphsurgeon: error: "), result.stderr
    assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def clean_digits(digits, tmp_path_factory) -> Path:
    """The digits CNN with BatchNorm folded (its conv weights are then what the outputs see)."""
    path = tmp_path_factory.mktemp("digits") / "clean.onnx"
    gs.save(gs.run_pipeline(gs.load(digits["model"]), "cleanup").model, path)
    return path


class _NoiseOptions(LayerPassOptions):
    scale: float = option(0.1, "Relative noise added to the weight.", FloatRange(0.01, 0.5))


class AddNoise(GSPass):
    """Test-only lossy pass: w += scale * |w|_rms * N(0, 1) on each selected layer."""

    name = "test-add-noise"
    kind = "lossy"
    Options = _NoiseOptions
    strength_option: ClassVar[str] = "scale"

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for layer in find_layers(model):
            if not self.selects(layer.node) or layer.weight_value.const_value is None:
                continue
            w = layer.weight.numpy()
            scale = self.options_for(layer.id).scale * float(np.sqrt(np.mean(w**2)))
            noise = np.random.default_rng(0).standard_normal(w.shape) * scale
            layer.weight_value.const_value = ir.tensor((w + noise).astype(w.dtype))
            modified = True
        return PassResult(model, modified)


# -- sensitivity ----------------------------------------------------------------------------
def test_strength_values_from_search_spaces() -> None:
    from graphsurgeon.passes.factorize import FactorizeLowRank

    assert strength_values(FactorizeLowRank) == ("energy", [0.999, 0.7495, 0.5])
    assert strength_values(FactorizeLowRank, "method") == ("method", ["tucker2", "spatial"])
    assert strength_values(AddNoise, strengths=[0.3, 0.1]) == ("scale", [0.3, 0.1])
    with pytest.raises(GraphSurgeonError, match="no option 'nope'"):
        strength_values(AddNoise, "nope")


@pytest.mark.parametrize("pass_", ["factorize-lowrank", AddNoise], ids=["factorize", "noise"])
def test_digits_rows_per_layer_and_stronger_means_more_drift(clean_digits, digits, pass_) -> None:
    strengths = [0.95, 0.8, 0.6] if pass_ == "factorize-lowrank" else [0.02, 0.1, 0.5]
    rows = layer_sensitivity(
        clean_digits, pass_, calib=digits["test"], metric="fidelity", strengths=strengths
    )
    layer_ids = [layer.id for layer in find_layers(gs.load(clean_digits))]
    assert len(layer_ids) == 5
    assert [(r.layer, r.value) for r in rows] == [(lid, v) for lid in layer_ids for v in strengths]
    assert all(r.status == "ok" or r.status.startswith("unchanged: ") for r in rows)
    # Drift is 1 - cosine; an unchanged layer has lost nothing.
    mean = [
        np.mean([r.drift if r.drift is not None else 0.0 for r in rows if r.strength == i])
        for i in range(3)
    ]
    assert mean[0] < mean[1] < mean[2], mean
    for r in rows:
        if r.status == "ok":
            assert r.drift == pytest.approx(1 - r.metrics["cosine"])
            assert r.params is not None and (pass_ == AddNoise or r.params < 47_530)


def test_remove_layers_sensitivity_uses_units() -> None:
    w = {
        f"w{i}": (RNG.standard_normal((8, 8)) * s).astype(np.float32)
        for i, s in enumerate((1, 1, 0.01, 0.01))
    }
    nodes = [
        oh.make_node("MatMul", ["x", "w0"], ["h"], name="big/fc"),
        oh.make_node("Add", ["x", "h"], ["s"], name="big/Add"),
        oh.make_node("MatMul", ["s", "w2"], ["h2"], name="small/fc"),
        oh.make_node("Add", ["s", "h2"], ["y"], name="small/Add"),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [nh.from_array(w["w0"], "w0"), nh.from_array(w["w2"], "w2")],
    )
    model = ir.from_proto(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    )
    rows = layer_sensitivity(model, "remove-layers")
    assert [(r.layer, r.op, r.option, r.status) for r in rows] == [
        ("big/Add", "residual", None, "ok"),
        ("small/Add", "residual", None, "ok"),
    ]
    drift = {r.layer: r.drift for r in rows}
    assert drift["small/Add"] < 0.01 < drift["big/Add"]
    assert len(list(model.graph)) == 4  # measured on copies


def test_sensitivity_cli_json_schema_and_table(clean_digits, digits) -> None:
    result = gs_cli(
        "sensitivity", clean_digits, "--pass", "factorize-lowrank", "--calib", digits["test"],
        "--strengths", "0.9,0.6", "--json", "--max-samples", "128",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {
        "model",
        "pass",
        "option",
        "values",
        "metric",
        "baseline",
        "params",
        "rows",
    }
    assert report["option"] == "energy" and report["values"] == [0.9, 0.6]
    assert report["metric"] == "accuracy"  # labelled data: accuracy is the headline
    assert report["baseline"]["cosine"] == pytest.approx(1.0)
    assert len(report["rows"]) == 10
    for row in report["rows"]:
        assert set(row) == {
            "layer",
            "op",
            "option",
            "value",
            "strength",
            "status",
            "metrics",
            "drift",
            "params",
        }
        if row["status"] == "ok":
            assert row["drift"] == pytest.approx(
                report["baseline"]["accuracy"] - row["metrics"]["accuracy"]
            )
    table = gs_cli(
        "sensitivity",
        clean_digits,
        "--pass",
        "factorize-lowrank",
        "--calib",
        digits["test"],
        "--strengths",
        "0.6",
    )
    assert table.returncode == 0 and "classifier/classifier.1/Gemm" in table.stdout


def test_sensitivity_cli_custom_metric(clean_digits, digits, tmp_path: Path) -> None:
    (tmp_path / "my_metrics.py").write_text(
        "import numpy as np\n"
        "def neg_mse(outputs, reference, labels):\n"
        "    return {'neg_mse': -float(np.mean((outputs['logits'] - reference['logits']) ** 2))}\n"
    )
    result = gs_cli(
        "sensitivity", clean_digits, "--pass", "factorize-lowrank", "--calib", digits["test"],
        "--strengths", "0.6", "--metric", "my_metrics:neg_mse", "--json",
        env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metric"] == "neg_mse" and report["baseline"] == {"neg_mse": 0.0}
    assert all(r["drift"] > 0 for r in report["rows"] if r["status"] == "ok")


def test_cli_bad_input(clean_digits, digits, tmp_path: Path, capsys) -> None:
    calib = digits["test"]
    sens = ["sensitivity", clean_digits, "--pass"]
    # Through the real command line: one line, exit 2, no traceback.
    bad(gs_cli(*sens, "no-such-pass", "--calib", calib), "unknown pass")
    bad(
        gs_cli("compare", clean_digits, clean_digits, "--calib", tmp_path / "x.npz"), "no such file"
    )
    cases = [
        (
            [*sens, "factorize-lowrank", "--calib", calib, "--metric", "nocolon"],
            "expected module:function",
        ),
        (
            [*sens, "factorize-lowrank", "--calib", calib, "--metric", "no_such_mod_x:f"],
            "cannot import",
        ),
        ([*sens, "factorize-lowrank", "--calib", tmp_path / "missing.npz"], "no such file"),
        (
            [*sens, "factorize-lowrank", "--calib", calib, "--options", "[1, 2]"],
            "expected a mapping",
        ),
        ([*sens, "factorize-lowrank", "--calib", calib, "--options", "{energy: 7}"], "energy"),
        ([*sens, "fold-constants", "--calib", calib], "is exact"),
        (["compare", clean_digits, tmp_path / "missing.onnx", "--calib", calib], "missing.onnx"),
    ]
    for argv, text in cases:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("graphsurgeon: error: ") and text in err[0], err


# -- metrics --------------------------------------------------------------------------------
def test_metrics_builtins_and_loader(digits) -> None:
    model = gs.load(digits["model"])
    scores = evaluate(model, digits["test"])
    assert list(scores) == ["accuracy"] and scores["accuracy"] > 0.95
    same = evaluate(model, digits["test"], metric="default", reference=model)
    assert same["cosine"] == pytest.approx(1.0) and same["max_abs"] == 0.0
    assert evaluate(model, digits["test"], metric="top1", reference=model) == {
        "top1_agreement": 1.0
    }
    assert load_metric("graphsurgeon.metrics:accuracy") is load_metric("accuracy")
    for spec, message in (("x", "expected module:function"), ("json:nope", "has no function")):
        with pytest.raises(GraphSurgeonError, match=message):
            load_metric(spec)
    with pytest.raises(GraphSurgeonError, match="reference"):
        evaluate(model, digits["test"], metric="fidelity")


# -- compare --------------------------------------------------------------------------------
def test_compare_identical_models(clean_digits, digits) -> None:
    result = gs_cli("compare", clean_digits, clean_digits, "--calib", digits["test"], "--json")
    assert result.returncode == 0, result.stderr
    tensors = json.loads(result.stdout)["tensors"]
    assert len(tensors) == len(list(gs.load(clean_digits).graph))  # every node's output
    for t in tensors:
        assert t["a"] == t["b"] and t["matched_by"] == "name"
        assert t["sqnr_db"] == "inf" and t["cosine"] == pytest.approx(1.0) and t["max_abs"] == 0


def test_compare_ranks_tensors_after_a_perturbed_layer_worst(clean_digits, digits) -> None:
    a = gs.load(clean_digits)
    b = gs.load(clean_digits)
    target = next(layer for layer in find_layers(b) if layer.id == "classifier/classifier.1/Gemm")
    w = target.weight.numpy()
    target.weight_value.const_value = ir.tensor(
        w + 0.05 * RNG.standard_normal(w.shape).astype(w.dtype)
    )
    # Rename every value so that matching must go by layer id and by position.
    for node in b.graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.name = f"renamed_{value.name}"
    diffs = compare_models(a, b, digits["test"])
    assert len(diffs) == len(list(a.graph))
    assert {d.matched_by for d in diffs} == {"name", "layer", "position"}
    assert all(d.b == d.a or d.b == f"renamed_{d.a}" for d in diffs)
    downstream = {
        "/classifier/classifier.1/Gemm_output_0",
        "/classifier/classifier.2/Relu_output_0",
        "logits",
    }
    worst = {d.a for d in diffs[: len(downstream)]}
    assert worst == downstream
    assert all(np.isfinite(d.sqnr_db) and d.cosine < 1 for d in diffs[:3])
    assert all(d.sqnr_db == float("inf") for d in diffs[3:])


def test_sqnr_definition() -> None:
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # |ref|^2 / |0.1 ref|^2 = 100
    assert sqnr_db(np.zeros(2), ref) == float("-inf")

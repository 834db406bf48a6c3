"""Plasticity: connections created / pruned, counted element by element around each pass."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.cli import main
from graphsurgeon.layers import find_layers
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.pipeline import PassStep
from graphsurgeon.plasticity import WeightMask, connection_changes, snapshot, summarize
from graphsurgeon.targets import Targets

RNG = np.random.default_rng(3)


def mlp() -> ir.Model:
    """x[4] -MatMul W1[4,6]- relu -Gemm W2[6,3]+b- y. W1 has 3 zeros, W2 none."""
    w1 = RNG.normal(size=(4, 6)).astype(np.float32)
    w1.flat[[0, 7, 13]] = 0
    w2 = RNG.normal(size=(6, 3)).astype(np.float32)
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            oh.make_node("Relu", ["h"], ["r"]),
            oh.make_node("Gemm", ["r", "w2", "b"], ["y"], name="fc2"),
        ],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [nh.from_array(w1, "w1"), nh.from_array(w2, "w2"), nh.from_array(np.ones(3, "f"), "b")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def _set(model: ir.Model, name: str, array: np.ndarray) -> None:
    value = model.graph.initializers[name]
    value.const_value = ir.tensor(array, name=name)


def _get(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy().copy()


class SwapWeights(GSPass):
    """Test pass: zero 2 nonzero weights of W1 and revive its 3 zeros (a RigL-like step)."""

    name = "swap-weights"
    kind = "surgery"

    def call(self, model: ir.Model) -> PassResult:
        w = _get(model, "w1")
        w.flat[[1, 2]] = 0
        w.flat[[0, 7, 13]] = 0.5
        _set(model, "w1", w)
        return PassResult(model, True)


class Untouched(GSPass):
    name = "untouched"
    kind = "lossy"

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, False)


def test_element_by_element_not_net():
    m = mlp()
    before = snapshot(m)
    assert before["fc1"].nonzero == 21 and before["fc2"].nonzero == 18
    SwapWeights()(m)
    # net change is +1, but 3 connections were created and 2 pruned
    assert connection_changes(before, snapshot(m)) == (3, 2)


def test_removed_channels_new_layers_and_reencoding():
    m = mlp()
    before = snapshot(m)
    _set(m, "w2", _get(m, "w2")[:4])  # two input rows of fc2 physically removed
    assert connection_changes(before, snapshot(m)) == (0, 6)
    bits = np.packbits(np.ones(8, bool))
    old = {"a": WeightMask((8,), "float32", 8, bits), "gone": WeightMask((2,), "float32", 2, bits)}
    new = {
        "a": WeightMask((4,), "uint8", 4, bits),  # packed int4: a re-encoding, not pruning
        "skip": WeightMask((3,), "float32", 2, bits),  # a new layer: its nonzeros are created
    }
    assert connection_changes(old, new) == (2, 2)


def test_pipeline_records_per_pass_and_cumulative():
    m = mlp()
    find_layers(m)
    steps = [
        PassStep("1", SwapWeights, {}, Targets()),
        PassStep("2", Untouched, {}, Targets()),
        gs.pipeline.compile_pipeline(
            [{"name": "prune-magnitude", "options": {"sparsity": 0.5}, "targets": {}}]
        )[0],
    ]
    result = gs.run_pipeline(m, steps)
    swap, untouched, prune = (r.plasticity for r in result.records)
    assert swap == {
        "created": 3,
        "pruned": 2,
        "plasticity": 1.5,
        "model": {"created": 3, "pruned": 2, "plasticity": 1.5},
    }
    assert untouched["created"] == untouched["pruned"] == 0 and untouched["plasticity"] is None
    # 50% of each layer: W1 (24) keeps 12 of its 22 nonzeros, W2 (18) keeps 9
    assert prune["created"] == 0 and prune["pruned"] == 10 + 9
    assert prune["model"] == {"created": 3, "pruned": 21, "plasticity": round(3 / 21, 6)}
    assert summarize(result.records) == prune["model"]
    assert result.to_dict()["passes"][0]["plasticity"]["created"] == 3


def test_run_summary_and_report(digits, tmp_path, capsys):
    spec = tmp_path / "surgery.yaml"
    spec.write_text(
        "steps:\n"
        "  - {name: prune-magnitude, options: {sparsity: 0.5}}\n"
        "  - {name: add-skips, options: {max_skips: 1}}\n"
    )
    report = tmp_path / "report.json"
    argv = ["run", str(spec), str(digits["model"]), "-o", str(tmp_path / "out.onnx")]
    assert main([*argv, "--calib", str(digits["train"]), "--report", str(report)]) == 0
    stdout = capsys.readouterr().out
    data = json.loads(report.read_text())
    pruned = data["passes"][0]["plasticity"]["pruned"]
    created = data["passes"][1]["plasticity"]["created"]
    assert pruned > 20_000 and created > 0
    assert data["plasticity"]["plasticity"] == round(created / pruned, 6)
    assert f"plasticity {created / pruned:.4g}" in " ".join(stdout.split())

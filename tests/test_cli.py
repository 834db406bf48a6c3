"""The CLI end to end on the digits CNN: inspect, passes, run (numeric verify, report,
determinism, pipeline files, IR dumps). Every command runs in a subprocess, as a user runs it."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

CLI = [sys.executable, "-m", "graphsurgeon.cli"]
CLEANUP_PASSES = [
    "eliminate-identities",
    "fold-constants",
    "fold-batchnorm",
    "fuse-matmul-add",
    "eliminate-common-subexpressions",
    "eliminate-dead-code",
]
BUILTIN_PASSES = {
    "eliminate-common-subexpressions",
    "eliminate-dead-code",
    "eliminate-identities",
    "fix-shapes",
    "fold-batchnorm",
    "fold-constants",
    "fuse-matmul-add",
}


def gs(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def ort_logits(model: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    return logits


def op_types(model: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(model)).graph.node]


# -- inspect -------------------------------------------------------------------------------
def test_inspect_json_with_static_shape(digits: dict[str, Path]) -> None:
    info = json.loads(
        ok(gs("inspect", digits["model"], "--shape", "input=1x1x8x8", "--json")).stdout
    )
    assert info["ops"]["Conv"] == 3
    assert info["ops"]["BatchNormalization"] == 3
    assert info["ops"] == {
        "Relu": 4,
        "Conv": 3,
        "BatchNormalization": 3,
        "Gemm": 2,
        "MaxPool": 1,
        "Flatten": 1,
    }
    assert info["inputs"] == [
        {"name": "input", "dtype": "FLOAT", "shape": "[1, 1, 8, 8]", "dynamic_dims": []}
    ]
    assert info["outputs"][0]["name"] == "logits" and info["outputs"][0]["shape"] == "[1, 10]"

    layers = info["layers"]
    assert len(layers) == 5
    assert [row["op"] for row in layers] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    conv1 = layers[0]
    assert conv1["weight_shape"] == [16, 1, 3, 3]
    assert conv1["output_shape"] == [1, 16, 8, 8]
    # One MAC per output element per weight in its receptive field: C_out*H*W * C_in*kH*kW.
    assert conv1["macs"] == 16 * 8 * 8 * 1 * 3 * 3 == 9216
    assert conv1["flops"] == 2 * 9216 + 16 * 8 * 8  # plus one bias add per output element
    assert conv1["params"] == 16 * 1 * 3 * 3 + 16
    assert conv1["bytes"] == 4 * conv1["params"]
    # The rest by hand: conv 16->32 at 8x8, conv 32->32 at 4x4 (after the 2x2 max pool),
    # Linear 512->64, Linear 64->10.
    expected_macs = [9216, 32 * 8 * 8 * 16 * 9, 32 * 4 * 4 * 32 * 9, 512 * 64, 64 * 10]
    assert [row["macs"] for row in layers] == expected_macs
    assert [row["params"] for row in layers] == [160, 4640, 9248, 32832, 650]

    totals = info["totals"]
    assert totals["layers"] == 5
    assert totals["nodes"] == 14
    assert totals["macs"] == sum(expected_macs) == 484992
    assert totals["flops"] == sum(row["flops"] for row in layers)
    # Params and bytes count every constant, BatchNorm statistics included.
    proto = onnx.load(str(digits["model"]))
    arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    assert totals["params"] == sum(a.size for a in arrays) == 47850
    assert totals["bytes"] == sum(a.nbytes for a in arrays)


def test_inspect_shows_the_dynamic_batch_dim(digits: dict[str, Path]) -> None:
    info = json.loads(ok(gs("inspect", digits["model"], "--json")).stdout)
    assert info["inputs"][0]["shape"] == "[batch, 1, 8, 8]"
    assert info["inputs"][0]["dynamic_dims"] == ["batch"]
    assert info["outputs"][0]["dynamic_dims"] == ["batch"]
    assert info["totals"]["flops"] is None and info["totals"]["macs"] is None
    assert all(row["macs"] is None for row in info["layers"])
    assert info["totals"]["params"] == 47850  # params need no shapes

    text = ok(gs("inspect", digits["model"])).stdout
    assert "[batch, 1, 8, 8]" in text  # not swallowed as rich markup
    assert "batch" in text
    assert "--shape" in text  # the hint for getting FLOPs
    assert "BatchNormalization" in text


# -- passes --------------------------------------------------------------------------------
def test_passes_json() -> None:
    rows = json.loads(ok(gs("passes", "--json")).stdout)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) >= BUILTIN_PASSES
    assert [row["name"] for row in rows] == sorted(by_name)
    for row in rows:
        assert row["kind"] in ("exact", "lossy", "surgery")
        assert row["doc"]
        assert isinstance(row["targets"], bool)
        for opt in row["options"]:
            assert set(opt) == {"name", "type", "default", "doc", "search_space"}
            assert opt["doc"]
    assert {by_name[n]["kind"] for n in BUILTIN_PASSES} == {"exact"}

    fold = {o["name"]: o for o in by_name["fold-constants"]["options"]}
    assert fold["input_size_limit"]["default"] == 8192
    assert fold["input_size_limit"]["type"] == "int"
    assert fold["input_size_limit"]["search_space"] == {
        "kind": "int",
        "low": 1024,
        "high": 1 << 20,
        "log": True,
        "step": 1,
    }
    assert fold["output_size_limit"]["default"] == 1 << 20
    assert fold["output_size_limit"]["search_space"]["high"] == 1 << 24
    assert by_name["fold-constants"]["targets"] is True

    cse = {o["name"]: o for o in by_name["eliminate-common-subexpressions"]["options"]}
    assert cse["deduplicate_initializers"]["default"] is False
    assert cse["deduplicate_initializers"]["search_space"] is None
    assert by_name["eliminate-common-subexpressions"]["targets"] is False

    fix = {o["name"]: o for o in by_name["fix-shapes"]["options"]}
    assert set(fix) == {"shapes", "dims", "default"}
    assert fix["shapes"]["default"] == {} and fix["default"]["default"] is None
    for name in (
        "eliminate-dead-code",
        "eliminate-identities",
        "fold-batchnorm",
        "fuse-matmul-add",
    ):
        assert by_name[name]["options"] == []

    text = ok(gs("passes")).stdout
    for name in BUILTIN_PASSES:
        assert name in text


# -- run -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cleanup_run(
    digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``run cleanup`` with numeric verification, a report and IR dumps, done once."""
    d = tmp_path_factory.mktemp("cleanup")
    out, report, dump = d / "out.onnx", d / "report.json", d / "dump"
    result = ok(
        gs(
            "run",
            "cleanup",
            digits["model"],
            "-o",
            out,
            "--verify",
            "numeric",
            "--calib",
            digits["test"],
            "--report",
            report,
            "--dump-ir",
            dump,
        )
    )
    return {
        "dir": d,
        "out": out,
        "report": json.loads(report.read_text()),
        "dump": dump,
        "stdout": result.stdout,
    }


def test_run_cleanup_folds_batchnorm(cleanup_run: dict[str, Any]) -> None:
    ops = op_types(cleanup_run["out"])
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 2
    assert len(ops) == 11
    onnx.checker.check_model(onnx.load(str(cleanup_run["out"])), full_check=True)
    assert sorted(p.name for p in cleanup_run["dir"].iterdir()) == [
        "dump",
        "out.onnx",
        "report.json",
    ]


def test_run_cleanup_keeps_outputs_and_accuracy(
    cleanup_run: dict[str, Any], digits: dict[str, Path]
) -> None:
    with np.load(digits["test"]) as data:
        x, labels = data["input"], data["labels"]
    before = ort_logits(digits["model"], x)
    after = ort_logits(cleanup_run["out"], x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    acc_before = float(np.mean(before.argmax(1) == labels))
    acc_after = float(np.mean(after.argmax(1) == labels))
    assert acc_after == acc_before
    assert acc_before >= 0.95


def test_run_report(cleanup_run: dict[str, Any], digits: dict[str, Path]) -> None:
    report = cleanup_run["report"]
    assert report["verify"] == "numeric"
    assert report["pipeline"] == "cleanup"
    assert report["model"] == str(digits["model"])
    assert report["output"] == str(cleanup_run["out"])
    assert report["modified"] is True
    records = report["passes"]
    # The repeat runs all six passes, changes the model once (fold-batchnorm), then runs them
    # again and stops when nothing changes: one record per pass run.
    assert [r["pass"] for r in records] == CLEANUP_PASSES * 2
    first, second = records[:6], records[6:]
    assert first[CLEANUP_PASSES.index("fold-batchnorm")]["modified"] is True
    assert not any(r["modified"] for r in second)  # why the repeat stopped
    for r in records:
        assert r["kind"] == "exact"
        assert r["step"].endswith(f"({r['pass']})")
        assert isinstance(r["time_s"], float) and 0 <= r["time_s"] < 60
        for side in ("before", "after"):
            assert set(r[side]) == {"nodes", "params", "bytes", "flops"}
        assert isinstance(r["layers"], dict)
        assert isinstance(r["notes"], dict)
    for prev, cur in itertools.pairwise(records):
        assert cur["before"] == prev["after"]
    fold = records[CLEANUP_PASSES.index("fold-batchnorm")]
    assert fold["before"]["nodes"] == 14 and fold["after"]["nodes"] == 11
    bn_params = 4 * (16 + 32 + 32)  # scale, bias, mean, var per channel
    assert fold["before"]["params"] == 47850
    final = records[-1]["after"]
    assert final["nodes"] == 11
    assert final["params"] == 47850 - bn_params
    assert final["bytes"] == 4 * final["params"]
    assert records[0]["before"]["flops"] is None  # no --shape: FLOPs unknown
    drift = report["drift_vs_original"]["logits"]
    assert drift["max_abs"] < 1e-3 and drift["cosine"] > 0.9999 and drift["top1_agreement"] == 1.0


def test_run_dump_ir(cleanup_run: dict[str, Any]) -> None:
    files = sorted(cleanup_run["dump"].iterdir())
    records = cleanup_run["report"]["passes"]
    assert len(files) == len(records) == 12
    assert [f.name for f in files] == [f"{i:03d}-{r['pass']}.txt" for i, r in enumerate(records, 1)]
    texts = [f.read_text() for f in files]
    assert all(texts)
    fold = CLEANUP_PASSES.index("fold-batchnorm")
    assert texts[fold - 1].count("::BatchNormalization(") == 3
    assert all("::BatchNormalization(" not in t for t in texts[fold:])


def test_run_is_deterministic(
    cleanup_run: dict[str, Any], digits: dict[str, Path], tmp_path: Path
) -> None:
    again = tmp_path / "again.onnx"
    ok(
        gs(
            "run",
            "cleanup",
            digits["model"],
            "-o",
            again,
            "--verify",
            "numeric",
            "--calib",
            digits["test"],
        )
    )
    assert again.read_bytes() == cleanup_run["out"].read_bytes()
    third = tmp_path / "third.onnx"
    ok(gs("run", "cleanup", digits["model"], "-o", third))  # verify mode changes nothing
    assert third.read_bytes() == again.read_bytes()


PIPELINE_YAML = r"""
name: digits-partial
description: fold two of the three BatchNorms, then tidy up
steps:
  - name: fold-constants
    options: {input_size_limit: 4096}
  - repeat:
      - name: fold-batchnorm
        targets:
          layers: ["features/features\\.(0|3)/Conv"]
      - eliminate-dead-code
    max_iterations: 3
  - name: fuse-matmul-add
    targets: {op_types: [MatMul]}
"""


def test_run_pipeline_file(digits: dict[str, Path], tmp_path: Path) -> None:
    spec = tmp_path / "partial.yaml"
    spec.write_text(PIPELINE_YAML)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    ok(
        gs(
            "run",
            spec,
            digits["model"],
            "-o",
            out,
            "--report",
            report,
            "--verify",
            "numeric",
            "--calib",
            digits["test"],
        )
    )
    ops = op_types(out)
    assert ops.count("BatchNormalization") == 1  # the third conv was not targeted
    assert ops.count("Conv") == 3
    records = json.loads(report.read_text())["passes"]
    assert [r["step"] for r in records] == [
        "1 (fold-constants)",
        "2.1 (fold-batchnorm)",
        "2.2 (eliminate-dead-code)",
        "2.1 (fold-batchnorm)",  # the repeat runs again after a change, then stops
        "2.2 (eliminate-dead-code)",
        "3 (fuse-matmul-add)",
    ]
    assert records[1]["modified"] is True  # fold-batchnorm, first time round
    assert not records[3]["modified"] and not records[4]["modified"]
    with np.load(digits["test"]) as data:
        x = data["input"]
    np.testing.assert_allclose(
        ort_logits(out, x), ort_logits(digits["model"], x), rtol=1e-4, atol=1e-5
    )

    # The same steps as JSON give the same model.
    import yaml

    as_json = tmp_path / "partial.json"
    as_json.write_text(json.dumps(yaml.safe_load(PIPELINE_YAML)))
    out2 = tmp_path / "out2.onnx"
    ok(gs("run", as_json, digits["model"], "-o", out2))
    assert out2.read_bytes() == out.read_bytes()


def test_run_report_per_layer_changes(tmp_path: Path) -> None:
    """MatMul + Add -> Gemm moves the bias into the layer: its params and FLOPs change."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    w = numpy_helper.from_array(np.full((16, 8), 0.25, np.float32), "W")
    b = numpy_helper.from_array(np.arange(8, dtype=np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "b"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "fc", [x], [y], [w, b])
    model = tmp_path / "fc.onnx"
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(proto, model)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    ok(gs("run", "fuse-matmul-add", model, "-o", out, "--report", report, "--verify", "numeric"))
    assert op_types(out) == ["Gemm", "Relu"]
    (record,) = json.loads(report.read_text())["passes"]
    assert record["modified"] is True
    assert record["before"]["nodes"] == 3 and record["after"]["nodes"] == 2
    assert record["layers"] == {
        "fc": {
            "params": [16 * 8, 16 * 8 + 8],
            "bytes": [4 * 16 * 8, 4 * (16 * 8 + 8)],
            "flops": [2 * 16 * 8, 2 * 16 * 8 + 8],
        }
    }


def test_run_prints_a_summary(cleanup_run: dict[str, Any]) -> None:
    text = cleanup_run["stdout"]
    assert "nodes 14 -> 11" in text
    assert "verify=numeric" in text
    assert f"wrote {cleanup_run['out']}" in text

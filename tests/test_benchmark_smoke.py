"""Smoke test of benchmarks/compression.py on digits (--quick): rows, baselines, skipping."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphsurgeon as gs
from graphsurgeon.registry import all_passes
from graphsurgeon.stats import model_stats

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ("prune-magnitude", "quantize-dynamic", "cast-precision", "quantize-weights")


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gs_bench_compression", ROOT / "benchmarks/compression.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_digits_run(digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    cheap = next(
        (c for c in bench.COMMON_CONFIGS if c.pass_name in CHEAP and c.pass_name in all_passes()),
        None,
    )
    configs = (
        bench.Config("missing pass", "no-such-pass"),
        bench.Config("bad options", "fold-constants", ({"no_such_option": 1},)),
        *([cheap] if cheap else []),
    )
    monkeypatch.setitem(bench.CONFIGS, "digits", configs)
    monkeypatch.setattr(bench, "MODELS_DIR", Path(digits["model"]).parent)
    out = tmp_path / "results.json"
    results = bench.main(["--models", "digits", "--quick", "--repeats", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results, default=str))
    rows = {r["config"]: r for r in results["models"]["digits"]["rows"]}

    original = rows["original"]
    saved = gs.save(gs.load(digits["model"]), tmp_path / "original.onnx")
    assert original["size_bytes"] == saved[0].stat().st_size
    assert original["params"] == model_stats(gs.load(digits["model"])).params
    assert original["fidelity"] >= 0.95  # the digits CNN's test accuracy
    assert original["latency_ms"] > 0 and original["speedup"] > 0
    assert original["latency_runs"] >= 2  # --repeats 2
    # the two classifier Gemms' weights (512x64 and 64x10 float32), biases excluded
    assert original["matmul_weight_bytes"] == 4 * (512 * 64 + 64 * 10)

    for label in ("ort quantize_dynamic", "ort quantize_static"):
        row = rows[label]
        assert row["status"] == "baseline", row["note"]
        assert row["size_bytes"] < original["size_bytes"] / 2  # int8 weights
        assert 3.5 < row["matmul_ratio"] <= 4.0 + 1e-9
        assert row["fidelity"] >= 0.9
        assert row["latency_ms"] > 0 and row["latency_cv"] >= 0

    assert rows["missing pass"]["status"] == "not available"
    assert "not registered" in rows["missing pass"]["note"]
    assert rows["bad options"]["status"] == "not available"
    assert "no_such_option" in rows["bad options"]["note"]
    if cheap is not None:
        row = rows[cheap.label]
        assert row["status"] in ("ok", "unchanged", "failed")
        if row["status"] == "ok":
            assert row["size_bytes"] > 0 and row["latency_ms"] > 0
            assert 0 <= row["fidelity"] <= 1

    names = [t["target"] for t in results["models"]["digits"]["targets"]]
    assert any(n.startswith("(b)") for n in names) and any(n.startswith("(c)") for n in names)
    assert {t["status"] for t in results["models"]["digits"]["targets"]} <= {
        "OK",
        "MISSED",
        "not available",
    }


def test_matmul_weight_bytes_counts_weights_through_dequantize() -> None:
    """MatMul(x, DequantizeLinear(Wq, s, z)) counts Wq + s + z; Gemm's bias C is not counted;
    a MatMul of two activations counts nothing."""
    wq = numpy_helper.from_array(np.ones((8, 4), np.int8), "Wq")
    scale = numpy_helper.from_array(np.full(4, 0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.zeros(4, np.int8), "z")
    w2 = numpy_helper.from_array(np.ones((4, 3), np.float32), "W2")
    bias = numpy_helper.from_array(np.ones(3, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], axis=1),
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Gemm", ["h", "W2", "b"], ["g"]),
            helper.make_node("MatMul", ["g", "y"], ["out"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5])],
        [wq, scale, zero, w2, bias],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    assert _bench().matmul_weight_bytes(model) == 8 * 4 + 4 * 4 + 4 + 4 * 3 * 4

"""cast-precision and share-weights: narrow storage and k-means codebooks, run in onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphsurgeon.passes._kmeans import kmeans_1d
from onnx import TensorProto, helper, numpy_helper

import graphsurgeon as gs
from graphsurgeon.layers import find_layers
from graphsurgeon.packed import PackedWeight
from graphsurgeon.pipeline import run_pipeline

RNG = np.random.default_rng(11)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def two_gemms(scale: float = 1.0) -> ir.Model:
    """x [4, 48] -> Gemm(w0 [48, 64]) -> Relu -> Gemm(w1 [32, 64], transB) -> y."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array((rng.standard_normal((48, 64)) * scale).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b0"),
        numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32) * 0.1, "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], name="fc0"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w1", "b1"], ["y"], name="fc1", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(proto)


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}


def reference(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x @ w["w0"] + w["b0"], 0)
    return h @ w["w1"].T + w["b1"]


def save(model: ir.Model, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    gs.save(model, path)
    return path


# -- cast-precision --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cast_precision_stores_narrow_and_runs(tmp_path: Path, dtype: str) -> None:
    model = two_gemms()
    w = weights(model)
    src = save(model, tmp_path, "src.onnx")
    result = run_pipeline(model, [{"name": "cast-precision", "options": {"dtype": dtype}}])
    record = result.records[0]
    assert record.modified
    out = save(result.model, tmp_path, "out.onnx")
    proto = onnx.load(str(out))
    want_type = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16
    assert {t.data_type for t in proto.graph.initializer} == {want_type}
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert len(casts) == 4  # two weights, two biases
    narrow = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rounded = {k: v.astype(narrow).astype(np.float32) for k, v in w.items()}
    x = RNG.standard_normal((4, 48)).astype(np.float32)
    got = session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, reference(rounded, x), rtol=1e-5, atol=1e-4)
    bound = 1e-3 if dtype == "float16" else 1e-2
    np.testing.assert_allclose(got, reference(w, x), rtol=bound, atol=bound * 10)
    float_bytes = sum(v.nbytes for v in w.values())
    # four Cast nodes and names cost a few hundred bytes
    assert os.path.getsize(src) - os.path.getsize(out) >= float_bytes / 2 - 1024
    layers = find_layers(gs.load(out))
    assert all(isinstance(layer.weight, PackedWeight) for layer in layers)
    assert all(layer.weight.dtype == ir.DataType.FLOAT for layer in layers)
    for lid, stats in record.after.layers.items():
        assert stats.bytes * 2 == record.before.layers[lid].bytes
        assert stats.flops == record.before.layers[lid].flops is not None


def test_cast_precision_overrides_and_range_refusal() -> None:
    model = two_gemms(scale=1e5)  # w0 overflows float16
    ids = [layer.id for layer in find_layers(model)]
    result = run_pipeline(
        model,
        [{"name": "cast-precision", "options": {"overrides": {ids[1]: {"dtype": "bfloat16"}}}}],
    )
    record = result.records[0]
    assert record.notes["cast"] == {ids[1]: "bfloat16"}
    assert record.notes["skipped"] == {"weight values outside the narrow type's range": 1}
    types = {n: v.dtype for n, v in result.model.graph.initializers.items()}
    assert types["w0"] == ir.DataType.FLOAT
    assert ir.DataType.BFLOAT16 in types.values()
    # bfloat16 has float32's range: the same weight is fine there
    result = run_pipeline(
        two_gemms(scale=1e5), [{"name": "cast-precision", "options": {"dtype": "bfloat16"}}]
    )
    assert result.records[0].notes["cast"] == {ids[0]: "bfloat16", ids[1]: "bfloat16"}


def test_cast_precision_minilm_halves_the_file(minilm, tmp_path: Path) -> None:
    result = run_pipeline(
        gs.load(minilm["model"]), "cast-precision", calib=minilm["sentences"], verify="numeric"
    )
    out = save(result.model, tmp_path, "fp16.onnx")
    ratio = os.path.getsize(minilm["model"]) / os.path.getsize(out)
    cosine = result.drift_vs_original["sentence_embedding"]["cosine"]
    print(f"MiniLM fp16 storage: file {ratio:.3f}x smaller, cosine {cosine:.6f}")
    assert ratio > 1.95
    assert cosine > 0.9999


# -- share-weights ---------------------------------------------------------------------------------
def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    out = [(packed.astype(np.int64) >> (j * bits)) & ((1 << bits) - 1) for j in range(8 // bits)]
    return np.stack(out, axis=-1).reshape(-1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_share_weights_codebook_matches_numpy_reference(tmp_path: Path, bits: int) -> None:
    model = two_gemms()
    w = weights(model)
    src = save(model, tmp_path, "src.onnx")
    result = run_pipeline(model, [{"name": "share-weights", "options": {"bits": bits}}])
    assert result.records[0].modified
    out = save(result.model, tmp_path, "out.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    decoded = dict(w)
    for name in ("w0", "w1"):
        assert name not in inits
        base = f"{name}_packed{bits}"
        codebook = inits[f"{base}_codebook"]
        assert codebook.shape == (1 << bits,)
        idx = unpack(inits[base], bits)[: w[name].size]
        decoded[name] = codebook[idx].reshape(w[name].shape)
        assert len(np.unique(decoded[name])) <= 1 << bits
        # every weight sits on its nearest centroid
        nearest = codebook[np.argmin(np.abs(w[name].reshape(-1, 1) - codebook), axis=1)]
        np.testing.assert_allclose(
            np.abs(decoded[name].ravel() - w[name].ravel()), np.abs(nearest - w[name].ravel())
        )
    x = RNG.standard_normal((4, 48)).astype(np.float32)
    got = session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, reference(decoded, x), rtol=1e-5, atol=1e-4)
    packed = sum(inits[k].nbytes for k in inits if k.startswith(("w0_", "w1_")))
    # indices at `bits` per weight, two 2^bits codebooks, a few int64 shape constants
    float_bytes = w["w0"].nbytes + w["w1"].nbytes
    assert packed <= float_bytes * bits / 32 + 2 * 4 * (1 << bits) + 256
    assert (
        os.path.getsize(out)
        < os.path.getsize(src) - (w["w0"].nbytes + w["w1"].nbytes) + packed + 4096
    )
    layers = find_layers(gs.load(out))
    assert [layer.weight.size for layer in layers] == [48 * 64, 32 * 64]
    np.testing.assert_allclose(layers[1].weight.numpy(), decoded["w1"])


def test_kmeans_is_deterministic_and_as_good_as_sklearn() -> None:
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000) * 0.02, rng.standard_normal(500) * 0.2])
    c1, l1 = kmeans_1d(x, 16)
    c2, l2 = kmeans_1d(x, 16)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(l1, l2)
    ours = float(np.sum((x - c1[l1]) ** 2))
    km = sklearn_cluster.KMeans(16, n_init=4, random_state=0).fit(x.reshape(-1, 1))
    assert ours <= 1.05 * km.inertia_


def test_share_weights_digits_keeps_accuracy(digits, tmp_path: Path) -> None:
    result = run_pipeline(
        gs.load(digits["model"]),
        [{"name": "share-weights", "options": {"bits": 4}}],
        calib=digits["test"],
        verify="numeric",
    )
    record = result.records[0]
    out = save(result.model, tmp_path, "shared.onnx")
    data = np.load(digits["test"])

    def accuracy(path: Path) -> float:
        logits = session(path).run(None, {"input": data["input"]})[0]
        return float(np.mean(np.argmax(logits, -1) == data["labels"]))

    base, shared = accuracy(digits["model"]), accuracy(out)
    print(f"digits share-weights 4 bit: accuracy {base:.4f} -> {shared:.4f}")
    assert shared >= base - 0.03
    assert os.path.getsize(out) < os.path.getsize(digits["model"]) / 4
    assert record.notes.get("skipped") is None or "the packed form" in str(record.notes["skipped"])
    assert len(record.after.layers) == 5
    assert all(
        record.after.layers[lid].bytes < record.before.layers[lid].bytes
        for lid in record.notes["shared"]
    )


@pytest.mark.slow  # 36 k-means fits and a numeric check on MiniLM: ~20-50 s on 2 cores
def test_share_weights_minilm_matmuls_with_overrides(minilm, tmp_path: Path) -> None:
    model = gs.load(minilm["model"])
    first = next(layer.id for layer in find_layers(model) if layer.op_type == "MatMul")
    result = run_pipeline(
        model,
        [
            {
                "name": "share-weights",
                "options": {"bits": 4, "overrides": {first: {"bits": 8}}},
                "targets": {"op_types": ["MatMul"]},
            }
        ],
        calib=minilm["sentences"],
        verify="numeric",
    )
    notes = result.records[0].notes["shared"]
    assert len(notes) == 36 and notes[first] == "256 centroids"
    assert sum(v == "16 centroids" for v in notes.values()) == 35
    cosine = result.drift_vs_original["sentence_embedding"]["cosine"]
    out = save(result.model, tmp_path, "shared.onnx")
    print(
        f"MiniLM share-weights 4 bit on MatMuls: cosine {cosine:.4f}, file "
        f"{os.path.getsize(minilm['model'])} -> {os.path.getsize(out)}"
    )
    assert cosine > 0.9
    assert os.path.getsize(minilm["model"]) - os.path.getsize(out) > 0.8 * 42467328 * 7 / 8


def test_cast_precision_compute_mode_runs_layers_in_float16(digits, tmp_path: Path) -> None:
    """compute: true puts every layer's activations, weights and output in float16 (Casts at
    the edges); onnxruntime runs it and the logits stay within fp16 rounding of the original;
    the graph output keeps its name and float32 type."""
    model = gs.load(digits["model"])
    result = run_pipeline(
        model,
        {"steps": ["cleanup", {"name": "cast-precision", "options": {"compute": True}}]},
        verify="numeric",
        calib=digits["test"],
    )
    record = result.records[-1]
    assert record.modified and all(v == "float16 compute" for v in record.notes["cast"].values())
    layers = [n for n in model.graph if n.op_type in ("Conv", "Gemm")]
    assert layers and all(
        v.dtype == ir.DataType.FLOAT16 for n in layers for v in [*n.inputs, *n.outputs] if v
    )
    assert [o.name for o in model.graph.outputs] == ["logits"]
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT
    drift = result.drift_vs_original["logits"]
    assert drift["cosine"] > 0.9999 and drift["top1_agreement"] > 0.99
    out = tmp_path / "fp16.onnx"
    gs.save(model, out)
    x = np.load(digits["test"])["input"][:8]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    want = ort.InferenceSession(str(digits["model"]), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    assert got[0].dtype == np.float32
    np.testing.assert_allclose(got[0], want[0], atol=0.05 * np.abs(want[0]).max())
    # bfloat16 compute is refused with the reason, storage still works
    model = gs.load(digits["model"])
    result = run_pipeline(
        model,
        {"steps": [{"name": "cast-precision", "options": {"compute": True, "dtype": "bfloat16"}}]},
    )
    assert not result.records[-1].modified
    assert any("bfloat16" in k for k in result.records[-1].notes.get("skipped", {}))

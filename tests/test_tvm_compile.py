"""TVM Relax compilation: outputs of the compiled library match onnxruntime on the source.

Builds are slow (seconds each), so every model is compiled once per session; all builds
target this machine's CPU (``mcpu="host"``) with one thread.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")

from graphsurgeon.kernels.tvm import compile_model, load, tvm_available

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.profiles import load_profile

RNG = np.random.default_rng(3)
PROFILE = load_profile("x86-avx2")


def compile_host(model, out: Path, **kw):
    return compile_model(model, PROFILE, out, threads=1, mcpu="host", **kw)


def ort_run(model: ir.Model | Path, feed: dict) -> dict[str, np.ndarray]:
    data = str(model) if isinstance(model, Path) else ir.to_proto(model).SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))


def mlp_model(k: int = 64, n: int = 48, *, batch: str | int = "batch") -> ir.Model:
    """x [batch, 5, k] -> MatMul -> Add -> Relu -> MatMul -> y [batch, 5, n] (fixed weights)."""
    rng = np.random.default_rng(k * 1000 + n)
    w0 = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    w1 = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    b0 = rng.standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["m0"]),
            helper.make_node("Add", ["m0", "b0"], ["a0"]),
            helper.make_node("Relu", ["a0"], ["r0"]),
            helper.make_node("MatMul", ["r0", "w1"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5, n])],
        [numpy_helper.from_array(a, name) for a, name in ((w0, "w0"), (w1, "w1"), (b0, "b0"))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(proto)


def attention_model(seq: int = 8, dim: int = 16) -> ir.Model:
    """Single-head self-attention with a residual and LayerNorm, built from plain ONNX ops."""
    inits = {
        name: (RNG.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
        for name in ("wq", "wk", "wv")
    }
    inits["scale"] = np.array(1 / np.sqrt(dim), np.float32)
    inits["gamma"] = RNG.standard_normal(dim).astype(np.float32)
    inits["beta"] = RNG.standard_normal(dim).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])],
        [numpy_helper.from_array(a, name) for name, a in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(proto)


@pytest.fixture(scope="session")
def builds(tmp_path_factory, digits) -> dict:
    root = tmp_path_factory.mktemp("tvm")
    out = {"root": root}
    out["digits"] = compile_host(digits["model"], root / "digits", shapes={"input": [1, 1, 8, 8]})
    out["mlp"] = compile_host(mlp_model(), root / "mlp", shapes={"x": [2, 5, 64]})
    return out


def test_tvm_available():
    assert tvm_available()


def test_digits_cnn_matches_ort(builds, digits):
    fn = load(builds["digits"].lib_path, builds["digits"].meta_path)
    data = np.load(digits["test"])
    for x in data["input"][:8]:
        feed = {"input": x[None].astype(np.float32)}
        got, ref = fn(feed)["logits"], ort_run(digits["model"], feed)["logits"]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        assert got.argmax() == ref.argmax()


def test_mlp_matches_ort_and_records_io(builds):
    model = mlp_model()
    feed = {"x": RNG.standard_normal((2, 5, 64)).astype(np.float32)}
    fn = load(builds["mlp"].lib_path, builds["mlp"].meta_path)
    np.testing.assert_allclose(fn(feed)["y"], ort_run(model, feed)["y"], rtol=1e-4, atol=1e-5)
    meta = json.loads(builds["mlp"].meta_path.read_text())
    assert meta["inputs"] == [{"name": "x", "shape": [2, 5, 64], "dtype": "float32"}]
    assert meta["outputs"][0]["name"] == "y" and '"mcpu"' in meta["target"]


def test_attention_block_matches_ort(tmp_path):
    # 64-wide rows: LayerNorm takes the row-wise schedule (whole SIMD vectors per row)
    model = attention_model(seq=8, dim=64)
    build = compile_host(model, tmp_path)
    feed = {"x": RNG.standard_normal((1, 8, 64)).astype(np.float32)}
    got = load(build.lib_path, build.meta_path)(feed)["y"]
    np.testing.assert_allclose(got, ort_run(model, feed)["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matmulnbits_fused_and_matches_ort(tmp_path, symmetric):
    model = mlp_model(k=64, n=32, batch=1)
    spec = [
        {
            "name": "quantize-weights",
            "options": {"bits": 4, "group_size": 32, "symmetric": symmetric},
        }
    ]
    quantized = run_pipeline(model, spec, verify="off").model
    assert sum(n.op_type == "MatMulNBits" for n in quantized.graph) == 2
    from graphsurgeon.kernels.tvm import importer

    relax_mod = importer.to_relax(importer.prepare(quantized))
    kernels = [gv.name_hint for gv, _ in relax_mod.functions_items()]
    assert sum(name.startswith("matmul_nbits") for name in kernels) == 2
    weights = [(s, d) for s, d in _tensor_constants(relax_mod) if s in ([64, 32], [32, 32])]
    assert weights == []  # no dequantized float weight is ever bound as a constant
    build = compile_host(quantized, tmp_path)
    feed = {"x": RNG.standard_normal((1, 5, 64)).astype(np.float32)}
    got = load(build.lib_path, build.meta_path)(feed)["y"]
    np.testing.assert_allclose(got, ort_run(quantized, feed)["y"], rtol=1e-4, atol=1e-4)


def _tensor_constants(mod) -> list[tuple[list[int], str]]:
    from tvm import relax
    from tvm.ir.expr import Constant

    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: found.append(e) if isinstance(e, Constant) else None
            )
    return [
        ([int(d) for d in c.value.shape], str(c.value.dtype))
        for c in found
        if hasattr(c.value, "shape")
    ]


def test_exported_library_loads_from_elsewhere(builds, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    lib = shutil.copy(builds["mlp"].lib_path, moved / "any.so")
    meta = shutil.copy(builds["mlp"].meta_path, moved / "any.json")
    feed = {"x": RNG.standard_normal((2, 5, 64)).astype(np.float32)}
    fresh = load(lib, meta)(feed)["y"]
    np.testing.assert_allclose(fresh, ort_run(mlp_model(), feed)["y"], rtol=1e-4, atol=1e-5)


def test_feed_errors_name_the_input(builds):
    fn = load(builds["mlp"].lib_path, builds["mlp"].meta_path)
    with pytest.raises(GraphSurgeonError, match="no input 'x'"):
        fn({"y": np.zeros((2, 5, 64), np.float32)})
    with pytest.raises(GraphSurgeonError, match=r"compiled for \[2, 5, 64\]"):
        fn({"x": np.zeros((1, 5, 64), np.float32)})
    with pytest.raises(GraphSurgeonError, match="wants float32"):
        fn({"x": np.zeros((2, 5, 64), np.float64)})


def test_tiny_tuning_run_writes_and_reuses_database(tmp_path):
    db = tmp_path / "db" / "host.json"
    model = mlp_model(k=32, n=32, batch=1)
    first = compile_host(model, tmp_path / "a", tune_seconds=3, database=db)
    data = json.loads(db.read_text())
    assert data["format"] == "graphsurgeon-tvm-tuning/1" and data["records"]
    record = next(iter(data["records"].values()))
    assert record["seconds"] > 0 and set(record["knobs"]) == {"vector", "rows", "parallel"}
    tuned = json.loads(first.meta_path.read_text())["tuned"]
    assert tuned["tuned"] >= 1
    second = compile_host(model, tmp_path / "b", tune_seconds=1, database=db)
    assert json.loads(second.meta_path.read_text())["tuned"]["reused"] >= 1
    feed = {"x": RNG.standard_normal((1, 5, 32)).astype(np.float32)}
    got = load(second.lib_path, second.meta_path)(feed)["y"]
    np.testing.assert_allclose(got, ort_run(model, feed)["y"], rtol=1e-4, atol=1e-5)


def test_dynamic_shapes_need_shape(tmp_path):
    with pytest.raises(GraphSurgeonError, match=r"input 'x' has dynamic shape .*--shape x="):
        compile_host(mlp_model(), tmp_path)


def test_unknown_op_is_named(tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("Celu", ["x"], ["h"]),
            helper.make_node("Foo", ["h"], ["y"], domain="my.ops"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]
    )
    with pytest.raises(GraphSurgeonError, match=r"no converter for op\(s\) .*Foo"):
        compile_host(ir.from_proto(proto), tmp_path)


def test_bad_arguments(tmp_path, builds):
    with pytest.raises(GraphSurgeonError, match="target must be"):
        compile_host(mlp_model(batch=1), tmp_path, target="tpu")
    with pytest.raises(GraphSurgeonError, match="'nope'"):
        compile_host(mlp_model(batch=1), tmp_path, shapes={"nope": [1]})
    with pytest.raises(GraphSurgeonError, match="tune_seconds"):
        compile_host(mlp_model(batch=1), tmp_path, tune_seconds=-1)
    with pytest.raises(GraphSurgeonError, match="CPU profile"):
        compile_host(mlp_model(batch=1), tmp_path, target="cuda")
    with pytest.raises(GraphSurgeonError, match="no such file"):
        load(tmp_path / "missing.so", builds["mlp"].meta_path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(GraphSurgeonError, match="metadata"):
        load(builds["mlp"].lib_path, tmp_path / "bad.json")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="compiling for CUDA needs nvcc")
def test_cuda_target_compiles(tmp_path, digits):
    """Compile-only here: the CUDA build is checked for a GPU profile's arch; running it needs
    a GPU (and this machine has none, which loading must say in one line)."""
    import tvm

    build = compile_model(
        digits["model"],
        load_profile("nvidia-h100-sxm"),
        tmp_path,
        shapes={"input": [1, 1, 8, 8]},
        target="cuda",
    )
    meta = json.loads(build.meta_path.read_text())
    assert meta["device"] == "cuda" and '"arch":"sm_90"' in meta["target"]
    assert build.lib_path.stat().st_size > 0
    if not tvm.cuda(0).exist:
        with pytest.raises(GraphSurgeonError, match="no CUDA GPU is visible"):
            load(build.lib_path, build.meta_path)

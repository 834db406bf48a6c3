"""Block-sparse layers in TVM builds: BSR kernels agree with onnxruntime on the same model.

Tolerance: the BSR kernels sum the kept products in another order than onnxruntime's dense
GEMM (which also adds the zeros), so outputs agree to float32 rounding: ``rtol = atol = 1e-4``
on outputs of magnitude ~10.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")
pytest.importorskip("scipy")

from graphsurgeon.kernels.tvm import compile_model, load
from graphsurgeon.kernels.tvm.sparse import lower_block_sparse

from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.profiles import load_profile

PROFILE = load_profile("x86-avx2")
RNG = np.random.default_rng(11)


def matmul_model(k: int, n: int, *, gemm: bool = False) -> ir.Model:
    """x [batch, k] -> MatMul(w [k, n]), or Gemm(alpha=0.5, transB=1, w [n, k]) + beta * c."""
    rng = np.random.default_rng(k + n)
    if gemm:
        w = rng.standard_normal((n, k)).astype(np.float32)
        c = rng.standard_normal(n).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0, transB=1)
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")]
    else:
        w = rng.standard_normal((k, n)).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        inits = [numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(
        [node],
        "bsr",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(proto)


def prune(model: ir.Model, block: str, sparsity: float = 0.9) -> ir.Model:
    spec = [{"name": "prune-blocks", "options": {"sparsity": sparsity, "block": block}}]
    return run_pipeline(model, spec, verify="off").model


def ort_run(model: ir.Model | str, feed: dict) -> dict[str, np.ndarray]:
    data = model if isinstance(model, str) else ir.to_proto(model).SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))


def build_and_run(model, tmp_path, feed, **kw):
    shapes = {k: list(v.shape) for k, v in feed.items()}
    build = compile_model(model, PROFILE, tmp_path, threads=1, mcpu="host", shapes=shapes, **kw)
    meta = json.loads(build.meta_path.read_text())
    return load(build.lib_path, build.meta_path)(feed), meta


# (block of prune-blocks on W [K, N], batch): the three kernels (rows, dot, batch)
@pytest.mark.parametrize(("block", "batch"), [("1x4", 1), ("16x1", 1), ("4x4", 16)])
def test_pruned_matmul_runs_bsr_and_matches_ort(tmp_path, block, batch):
    pruned = prune(matmul_model(128, 96), block)
    feed = {"x": RNG.standard_normal((batch, 128)).astype(np.float32)}
    got, meta = build_and_run(pruned, tmp_path, feed)
    bh, bw = (int(v) for v in block.split("x"))
    [layer] = meta["block_sparse"]
    assert layer["block"] == [bw, bh] and layer["source"] == "mask"  # blocks of W^T
    assert layer["block_sparsity"] == pytest.approx(0.9, abs=0.01)
    np.testing.assert_allclose(got["y"], ort_run(pruned, feed)["y"], rtol=1e-4, atol=1e-4)


def test_digits_gemms_after_prune_blocks(tmp_path, digits):
    model = ir.load(digits["model"])
    pruned = prune(model, "4x4")
    x = np.load(digits["test"])["input"][:16].astype(np.float32)
    got, meta = build_and_run(pruned, tmp_path, {"input": x})
    lowered = {layer["node"]: layer for layer in meta["block_sparse"]}
    gemms = [n.name for n in pruned.graph if n.op_type == "Gemm"]
    assert sorted(lowered) == sorted(gemms)  # both classifier layers, no conv
    ref = ort_run(pruned, {"input": x})["logits"]
    np.testing.assert_allclose(got["logits"], ref, rtol=1e-4, atol=1e-4)
    assert (got["logits"].argmax(1) == ref.argmax(1)).all()


def test_gemm_alpha_beta_bias_and_detected_blocks(tmp_path):
    pruned = prune(matmul_model(64, 32, gemm=True), "1x4")  # W [N, K]: blocks of W^T itself
    for node in pruned.graph:
        node.metadata_props.clear()  # no mask metadata: the blocks are found from the zeros
    feed = {"x": RNG.standard_normal((4, 64)).astype(np.float32)}
    got, meta = build_and_run(pruned, tmp_path, feed)
    [layer] = meta["block_sparse"]
    assert layer["source"] == "detected" and layer["block_sparsity"] >= 0.9
    np.testing.assert_allclose(got["y"], ort_run(pruned, feed)["y"], rtol=1e-4, atol=1e-4)


def test_dense_or_lightly_pruned_weights_stay_dense():
    assert lower_block_sparse(matmul_model(64, 32)) == []
    assert lower_block_sparse(prune(matmul_model(64, 32), "4x4", sparsity=0.5)) == []
    lowered = prune(matmul_model(64, 32), "4x4")
    assert len(lower_block_sparse(lowered)) == 1
    assert [n.op_type for n in lowered.graph] == ["BlockSparseMatMul"]


def test_block_sparse_off_builds_dense(tmp_path):
    pruned = prune(matmul_model(64, 32), "4x4")
    feed = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    got, meta = build_and_run(pruned, tmp_path, feed, block_sparse=False)
    assert meta["block_sparse"] == []
    np.testing.assert_allclose(got["y"], ort_run(pruned, feed)["y"], rtol=1e-4, atol=1e-4)


def test_tuning_skips_the_bsr_kernel(tmp_path):
    """The BSR kernel is written scheduled: the tuner leaves it alone, the rest is tuned."""
    pruned = prune(matmul_model(64, 32), "4x4")
    feed = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    got, meta = build_and_run(
        pruned, tmp_path / "b", feed, tune_seconds=1, database=tmp_path / "db.json"
    )
    assert meta["block_sparse"] and meta["tuned"]["kernels"] >= 1
    records = json.loads((tmp_path / "db.json").read_text())["records"].values()
    assert not [r for r in records if r["kernel"].startswith("bsr_")]
    np.testing.assert_allclose(got["y"], ort_run(pruned, feed)["y"], rtol=1e-4, atol=1e-4)

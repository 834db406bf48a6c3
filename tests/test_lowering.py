"""lower-kernels / raise-kernels: patterns -> graphsurgeon custom ops -> back, outputs unchanged.

The lowered model is run by onnx's reference evaluator with the custom ops defined by
graphsurgeon.kernels.reference, and compared to onnxruntime on the model before lowering; the
raised model must run in stock onnxruntime with the same outputs and the original node form.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphsurgeon.kernels import reference
from graphsurgeon.passes.lowering import (
    GS_DOMAIN,
    LOWERED_FROM_KEY,
    LowerKernels,
    RaiseKernels,
)
from graphsurgeon.passes.pruning import MASK_KEY, PruneBlocks, PruneNM, read_mask
from graphsurgeon.passes.weight_quant import QuantizeWeights
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.data import load_npz
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers

RNG = np.random.default_rng(3)
FLOAT = TensorProto.FLOAT


def mlp() -> ir.Model:
    """x[3,64] -MatMul W1[64,48]- Relu -Gemm(W2[16,48], transB=1, b)- y[3,16] (same weights
    every call)."""
    rng = np.random.default_rng(0)
    w1 = rng.uniform(-1, 1, (64, 48)).astype(np.float32)
    w2 = rng.uniform(-1, 1, (16, 48)).astype(np.float32)
    b = rng.uniform(-1, 1, 16).astype(np.float32)
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            oh.make_node("Relu", ["h"], ["r"], name="relu"),
            oh.make_node("Gemm", ["r", "W2", "b"], ["y"], name="fc2", transB=1),
        ],
        "g",
        [oh.make_tensor_value_info("x", FLOAT, [3, 64])],
        [oh.make_tensor_value_info("y", FLOAT, [3, 16])],
        [nh.from_array(w1, "W1"), nh.from_array(w2, "W2"), nh.from_array(b, "b")],
    )
    return ir.from_proto(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    )


FEEDS = {"x": RNG.standard_normal((3, 64)).astype(np.float32)}


def ort(model: ir.Model, feeds=FEEDS) -> dict[str, np.ndarray]:
    return run(make_session(model), feeds)


def lowered_outputs(model: ir.Model, feeds=FEEDS) -> dict[str, np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)  # custom domain and all
    outs = reference.evaluator(proto).run(None, feeds)
    return dict(zip([v.name for v in model.graph.outputs], outs, strict=True))


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def round_trip(model: ir.Model, feeds=FEEDS, **options) -> tuple[LowerKernels, list[str]]:
    """Lower (outputs == ORT before), raise (ORT outputs == before); the lowered op types."""
    before_ops, before = ops(model), ort(model, feeds)
    before_inits = sorted(model.graph.initializers)
    lower = LowerKernels(options)
    assert lower(model).modified
    lowered_ops = ops(model)
    for name, y in lowered_outputs(model, feeds).items():
        np.testing.assert_allclose(y, before[name], rtol=1e-5, atol=1e-5)
    assert RaiseKernels()(model).modified
    assert ops(model) == before_ops
    assert sorted(model.graph.initializers) == before_inits  # the weights' own names, back
    assert GS_DOMAIN not in model.opset_imports
    assert not any(LOWERED_FROM_KEY in n.metadata_props for n in model.graph)
    for name, y in ort(model, feeds).items():
        np.testing.assert_array_equal(y, before[name])
    return lower, lowered_ops


# -- packed weights --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "op"),
    [
        ({"bits": 4}, "MatMulW4A16"),
        ({"bits": 4, "symmetric": False, "group_size": 16}, "MatMulW4A16"),
        ({"bits": 8, "symmetric": False}, "MatMulW8A16"),
    ],
)
def test_matmulnbits_lowers_to_w4a16_and_back(options, op):
    model = mlp()
    QuantizeWeights(options)(model)
    nbits = next(n for n in model.graph if n.op_type == "MatMulNBits")
    layer_id = nbits.metadata_props["graphsurgeon.layer_id"]
    tensors = [v.const_value.numpy().tobytes() for v in nbits.inputs[1:]]
    _, lowered = round_trip(model)
    assert lowered[0] == op
    # the custom node reads the MatMulNBits tensors as they are (no repacking)
    model2 = mlp()
    QuantizeWeights(options)(model2)
    LowerKernels()(model2)
    node = next(n for n in model2.graph if n.domain == GS_DOMAIN)
    assert [v.const_value.numpy().tobytes() for v in node.inputs[1:]] == tensors
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert attrs == {
        "K": 64,
        "N": 48,
        "bits": options["bits"],
        "block_size": options.get("group_size", 32),
        "has_zeros": int(not options.get("symmetric", True)),
    }
    assert node.metadata_props["graphsurgeon.layer_id"] == layer_id


def dq_model(dtype: int, zero_point: bool, k: int = 80, n: int = 24, block: int = 16) -> ir.Model:
    """A blocked DequantizeLinear (opset 21, along K, K not a multiple of the block) + MatMul."""
    lo, hi = {TensorProto.INT4: (-8, 8), TensorProto.UINT4: (0, 16), TensorProto.INT8: (-128, 128),
              TensorProto.UINT8: (0, 256)}[dtype]  # fmt: skip
    blocks = -(-k // block)
    inits = [
        oh.make_tensor("wq", dtype, [k, n], RNG.integers(lo, hi, (k, n)).ravel().tolist()),
        nh.from_array(RNG.uniform(0.01, 0.1, (blocks, n)).astype(np.float32), "s"),
    ]
    if zero_point:
        zp = RNG.integers(lo, hi, (blocks, n)).ravel().tolist()
        inits.append(oh.make_tensor("z", dtype, [blocks, n], zp))
    graph = oh.make_graph(
        [
            oh.make_node("DequantizeLinear", [i.name for i in inits], ["w"], axis=0, block_size=block),
            oh.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        "g",
        [oh.make_tensor_value_info("x", FLOAT, [3, k])],
        [oh.make_tensor_value_info("y", FLOAT, [3, n])],
        inits,
    )  # fmt: skip
    return ir.from_proto(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    )


@pytest.mark.parametrize(
    "dtype", [TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8]
)
@pytest.mark.parametrize("zero_point", [False, True])
def test_blocked_dequantizelinear_lowers_and_raises(dtype, zero_point):
    model = dq_model(dtype, zero_point)
    originals = [v.const_value for v in model.graph.node(0).inputs]
    feeds = {"x": RNG.standard_normal((3, 80)).astype(np.float32)}
    _, lowered = round_trip(model, feeds)
    four = dtype in (TensorProto.INT4, TensorProto.UINT4)
    assert lowered == ["MatMulW4A16" if four else "MatMulW8A16"]
    raised = [v.const_value for v in model.graph.node(0).inputs]
    assert len(raised) == len(originals)  # a zero point only where there was one
    for old, new in zip(originals, raised, strict=True):  # same codes, scales, zero points
        assert new.dtype == old.dtype
        np.testing.assert_array_equal(new.numpy(), old.numpy())


def test_dequantizelinear_block_not_power_of_two_is_skipped():
    model = dq_model(TensorProto.INT8, False, block=24, k=72)
    lower = LowerKernels()
    assert not lower(model).modified
    assert lower.report()["skipped"] == {"block_size 24 is not a power of two >= 16": 1}


# -- sparse ----------------------------------------------------------------------------------
def test_two_four_lowers_matmul_and_gemm_and_keeps_the_mask():
    model = mlp()
    PruneNM({"pattern": "2:4"})(model)
    masks = {lay.id: read_mask(model, lay.id) for lay in find_layers(model)}
    lower, lowered = round_trip(model)
    assert lowered == ["SparseMatMul24", "Relu", "SparseMatMul24"]
    assert lower.report()["lowered"] == {"SparseMatMul24": 2}
    gemm = model.graph.node(2)
    assert gemm.attributes.get_int("transB") == 1  # raised in its own layout
    for lid, mask in masks.items():  # the "zeros" mask still matches the raised weight
        np.testing.assert_array_equal(read_mask(model, lid), mask)


@pytest.mark.parametrize(("pattern", "lowered"), [("1:4", True), ("4:8", False)])
def test_other_nm_patterns_lower_when_they_fit_two_four(pattern, lowered):
    model = mlp()
    PruneNM({"pattern": pattern})(model)
    lower = LowerKernels()
    assert lower(model).modified == lowered
    if not lowered:
        assert "more than 2 nonzeros" in next(iter(lower.report()["skipped"]))


def test_two_four_stores_half_the_values():
    model = mlp()
    PruneNM({})(model)
    LowerKernels()(model)
    node = model.graph.node(0)
    values, meta = (v.const_value.numpy() for v in node.inputs[1:3])
    assert values.shape == (48, 32) and meta.shape == (48, 8) and meta.dtype == np.uint8
    # the dense weight's mask travels in lowered_from, not as a mask of the node's inputs
    assert MASK_KEY not in node.metadata_props
    assert "mask" in json.loads(node.metadata_props[LOWERED_FROM_KEY])


def test_two_four_mask_that_no_longer_fits_is_skipped():
    model = mlp()
    PruneNM({})(model)
    w = model.graph.initializers["W1"]
    w.const_value = ir.tensor(np.ones((64, 48), np.float32), name="W1")  # changed after pruning
    lower = LowerKernels()
    lower(model)
    assert ops(model)[0] == "MatMul"
    assert "more than 2 nonzeros" in next(iter(lower.report()["skipped"]))


@pytest.mark.parametrize("block", ["4x4", "16x16", "1x4"])
def test_block_sparse_lowers_to_bsr(block):
    model = mlp()
    PruneBlocks({"block": block, "sparsity": 0.7})(model)
    _, lowered = round_trip(model)
    assert lowered == ["BsrMatMul", "Relu", "BsrMatMul"]
    model = mlp()
    PruneBlocks({"block": block, "sparsity": 0.7})(model)
    LowerKernels()(model)
    bh, bw = (int(s) for s in block.split("x"))
    # MatMul W [K, N]: the mask's rows run along K; Gemm transB W [N, K]: along N
    blocks = [
        list(n.attributes["blocksize"].value) for n in model.graph if n.op_type == "BsrMatMul"
    ]
    assert blocks == [[bw, bh], [bh, bw]]


def test_block_sparsity_below_threshold_stays_dense():
    model = mlp()
    PruneBlocks({"block": "4x4", "sparsity": 0.3})(model)
    lower = LowerKernels({"bsr_min_sparsity": 0.5})
    assert not lower(model).modified
    assert all("< bsr_min_sparsity" in r for r in lower.report()["skipped"])


# -- int8 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("b_dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("b_zero", [False, True])
def test_matmulinteger_lowers_to_int8(b_dtype, b_zero):
    k, n = 40, 12
    info = np.iinfo(b_dtype)
    b = RNG.integers(info.min, info.max + 1, (k, n)).astype(b_dtype)
    inits, inputs = [nh.from_array(b, "B")], ["a", "B", "az"]
    if b_zero:
        inits.append(nh.from_array(RNG.integers(0, 9, n).astype(b_dtype), "bz"))
        inputs.append("bz")
    graph = oh.make_graph(
        [
            oh.make_node("DynamicQuantizeLinear", ["x"], ["a", "as", "az"]),
            oh.make_node("MatMulInteger", inputs, ["y"], name="mi"),
        ],
        "g",
        [oh.make_tensor_value_info("x", FLOAT, [3, k])],
        [oh.make_tensor_value_info("y", TensorProto.INT32, [3, n])],
        inits,
    )
    model = ir.from_proto(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    )
    feeds = {"x": RNG.standard_normal((3, k)).astype(np.float32)}
    _, lowered = round_trip(model, feeds)
    assert lowered == ["DynamicQuantizeLinear", "MatMulInt8"]
    assert model.graph.initializers["B"].dtype == ir.DataType.from_numpy(np.dtype(b_dtype))


# -- real model, pipeline, options ------------------------------------------------------------
def test_digits_pipeline_lower_then_raise(digits, tmp_path):
    model = gs.load(digits["model"])
    feeds = load_npz(digits["test"], model).feeds(32, batch_size=32)[0]
    result = gs.run_pipeline(
        model,
        {"steps": ["cleanup", {"name": "prune-nm"}, {"name": "lower-kernels"}]},
        verify="structural",
    )
    lowered = result.model
    assert sorted(n.op_type for n in lowered.graph if n.domain == GS_DOMAIN) == [
        "SparseMatMul24",
        "SparseMatMul24",
    ]
    gs.save(lowered, tmp_path / "lowered.onnx")  # the custom-op model saves and loads
    reloaded = gs.load(tmp_path / "lowered.onnx")
    pruned = gs.run_pipeline(gs.load(digits["model"]), {"steps": ["cleanup", "prune-nm"]}).model
    expected = ort(pruned, feeds)
    got = lowered_outputs(reloaded, feeds)
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-4, atol=1e-4)
    raised = gs.run_pipeline(reloaded, {"steps": ["raise-kernels"]}, verify="structural").model
    np.testing.assert_array_equal(ort(raised, feeds)["logits"], expected["logits"])


def test_kernels_option_selects_patterns():
    model = mlp()
    PruneNM({})(model)
    assert not LowerKernels({"kernels": ["bsr", "int8"]})(model).modified
    assert LowerKernels({"kernels": ["sparse24"]})(model).modified


def test_bad_option_is_a_clear_error():
    with pytest.raises(gs.GraphSurgeonError, match="lower-kernels: kernels"):
        LowerKernels({"kernels": ["w3a16"]})


def test_lowered_from_metadata_is_json():
    model = mlp()
    QuantizeWeights({"bits": 4})(model)
    LowerKernels()(model)
    node = model.graph.node(0)
    assert json.loads(node.metadata_props[LOWERED_FROM_KEY]) == {
        "op": "MatMulNBits",
        "accuracy_level": 0,
    }


def test_digits_quantize_dynamic_lowers_to_int8(digits):
    """quantize-dynamic's MatMulInteger (uint8 activations from DynamicQuantizeLinear, int8
    weights) -> MatMulInt8: the same logits, bit for bit, and back."""
    model = gs.run_pipeline(gs.load(digits["model"]), {"steps": ["cleanup", "quantize-dynamic"]})
    model = model.model
    feeds = load_npz(digits["test"], model).feeds(16, batch_size=16)[0]
    before = ort(model, feeds)["logits"]
    lower = LowerKernels()
    lower(model)
    assert lower.report()["lowered"] == {"MatMulInt8": 2}
    np.testing.assert_array_equal(lowered_outputs(model, feeds)["logits"], before)
    RaiseKernels()(model)
    np.testing.assert_array_equal(ort(model, feeds)["logits"], before)

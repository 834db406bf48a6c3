"""quantize-weights: packed low-bit weights that run in stock onnxruntime.

The reference for every numeric check is rebuilt here, independently of the pass: the packed
bytes are read back from the saved file and unpacked with this file's own helpers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphsurgeon.passes.weight_quant import QuantizeWeights
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits

import graphsurgeon as gs
from graphsurgeon.layers import find_layers
from graphsurgeon.packed import PackedWeight
from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.targets import Targets

RNG = np.random.default_rng(7)


# -- helpers ------------------------------------------------------------------------------------
def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes from bytes, ``8/bits`` per byte, lowest bits first (test's own implementation)."""
    out = []
    for j in range(8 // bits):
        out.append((packed.astype(np.int64) >> (j * bits)) & ((1 << bits) - 1))
    return np.stack(out, axis=-1).reshape(*packed.shape[:-1], -1)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def init_map(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def matmul_model(k: int, n: int, *, layers: int = 1, seed: int = 0) -> ir.Model:
    """x [batch, seq, k] -> MatMul(W0 [k, n]) -> Relu -> MatMul(W1 [n, n]) ..."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, width = [], [], "x", k
    for i in range(layers):
        w = (rng.standard_normal((width, n)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        prev, width = f"r{i}", n
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, n])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(proto)


def run_quant(model: ir.Model, options: dict, **kw) -> tuple[ir.Model, object]:
    result = run_pipeline(model, [{"name": "quantize-weights", "options": options, **kw}])
    return result.model, result.records[0]


def saved(model: ir.Model, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    gs.save(model, path)
    return path


# -- MatMulNBits ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bits", "symmetric"),
    [
        (4, True),
        (4, False),
        (8, True),
        (8, False),
        (2, True),
        (2, False),
        ("ternary", True),
        (1, True),
    ],
)
def test_matmulnbits_matches_numpy_reference(tmp_path: Path, bits, symmetric: bool) -> None:
    k, n, group = 96, 40, 32  # K not a multiple of 64: exercises the padded last block
    model = matmul_model(k, n)
    w = model.graph.initializers["w0"].const_value.numpy().copy()
    src = saved(model, tmp_path, "src.onnx")
    model, record = run_quant(model, {"bits": bits, "symmetric": symmetric, "group_size": group})
    assert record.modified
    out = saved(model, tmp_path, "q.onnx")
    proto = onnx.load(str(out))
    (node,) = [nd for nd in proto.graph.node if nd.op_type == "MatMulNBits"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nbits = 2 if bits in ("ternary", 1) else bits
    assert node.domain == "com.microsoft"
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (k, n, nbits, group)
    inits = init_map(out)
    blocks = -(-k // group)
    packed = inits[node.input[1]]
    assert packed.dtype == np.uint8 and packed.shape == (n, blocks, group * nbits // 8)
    codes = unpack(packed, nbits).reshape(n, blocks, group)
    scales = inits[node.input[2]].reshape(n, blocks)
    has_zp = len(node.input) > 3 and node.input[3]
    assert bool(has_zp) == (not symmetric and bits not in ("ternary", 1))
    if has_zp:
        zero = unpack(inits[node.input[3]].reshape(n, -1), nbits)[:, :blocks]
    else:
        zero = np.full((n, blocks), 1 << (nbits - 1))
    if bits == "ternary":
        assert set(np.unique(codes)) <= {1, 2, 3}
    if bits == 1:
        assert set(np.unique(codes)) <= {1, 3}
    w_hat = ((codes - zero[..., None]) * scales[..., None]).reshape(n, -1)[:, :k].T
    x = RNG.standard_normal((3, 5, k)).astype(np.float32)
    got = session(out).run(None, {"x": x})[0]
    want = np.maximum(x @ w_hat.astype(np.float32), 0)
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=1e-4)
    rel = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
    bound = {8: 0.01, 4: 0.15, 2: 0.7, "ternary": 0.7, 1: 0.8}[bits]
    assert rel < bound
    # the file really shrinks: the float weight is gone, the packed one is smaller
    float_bytes = w.nbytes
    packed_bytes = sum(inits[name].nbytes for name in node.input[1:] if name)
    assert "w0" not in inits
    # graph overhead (node, attributes, names) is a few hundred bytes at most
    assert os.path.getsize(out) <= os.path.getsize(src) - float_bytes + packed_bytes + 512
    assert packed_bytes < float_bytes / (2.5 if bits == 8 else 5)


def test_int4_packing_matches_onnxruntime_quantizer() -> None:
    """Symmetric int4 codes and scales are byte-identical to ORT's own MLAS quantizer."""
    k, n, group = 128, 48, 32
    model = matmul_model(k, n)
    w = model.graph.initializers["w0"].const_value.numpy().copy()
    model, _ = run_quant(model, {"bits": 4, "group_size": group})
    (node,) = [nd for nd in model.graph if nd.op_type == "MatMulNBits"]
    packed = np.zeros((n, k // group, group // 2), np.uint8)
    zp = np.zeros((n, (k // group + 1) // 2), np.uint8)
    scales = np.zeros((n, k // group), np.float32)
    quantize_matmul_4bits(packed, w, scales, zp, group, n, k, True)
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), packed)
    np.testing.assert_allclose(node.inputs[2].const_value.numpy(), scales.ravel(), rtol=1e-6)


# -- codebook form: Gemm, Conv, MatMul under format=codebook ------------------------------------
def gemm_conv_model(trans_b: int) -> ir.Model:
    rng = np.random.default_rng(1)
    conv_w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    gemm_w = rng.standard_normal((64, 16 * 4 * 4)).astype(np.float32) * 0.05  # [N, K]
    if not trans_b:
        gemm_w = np.ascontiguousarray(gemm_w.T)
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], name="gemm", transB=trans_b),
    ]
    inits = [
        numpy_helper.from_array(conv_w, "cw"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "cb"),
        numpy_helper.from_array(gemm_w, "gw"),
        numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "gb"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(proto)


def decode_codebook(inits: dict[str, np.ndarray], weight: str, shape, bits_cb: int, transposed):
    """Rebuild a codebook-form weight from the saved initializers (test's own decode)."""
    base = next(n for n in inits if n.startswith(f"{weight}_packed") and n.endswith(str(bits_cb)))
    codes = unpack(inits[base], bits_cb).ravel()
    codebook = inits[f"{base}_codebook"]
    scales = inits[f"{base}_scales"]  # [R, G, 1]
    rows, groups, _ = scales.shape
    values = codebook[codes].reshape(rows, groups, -1) * scales
    if f"{base}_offsets" in inits:
        values = values + inits[f"{base}_offsets"]
    per_row = int(np.prod(shape)) // rows
    values = values.reshape(rows, -1)[:, :per_row]
    return (values.T if transposed else values).reshape(shape)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    ("bits", "symmetric", "cb_bits"),
    [(4, True, 4), (4, False, 4), (2, True, 2), ("ternary", True, 2), (1, True, 1), (8, True, 8)],
)
def test_codebook_form_matches_numpy_reference(tmp_path, trans_b, bits, symmetric, cb_bits) -> None:
    model = gemm_conv_model(trans_b)
    ws = {n: model.graph.initializers[n].const_value.numpy().copy() for n in ("cw", "gw")}
    src = saved(model, tmp_path, "src.onnx")
    model, record = run_quant(model, {"bits": bits, "symmetric": symmetric, "group_size": 32})
    assert record.modified and not record.notes.get("skipped")
    out = saved(model, tmp_path, "q.onnx")
    inits = init_map(out)
    assert "cw" not in inits and "gw" not in inits
    conv_w = decode_codebook(inits, "cw", ws["cw"].shape, cb_bits, False)
    gemm_w = decode_codebook(inits, "gw", ws["gw"].shape, cb_bits, not trans_b)
    if bits == 1:
        assert all(len(np.unique(np.abs(r))) == 1 for r in conv_w.reshape(16, -1)[:, :32])
    for w, w_hat in ((ws["cw"], conv_w), (ws["gw"], gemm_w)):
        rel = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
        assert rel < {4: 0.15, 8: 0.01, 2: 0.7, "ternary": 0.7, 1: 0.8}[bits]
    # numpy reference of the whole net with the decoded weights, via an fp32 ORT run of the
    # original graph whose weights are swapped for the decoded ones
    ref = onnx.load(str(src))
    for t in ref.graph.initializer:
        if t.name == "cw":
            t.CopyFrom(numpy_helper.from_array(conv_w.astype(np.float32), "cw"))
        if t.name == "gw":
            t.CopyFrom(numpy_helper.from_array(gemm_w.astype(np.float32), "gw"))
    x = RNG.standard_normal((2, 8, 4, 4)).astype(np.float32)
    want = ort.InferenceSession(ref.SerializeToString()).run(None, {"x": x})[0]
    got = session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=1e-4)
    assert os.path.getsize(out) < os.path.getsize(src) * {8: 0.4, 4: 0.3}.get(bits, 0.25)
    # the layer finder sees both layers with their logical shape and packed bytes
    layers = {layer.op_type: layer for layer in find_layers(gs.load(out))}
    assert isinstance(layers["Conv"].weight, PackedWeight)
    assert list(layers["Conv"].weight.shape) == list(ws["cw"].shape)
    np.testing.assert_allclose(layers["Gemm"].weight.numpy(), gemm_w, rtol=1e-6, atol=1e-7)
    assert layers["Gemm"].weight.nbytes < ws["gw"].nbytes / (3 if bits == 8 else 5)
    after = record.after.layers
    assert all(after[lid].bytes < record.before.layers[lid].bytes for lid in after)
    assert after[layers["Conv"].id].macs == record.before.layers[layers["Conv"].id].macs


def test_matmul_codebook_format_uses_default_domain_only(tmp_path: Path) -> None:
    model = matmul_model(64, 32)
    model, record = run_quant(model, {"bits": 4, "format": "codebook"})
    assert record.modified
    assert {node.domain for node in model.graph} == {""}
    assert "com.microsoft" not in model.opset_imports
    x = RNG.standard_normal((2, 5, 64)).astype(np.float32)
    w_hat = find_layers(model)[0].weight.numpy()
    got = session(saved(model, tmp_path, "q.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, np.maximum(x @ w_hat, 0), atol=1e-4, rtol=1e-4)


# -- options, overrides, refusals, exact `modified` ---------------------------------------------
def test_per_layer_overrides_give_mixed_precision() -> None:
    model = matmul_model(64, 64, layers=3)
    layer_ids = [layer.id for layer in find_layers(model)]
    overrides = {layer_ids[0]: {"bits": 8}, layer_ids[1]: {"bits": 2, "group_size": 64}}
    model, record = run_quant(model, {"bits": 4, "overrides": overrides})
    got = {layer.id: layer.node for layer in find_layers(model)}
    assert [got[i].attributes.get_int("bits") for i in layer_ids] == [8, 2, 4]
    assert [got[i].attributes.get_int("block_size") for i in layer_ids] == [32, 64, 32]
    bytes_after = [record.after.layers[i].bytes for i in layer_ids]
    assert bytes_after[1] < bytes_after[2] < bytes_after[0] < 64 * 64 * 4


def test_targets_and_exact_modified(tmp_path: Path) -> None:
    model = matmul_model(64, 32, layers=2)
    find_layers(model)  # layer ids, as the pipeline assigns them before any pass
    before = saved(model, tmp_path, "a.onnx").read_bytes()
    result = QuantizeWeights({"bits": 4}, Targets(names=["nothing"]))(model)
    assert not result.modified
    assert saved(model, tmp_path, "b.onnx").read_bytes() == before
    model, record = run_quant(model, {"bits": 4}, targets={"names": ["mm1"]})
    assert record.modified
    assert [n.op_type for n in model.graph if n.op_type.startswith("MatMul")] == [
        "MatMul",
        "MatMulNBits",
    ]


def test_refusals_are_recorded() -> None:
    model = matmul_model(64, 32)
    graph = model.graph
    x2 = graph.node("mm0").inputs[0]
    # a second reader of w0 makes it shared
    extra = ir.node("MatMul", [x2, graph.initializers["w0"]], name="mm_shared")
    graph.insert_after(graph.node("mm0"), extra)
    graph.outputs.append(extra.outputs[0])
    extra.outputs[0].name, extra.outputs[0].dtype = "y2", ir.DataType.FLOAT
    _, record = run_quant(model, {"bits": 4})
    assert not record.modified
    assert record.notes["skipped"] == {"weight is shared by several nodes": 2}
    tiny = matmul_model(4, 4)  # 64 bytes of weight: scales alone would outweigh it
    _, record = run_quant(tiny, {"bits": 4})
    assert not record.modified
    assert "the packed form would not be smaller than the weight" in record.notes["skipped"]


def test_gptq_reduces_output_error_on_correlated_inputs() -> None:
    from graphsurgeon.passes._gptq import gptq_quantize, hessian
    from graphsurgeon.passes._lowbit import Grid, dequantize, quantize_rtn

    rng = np.random.default_rng(3)
    k, n = 128, 64
    # activations live near a low-dimensional subspace, as real ones do
    x = rng.standard_normal((2048, 16)) @ rng.standard_normal((16, k))
    x += 0.05 * rng.standard_normal((2048, k))
    v = rng.standard_normal((n, k))
    grid = Grid("int", 4, True)
    # with uncorrelated inputs (H = I) there is nothing to compensate: GPTQ == round to nearest
    np.testing.assert_array_equal(
        gptq_quantize(v, np.eye(k), grid, 32)[0], quantize_rtn(v, grid, 32)[0]
    )
    errors = {}
    for name, (codes, scale, zero) in {
        "rtn": quantize_rtn(v, grid, 32),
        "gptq": gptq_quantize(v, hessian(x), grid, 32),
    }.items():
        assert codes.max() <= 15
        v_hat = dequantize(codes, scale, zero).reshape(n, -1)[:, :k]
        errors[name] = np.linalg.norm(x @ (v - v_hat).T) / np.linalg.norm(x @ v.T)
    assert errors["gptq"] < 0.5 * errors["rtn"]


# -- real models ----------------------------------------------------------------------------------
def accuracy(path: Path, data: Path) -> float:
    d = np.load(data)
    logits = session(path).run(None, {"input": d["input"]})[0]
    return float(np.mean(np.argmax(logits, -1) == d["labels"]))


def test_digits_int4_g32_keeps_accuracy(digits, tmp_path: Path) -> None:
    result = run_pipeline(
        gs.load(digits["model"]),
        [{"name": "quantize-weights", "options": {"bits": 4, "group_size": 32}}],
        calib=digits["test"],
        verify="numeric",
    )
    out = saved(result.model, tmp_path, "q.onnx")
    base, quant = accuracy(digits["model"], digits["test"]), accuracy(out, digits["test"])
    assert quant >= base - 0.03, (base, quant)
    assert os.path.getsize(out) < os.path.getsize(digits["model"]) / 3
    record = result.records[0]
    assert len(record.after.layers) == len(record.before.layers) == 5
    assert record.after.bytes < record.before.bytes / 4
    # the first conv (144 weights, 576 bytes) is too small for codes + scales + decode to pay
    assert record.notes["skipped"] == {"the packed form would not be smaller than the weight": 1}
    changed = record.layer_changes()
    assert len(changed) == 4
    assert all(b[1] < b[0] for b in (c["bytes"] for c in changed.values()))


def test_minilm_int4_matmul_weights_shrink_6x(minilm, tmp_path: Path) -> None:
    model = gs.load(minilm["model"])
    float_bytes = sum(
        layer.weight.nbytes for layer in find_layers(model) if layer.op_type == "MatMul"
    )
    result = run_pipeline(
        model,
        [
            {
                "name": "quantize-weights",
                "options": {"bits": 4, "group_size": 32},
                "targets": {"op_types": ["MatMul"]},  # the MatMuls alone: the measure
            }
        ],
        calib=minilm["sentences"],
        verify="numeric",
    )
    out = saved(result.model, tmp_path, "q.onnx")
    saved_bytes = os.path.getsize(minilm["model"]) - os.path.getsize(out)
    packed_bytes = float_bytes - saved_bytes  # what the MatMul weights now take in the file
    ratio = float_bytes / packed_bytes
    print(f"MiniLM int4 g32 MatMul weights: {float_bytes} -> {packed_bytes} bytes, {ratio:.2f}x")
    assert ratio >= 6.0
    nbits = [layer for layer in find_layers(result.model) if layer.op_type == "MatMulNBits"]
    assert len(nbits) == 36
    cosine = result.drift_vs_original["sentence_embedding"]["cosine"]
    print(f"MiniLM int4 g32 rtn sentence_embedding cosine {cosine:.4f}")
    assert cosine > 0.95
    embeddings = [layer for layer in find_layers(result.model) if layer.op_type == "Gather"]
    assert len(embeddings) == 3 and all(e.weight.dtype == ir.DataType.FLOAT for e in embeddings)


def test_embedding_table_int4_codebook_within_one_step_and_smaller(tmp_path) -> None:
    """A Gather table is quantized in groups along each row: every looked-up value is within
    one quantization step of the original, and the saved file shrinks (3.4x for this tiny
    table, whose decode subgraph is a fixed cost)."""
    from onnx import TensorProto, helper, numpy_helper

    import graphsurgeon as gs
    from graphsurgeon.execution import make_session, run

    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 64)).astype(np.float32)
    idx = helper.make_tensor_value_info("ids", TensorProto.INT64, [3, 5])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5, 64])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")],
        "g",
        [idx],
        [out],
        [numpy_helper.from_array(table, "E")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    result = gs.run_pipeline(
        model, [{"name": "quantize-weights", "options": {"bits": 4, "group_size": 32}}]
    )
    assert result.modified and not result.records[0].notes.get("skipped")
    ids = rng.integers(0, 50, (3, 5)).astype(np.int64)
    got = run(make_session(result.model, optimize=True), {"ids": ids})["y"]
    want = table[ids]
    step = np.abs(table).reshape(50, 2, 32).max(-1) / 7  # one int4 step per row group
    bound = np.repeat(step, 32, axis=-1)[ids]
    assert np.all(np.abs(got - want) <= bound + 1e-6)
    gs.save(result.model, tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx").stat().st_size < table.nbytes / 3


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_codebook_decode_with_codes_that_do_not_fill_the_last_byte(bits) -> None:
    """10 x 57 codes at 2 bits are 570 codes in 143 bytes (572 slots): the decode drops the
    2 padding codes before reshaping (a pruned 10 x 57 Gemm once failed here in onnxruntime)."""
    from graphsurgeon.passes._lowbit import emit_codebook_decode

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, size=(10, 1, 57)).astype(np.uint8)
    codebook = rng.standard_normal(1 << bits).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 57]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name="g")
    out = ir.Value(name="y")
    gemm = ir.node("Gemm", [x, x], attributes={"transB": 1}, outputs=[out])  # B replaced below
    graph.append(gemm)
    w = emit_codebook_decode(graph, gemm, "w", codes, bits, codebook, (10, 57))
    gemm.replace_input_with(1, w)
    out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape([2, 10])
    graph.outputs.append(out)
    proto = ir.to_proto(ir.Model(graph, ir_version=8))
    feed = rng.standard_normal((2, 57)).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": feed})[0]
    want = feed @ codebook[codes.reshape(10, 57)].T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_columns_reproduce_onnxruntime_conv() -> None:
    """im2col rows times the flattened kernel are the Conv (strides, pads, dilations)."""
    from graphsurgeon.passes._gptq import conv_columns
    from onnx import helper as h

    rng = np.random.default_rng(0)
    for strides, pads, dil in [((1, 1), (1, 1, 1, 1), (1, 1)), ((2, 1), (0, 1, 2, 0), (1, 2))]:
        x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
        w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
        node = h.make_node(
            "Conv", ["x", "w"], ["y"], strides=list(strides), pads=list(pads), dilations=list(dil)
        )
        graph = h.make_graph(
            [node],
            "g",
            [h.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
            [h.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, "w")],
        )
        proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
        y = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
        attrs = {"strides": strides, "pads": pads, "dilations": dil}
        cols = conv_columns(x, attrs, (3, 3), limit=10**9)
        got = (cols @ w.reshape(5, -1).T).reshape(2, y.shape[2], y.shape[3], 5)
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), y, rtol=1e-4, atol=1e-4)


def test_gptq_on_conv_layers_beats_round_to_nearest(digits) -> None:
    """2-bit weights on the digits CNN's convolutions: GPTQ's compensation (im2col Hessian on
    the train split) moves the logits less than round-to-nearest, on the test split."""
    from graphsurgeon.metrics import evaluate

    errors = {}
    for method in ("rtn", "gptq"):
        model = gs.load(digits["model"])
        options = {"bits": 2, "group_size": 32, "method": method, "calib_samples": 128}
        result = run_pipeline(
            model,
            {
                "steps": [
                    {
                        "name": "quantize-weights",
                        "options": options,
                        "targets": {"op_types": ["Conv"]},
                    }
                ]
            },
            calib=digits["train"],
        )
        record = result.records[-1]
        assert all("gptq" not in reason for reason in record.notes.get("skipped", {}))
        assert all(v.endswith(method) for v in record.notes["quantized"].values())
        scores = evaluate(model, digits["test"], "fidelity", reference=gs.load(digits["model"]))
        errors[method] = 1 - scores["cosine"]
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_embedding_tables_stay_packed_with_gather_block_quantized(symmetric) -> None:
    """format auto: an int4 table becomes ORT's GatherBlockQuantized (packed in memory, rows
    dequantized on lookup); every value within one quantization step; codebook on request."""
    from onnx import TensorProto, helper, numpy_helper

    from graphsurgeon.execution import make_session, run

    rng = np.random.default_rng(1)
    table = (rng.standard_normal((40, 96)) + (0 if symmetric else 0.7)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, 96])],
        [numpy_helper.from_array(table, "E")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ids = rng.integers(0, 40, (2, 7)).astype(np.int64)
    outputs = {}
    for fmt in ("auto", "codebook"):
        model = ir.serde.deserialize_model(proto)
        options = {"bits": 4, "group_size": 32, "symmetric": symmetric, "format": fmt}
        result = gs.run_pipeline(model, [{"name": "quantize-weights", "options": options}])
        ops = {n.op_type for n in model.graph}
        assert ("GatherBlockQuantized" in ops) == (fmt == "auto")
        assert [o.name for o in model.graph.outputs] == ["y"] and result.modified
        outputs[fmt] = run(make_session(model, optimize=True), {"ids": ids})["y"]
        if fmt == "auto":  # the layer finder still sees the table, packed, with its id
            (layer,) = find_layers(model)
            assert layer.op_type == "GatherBlockQuantized" and layer.id == "embed"
            assert isinstance(layer.weight, PackedWeight) and list(layer.weight.shape) == [40, 96]
            assert layer.weight.nbytes < table.nbytes / 5
            decoded = layer.weight.numpy()
    blocks = table.reshape(40, 3, 32)
    span = (
        np.abs(blocks).max(-1) / 7
        if symmetric
        else (blocks.max(-1) - np.minimum(blocks.min(-1), 0)) / 15
    )
    bound = np.repeat(span, 32, axis=-1)[ids]
    assert np.all(np.abs(outputs["auto"] - table[ids]) <= bound + 1e-6)
    np.testing.assert_allclose(outputs["auto"], outputs["codebook"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(decoded[ids], outputs["auto"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (2, False)])
def test_matmulnbits_accuracy_level_4_quantizes_the_input_per_block(
    tmp_path: Path, bits: int, symmetric: bool
) -> None:
    """Level 4: ORT rounds each block of ``group`` inputs along K to int8 with scale
    max|a|/127 and multiplies in integers; the numpy reference does the same to x, then
    multiplies by the dequantized weight read back from the file. Levels 0 and 1: fp32 x."""
    k, n, group = 128, 24, 32
    x = RNG.standard_normal((2, 5, k)).astype(np.float32)
    outputs = {}
    for level in (0, 1, 4):
        model, record = run_quant(
            matmul_model(k, n),
            {"bits": bits, "symmetric": symmetric, "group_size": group, "accuracy_level": level},
        )
        assert record.modified
        path = saved(model, tmp_path, f"q{level}.onnx")
        (node,) = [nd for nd in onnx.load(str(path)).graph.node if nd.op_type == "MatMulNBits"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("accuracy_level", 0) == level
        outputs[level] = session(path).run(None, {"x": x})[0]
    inits = init_map(path)
    blocks = k // group
    codes = unpack(inits[node.input[1]], bits).reshape(n, blocks, group)
    scales = inits[node.input[2]].reshape(n, blocks)
    if len(node.input) > 3 and node.input[3]:
        zero = unpack(inits[node.input[3]].reshape(n, -1), bits)[:, :blocks]
    else:
        zero = np.full((n, blocks), 1 << (bits - 1))
    w_hat = ((codes - zero[..., None]) * scales[..., None]).reshape(n, k).T.astype(np.float32)
    xb = x.reshape(2, 5, blocks, group)
    amax = np.abs(xb).max(-1, keepdims=True)
    x_int8 = (np.rint(xb * (127 / amax)) * (amax / 127)).reshape(x.shape)
    fp32, int8 = np.maximum(x @ w_hat, 0), np.maximum(x_int8 @ w_hat, 0)
    tol = 1e-5 * np.abs(fp32).max()
    np.testing.assert_allclose(outputs[0], fp32, atol=tol, rtol=0)
    np.testing.assert_allclose(outputs[1], fp32, atol=tol, rtol=0)
    np.testing.assert_allclose(outputs[4], int8, atol=tol, rtol=0)
    # the int8 input really changes the result (by about its rounding error, no more)
    gap = np.abs(outputs[4] - fp32).max()
    assert 50 * tol < gap < 0.02 * np.abs(fp32).max()

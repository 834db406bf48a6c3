"""The training bridge: ONNX IR -> torch.nn.Module -> trained weights back into the IR.

Every forward is checked against onnxruntime on the same model: hand-built graphs for the
ops whose ONNX semantics differ from torch's defaults (asymmetric pads, output_padding,
count_include_pad, negative Slice steps, opset-dependent axes...), the digits CNN, MiniLM,
and a QDQ (int8) digits model. Round trips are byte-exact; after training, onnxruntime on the
written-back model matches the torch module; pruning masks stay zero; unknown ops get a
one-line error.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from graphsurgeon.passes.pruning import MASK_KEY, PruneMagnitude, read_mask
from graphsurgeon.passes.quantization import QuantizeInt8
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.data import Dataset, load_npz
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers
from graphsurgeon.shapes import ShapeInferencePass
from graphsurgeon.training import UnsupportedOpError, register_op, to_torch

torch.set_num_threads(1)
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(3)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def make_model(nodes, inputs, outputs, inits=(), opset: int = 17, domains=()) -> ir.Model:
    graph = oh.make_graph(nodes, "g", inputs, outputs, [nh.from_array(a, n) for n, a in inits])
    opsets = [oh.make_opsetid("", opset), *(oh.make_opsetid(d, 1) for d in domains)]
    proto = oh.make_model(graph, opset_imports=opsets, ir_version=10)
    if not domains and all(
        o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape")
        for o in proto.graph.output
    ):
        onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def torch_outputs(module, feed, names=None) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(**feed)
    return {k: v.numpy() for k, v in out.items() if names is None or k in names}


def assert_matches_ort(model: ir.Model, feed: dict[str, np.ndarray], atol: float = 1e-4) -> None:
    expected = run(make_session(model), feed)
    got = torch_outputs(to_torch(model), feed)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, atol=atol, rtol=1e-4, err_msg=name)


def vi(name: str, shape, dtype=FLOAT):
    """A value info; shape None leaves the output's shape to onnxruntime's inference."""
    if shape is None:
        return oh.make_tensor_value_info(name, dtype, None)
    return oh.make_tensor_value_info(name, dtype, shape)


def const(name: str, values, dtype=np.int64):
    return oh.make_node("Constant", [], [name], value=nh.from_array(np.array(values, dtype)))


# -- op semantics against onnxruntime -----------------------------------------------------------
def case_conv_padding():
    nodes = [
        oh.make_node("Conv", ["x", "W", "b"], ["a"], pads=[0, 1, 2, 1], strides=[2, 1]),
        oh.make_node("Conv", ["a", "W2"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2], group=2),
        oh.make_node(
            "ConvTranspose",
            ["c", "T", "tb"],
            ["y"],
            strides=[2, 2],
            pads=[1, 0, 0, 1],
            output_padding=[1, 1],
            group=2,
        ),
    ]
    inits = [
        ("W", rand(4, 3, 3, 3)),
        ("b", rand(4)),
        ("W2", rand(4, 2, 3, 3)),
        ("T", rand(4, 3, 3, 3)),
        ("tb", rand(6)),
    ]
    return nodes, [vi("x", [2, 3, 9, 8])], [vi("y", None)], inits, {"x": rand(2, 3, 9, 8)}


def case_pooling():
    nodes = [
        oh.make_node(
            "MaxPool",
            ["x"],
            ["a"],
            kernel_shape=[3, 3],
            pads=[1, 0, 1, 1],
            strides=[2, 2],
            ceil_mode=1,
        ),
        oh.make_node(
            "AveragePool", ["a"], ["b"], kernel_shape=[2, 3], pads=[1, 1, 0, 1], count_include_pad=0
        ),
        oh.make_node(
            "AveragePool",
            ["a"],
            ["c"],
            kernel_shape=[2, 2],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
            strides=[2, 2],
        ),
        oh.make_node("GlobalAveragePool", ["c"], ["d"]),
        oh.make_node("GlobalMaxPool", ["b"], ["e"]),
    ]
    outs = [vi(n, None) for n in "bcde"]
    return nodes, [vi("x", [1, 2, 9, 8])], outs, [], {"x": rand(1, 2, 9, 8)}


def case_shapes():
    nodes = [
        const("starts", [-1, 1]),
        const("ends", [-100, 6]),
        const("axes", [2, 1]),
        const("steps", [-2, 2]),
        oh.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["s"]),
        const("split", [1, 3]),
        oh.make_node("Split", ["s", "split"], ["p", "q"], axis=2),
        const("idx", [[-1, 0], [1, 1]]),
        oh.make_node("Gather", ["x", "idx"], ["g"], axis=2),
        oh.make_node("Shape", ["x"], ["shp"], start=1),
        const("one", [1]),
        oh.make_node("Unsqueeze", ["q", "one"], ["u"]),
        oh.make_node("Squeeze", ["u", "one"], ["sq"]),
        const("newshape", [0, -1]),
        oh.make_node("Reshape", ["x", "newshape"], ["r"]),
        oh.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
        oh.make_node("Flatten", ["x"], ["f"], axis=2),
        oh.make_node("Concat", ["p", "sq"], ["cat"], axis=2),
        oh.make_node("Expand", ["p", "shp"], ["e"]),
        const("reps", [1, 2, 3]),
        oh.make_node("Tile", ["p", "reps"], ["tile"]),
        oh.make_node(
            "ConstantOfShape", ["shp"], ["zeros"], value=nh.from_array(np.array([2.5], np.float32))
        ),
        oh.make_node("Range", ["r0", "r1", "r2"], ["range"]),
    ]
    outs = [
        vi(n, None, FLOAT if n not in ("shp", "range") else INT64)
        for n in ("s", "p", "q", "g", "shp", "sq", "t", "f", "cat", "e", "tile", "zeros", "range")
    ]
    inits = [
        ("r0", np.array(2, np.int64)),
        ("r1", np.array(11, np.int64)),
        ("r2", np.array(3, np.int64)),
    ]
    return nodes, [vi("x", [2, 3, 7])], outs, inits, {"x": rand(2, 3, 7)}


def case_math():
    nodes = [
        oh.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["ln"], axis=-1, epsilon=1e-3),
        oh.make_node("Softmax", ["ln"], ["sm"], axis=1),
        oh.make_node("Erf", ["x"], ["erf"]),
        oh.make_node("Pow", ["x", "two"], ["pw"]),
        oh.make_node("Sqrt", ["pw"], ["sqrt"]),
        oh.make_node("ReduceMean", ["x", "axes"], ["rm"], keepdims=0),
        oh.make_node("ReduceSum", ["x", "axes"], ["rs"]),
        oh.make_node("Equal", ["x", "x"], ["eq"]),
        oh.make_node("Greater", ["x", "zero"], ["gt"]),
        oh.make_node("Where", ["gt", "x", "sm"], ["wh"]),
        oh.make_node("Gemm", ["m", "gw", "gb"], ["gemm"], transA=1, transB=1, alpha=0.5, beta=2.0),
        oh.make_node("Clip", ["x", "lo", "hi"], ["clip"]),
        oh.make_node("Cast", ["x"], ["cast"], to=INT64),
        oh.make_node("Gelu", ["x"], ["gelu"], approximate="tanh"),
        oh.make_node("Sigmoid", ["x"], ["sig"]),
        oh.make_node("Tanh", ["x"], ["tanh"]),
        oh.make_node("BatchNormalization", ["x4", "bs", "bb", "bm", "bv"], ["bn"]),
        oh.make_node("ReduceL2", ["x", "axes"], ["l2"]),
    ]
    inits = [
        ("ln_s", rand(5)),
        ("ln_b", rand(5)),
        ("two", np.array(2.0, np.float32)),
        ("axes", np.array([0, 2], np.int64)),
        ("zero", np.array(0.0, np.float32)),
        ("gw", rand(6, 4)),
        ("gb", rand(6)),
        ("lo", np.array(-0.5, np.float32)),
        ("hi", np.array(0.7, np.float32)),
        ("bs", rand(3)),
        ("bb", rand(3)),
        ("bm", rand(3)),
        ("bv", np.abs(rand(3)) + 0.5),
    ]
    inputs = [vi("x", [2, 3, 5]), vi("m", [4, 2]), vi("x4", [2, 3, 2, 2])]
    outs = [
        vi(n, None, INT64 if n == "cast" else TensorProto.BOOL if n == "eq" else FLOAT)
        for n in (
            "ln",
            "sm",
            "erf",
            "sqrt",
            "rm",
            "rs",
            "eq",
            "wh",
            "gemm",
            "clip",
            "cast",
            "gelu",
            "sig",
            "tanh",
            "bn",
            "l2",
        )
    ]
    feed = {"x": rand(2, 3, 5), "m": rand(4, 2), "x4": rand(2, 3, 2, 2)}
    return nodes, inputs, outs, inits, feed


@pytest.mark.parametrize("case", [case_conv_padding, case_pooling, case_shapes, case_math])
def test_ops_match_onnxruntime(case) -> None:
    nodes, inputs, outputs, inits, feed = case()
    model = make_model(nodes, inputs, outputs, inits, opset=20)
    assert_matches_ort(model, feed, atol=1e-5)


def test_opset_11_attribute_forms() -> None:
    """Older opsets carry axes and splits as attributes; Softmax coerces to 2-D."""
    nodes = [
        oh.make_node("Unsqueeze", ["x"], ["u"], axes=[0, 3]),
        oh.make_node("Squeeze", ["u"], ["s"], axes=[0]),
        oh.make_node("Split", ["s"], ["a", "b"], axis=3, split=[1, 3]),
        oh.make_node("ReduceMean", ["x"], ["m"], axes=[1]),
        oh.make_node("Softmax", ["x"], ["sm"], axis=1),
    ]
    outs = [vi(n, None) for n in ("s", "a", "b", "m", "sm")]
    model = make_model(nodes, [vi("x", [2, 3, 4])], outs, opset=11)
    assert_matches_ort(model, {"x": rand(2, 3, 4)}, atol=1e-6)


# -- real models ----------------------------------------------------------------------------
def test_digits_cnn_matches_onnxruntime(digits) -> None:
    model = gs.load(digits["model"])
    x = np.load(digits["test"])["input"][:32]
    assert_matches_ort(model, {"input": x})


def test_minilm_matches_onnxruntime(minilm) -> None:
    model = gs.load(minilm["model"])
    data = np.load(minilm["sentences"])
    feed = {k: data[k][:4] for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert_matches_ort(model, feed)


def test_capture_returns_intermediate_values(digits) -> None:
    model = gs.load(digits["model"])
    ShapeInferencePass()(model)
    layers = find_layers(model)
    name = layers[1].node.outputs[0].name
    x = np.load(digits["test"])["input"][:4]
    out = to_torch(model)(input=x, capture=[name])
    expected = gs.calibration.collect_activations(model, [{"input": x}], [name])[name]
    np.testing.assert_allclose(out[name].detach().numpy(), expected, atol=1e-5)
    with pytest.raises(GraphSurgeonError, match="no value named 'nope'"):
        to_torch(model)(input=x, capture=["nope"])


# -- round trips ----------------------------------------------------------------------------
def test_untrained_round_trip_is_byte_identical(digits) -> None:
    model = gs.load(digits["model"])
    before = serialized(model)
    module = to_torch(model)
    assert module.write_back(model) == []
    assert serialized(model) == before


def _train_a_little(module, feed: dict[str, np.ndarray], steps: int = 5) -> None:
    """A few SGD steps on an arbitrary objective: only the weights' change matters here."""
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        out = next(iter(module(**feed).values()))
        (out.square().mean()).backward()
        optimizer.step()
        module.apply_masks()


def test_trained_weights_written_back_match_the_module(digits) -> None:
    model = gs.load(digits["model"])
    x = np.load(digits["test"])["input"][:16]
    module = to_torch(model)
    before = torch_outputs(module, {"input": x})["logits"]
    _train_a_little(module, {"input": x})
    changed = module.write_back(model)
    assert "features.0.weight" in changed
    assert "features.1.running_mean" not in changed  # BN statistics are buffers
    after = torch_outputs(module, {"input": x})["logits"]
    assert np.abs(after - before).max() > 1e-3
    ort_after = run(make_session(model), {"input": x})["logits"]
    np.testing.assert_allclose(ort_after, after, atol=1e-4)
    assert model.graph.initializers["features.0.weight"].const_value.dtype == ir.DataType.FLOAT


def test_masks_stay_zero_and_metadata_stays_valid(digits) -> None:
    model = gs.load(digits["model"])
    PruneMagnitude({"sparsity": 0.7})(model)
    layer = find_layers(model)[1]
    mask = read_mask(model, layer.id)
    module = to_torch(model)
    assert layer.id in module.mask_layers
    x = np.load(digits["test"])["input"][:16]
    _train_a_little(module, {"input": x})
    module.write_back(model)
    weight = layer.weight_value.const_value.numpy()
    assert np.all(weight[~mask] == 0)
    assert np.count_nonzero(weight[mask]) > 0.99 * mask.sum()
    np.testing.assert_array_equal(read_mask(model, layer.id), mask)  # CRC still matches
    frozen = to_torch(model, trainable=False)  # inference only: masks need no gradient hook
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.set_trainable([layer.weight_value.name])  # now it trains: the hook is added
    frozen(input=x)["logits"].sum().backward()
    grad = frozen.param(layer.weight_value.name).grad.numpy()
    assert np.all(grad[~mask] == 0) and np.any(grad[mask] != 0)


def test_qdq_model_is_fake_quant_and_keeps_its_int8_form(digits) -> None:
    """QuantizeLinear/DequantizeLinear become fake-quant (STE); written-back weights are
    int8 re-quantized with their scales, and onnxruntime runs what torch trained."""
    model = gs.load(digits["model"])
    q = QuantizeInt8()
    q.calib = load_npz(digits["train"], model)
    q(model)
    x = np.load(digits["test"])["input"][:64]
    module = to_torch(model)
    assert "features.0.weight_quantized" in module.quant
    ort_logits = run(make_session(model), {"input": x})["logits"]
    torch_logits = torch_outputs(module, {"input": x})["logits"]
    # float rounding order differs (1 ulp) and can flip a value across a rounding boundary:
    # a handful of quantization steps, never a different model
    assert (ort_logits.argmax(1) == torch_logits.argmax(1)).mean() >= 0.98
    assert np.abs(ort_logits - torch_logits).mean() < 0.01
    before = serialized(model)
    assert module.write_back(model) == [] and serialized(model) == before

    # gradients reach the shadow weights through the rounding (straight-through)
    out = module(input=x)["logits"].square().mean()
    out.backward()
    assert module.param("features.0.weight_quantized").grad.abs().sum() > 0
    _train_a_little(module, {"input": x})
    changed = module.write_back(model)
    assert "features.3.weight_quantized" in changed
    value = model.graph.initializers["features.3.weight_quantized"]
    assert value.const_value.dtype == ir.DataType.INT8
    ort_after = run(make_session(model), {"input": x})["logits"]
    torch_after = torch_outputs(module, {"input": x})["logits"]
    assert (ort_after.argmax(1) == torch_after.argmax(1)).mean() >= 0.98
    assert np.abs(ort_after - torch_after).mean() < 0.01


@pytest.mark.parametrize("pipeline", ["quantize-dynamic", "share-weights"])
def test_compressed_digits_forms_match_onnxruntime(digits, pipeline: str) -> None:
    """DynamicQuantizeLinear/ConvInteger/MatMulInteger and codebook-decoded weights."""
    model = gs.run_pipeline(gs.load(digits["model"]), pipeline).model
    x = np.load(digits["test"])["input"][:32]
    assert_matches_ort(model, {"input": x})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_train_in_float32_and_keep_their_dtype(digits, dtype) -> None:
    model = gs.run_pipeline(
        gs.load(digits["model"]), [{"name": "cast-precision", "options": {"dtype": dtype}}]
    ).model
    dtypes = {n: v.const_value.dtype for n, v in model.graph.initializers.items()}
    assert ir.DataType[dtype.upper()] in dtypes.values()
    before = serialized(model)
    module = to_torch(model)
    assert module.write_back(model) == [] and serialized(model) == before
    x = np.load(digits["test"])["input"][:16]
    _train_a_little(module, {"input": x})
    changed = module.write_back(model)
    assert any(dtypes[n] == ir.DataType[dtype.upper()] for n in changed)
    assert {n: v.const_value.dtype for n, v in model.graph.initializers.items()} == dtypes
    expected = run(make_session(model), {"input": x})["logits"]
    np.testing.assert_allclose(torch_outputs(module, {"input": x})["logits"], expected, atol=1e-4)


def test_matmulnbits_matches_onnxruntime() -> None:
    model = make_model(
        [oh.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
        [vi("x", [2, 64])],
        [vi("y", [2, 32])],
        [("W", rand(64, 32))],
    )
    gs.run_pipeline(model, [{"name": "quantize-weights", "options": {"bits": 4}}])
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    assert_matches_ort(model, {"x": rand(2, 64)})


def test_matmul_integer_to_float_trains_through_its_int8_weight() -> None:
    """quantize-int8 writes static-shape MatMuls as com.microsoft MatMulIntegerToFloat; the
    int8 B trains through its shadow and onnxruntime runs the written-back integers."""
    model = make_model(
        [
            oh.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
            oh.make_node("Add", ["h", "b"], ["y"]),
        ],
        [vi("x", [4, 16])],
        [vi("y", [4, 8])],
        [("W", rand(16, 8)), ("b", rand(8))],
    )
    x = rand(64, 16)
    gs.run_pipeline(model, "quantize-int8", calib=Dataset({"x": x}, None, {"x": True}, 4))
    assert "MatMulIntegerToFloat" in [n.op_type for n in model.graph]
    module = to_torch(model)
    feed = {"x": x[:4]}
    np.testing.assert_allclose(
        torch_outputs(module, feed)["y"], run(make_session(model), feed)["y"], atol=1e-5
    )
    _train_a_little(module, feed, steps=3)
    assert "W_quantized" in module.write_back(model)
    assert model.graph.initializers["W_quantized"].const_value.dtype == ir.DataType.INT8
    np.testing.assert_allclose(
        torch_outputs(module, feed)["y"], run(make_session(model), feed)["y"], atol=1e-5
    )


# -- errors and extension -----------------------------------------------------------------------
def test_unsupported_op_names_op_domain_and_node() -> None:
    model = make_model(
        [oh.make_node("Frobnicate", ["x"], ["y"], name="weird", domain="acme.ops")],
        [vi("x", [2])],
        [vi("y", [2])],
        domains=["acme.ops"],
    )
    with pytest.raises(UnsupportedOpError) as info:
        to_torch(model)
    text = str(info.value)
    assert "Frobnicate" in text and "acme.ops" in text and "'weird'" in text
    assert "\n" not in text and isinstance(info.value, GraphSurgeonError)


def test_register_op_teaches_the_bridge_a_custom_op() -> None:
    model = make_model(
        [oh.make_node("Twice", ["x"], ["y"], name="t", domain="test.bridge", scale=3.0)],
        [vi("x", [3])],
        [vi("y", [3])],
        domains=["test.bridge"],
    )
    register_op(
        "test.bridge",
        "Twice",
        lambda ctx, node, x: [x[0] * node.attributes["scale"].value],
    )
    x = rand(3)
    out = to_torch(model)(x=x)["y"].detach().numpy()
    np.testing.assert_allclose(out, 3 * x)


def test_missing_feed_is_a_clear_error(digits) -> None:
    module = to_torch(gs.load(digits["model"]))
    with pytest.raises(GraphSurgeonError, match="no feed for input 'input'"):
        module()


def test_mask_metadata_key_is_the_pruning_one() -> None:
    from graphsurgeon.training.bridge import MASK_KEY as BRIDGE_KEY

    assert BRIDGE_KEY == MASK_KEY

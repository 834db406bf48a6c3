"""fuse-attention and unfuse-skip-layernorm on tiny hand-built encoder graphs.

Outputs are checked against onnxruntime on the source graph: the fused Attention (raw mask,
so exact for any padding), Sum + LayerNormalization against onnxruntime's own
SkipLayerNormalization, quantize-dynamic's QAttention against the float model.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphsurgeon.passes.fusion import FuseAttention, UnfuseSkipLayerNorm
from graphsurgeon.passes.quantization import QuantizeDynamic
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers
from graphsurgeon.targets import Targets

RNG = np.random.default_rng(5)
S, H, HEADS, FF = 5, 16, 2, 32


def w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.3).astype(np.float32)


class Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(nh.from_array(np.asarray(value), name))
        return name

    def __call__(self, op: str, inputs: list[str], out: str, domain: str = "", **attrs) -> str:
        self.nodes.append(oh.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def model(self, inputs, outputs, opsets=(("", 17),)) -> ir.Model:
        graph = oh.make_graph(self.nodes, "g", inputs, outputs, self.inits)
        proto = oh.make_model(
            graph, opset_imports=[oh.make_opsetid(d, v) for d, v in opsets], ir_version=8
        )
        onnx.checker.check_model(proto)
        model = ir.from_proto(proto)
        find_layers(model)
        return model


def encoder_layer() -> ir.Model:
    """One BERT encoder layer as PyTorch exports it: LayerNorm, Q/K/V MatMul+bias, heads by
    Reshape/Transpose, QK^T / sqrt(d) + (1 - mask) * -10000, Softmax, times V, output
    projection + residual + LayerNorm, erf-Gelu FFN + residual + LayerNorm."""
    b, d = Builder(), H // HEADS
    for i in range(3):
        b.init(f"gamma{i}", 1 + w(H))
        b.init(f"beta{i}", w(H))
    b.init("heads_shape", np.array([1, S, -1, d], np.int64))
    b.init("merge_shape", np.array([1, S, -1], np.int64))
    b.init("sqrt_d", np.array(np.sqrt(d), np.float32))
    b.init("one", np.array(1.0, np.float32))
    b.init("big", np.array(-10000.0, np.float32))
    b.init("axis1", np.array([1], np.int64))
    b.init("sqrt2", np.array(np.sqrt(2.0), np.float32))
    b.init("half", np.array(0.5, np.float32))
    ln0 = b("LayerNormalization", ["x", "gamma0", "beta0"], "ln0", axis=-1, epsilon=1e-12)
    heads = {}
    for name in ("query", "key", "value"):
        mm = b("MatMul", [ln0, b.init(f"W_{name}", w(H, H))], f"{name}/MatMul")
        add = b("Add", [b.init(f"b_{name}", w(H)), mm], f"{name}/Add")
        split = b("Reshape", [add, "heads_shape"], f"{name}/Reshape")
        perm = [0, 2, 3, 1] if name == "key" else [0, 2, 1, 3]
        heads[name] = b("Transpose", [split], f"{name}/Transpose", perm=perm)
    mask = b("Unsqueeze", [b("Unsqueeze", ["mask", "axis1"], "mask3"), "axis1"], "mask4")
    mask = b("Mul", [b("Sub", ["one", b("Cast", [mask], "maskf", to=1)], "inv"), "big"], "bias")
    scores = b("Div", [b("MatMul", [heads["query"], heads["key"]], "qk"), "sqrt_d"], "qk_d")
    probs = b("Softmax", [b("Add", [scores, mask], "masked")], "probs", axis=-1)
    ctx = b("Transpose", [b("MatMul", [probs, heads["value"]], "ctx")], "ctx_t", perm=[0, 2, 1, 3])
    ctx = b("Reshape", [ctx, "merge_shape"], "ctx_r")
    out = b("MatMul", [ctx, b.init("W_o", w(H, H))], "attention/output/MatMul")
    out = b("Add", [b.init("b_o", w(H)), out], "attention/output/Add")
    ln1 = b("LayerNormalization", [b("Add", [out, ln0], "res1"), "gamma1", "beta1"], "ln1", axis=-1)
    h = b("MatMul", [ln1, b.init("W_1", w(H, FF))], "ffn1/MatMul")
    h = b("Add", [b.init("b_1", w(FF)), h], "ffn1/Add")
    erf = b("Add", [b("Erf", [b("Div", [h, "sqrt2"], "g_div")], "g_erf"), "one"], "g_add")
    h = b("Mul", [b("Mul", [h, erf], "g_mul"), "half"], "gelu")
    h = b("MatMul", [h, b.init("W_2", w(FF, H))], "ffn2/MatMul")
    h = b("Add", [b.init("b_2", w(H)), h], "ffn2/Add")
    b("LayerNormalization", [b("Add", [h, ln1], "res2"), "gamma2", "beta2"], "y", axis=-1)
    return b.model(
        [
            oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, H]),
            oh.make_tensor_value_info("mask", TensorProto.INT64, [1, S]),
        ],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, H])],
    )


X = np.random.default_rng(1).standard_normal((1, S, H)).astype(np.float32)


def feeds() -> list[dict[str, np.ndarray]]:
    x = X
    masks = ([1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 1])  # right padding and holes
    return [{"x": x, "mask": np.array([m], np.int64)} for m in masks]


def outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    return run(make_session(model), feed)["y"]


def ops(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph)


def test_fuse_attention_matches_source_for_any_mask_and_keeps_layer_ids() -> None:
    model = encoder_layer()
    refs = [outputs(model, f) for f in feeds()]
    ffn_ids = {layer.id for layer in find_layers(model) if "ffn" in layer.id}
    fuse = FuseAttention()
    result = fuse(model)
    assert result.modified and fuse.notes["attention"] == 1 and fuse.notes["heads"] == HEADS
    assert ops(model)["Attention"] == 1 and ops(model)["BiasGelu"] == 1
    assert {"Softmax", "Transpose", "Reshape", "Erf"}.isdisjoint(ops(model))
    assert fuse.notes["merged_layers"] == {
        "query/MatMul": ["query/MatMul", "key/MatMul", "value/MatMul"]
    }
    layers = {layer.id: layer for layer in find_layers(model)}
    assert layers["query/MatMul"].op_type == "Attention"
    assert layers["query/MatMul"].weight.shape == (H, 3 * H)  # Q | K | V
    assert ffn_ids <= set(layers) and "attention/output/MatMul" in layers
    for feed, ref in zip(feeds(), refs, strict=True):
        np.testing.assert_allclose(outputs(model, feed), ref, atol=2e-5)


def test_fuse_attention_refusals() -> None:
    b = Builder()
    b("MatMul", ["x", b.init("W", w(H, H))], "y")
    model = b.model(
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, H])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, H])],
    )
    before = ir.to_proto(model).SerializeToString()
    fuse = FuseAttention()
    assert not fuse(model).modified
    assert ir.to_proto(model).SerializeToString() == before
    assert "no constant [batch, seq, heads, head_size] reshape" in next(iter(fuse.skipped))
    with pytest.raises(GraphSurgeonError, match="does not take targets"):
        FuseAttention(None, Targets(layers=["y"]))
    with pytest.raises(GraphSurgeonError, match="mask"):
        FuseAttention({"mask": "left"})


def test_quantize_dynamic_turns_fused_attention_into_qattention() -> None:
    model = encoder_layer()
    FuseAttention()(model)
    ref = [outputs(model, f) for f in feeds()]
    quant = QuantizeDynamic({"per_channel": True, "op_types": ["MatMul", "Attention"]})
    assert quant(model).modified and quant.notes["quantized_layers"] == 4
    layers = {layer.id: layer for layer in find_layers(model)}
    assert layers["query/MatMul"].op_type == "QAttention"
    assert layers["query/MatMul"].weight.dtype in (ir.DataType.INT8, ir.DataType.UINT8)
    for feed, r in zip(feeds(), ref, strict=True):  # LayerNorm output: unit scale
        assert np.abs(outputs(model, feed) - r).max() < 0.1


def residual_graph(skip_op: bool) -> ir.Model:
    """y = LayerNorm(a + b) (+ a bias Add of a constant that is no residual), or the same
    as one com.microsoft SkipLayerNormalization (with bias, every output used)."""
    b = Builder()
    b.init("gamma", 1 + w(H))
    b.init("beta", w(H))
    b.init("bias", w(H))
    outs = [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, H])]
    if skip_op:
        b.nodes.append(
            oh.make_node(
                "SkipLayerNormalization",
                ["a", "b", "gamma", "beta", "bias"],
                ["y", "mean", "inv_std", "sum"],
                name="sln",
                domain="com.microsoft",
                epsilon=1e-5,
            )
        )
        outs += [
            oh.make_tensor_value_info("mean", TensorProto.FLOAT, [1, S, 1]),
            oh.make_tensor_value_info("inv_std", TensorProto.FLOAT, [1, S, 1]),
            oh.make_tensor_value_info("sum", TensorProto.FLOAT, [1, S, H]),
        ]
        opsets = (("", 17), ("com.microsoft", 1))
    else:
        biased = b("Add", ["a", "bias"], "biased")  # a constant operand: a bias, left alone
        b("LayerNormalization", [b("Add", [biased, "b"], "res"), "gamma", "beta"], "y", axis=-1)
        opsets = (("", 17),)
    inputs = [oh.make_tensor_value_info(n, TensorProto.FLOAT, [1, S, H]) for n in "ab"]
    return b.model(inputs, outs, opsets)


def session_ops(model: ir.Model, tmp_path) -> Counter[str]:
    """The op types onnxruntime's session optimizer leaves (what actually runs)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), options)
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_residual_add_becomes_sum_and_onnxruntime_no_longer_fuses(tmp_path) -> None:
    model = residual_graph(skip_op=False)
    feed = {"a": w(1, S, H), "b": w(1, S, H)}
    ref = outputs(model, feed)
    assert session_ops(model, tmp_path)["SkipLayerNormalization"] == 1
    unfuse = UnfuseSkipLayerNorm()
    assert unfuse(model).modified and unfuse.notes["residual_sums"] == 1
    assert ops(model) == Counter({"Add": 1, "Sum": 1, "LayerNormalization": 1})
    assert "SkipLayerNormalization" not in session_ops(model, tmp_path)
    np.testing.assert_array_equal(outputs(model, feed), ref)  # the same additions
    assert not UnfuseSkipLayerNorm()(model).modified


def test_skip_layernorm_split_matches_onnxruntime_kernel() -> None:
    model = residual_graph(skip_op=True)
    feed = {"a": w(1, S, H), "b": w(1, S, H)}
    names = ["y", "mean", "inv_std", "sum"]
    ref = run(make_session(model), feed)
    unfuse = UnfuseSkipLayerNorm()
    assert unfuse(model).modified and unfuse.notes["split_skip_layernorms"] == 1
    assert ops(model) == Counter({"Sum": 1, "LayerNormalization": 1})
    got = run(make_session(model), feed)
    for name in names:
        np.testing.assert_allclose(got[name].ravel(), ref[name].ravel(), rtol=1e-5, atol=1e-5)


def test_tune_with_the_transformer_prelude_replays_from_the_cli(tmp_path) -> None:
    """`graphsurgeon tune --prelude cleanup,fuse-attention,unfuse-skip-layernorm`: the search
    runs on the fused graph, and its policy.yaml (prelude included) replays with `graphsurgeon
    run` to a model computing exactly what best.onnx computes."""
    import yaml

    import graphsurgeon as gs
    from graphsurgeon.cli import main

    src = tmp_path / "encoder.onnx"
    gs.save(encoder_layer(), src)
    rng = np.random.default_rng(2)
    masks = np.ones((8, 1, S), np.int64)
    masks[::2, 0, 3:] = 0
    np.savez(
        tmp_path / "calib.npz", x=rng.standard_normal((8, 1, S, H)).astype(np.float32), mask=masks
    )
    out = tmp_path / "run"
    args = [
        "tune", str(src), "--profile", "x86-avx512-vnni", "--calib", str(tmp_path / "calib.npz"),
        "--prelude", "cleanup,fuse-attention,unfuse-skip-layernorm",
        "--methods", "quantize-dynamic", "--strategy", "random", "--budget", "4",
        "--measure-front", "1", "-o", str(out), "-q",
    ]  # fmt: skip
    assert main(args) == 0
    spec = yaml.safe_load((out / "policy.yaml").read_text())
    names = [s if isinstance(s, str) else s["name"] for s in spec["steps"]]
    assert names[:3] == ["cleanup", "fuse-attention", "unfuse-skip-layernorm"]
    replay = tmp_path / "replay.onnx"
    assert main(["run", str(out / "policy.yaml"), str(src), "-o", str(replay)]) == 0
    model = gs.load(replay)
    assert ops(model)["Attention"] + ops(model)["QAttention"] == 1
    assert ops(model)["Sum"] == 2 and ops(model)["Reshape"] == 0
    best = gs.load(out / "best.onnx")
    for feed in feeds():
        np.testing.assert_array_equal(outputs(model, feed), outputs(best, feed))

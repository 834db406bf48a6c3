"""Each built-in pass on tiny hand-built graphs, plus the registry, options, pipelines, layers,
graph view and statistics.

Rewrites are checked by object identity (which value a consumer reads after the pass), numerically
in onnxruntime against the model serialized before the pass, and, where a pass does not apply,
by comparing the serialized model byte for byte.
"""

from __future__ import annotations

import importlib.metadata
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphsurgeon.passes import (
    BUILTIN_PASSES,
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    EliminateIdentities,
    FixShapes,
    FoldBatchNorm,
    FoldConstants,
    FuseMatMulAdd,
)
from graphsurgeon.passes.folding import FoldConstantsOptions
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphsurgeon import registry
from graphsurgeon.data import generate_inputs
from graphsurgeon.errors import GraphSurgeonError, PipelineError
from graphsurgeon.execution import make_session, run
from graphsurgeon.graph_view import SOURCE, GraphView
from graphsurgeon.layers import LAYER_ID_KEY, find_layers, layer_id, weight_ids
from graphsurgeon.model_io import load, save
from graphsurgeon.options import (
    Choice,
    FloatRange,
    IntRange,
    PassOptions,
    option,
    search_spaces,
)
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.pipeline import RepeatStep, compile_pipeline, run_pipeline
from graphsurgeon.stats import layer_stats, model_stats
from graphsurgeon.targets import Targets
from graphsurgeon.verify import compare_exact

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(1234)

# The cleanup family; compression passes have tests of their own.
CLEANUP_NAMES = {
    "fold-constants",
    "eliminate-dead-code",
    "eliminate-common-subexpressions",
    "eliminate-identities",
    "fold-batchnorm",
    "fuse-matmul-add",
    "fix-shapes",
}
CLEANUP_PASSES = [c for c in BUILTIN_PASSES if c.name in CLEANUP_NAMES]


# -- building and checking helpers -----------------------------------------------------------
def vi(name: str, shape, dtype: int = FLOAT) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, dtype, shape)


def const(name: str, array) -> onnx.TensorProto:
    return nh.from_array(np.asarray(array), name)


def rand(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, size=shape).astype(np.float32)


def build(
    nodes, inputs, outputs, initializers=(), opset: int = 18, full_check: bool = True
) -> ir.Model:
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto, full_check=full_check)
    return ir.serde.deserialize_model(proto)


def proto_bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def from_bytes(data: bytes) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(data))


def node(model: ir.Model, name: str) -> ir.Node:
    found = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name == name]
    assert len(found) == 1, f"expected one node named {name!r}, found {len(found)}"
    return found[0]


def nodes_of(model: ir.Model, op_type: str | None = None) -> list[ir.Node]:
    return [
        n
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
        if op_type is None or n.op_type == op_type
    ]


def names(model: ir.Model) -> set[str]:
    return {n.name for n in ir.traversal.RecursiveGraphIterator(model.graph)}


def outputs_of(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run(make_session(model), feed)


def assert_same_outputs(before: bytes, model: ir.Model, feed=None, seed: int = 7) -> None:
    """The rewritten ``model`` computes what the serialized original did, in onnxruntime."""
    original = from_bytes(before)
    feed = generate_inputs(original, seed=seed) if feed is None else feed
    ref = outputs_of(original, feed)
    got = outputs_of(model, feed)
    assert list(ref) == list(got)
    assert compare_exact(ref, got) is None, (ref, got)
    # compare_exact must be able to fail: a perturbed output is caught.
    name = next(iter(ref))
    if np.issubdtype(ref[name].dtype, np.floating) and ref[name].size:
        bumped = {**got, name: got[name] + 0.1 * (1 + np.abs(got[name]))}
        assert compare_exact(ref, bumped) is not None


def assert_untouched(pass_: GSPass, model: ir.Model) -> PassResult:
    before = proto_bytes(model)
    result = pass_(model)
    assert result.modified is False
    assert proto_bytes(model) == before
    return result


# -- (a) each pass where it applies -------------------------------------------------------------
def test_fold_constants_folds_a_constant_chain():
    model = build(
        [
            oh.make_node("Constant", [], ["c"], name="c", value=const("cv", np.float32([1, 2, 3]))),
            oh.make_node("Mul", ["c", "k"], ["s"], name="mul_const"),
            oh.make_node("Add", ["x", "s"], ["y"], name="add"),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        [const("k", np.float32([2, 2, 2]))],
    )
    before = proto_bytes(model)
    x = model.graph.inputs[0]
    add = node(model, "add")
    result = FoldConstants()(model)
    assert result.modified is True
    assert names(model) == {"add"}
    assert node(model, "add") is add
    assert add.inputs[0] is x
    folded = add.inputs[1]
    assert folded.is_initializer()
    np.testing.assert_array_equal(folded.const_value.numpy(), [2, 4, 6])
    assert "k" not in model.graph.initializers  # the folded-away input is gone
    assert model.graph.outputs[0] is add.outputs[0]
    assert_same_outputs(before, model)


def test_eliminate_dead_code_removes_dead_chains_and_their_initializers():
    model = build(
        [
            oh.make_node("Relu", ["x"], ["r"], name="relu"),
            oh.make_node("Mul", ["x", "w_dead"], ["d1"], name="dead_mul"),
            oh.make_node("Tanh", ["d1"], ["d2"], name="dead_tanh"),
        ],
        [vi("x", [2, 3])],
        [vi("r", [2, 3])],
        [const("w_dead", rand(2, 3))],
    )
    before = proto_bytes(model)
    relu = node(model, "relu")
    result = EliminateDeadCode()(model)
    assert result.modified is True
    assert names(model) == {"relu"}
    assert "w_dead" not in model.graph.initializers
    assert model.graph.outputs[0] is relu.outputs[0]
    assert relu.inputs[0] is model.graph.inputs[0]
    assert_same_outputs(before, model)


@pytest.mark.parametrize(
    "trim",
    [
        oh.make_node("Dropout", ["x"], ["y", "mask"], name="drop"),
        oh.make_node("Clip", ["x", "", ""], ["y"], name="clip"),
        oh.make_node(
            "BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", training_mode=0
        ),
    ],
    ids=["unused-optional-output", "trailing-empty-inputs", "bn-training-mode-0"],
)
def test_eliminate_dead_code_reports_trimming_live_nodes(trim):
    model = build(
        [trim],
        [vi("x", [1, 2, 2, 2])],
        [vi("y", [1, 2, 2, 2])],
        [const(k, rand(2, low=0.5, high=1.5)) for k in "sbmv"] if trim.name == "bn" else [],
    )
    before = proto_bytes(model)
    result = EliminateDeadCode()(model)
    assert proto_bytes(model) != before
    assert result.modified is True
    assert_same_outputs(before, model)
    assert_untouched(EliminateDeadCode(), model)


def test_cse_merges_duplicate_nodes():
    model = build(
        [
            oh.make_node("Mul", ["x", "w"], ["m1"], name="mul1"),
            oh.make_node("Mul", ["x", "w"], ["m2"], name="mul2"),
            oh.make_node("Sub", ["m1", "m2"], ["d"], name="sub"),
            oh.make_node("Add", ["d", "m2"], ["y"], name="add"),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        [const("w", rand(2, 3))],
    )
    before = proto_bytes(model)
    sub, add = node(model, "sub"), node(model, "add")
    result = EliminateCommonSubexpressions()(model)
    assert result.modified is True
    muls = nodes_of(model, "Mul")
    assert len(muls) == 1
    kept = muls[0].outputs[0]
    assert sub.inputs[0] is kept and sub.inputs[1] is kept
    assert add.inputs[1] is kept
    assert_same_outputs(before, model)


def test_cse_leaves_initializers_unless_asked():
    inits = [const("w1", np.float32([1, 2, 3])), const("w2", np.float32([1, 2, 3]))]
    nodes = [
        oh.make_node("Mul", ["x", "w1"], ["m1"], name="mul1"),
        oh.make_node("Mul", ["x", "w2"], ["m2"], name="mul2"),
        oh.make_node("Add", ["m1", "m2"], ["y"], name="add"),
    ]
    model = build(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], inits)
    assert_untouched(EliminateCommonSubexpressions(), model)
    before = proto_bytes(model)
    result = EliminateCommonSubexpressions({"deduplicate_initializers": True})(model)
    assert result.modified is True
    assert len(model.graph.initializers) == 1
    add = node(model, "add")
    assert add.inputs[0] is add.inputs[1]
    assert_same_outputs(before, model)


def test_cse_keeps_the_declared_type_of_a_merged_graph_output():
    # The kept Relu's value has no annotation; the merged one is a typed graph output.
    model = build(
        [
            oh.make_node("Relu", ["x"], ["a"], name="relu_a"),
            oh.make_node("Relu", ["x"], ["b"], name="relu_b"),
            oh.make_node("Neg", ["a"], ["n"], name="neg"),
        ],
        [vi("x", [2, 3])],
        [vi("b", [2, 3]), vi("n", [2, 3])],
    )
    before = proto_bytes(model)
    relu_a = node(model, "relu_a")
    assert EliminateCommonSubexpressions()(model).modified is True
    assert model.graph.outputs[0] is relu_a.outputs[0]
    assert model.graph.outputs[0].name == "b"
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT
    assert list(model.graph.outputs[0].shape) == [2, 3]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_same_outputs(before, model)


def test_eliminate_identities_rewires_consumers_and_outputs():
    model = build(
        [
            oh.make_node("Relu", ["x"], ["r"], name="relu"),
            oh.make_node("Identity", ["r"], ["i"], name="id1"),
            oh.make_node("Sigmoid", ["i"], ["s"], name="sig"),
            oh.make_node("Tanh", ["r"], ["t"], name="tanh"),
            oh.make_node("Identity", ["t"], ["z"], name="id_out"),
        ],
        [vi("x", [2, 3])],
        [vi("s", [2, 3]), vi("z", [2, 3])],
    )
    before = proto_bytes(model)
    relu, sig, tanh = node(model, "relu"), node(model, "sig"), node(model, "tanh")
    result = EliminateIdentities()(model)
    assert result.modified is True
    assert nodes_of(model, "Identity") == []
    assert sig.inputs[0] is relu.outputs[0]
    # The Identity feeding graph output z is gone; Tanh's value now is that output, named z.
    assert model.graph.outputs[1] is tanh.outputs[0]
    assert tanh.outputs[0].name == "z"
    assert [v.name for v in model.graph.outputs] == ["s", "z"]
    assert_same_outputs(before, model)


def test_eliminate_identities_keeps_input_to_output_identity():
    model = build(
        [
            oh.make_node("Identity", ["x"], ["y"], name="id"),
            oh.make_node("Relu", ["x"], ["r"], name="relu"),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3]), vi("r", [2, 3])],
    )
    assert_untouched(EliminateIdentities(), model)
    assert node(model, "id").inputs[0] is model.graph.inputs[0]


def test_eliminate_identities_keeps_identity_between_two_graph_outputs():
    model = build(
        [
            oh.make_node("Relu", ["x"], ["r"], name="relu"),
            oh.make_node("Identity", ["r"], ["a"], name="id_a"),
            oh.make_node("Identity", ["a"], ["b"], name="id_b"),
        ],
        [vi("x", [2, 3])],
        [vi("a", [2, 3]), vi("b", [2, 3])],
    )
    before = proto_bytes(model)
    relu, id_b = node(model, "relu"), node(model, "id_b")
    assert EliminateIdentities()(model).modified is True
    assert [n.name for n in model.graph] == ["relu", "id_b"]
    # a = Identity(r) went (r took the name a); b = Identity(a) must stay, or a is lost.
    assert model.graph.outputs[0] is relu.outputs[0] and relu.outputs[0].name == "a"
    assert model.graph.outputs[1] is id_b.outputs[0] and id_b.inputs[0] is relu.outputs[0]
    assert [v.name for v in model.graph.outputs] == ["a", "b"]
    assert_same_outputs(before, model)


def test_eliminate_identities_keeps_subgraph_output_of_an_outer_value():
    then_branch = oh.make_graph(
        [oh.make_node("Identity", ["r"], ["t"], name="then_id")], "then", [], [vi("t", [2])]
    )
    else_branch = oh.make_graph(
        [
            oh.make_node("Identity", ["r"], ["i"], name="else_id"),
            oh.make_node("Neg", ["i"], ["e"], name="else_neg"),
        ],
        "else",
        [],
        [vi("e", [2])],
    )
    model = build(
        [
            oh.make_node("Relu", ["x"], ["r"], name="relu"),
            oh.make_node(
                "If", ["c"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch
            ),
            oh.make_node("Neg", ["r"], ["z"], name="neg"),
        ],
        [vi("c", [], TensorProto.BOOL), vi("x", [2])],
        [vi("y", [2]), vi("z", [2])],
    )
    before = proto_bytes(model)
    relu, else_neg = node(model, "relu"), node(model, "else_neg")
    assert EliminateIdentities()(model).modified is True
    # Inside the else-branch the Identity goes; the then-branch must not return r directly.
    assert "else_id" not in names(model) and "then_id" in names(model)
    assert else_neg.inputs[0] is relu.outputs[0]
    assert relu.outputs[0].name == "r"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for cond in (True, False):
        assert_same_outputs(before, model, feed={"c": np.array(cond), "x": rand(2)})


def _bn_params(prefix: str, c: int) -> list[onnx.TensorProto]:
    return [
        const(f"{prefix}_scale", rand(c, low=0.5, high=2.0)),
        const(f"{prefix}_bias", rand(c)),
        const(f"{prefix}_mean", rand(c)),
        const(f"{prefix}_var", rand(c, low=0.5, high=2.0)),
    ]


def _bn(prefix: str, x: str, y: str, *more_outputs: str, **attrs) -> onnx.NodeProto:
    inputs = [x, *(f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var"))]
    return oh.make_node("BatchNormalization", inputs, [y, *more_outputs], name=prefix, **attrs)


def conv_bn_model(
    *, bias: bool = True, bn_attrs=None, bn_outputs=(), extra_nodes=(), extra_outputs=()
):
    inits = [const("W", rand(4, 3, 3, 3)), *_bn_params("bn", 4)]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(const("B", rand(4)))
        conv_inputs.append("B")
    nodes = [
        oh.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),
        _bn("bn", "c", "b", *bn_outputs, **(bn_attrs or {})),
        oh.make_node("Relu", ["b"], ["y"], name="relu"),
        *extra_nodes,
    ]
    return build(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y", [1, 4, 5, 5]), *extra_outputs],
        inits,
    )


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_into_conv(bias):
    model = conv_bn_model(bias=bias)
    before = proto_bytes(model)
    x, relu = model.graph.inputs[0], node(model, "relu")
    w_before = model.graph.initializers["W"].const_value.numpy().copy()
    result = FoldBatchNorm()(model)
    assert result.modified is True
    assert nodes_of(model, "BatchNormalization") == []
    (conv,) = nodes_of(model, "Conv")
    assert relu.inputs[0] is conv.outputs[0]  # BN's consumer reads the Conv's output
    assert conv.inputs[0] is x
    assert conv.inputs[1] is model.graph.initializers["W"]  # the weight keeps its name
    assert len(conv.inputs) == 3 and conv.inputs[2].is_initializer()
    assert not np.allclose(conv.inputs[1].const_value.numpy(), w_before)
    # Only the folded weights, bias and nothing of the BN are left.
    assert not any(k.startswith("bn_") for k in model.graph.initializers)
    assert model.graph.outputs[0] is relu.outputs[0]
    assert_same_outputs(before, model)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fold_batchnorm_into_gemm(trans_b):
    w = rand(5, 4) if trans_b else rand(4, 5)
    model = build(
        [
            oh.make_node("Gemm", ["x", "W", "C"], ["g"], name="gemm", transB=trans_b, beta=0.5),
            _bn("bn", "g", "y"),
        ],
        [vi("x", [3, 4])],
        [vi("y", [3, 5])],
        [const("W", w), const("C", rand(5)), *_bn_params("bn", 5)],
    )
    before = proto_bytes(model)
    x = model.graph.inputs[0]
    result = FoldBatchNorm()(model)
    assert result.modified is True
    assert [n.op_type for n in model.graph] == ["Gemm"]
    gemm = model.graph.node(0)
    assert gemm.inputs[0] is x
    assert model.graph.outputs[0] is gemm.outputs[0]
    assert model.graph.outputs[0].name == "y"
    assert_same_outputs(before, model)


def test_fold_batchnorm_into_grouped_conv_transpose():
    # ConvTranspose weight: (C_in, C_out / group, k, k); BN scales C_out = 2 * 3 channels.
    model = build(
        [
            oh.make_node("ConvTranspose", ["x", "W", "B"], ["c"], name="convt", group=2),
            _bn("bn", "c", "y"),
        ],
        [vi("x", [1, 4, 3, 3])],
        [vi("y", [1, 6, 4, 4])],
        [const("W", rand(4, 3, 2, 2)), const("B", rand(6)), *_bn_params("bn", 6)],
    )
    before = proto_bytes(model)
    result = FoldBatchNorm()(model)
    assert result.modified is True
    assert [n.op_type for n in model.graph] == ["ConvTranspose"]
    assert model.graph.outputs[0] is model.graph.node(0).outputs[0]
    assert_same_outputs(before, model)


@pytest.mark.parametrize("transpose", ["none", "a", "b", "ab"])
def test_fuse_matmul_add_into_gemm(transpose):
    nodes, a_name, b_name = [], "x", "W"
    x_shape = [4, 2] if "a" in transpose else [2, 4]
    w = rand(3, 4) if "b" in transpose else rand(4, 3)
    if "a" in transpose:
        nodes.append(oh.make_node("Transpose", ["x"], ["xt"], name="ta", perm=[1, 0]))
        a_name = "xt"
    if "b" in transpose:
        nodes.append(oh.make_node("Transpose", ["W"], ["wt"], name="tb", perm=[1, 0]))
        b_name = "wt"
    nodes += [
        oh.make_node("MatMul", [a_name, b_name], ["mm"], name="mm"),
        oh.make_node("Add", ["mm", "b"], ["y"], name="add"),
    ]
    model = build(
        nodes, [vi("x", x_shape)], [vi("y", [2, 3])], [const("W", w), const("b", rand(3))]
    )
    before = proto_bytes(model)
    x, w_value, b_value = model.graph.inputs[0], *(model.graph.initializers[k] for k in "Wb")
    result = FuseMatMulAdd()(model)
    assert result.modified is True
    assert [n.op_type for n in model.graph] == ["Gemm"]
    gemm = model.graph.node(0)
    assert gemm.inputs[0] is x
    assert gemm.inputs[1] is w_value
    assert gemm.inputs[2] is b_value
    assert gemm.attributes.get_int("transA", 0) == int("a" in transpose)
    assert gemm.attributes.get_int("transB", 0) == int("b" in transpose)
    assert model.graph.outputs[0] is gemm.outputs[0]
    assert_same_outputs(before, model)


@pytest.mark.parametrize("bias_shape", [(3,), (1, 3), (2, 3), (2, 1), (1, 1), ()])
def test_fuse_matmul_add_legal_bias_shapes(bias_shape):
    model = build(
        [
            oh.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            oh.make_node("Add", ["mm", "b"], ["y"], name="add"),
        ],
        [vi("x", [2, 4])],
        [vi("y", [2, 3])],
        [const("W", rand(4, 3)), const("b", rand(*bias_shape))],
    )
    before = proto_bytes(model)
    assert FuseMatMulAdd()(model).modified is True
    assert [n.op_type for n in model.graph] == ["Gemm"]
    assert_same_outputs(before, model)


def symbolic_model() -> ir.Model:
    return build(
        [
            oh.make_node("Relu", ["x"], ["r"], name="relu"),
            oh.make_node("Add", ["r", "t"], ["y"], name="add"),
        ],
        [vi("x", ["batch", 4]), vi("t", ["batch", "width"])],
        [vi("y", ["batch", 4])],
    )


@pytest.mark.parametrize(
    ("options", "want_x", "want_t"),
    [
        ({"dims": {"batch": 2}}, [2, 4], None),
        ({"dims": {"batch": 2, "width": 4}}, [2, 4], [2, 4]),
        ({"shapes": {"t": [2, 4]}}, None, [2, 4]),
        ({"default": 4}, [4, 4], [4, 4]),
        ({"dims": {"batch": 2}, "default": 4}, [2, 4], [2, 4]),
    ],
)
def test_fix_shapes(options, want_x, want_t):
    model = symbolic_model()
    before = proto_bytes(model)
    x, t = model.graph.inputs
    result = FixShapes(options)(model)
    assert result.modified is True
    assert model.graph.inputs[0] is x and model.graph.inputs[1] is t
    for value, want in ((x, want_x), (t, want_t)):
        if want is None:
            assert any(not isinstance(d, int) for d in value.shape)
        else:
            assert list(value.shape) == want
    if want_x is not None:
        # Shapes downstream are re-inferred from the fixed input.
        assert list(node(model, "relu").outputs[0].shape) == want_x
    batch = (want_x or want_t)[0]
    assert_same_outputs(before, model, feed={"x": rand(batch, 4), "t": rand(batch, 4)})


def test_fix_shapes_errors():
    with pytest.raises(GraphSurgeonError, match="nope"):
        FixShapes({"dims": {"nope": 1}})(symbolic_model())
    with pytest.raises(GraphSurgeonError, match="nope"):
        FixShapes({"shapes": {"nope": [1, 4]}})(symbolic_model())
    with pytest.raises(GraphSurgeonError, match="dim 1 is fixed to 4"):
        FixShapes({"shapes": {"x": [2, 5]}})(symbolic_model())
    with pytest.raises(GraphSurgeonError, match="rank"):
        FixShapes({"shapes": {"x": [2]}})(symbolic_model())
    with pytest.raises(GraphSurgeonError, match="default"):
        FixShapes({"default": 0})
    with pytest.raises(GraphSurgeonError, match="dims"):
        FixShapes({"dims": {"batch": -1}})
    with pytest.raises(GraphSurgeonError, match="shapes"):
        FixShapes({"shapes": {"x": [-1, 4]}})


def test_fix_shapes_error_leaves_the_model_unchanged():
    model = symbolic_model()
    before = proto_bytes(model)
    with pytest.raises(GraphSurgeonError):
        FixShapes({"shapes": {"x": [2, 4], "nope": [1]}})(model)
    assert proto_bytes(model) == before


def shape_subgraph_model() -> ir.Model:
    """x: [batch, 4] -> Reshape(x, Concat(Gather(Shape(x), [0]), [2, 2])) -> [batch, 2, 2]."""
    return build(
        [
            oh.make_node("Shape", ["x"], ["s"], name="shape"),
            oh.make_node("Gather", ["s", "idx"], ["b"], name="gather", axis=0),
            oh.make_node("Concat", ["b", "tail"], ["ns"], name="concat", axis=0),
            oh.make_node("Reshape", ["x", "ns"], ["y"], name="reshape"),
        ],
        [vi("x", ["batch", 4])],
        [vi("y", ["batch", 2, 2])],
        [const("idx", np.int64([0])), const("tail", np.int64([2, 2]))],
    )


def test_fold_constants_folds_shape_subgraph_once_shapes_are_static():
    model = shape_subgraph_model()
    before = proto_bytes(model)
    assert assert_untouched(FoldConstants(), model).modified is False  # batch is symbolic
    assert FixShapes({"dims": {"batch": 3}})(model).modified is True
    reshape = node(model, "reshape")
    result = FoldConstants()(model)
    assert result.modified is True
    assert [n.name for n in model.graph] == ["reshape"]
    assert reshape.inputs[0] is model.graph.inputs[0]
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [3, 2, 2])
    assert_same_outputs(before, model, feed={"x": rand(3, 4)})


def if_model(then_nodes, then_outputs, then_inits=()) -> ir.Model:
    then_branch = oh.make_graph(then_nodes, "then", [], then_outputs, list(then_inits))
    else_branch = oh.make_graph(
        [oh.make_node("Neg", ["x"], ["e"], name="neg")], "else", [], [vi("e", [2, 3])]
    )
    return build(
        [
            oh.make_node(
                "If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch
            )
        ],
        [vi("cond", [], TensorProto.BOOL), vi("x", [2, 3])],
        [vi("y", [2, 3])],
        [const("k", np.float32([1, 2, 3]))],
    )


def test_fold_constants_inside_if_branch():
    model = if_model(
        [
            oh.make_node("Constant", [], ["c"], name="inner_c", value=const("cv", np.float32(2))),
            oh.make_node("Mul", ["k", "c"], ["k2"], name="inner_mul"),
            oh.make_node("Add", ["x", "k2"], ["t"], name="inner_add"),
        ],
        [vi("t", [2, 3])],
    )
    before = proto_bytes(model)
    add = node(model, "inner_add")
    result = FoldConstants()(model)
    assert result.modified is True
    assert "inner_mul" not in names(model) and "inner_c" not in names(model)
    assert add.inputs[0] is model.graph.inputs[1]  # x, read from the outer scope
    np.testing.assert_array_equal(add.inputs[1].const_value.numpy(), [2, 4, 6])
    for cond in (True, False):
        assert_same_outputs(before, model, feed={"cond": np.array(cond), "x": rand(2, 3)})


def test_fold_constants_folds_if_with_constant_condition():
    then_branch = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["t"], name="then_relu")], "then", [], [vi("t", [2, 3])]
    )
    else_branch = oh.make_graph(
        [oh.make_node("Neg", ["x"], ["e"], name="else_neg")], "else", [], [vi("e", [2, 3])]
    )
    model = build(
        [
            oh.make_node(
                "If", ["cond"], ["i"], name="if", then_branch=then_branch, else_branch=else_branch
            ),
            oh.make_node("Sigmoid", ["i"], ["y"], name="sig"),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        [const("cond", np.array(True))],
    )
    before = proto_bytes(model)
    sig = node(model, "sig")
    assert FoldConstants()(model).modified is True
    assert nodes_of(model, "If") == [] and nodes_of(model, "Neg") == []
    (relu,) = nodes_of(model, "Relu")
    assert relu.graph is model.graph
    assert sig.inputs[0] is relu.outputs[0]
    assert_same_outputs(before, model)


def test_fold_constants_inside_loop_body():
    body = oh.make_graph(
        [
            oh.make_node("Mul", ["k", "two"], ["k2"], name="body_mul"),
            oh.make_node("Add", ["acc_in", "k2"], ["acc_out"], name="body_add"),
            oh.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", [3])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [3])],
    )
    model = build(
        [oh.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)],
        [vi("x", [3])],
        [vi("y", [3])],
        [const("n", np.int64(3)), const("k", np.float32([1, 2, 3])), const("two", np.float32(2))],
    )
    before = proto_bytes(model)
    add = node(model, "body_add")
    assert FoldConstants()(model).modified is True
    assert "body_mul" not in names(model)
    np.testing.assert_array_equal(add.inputs[1].const_value.numpy(), [2, 4, 6])
    assert_same_outputs(before, model)


def test_dead_code_inside_if_branch():
    model = if_model(
        [
            oh.make_node("Relu", ["x"], ["t"], name="inner_relu"),
            oh.make_node("Mul", ["x", "k"], ["dead"], name="inner_dead"),
        ],
        [vi("t", [2, 3])],
    )
    before = proto_bytes(model)
    relu = node(model, "inner_relu")
    assert EliminateDeadCode()(model).modified is True
    assert "inner_dead" not in names(model)
    assert relu.graph.outputs[0] is relu.outputs[0]
    for cond in (True, False):
        assert_same_outputs(before, model, feed={"cond": np.array(cond), "x": rand(2, 3)})


def test_eliminate_identities_inside_if_branch():
    model = if_model(
        [
            oh.make_node("Relu", ["x"], ["r"], name="inner_relu"),
            oh.make_node("Identity", ["r"], ["i"], name="inner_id"),
            oh.make_node("Neg", ["i"], ["t"], name="inner_neg"),
        ],
        [vi("t", [2, 3])],
    )
    before = proto_bytes(model)
    relu, neg = node(model, "inner_relu"), node(model, "inner_neg")
    assert EliminateIdentities()(model).modified is True
    assert "inner_id" not in names(model)
    assert neg.inputs[0] is relu.outputs[0]
    for cond in (True, False):
        assert_same_outputs(before, model, feed={"cond": np.array(cond), "x": rand(2, 3)})


# -- (b) where a pass does not apply, it leaves the model byte-identical ------------------------
def plain_model() -> ir.Model:
    """Nothing to fold, fuse, merge or remove; static shapes; no value_info recorded."""
    return build(
        [
            oh.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            oh.make_node("Mul", ["mm", "s"], ["m"], name="mul"),
            oh.make_node("Relu", ["m"], ["r"], name="relu"),
            oh.make_node("Reshape", ["r", "shape4"], ["r4"], name="reshape"),
            _bn("bn", "r4", "b"),
            oh.make_node("Sigmoid", ["b"], ["y"], name="sig"),
        ],
        [vi("x", [2, 4])],
        [vi("y", [1, 2, 3, 1])],
        [
            const("W", rand(4, 3)),
            const("s", rand(3)),
            const("shape4", np.int64([1, 2, 3, 1])),
            *_bn_params("bn", 2),
        ],
    )


@pytest.mark.parametrize("pass_cls", CLEANUP_PASSES, ids=lambda c: c.name)
def test_pass_that_does_not_apply_leaves_model_byte_identical(pass_cls):
    model = plain_model()
    assert_untouched(pass_cls(), model)
    # Same with full shape annotations already present.
    model = plain_model()
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass()(model)
    assert_untouched(pass_cls(), model)


def test_fold_batchnorm_not_after_a_layer_is_untouched():
    model = build(
        [oh.make_node("Relu", ["x"], ["r"], name="relu"), _bn("bn", "r", "y")],
        [vi("x", [1, 4, 3, 3])],
        [vi("y", [1, 4, 3, 3])],
        _bn_params("bn", 4),
    )
    assert_untouched(FoldBatchNorm(), model)


def test_fuse_matmul_add_needs_an_add():
    model = build(
        [
            oh.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            oh.make_node("Mul", ["mm", "b"], ["y"], name="mul"),
        ],
        [vi("x", [2, 4])],
        [vi("y", [2, 3])],
        [const("W", rand(4, 3)), const("b", rand(3))],
    )
    assert_untouched(FuseMatMulAdd(), model)


# -- (c) refusals, each with its reason ---------------------------------------------------------
def _skipped(pass_: GSPass) -> str:
    return " | ".join(pass_.report().get("skipped", {}))


def test_fold_batchnorm_refuses_training_mode():
    model = conv_bn_model(
        bn_attrs={"training_mode": 1},
        bn_outputs=["run_mean", "run_var"],
        extra_outputs=[vi("run_mean", [4]), vi("run_var", [4])],
    )
    pass_ = FoldBatchNorm()
    assert_untouched(pass_, model)
    assert "training mode" in _skipped(pass_)


def test_fold_batchnorm_refuses_single_output_training_mode():
    # Strict shape inference rejects it (and so does onnxruntime); the pass must not fold it.
    model = build(
        [
            oh.make_node("Conv", ["x", "W"], ["c"], name="conv"),
            _bn("bn", "c", "y", training_mode=1),
        ],
        [vi("x", [1, 3, 3, 3])],
        [vi("y", [1, 4, 3, 3])],
        [const("W", rand(4, 3, 1, 1)), *_bn_params("bn", 4)],
        full_check=False,
    )
    pass_ = FoldBatchNorm()
    assert_untouched(pass_, model)
    assert _skipped(pass_) == "BatchNormalization in training mode"


def test_fold_batchnorm_refuses_shared_conv_weights():
    second = oh.make_node("Conv", ["x", "W"], ["c2"], name="conv2", pads=[1, 1, 1, 1])
    model = conv_bn_model(extra_nodes=[second], extra_outputs=[vi("c2", [1, 4, 5, 5])])
    before = proto_bytes(model)
    pass_ = FoldBatchNorm()
    assert_untouched(pass_, model)
    assert "W" in _skipped(pass_) and "conv2" in _skipped(pass_)
    assert_same_outputs(before, model)


def test_fold_batchnorm_refuses_conv_output_read_elsewhere():
    also = oh.make_node("Sigmoid", ["c"], ["s"], name="sig")
    model = conv_bn_model(extra_nodes=[also], extra_outputs=[vi("s", [1, 4, 5, 5])])
    assert_untouched(FoldBatchNorm(), model)


def test_fold_batchnorm_refuses_non_constant_weights():
    model = build(
        [oh.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("bn", "c", "y")],
        [vi("x", [1, 3, 3, 3]), vi("w", [4, 3, 1, 1])],
        [vi("y", [1, 4, 3, 3])],
        _bn_params("bn", 4),
    )
    pass_ = FoldBatchNorm()
    assert_untouched(pass_, model)
    assert "not a constant initializer" in _skipped(pass_)


def test_fuse_matmul_add_refuses_rank3_input():
    model = build(
        [
            oh.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            oh.make_node("Add", ["mm", "b"], ["y"], name="add"),
        ],
        [vi("x", [2, 3, 4])],
        [vi("y", [2, 3, 5])],
        [const("W", rand(4, 5)), const("b", rand(5))],
    )
    pass_ = FuseMatMulAdd()
    assert_untouched(pass_, model)
    assert "Rank" in _skipped(pass_)


def test_fuse_matmul_add_refuses_bias_that_grows_the_output():
    # MatMul gives (1, 3); Add with a (2, 3) bias gives (2, 3). Gemm broadcasts C one way only.
    model = build(
        [
            oh.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            oh.make_node("Add", ["mm", "b"], ["y"], name="add"),
        ],
        [vi("x", [1, 4])],
        [vi("y", [2, 3])],
        [const("W", rand(4, 3)), const("b", rand(2, 3))],
    )
    pass_ = FuseMatMulAdd()
    assert_untouched(pass_, model)
    assert "broadcast" in _skipped(pass_)


@pytest.mark.parametrize("annotated", [False, True])
def test_fuse_matmul_add_refuses_adding_the_matmul_to_itself(annotated):
    model = build(
        [
            oh.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            oh.make_node("Add", ["mm", "mm"], ["y"], name="add"),
        ],
        [vi("x", [2, 4])],
        [vi("y", [2, 3])],
        [const("W", rand(4, 3))],
    )
    if annotated:
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)
    pass_ = FuseMatMulAdd()
    assert_untouched(pass_, model)  # Gemm(x, W, mm) would read its own MatMul
    assert "computed by the nodes being fused" in _skipped(pass_)


def test_fuse_matmul_add_infers_an_unannotated_bias_shape():
    model = build(
        [
            oh.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            oh.make_node("Relu", ["t"], ["bias"], name="relu"),
            oh.make_node("Add", ["mm", "bias"], ["y"], name="add"),
        ],
        [vi("x", [2, 4]), vi("t", [1, 3])],
        [vi("y", [2, 3])],
        [const("W", rand(4, 3))],
    )
    before = proto_bytes(model)
    relu = node(model, "relu")
    assert FuseMatMulAdd()(model).modified is True
    (gemm,) = nodes_of(model, "Gemm")
    assert gemm.inputs[2] is relu.outputs[0]
    assert_same_outputs(before, model)


def test_pass_that_does_not_apply_keeps_initializer_order():
    # Shape inference takes initializers over 1 KB out of the graph and puts them back; the
    # order (and so the serialized model) must not change when nothing is fused.
    model = build(
        [
            oh.make_node("Conv", ["x", "big"], ["c"], name="conv"),
            oh.make_node("Constant", [], ["w"], name="w", value=const("wv", rand(8, 2))),
            oh.make_node("MatMul", ["d", "w"], ["y"], name="mm"),
        ],
        [vi("x", [1, 8, 3, 3]), vi("d", [3, 8])],
        [vi("c", [1, 8, 1, 1]), vi("y", [3, 2])],
        [const("big", rand(8, 8, 3, 3)), const("small", rand(2))],
    )
    assert list(model.graph.initializers) == ["big", "small"]
    assert_untouched(FuseMatMulAdd(), model)
    assert list(model.graph.initializers) == ["big", "small"]


def test_fuse_matmul_add_refuses_rank3_bias_and_int_dtype():
    model = build(
        [
            oh.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            oh.make_node("Add", ["mm", "b"], ["y"], name="add"),
        ],
        [vi("x", [2, 4])],
        [vi("y", [1, 2, 3])],
        [const("W", rand(4, 3)), const("b", rand(1, 2, 3))],
    )
    assert_untouched(FuseMatMulAdd(), model)
    model = build(
        [
            oh.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            oh.make_node("Add", ["mm", "b"], ["y"], name="add"),
        ],
        [vi("x", [2, 4], TensorProto.INT32)],
        [vi("y", [2, 3], TensorProto.INT32)],
        [const("W", np.ones((4, 3), np.int32)), const("b", np.ones(3, np.int32))],
    )
    assert_untouched(FuseMatMulAdd(), model)


# -- (d) targets -------------------------------------------------------------------------------
def two_conv_bn_model() -> ir.Model:
    nodes, inits = [], []
    for i in (1, 2):
        src = "x" if i == 1 else "r1"
        nodes += [
            oh.make_node(
                "Conv", [src, f"W{i}"], [f"c{i}"], name=f"block{i}/conv", pads=[1, 1, 1, 1]
            ),
            _bn(f"bn{i}", f"c{i}", f"b{i}"),
            oh.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        inits += [const(f"W{i}", rand(3, 3, 3, 3)), *_bn_params(f"bn{i}", 3)]
    return build(nodes, [vi("x", [1, 3, 4, 4])], [vi("r2", [1, 3, 4, 4])], inits)


@pytest.mark.parametrize(
    "targets",
    [
        Targets(names=["block1/conv"]),
        Targets(names=[r"block1/.*"]),
        Targets(layers=["block1/conv"]),
        Targets(exclude=["block2/conv"]),
        Targets(op_types=["Conv"], exclude=[r"block2/.*"]),
    ],
    ids=["name", "name-regex", "layer", "exclude", "op-type-exclude"],
)
def test_fold_batchnorm_targets(targets):
    model = two_conv_bn_model()
    find_layers(model)
    before = proto_bytes(model)
    relu1, relu2, conv2 = node(model, "relu1"), node(model, "relu2"), node(model, "block2/conv")
    pass_ = FoldBatchNorm(targets=targets)
    assert pass_(model).modified is True
    assert [n.name for n in nodes_of(model, "BatchNormalization")] == ["bn2"]
    assert node(model, "bn2").inputs[0] is conv2.outputs[0]
    assert relu2.inputs[0] is node(model, "bn2").outputs[0]
    assert relu1.inputs[0].producer().op_type == "Conv"
    assert relu1.inputs[0].producer() is not conv2
    assert "not selected by the targets" in _skipped(pass_)
    assert_same_outputs(before, model)


def with_bystanders(model: ir.Model) -> ir.Model:
    """Add an unselected dead node and an unselected live BN with training_mode=0."""
    x = model.graph.inputs[0]
    dead = ir.Node("", "Neg", [x], name="dead_bystander")
    bn_params = [
        ir.Value(name=f"by_{k}", const_value=ir.tensor(np.full(x.shape[1], 0.5, np.float32)))
        for k in "sbmv"
    ]
    for value in bn_params:
        model.graph.register_initializer(value)
    bn = ir.Node(
        "",
        "BatchNormalization",
        [x, *bn_params],
        attributes=[ir.AttrInt64("training_mode", 0)],
        name="live_bystander",
    )
    bn.outputs[0].name = "by_out"
    bn.outputs[0].dtype, bn.outputs[0].shape = x.dtype, x.shape
    unused = ir.Value(name="unused_init", const_value=ir.tensor(np.ones(3, np.float32)))
    model.graph.register_initializer(unused)
    model.graph.extend([dead, bn])
    model.graph.outputs.append(bn.outputs[0])
    return model


@pytest.mark.parametrize(
    ("pass_", "make", "selected"),
    [
        (FoldBatchNorm(targets=Targets(names=["block1/conv"])), two_conv_bn_model, "bn1"),
        (FuseMatMulAdd(targets=Targets(names=["fc1"])), lambda: two_matmul_add_model(), "add1"),
        (FoldConstants(targets=Targets(names=["mm1"])), lambda: fold_targets_model(), "mm1"),
    ],
    ids=["fold-batchnorm", "fuse-matmul-add", "fold-constants"],
)
def test_targeted_pass_leaves_unselected_dead_code_alone(pass_, make, selected):
    model = with_bystanders(make())
    find_layers(model)
    before = proto_bytes(model)
    assert pass_(model).modified is True
    assert selected not in names(model)  # the selected rewrite happened
    assert {"dead_bystander", "live_bystander"} <= names(model)
    assert node(model, "live_bystander").attributes.get_int("training_mode") == 0
    assert "unused_init" in model.graph.initializers
    assert_same_outputs(before, model)


def test_fold_batchnorm_op_type_targets_select_all():
    model = two_conv_bn_model()
    assert FoldBatchNorm(targets=Targets(op_types=["Conv"]))(model).modified is True
    assert nodes_of(model, "BatchNormalization") == []
    model = two_conv_bn_model()
    assert_untouched(FoldBatchNorm(targets=Targets(op_types=["Gemm"])), model)


def two_matmul_add_model() -> ir.Model:
    nodes, inits = [], []
    for i in (1, 2):
        src = "x" if i == 1 else "a1"
        nodes += [
            oh.make_node("MatMul", [src, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
            oh.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
        ]
        inits += [const(f"W{i}", rand(4, 4)), const(f"b{i}", rand(4))]
    return build(nodes, [vi("x", [2, 4])], [vi("a2", [2, 4])], inits)


@pytest.mark.parametrize(
    "targets",
    [
        Targets(names=["fc2"]),
        Targets(layers=["fc2"]),
        Targets(op_types=["MatMul"], exclude=["fc1"]),
        Targets(exclude=["fc1"]),
    ],
    ids=["name", "layer", "op-type-exclude", "exclude"],
)
def test_fuse_matmul_add_targets(targets):
    model = two_matmul_add_model()
    find_layers(model)
    before = proto_bytes(model)
    fc1, add1 = node(model, "fc1"), node(model, "add1")
    assert FuseMatMulAdd(targets=targets)(model).modified is True
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Gemm"]
    assert model.graph.node(0) is fc1 and model.graph.node(1) is add1
    gemm = model.graph.node(2)
    assert gemm.inputs[0] is add1.outputs[0]
    assert model.graph.outputs[0] is gemm.outputs[0]
    assert_same_outputs(before, model)


def fold_targets_model() -> ir.Model:
    """Two constant MatMul chains (layers), a constant Add and an Identity, all foldable."""
    return build(
        [
            oh.make_node("MatMul", ["A1", "B1"], ["p1"], name="mm1"),
            oh.make_node("MatMul", ["A2", "B2"], ["p2"], name="mm2"),
            oh.make_node("Add", ["k1", "k2"], ["k"], name="addk"),
            oh.make_node("Identity", ["x"], ["xi"], name="ident"),
            oh.make_node("Add", ["xi", "p1"], ["s1"], name="use1"),
            oh.make_node("Add", ["s1", "p2"], ["s2"], name="use2"),
            oh.make_node("Add", ["s2", "k"], ["y"], name="use3"),
        ],
        [vi("x", [2, 2])],
        [vi("y", [2, 2])],
        [const(n, rand(2, 2)) for n in ("A1", "B1", "A2", "B2", "k1", "k2")],
    )


@pytest.mark.parametrize(
    ("targets", "folded"),
    [
        (Targets(names=["mm1"]), {"mm1"}),
        (Targets(names=["mm.*"]), {"mm1", "mm2"}),
        (Targets(op_types=["Add"]), {"addk"}),
        (Targets(layers=["mm2"]), {"mm2"}),
        (Targets(op_types=["MatMul"], exclude=["mm1"]), {"mm2"}),
        (Targets(exclude=["mm1", "ident"]), {"mm2", "addk"}),
        (Targets(op_types=["Identity"]), {"ident"}),
    ],
)
def test_fold_constants_targets(targets, folded):
    model = fold_targets_model()
    find_layers(model)
    before = proto_bytes(model)
    all_names = names(model)
    assert FoldConstants(targets=targets)(model).modified is True
    assert names(model) == all_names - folded
    # Unselected nodes keep their inputs: the Identity is bypassed only when it is selected.
    use1 = node(model, "use1")
    if "ident" in folded:
        assert use1.inputs[0] is model.graph.inputs[0]
    else:
        assert use1.inputs[0] is node(model, "ident").outputs[0]
    assert_same_outputs(before, model)


def test_fold_constants_target_selecting_nothing_foldable_is_untouched():
    model = fold_targets_model()
    assert_untouched(FoldConstants(targets=Targets(names=["use1"])), model)


@pytest.mark.parametrize(
    "pass_cls", [EliminateDeadCode, EliminateCommonSubexpressions, EliminateIdentities, FixShapes]
)
def test_whole_graph_passes_refuse_targets(pass_cls):
    assert pass_cls.supports_targets is False
    with pytest.raises(GraphSurgeonError, match="does not take targets"):
        pass_cls(targets=Targets(names=["x"]))
    pass_cls(targets=Targets())  # an empty selector is fine


def test_targets_validation_and_matching():
    with pytest.raises(ValueError, match="invalid regex"):
        Targets(names=["("])
    with pytest.raises(ValueError):
        Targets(nmes=["x"])
    conv = ir.Node("", "Conv", [], name="a.b")
    assert Targets(names=["a.b"]).selects(conv)
    assert not Targets(names=["a"]).selects(conv)  # full match, not search
    assert Targets(names=["a.*"]).selects(conv)
    assert not Targets(layers=[".*"]).selects(conv)  # not a layer yet: no id
    conv.metadata_props[LAYER_ID_KEY] = "stem"
    assert Targets(layers=["stem"]).selects(conv)
    assert not Targets(exclude=["stem"]).selects(conv)
    assert not Targets(op_types=["Conv"], exclude=["a.b"]).selects(conv)
    assert Targets().selects(conv) and Targets().empty


# -- registry ----------------------------------------------------------------------------------
BUILTIN_NAMES = {
    "fold-constants",
    "eliminate-dead-code",
    "eliminate-common-subexpressions",
    "eliminate-identities",
    "fold-batchnorm",
    "fuse-matmul-add",
    "fix-shapes",
}


def test_registry_has_every_builtin():
    passes = registry.all_passes()
    assert set(passes) >= BUILTIN_NAMES
    for name, cls in passes.items():
        assert cls.name == name
        assert registry._KEBAB.match(name)
        assert cls.kind in ("exact", "lossy", "surgery")
        assert issubclass(cls.Options, PassOptions)
        assert registry.get_pass(name) is cls
    assert {c.name for c in BUILTIN_PASSES} >= BUILTIN_NAMES
    assert all(registry.get_pass(c.name) is c for c in BUILTIN_PASSES)
    assert all(c.kind == "exact" for c in CLEANUP_PASSES)


def test_registry_unknown_pass_suggests():
    with pytest.raises(GraphSurgeonError, match="did you mean fold-constants"):
        registry.get_pass("fold-constant")


def test_register_rejects_bad_names_kinds_and_clashes(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def make(name, kind="exact"):
        return type("P", (GSPass,), {"name": name, "kind": kind, "call": lambda self, m: None})

    with pytest.raises(ValueError, match="kebab-case"):
        registry.register(make("Bad_Name"))
    with pytest.raises(ValueError, match="kind"):
        registry.register(make("odd-kind", kind="fuzzy"))
    with pytest.raises(ValueError, match="taken"):
        registry.register(make("fold-constants"))
    registry.register(FoldConstants)  # re-registering the same class is fine


class _FakeEntryPoint:
    def __init__(self, name: str, value: str, obj=None, error: Exception | None = None):
        self.name, self.value, self._obj, self._error = name, value, obj, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._obj


class FakePass(GSPass):
    """A plugin pass: doubles nothing, changes nothing."""

    name = "fake-plugin-pass"
    kind = "lossy"

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, False)


class FakeSurgery(FakePass):
    name = "fake-plugin-surgery"
    kind = "surgery"


def test_load_plugins_reads_the_entry_point_group(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_loaded", False)
    groups = []

    def fake_entry_points(*, group):
        groups.append(group)
        clash = type("Clash", (FakePass,), {"name": "fold-constants"})
        return [
            _FakeEntryPoint("one", "fake_pkg:FakePass", FakePass),
            _FakeEntryPoint("many", "fake_pkg:PASSES", [FakeSurgery]),
            _FakeEntryPoint("module", "fake_pkg", warnings),
            _FakeEntryPoint("broken", "broken_pkg:X", error=ImportError("no module broken_pkg")),
            _FakeEntryPoint("clash", "fake_pkg:Clash", clash),
            _FakeEntryPoint("junk", "fake_pkg:JUNK", 42),
            _FakeEntryPoint("text", "fake_pkg:TEXT", "fold-constants"),
        ]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    with pytest.warns(UserWarning) as caught:
        registry.load_plugins()
    assert groups == ["graphsurgeon.passes"]
    messages = " | ".join(str(w.message) for w in caught)
    for value in ("broken_pkg:X", "fake_pkg:Clash", "fake_pkg:JUNK", "fake_pkg:TEXT"):
        assert value in messages
    assert "not a pass class" in messages
    assert len(caught) == 4
    assert registry.get_pass("fake-plugin-pass") is FakePass
    assert registry.get_pass("fake-plugin-surgery") is FakeSurgery
    assert registry.get_pass("fold-constants") is FoldConstants
    assert set(registry.all_passes()) >= BUILTIN_NAMES
    # Loaded once: a second call does not read entry points again.
    registry.load_plugins()
    assert groups == ["graphsurgeon.passes"]


def test_register_loaded_accepts_classes_lists_and_modules(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry._register_loaded((FakePass, [FakeSurgery]), "src")
    assert registry._REGISTRY["fake-plugin-pass"] is FakePass
    assert registry._REGISTRY["fake-plugin-surgery"] is FakeSurgery
    registry._register_loaded(warnings, "src")  # a module registered itself on import
    for junk in (42, "fake-plugin-pass", b"x", object()):
        with pytest.raises(TypeError, match="not a pass class"):
            registry._register_loaded(junk, "src")


def test_the_package_declares_its_builtins_as_an_entry_point():
    eps = importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    loaded = {ep.name: ep.load() for ep in eps}
    assert loaded["builtin"] == BUILTIN_PASSES


# -- options -----------------------------------------------------------------------------------
class _DemoOptions(PassOptions):
    sparsity: float = option(0.5, "Fraction zeroed.", FloatRange(0.1, 0.9), ge=0.0, lt=1.0)
    bits: int = option(8, "Bits.", Choice([4, 8]))
    group: int = option(32, "Group size.", IntRange(16, 128, log=True, step=16), ge=1)
    plain: str = option("x", "Not searchable.")
    ids: list[str] = option([], "A list default.")


def test_search_spaces_are_read_back_from_options():
    spaces = search_spaces(_DemoOptions)
    assert set(spaces) == {"sparsity", "bits", "group"}
    assert spaces["sparsity"] == FloatRange(0.1, 0.9)
    assert spaces["bits"] == Choice([4, 8])
    assert spaces["group"] == IntRange(16, 128, log=True, step=16)
    assert isinstance(spaces["group"], IntRange) and spaces["group"].log is True
    fold = search_spaces(FoldConstantsOptions)
    assert fold == {
        "input_size_limit": IntRange(1024, 1 << 20, log=True),
        "output_size_limit": IntRange(1024, 1 << 24, log=True),
    }
    assert search_spaces(FixShapes.Options) == {}
    # Each list default is a fresh list.
    a, b = _DemoOptions(), _DemoOptions()
    a.ids.append("z")
    assert b.ids == []


def test_out_of_range_option_names_the_field():
    with pytest.raises(
        GraphSurgeonError,
        match=r"fold-constants: input_size_limit: .*greater than or equal to 0.*-5",
    ):
        FoldConstants({"input_size_limit": -5})
    with pytest.raises(GraphSurgeonError, match="output_size_limit"):
        FoldConstants({"output_size_limit": "lots"})
    with pytest.raises(GraphSurgeonError, match="no_such_option"):
        FoldConstants({"no_such_option": 1})
    options = FoldConstantsOptions()
    with pytest.raises(ValueError, match="input_size_limit"):
        options.input_size_limit = -1  # validated on assignment too
    with pytest.raises(ValueError, match="sparsity"):
        _DemoOptions(sparsity=1.5)


# -- pipelines ---------------------------------------------------------------------------------
def messy_model() -> ir.Model:
    """Identities, constants, a Conv+BN, a MatMul+Add, duplicates and dead code: cleanup food."""
    inits = [
        const("W", rand(3, 3, 3, 3)),
        *_bn_params("bn", 3),
        const("F", rand(3, 4)),
        const("fb", rand(4)),
        const("k1", rand(4)),
        const("k2", rand(4)),
    ]
    nodes = [
        oh.make_node("Identity", ["x"], ["xi"], name="id_in"),
        oh.make_node("Conv", ["xi", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        _bn("bn", "c", "b"),
        oh.make_node("ReduceMean", ["b", "axes"], ["p"], name="pool", keepdims=0),
        oh.make_node("MatMul", ["p", "F"], ["m"], name="fc"),
        oh.make_node("Add", ["m", "fb"], ["f"], name="fc_add"),
        oh.make_node("Add", ["k1", "k2"], ["k"], name="const_add"),
        oh.make_node("Relu", ["f"], ["r1"], name="relu1"),
        oh.make_node("Relu", ["f"], ["r2"], name="relu2"),
        oh.make_node("Add", ["r1", "r2"], ["s"], name="sum"),
        oh.make_node("Mul", ["s", "k"], ["y"], name="scale"),
        oh.make_node("Sigmoid", ["p"], ["dead"], name="dead"),
    ]
    inits.append(const("axes", np.int64([2, 3])))
    return build(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4])], inits)


def test_named_cleanup_pipeline_compiles_and_runs():
    steps = compile_pipeline("cleanup")
    assert len(steps) == 1 and isinstance(steps[0], RepeatStep)
    assert steps[0].max_iterations == 4
    assert [s.cls.name for s in steps[0].steps] == [
        "eliminate-identities",
        "fold-constants",
        "fold-batchnorm",
        "fuse-matmul-add",
        "eliminate-common-subexpressions",
        "eliminate-dead-code",
    ]
    nested = compile_pipeline(["cleanup", "eliminate-dead-code"])
    assert isinstance(nested[0], RepeatStep) and nested[0].max_iterations == 1
    model = messy_model()
    before = proto_bytes(model)
    result = run_pipeline(model, "cleanup", verify="numeric")
    assert result.modified is True
    ops = sorted(n.op_type for n in model.graph)
    assert ops == ["Add", "Conv", "Gemm", "Mul", "ReduceMean", "Relu"]
    assert result.drift_vs_original is not None
    assert_same_outputs(before, model)
    # Records: the repeat ran until a whole round changed nothing.
    last_round = result.records[-6:]
    assert [r.name for r in last_round] == [s.cls.name for s in steps[0].steps]
    assert not any(r.modified for r in last_round)
    assert any(r.modified for r in result.records[:-6])


def test_repeat_runs_to_a_fixed_point_and_stops():
    model = messy_model()
    result = run_pipeline(
        model, [{"repeat": ["eliminate-identities", "eliminate-dead-code"], "max_iterations": 5}]
    )
    assert result.modified is True
    # Round 1 changes, round 2 changes nothing and stops the loop.
    assert [(r.name, r.modified) for r in result.records] == [
        ("eliminate-identities", True),
        ("eliminate-dead-code", True),
        ("eliminate-identities", False),
        ("eliminate-dead-code", False),
    ]
    again = run_pipeline(model, [{"repeat": ["eliminate-identities"], "max_iterations": 5}])
    assert again.modified is False and len(again.records) == 1
    capped = run_pipeline(
        messy_model(), [{"repeat": ["eliminate-identities"], "max_iterations": 1}]
    )
    assert [r.modified for r in capped.records] == [True]


@pytest.mark.parametrize(
    ("spec", "where", "problem"),
    [
        (["eliminate-dead-code", "no-such-pass"], "step 2 (no-such-pass)", "unknown pass"),
        (["fold-constant"], "step 1 (fold-constant)", "did you mean fold-constants"),
        (
            [{"name": "fold-constants", "options": {"input_size_limit": "big"}}],
            "step 1 (fold-constants)",
            "options.input_size_limit",
        ),
        (
            [{"name": "fold-constants", "options": {"input_size_limit": -3}}],
            "step 1 (fold-constants)",
            "greater than or equal to 0",
        ),
        (
            [{"name": "fix-shapes", "options": {"default": 0}}],
            "step 1 (fix-shapes)",
            "options.default",
        ),
        (
            [{"name": "fold-constants", "options": {"bogus": 1}}],
            "step 1 (fold-constants)",
            "bogus",
        ),
        (
            ["eliminate-dead-code", {"name": "fold-batchnorm", "targets": {"names": ["("]}}],
            "step 2 (fold-batchnorm)",
            "invalid regex",
        ),
        (
            [{"name": "fold-batchnorm", "targets": {"nmes": ["x"]}}],
            "step 1 (fold-batchnorm)",
            "nmes",
        ),
        (
            [{"name": "eliminate-dead-code", "targets": {"names": ["x"]}}],
            "step 1 (eliminate-dead-code)",
            "does not take targets",
        ),
        ([{"name": "fold-constants", "option": {}}], "step 1", "unknown key(s) ['option']"),
        ([{"options": {}}], "step 1", "no pass 'name'"),
        ([{"repeat": ["eliminate-dead-code"], "times": 2}], "step 1", "unknown key(s) ['times']"),
        ([{"repeat": ["eliminate-dead-code", "nope"]}], "step 1.2 (nope)", "unknown pass"),
        ([{"repeat": []}], "step 1", "non-empty list"),
        ([{"repeat": ["eliminate-dead-code"], "max_iterations": 0}], "step 1", "max_iterations"),
        ([42], "step 1", "expected a pass name or a mapping"),
        ({"steps": ["eliminate-dead-code"], "stpes": []}, "pipeline", "unknown top-level key"),
        ([], "pipeline", "non-empty list"),
    ],
)
def test_pipeline_errors_name_the_step(spec, where, problem):
    with pytest.raises(PipelineError) as info:
        compile_pipeline(spec)
    assert where in (info.value.where or "")
    assert problem in info.value.problem


def test_pipeline_errors_in_files_name_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "steps:\n  - eliminate-dead-code\n  - name: fold-constants\n    options: {input_size_limit: -1}\n"
    )
    with pytest.raises(PipelineError) as info:
        compile_pipeline(path)
    assert str(path) in info.value.where and "step 2 (fold-constants)" in info.value.where
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        compile_pipeline(bad)


# -- layers ------------------------------------------------------------------------------------
def layers_model() -> ir.Model:
    return build(
        [
            oh.make_node("Conv", ["x", "W"], ["c"], name="stem/conv", pads=[1, 1, 1, 1]),
            _bn("bn", "c", "b"),
            oh.make_node("Flatten", ["b"], ["f"], name="flat"),
            oh.make_node("MatMul", ["f", "F"], ["m"], name="fc"),
            oh.make_node("Transpose", ["m"], ["m_t"], name="tr"),
            oh.make_node("MatMul", ["m", "m_t"], ["mm"], name="act_mm"),
            oh.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
            oh.make_node("Gather", ["T", "ids"], ["ti"], name="int_gather"),
            oh.make_node("Constant", [], ["Wc"], name="wc", value=const("wcv", rand(2, 2))),
            oh.make_node("Reshape", ["e", "shape2"], ["e2"], name="reshape"),
            oh.make_node("MatMul", ["Wc", "e2"], ["cm"], name="const_first"),
        ],
        [vi("x", [1, 2, 3, 3]), vi("ids", [2], TensorProto.INT64)],
        [vi("mm", [1, 1]), vi("ti", [2], TensorProto.INT64), vi("cm", [2, 2])],
        [
            const("W", rand(2, 2, 3, 3)),
            *_bn_params("bn", 2),
            const("F", rand(18, 4)),
            const("E", rand(5, 2)),
            const("T", np.int64([3, 1, 4, 1, 5])),
            const("shape2", np.int64([2, 2])),
        ],
    )


def test_find_layers_classifies_weight_bearing_nodes():
    model = layers_model()
    layers = {layer.node.name: layer for layer in find_layers(model)}
    assert set(layers) == {"stem/conv", "fc", "embed", "const_first"}
    assert layers["stem/conv"].id == "stem/conv" and layers["stem/conv"].weight_index == 1
    assert layers["fc"].weight_index == 1
    assert layers["const_first"].weight_index == 0  # a Constant node's value is a weight
    assert layers["embed"].weight_index == 0
    assert layers["embed"].weight_value is model.graph.initializers["E"]
    assert layer_id(node(model, "act_mm")) is None  # two activations
    assert layer_id(node(model, "int_gather")) is None  # an integer table is plumbing
    assert layer_id(node(model, "stem/conv")) == "stem/conv"


def test_unnamed_layers_get_unique_ids():
    model = build(
        [
            oh.make_node("MatMul", ["x", "W1"], ["a"]),
            oh.make_node("MatMul", ["a", "W2"], ["b"]),
            oh.make_node("MatMul", ["b", "W3"], ["y"], name="matmul"),
        ],
        [vi("x", [1, 2])],
        [vi("y", [1, 2])],
        [const(f"W{i}", rand(2, 2)) for i in (1, 2, 3)],
    )
    ids = [layer.id for layer in find_layers(model)]
    assert len(set(ids)) == 3
    assert all(i.startswith("matmul") for i in ids)
    assert [layer.id for layer in find_layers(model)] == ids  # read back, not recomputed


def test_layer_ids_survive_save_and_load(tmp_path):
    model = layers_model()
    ids = {layer.node.name: layer.id for layer in find_layers(model)}
    # Rename the nodes: ids come from the stored metadata, not from the names.
    for n in model.graph:
        n.name = f"renamed_{n.name}"
    save(model, tmp_path / "m.onnx")
    loaded = load(tmp_path / "m.onnx")
    for n in loaded.graph:
        assert n.metadata_props.get(LAYER_ID_KEY) == ids.get(n.name.removeprefix("renamed_"))
    again = {layer.node.name.removeprefix("renamed_"): layer.id for layer in find_layers(loaded)}
    assert again == ids


def test_conv_inherits_its_layer_id_after_fold_batchnorm():
    model = conv_bn_model()
    node(model, "conv").name = "features.0/conv"
    (layer,) = find_layers(model)
    assert layer.id == "features.0/conv"
    inherit = weight_ids([layer])
    assert inherit == {"W": "features.0/conv"}
    assert FoldBatchNorm()(model).modified is True
    (conv,) = nodes_of(model, "Conv")
    conv.metadata_props.pop(LAYER_ID_KEY, None)  # whatever the rewriter copied, inherit decides
    conv.name = "fused"
    (after,) = find_layers(model, inherit=inherit)
    assert after.node is conv and after.id == "features.0/conv"
    # Without the snapshot, a fresh id would come from the node's name.
    conv.metadata_props.pop(LAYER_ID_KEY)
    assert find_layers(model)[0].id == "fused"


def test_pipeline_keeps_layer_ids_through_fold_batchnorm():
    model = conv_bn_model()
    node(model, "conv").name = "features.0/conv"
    run_pipeline(model, ["fold-batchnorm"])
    (conv,) = nodes_of(model, "Conv")
    assert layer_id(conv) == "features.0/conv"


# -- graph view --------------------------------------------------------------------------------
def diamond_model() -> ir.Model:
    return build(
        [
            oh.make_node("Relu", ["x"], ["a"], name="A"),
            oh.make_node("Sigmoid", ["a"], ["b"], name="B"),
            oh.make_node("Tanh", ["a"], ["c"], name="C"),
            oh.make_node("Add", ["b", "c"], ["d"], name="D"),
            oh.make_node("Neg", ["x"], ["e"], name="E"),
        ],
        [vi("x", [2])],
        [vi("d", [2]), vi("e", [2])],
    )


def test_graph_view_producers_consumers_reachability():
    model = diamond_model()
    a, b, c, d, e = (node(model, n) for n in "ABCDE")
    view = GraphView(model)
    assert set(view.producers(d)) == {b, c}
    assert view.producers(a) == []
    assert set(view.consumers(a)) == {b, c}
    assert view.consumers(d) == []
    assert view.reachable(a, d) and not view.reachable(d, a)
    assert not view.reachable(b, c) and not view.reachable(e, d)
    assert view.descendants(a) == {b, c, d}


def test_graph_view_dominators_on_a_diamond():
    model = diamond_model()
    a, b, c, d, e = (node(model, n) for n in "ABCDE")
    view = GraphView(model)
    idom = view.immediate_dominators()
    assert idom[d] is a and idom[b] is a and idom[c] is a
    assert idom[a] == SOURCE and idom[e] == SOURCE
    assert view.dominates(a, d) and view.dominates(d, d)
    assert not view.dominates(b, d) and not view.dominates(c, d)
    assert not view.dominates(e, d)


def test_graph_view_subgraph_reads_make_edges():
    then_branch = oh.make_graph(
        [oh.make_node("Add", ["x", "r"], ["t"], name="inner_add")], "then", [], [vi("t", [2])]
    )
    else_branch = oh.make_graph(
        [oh.make_node("Neg", ["x"], ["e"], name="inner_neg")], "else", [], [vi("e", [2])]
    )
    model = build(
        [
            oh.make_node("Relu", ["x"], ["r"], name="outer_relu"),
            oh.make_node("Not", ["c"], ["nc"], name="not"),
            oh.make_node(
                "If", ["nc"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch
            ),
        ],
        [vi("c", [], TensorProto.BOOL), vi("x", [2])],
        [vi("y", [2])],
    )
    relu, not_, if_ = node(model, "outer_relu"), node(model, "not"), node(model, "if")
    view = GraphView(model)
    # The If reads r inside its then-branch: it depends on the Relu as well as on its input.
    assert set(view.producers(if_)) == {relu, not_}
    assert view.reachable(relu, if_)
    assert SOURCE in set(view.nx.predecessors(if_))  # x, a graph input, is read inside too
    assert not view.dominates(relu, if_)


def layer_chain_model() -> ir.Model:
    return build(
        [
            oh.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            oh.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
            oh.make_node("Add", ["r1", "r2"], ["s"], name="skip"),
            oh.make_node("Flatten", ["s"], ["f"], name="flat"),
            oh.make_node("Gemm", ["f", "F"], ["y"], name="fc"),
        ],
        [vi("x", [1, 2, 3, 3])],
        [vi("y", [1, 4])],
        [const("W1", rand(2, 2, 3, 3)), const("W2", rand(2, 2, 3, 3)), const("F", rand(18, 4))],
    )


def test_layer_distance_and_layer_graph():
    model = layer_chain_model()
    view = GraphView(model)
    conv1, conv2, fc = (node(model, n) for n in ("conv1", "conv2", "fc"))
    relu1, skip = node(model, "relu1"), node(model, "skip")
    assert view.layer_distance(conv1, conv2) == 1  # conv -> relu -> conv
    assert view.layer_distance(conv1, relu1) == 0
    assert view.layer_distance(conv1, fc) == 1  # via the skip connection
    assert view.layer_distance(conv2, fc) == 1
    assert view.layer_distance(conv2, conv1) is None
    assert view.layer_distance(skip, fc) == 1
    lg = view.layer_graph()
    assert set(lg.nodes) == {"conv1", "conv2", "fc"}
    assert set(lg.edges) == {("conv1", "conv2"), ("conv1", "fc"), ("conv2", "fc")}
    assert GraphView(model.graph).layer_nodes == {}  # a bare graph has no layer ids


# -- statistics --------------------------------------------------------------------------------
def stats_model() -> ir.Model:
    from onnx_ir.passes.common import ShapeInferencePass

    model = build(
        [
            oh.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            oh.make_node("Conv", ["c", "Wg"], ["g"], name="gconv", group=2, strides=[2, 2]),
            oh.make_node("Flatten", ["g"], ["f"], name="flat"),
            oh.make_node("Gemm", ["f", "G", "gb"], ["h"], name="gemm", transB=1),
            oh.make_node("Gemm", ["GA", "h"], ["h2"], name="gemm_a", transA=1),
            oh.make_node("Reshape", ["h2", "shape3"], ["h3"], name="reshape"),
            oh.make_node("MatMul", ["h3", "M"], ["y"], name="mm"),
        ],
        [vi("x", [1, 3, 8, 8])],
        [vi("y", [7, 5, 6])],
        [
            const("W", rand(4, 3, 3, 3)),
            const("B", rand(4)),
            const("Wg", rand(4, 2, 2, 2)),
            const("G", rand(10, 64)),
            const("gb", rand(10)),
            const("GA", rand(1, 7)),
            const("shape3", np.int64([7, 5, 2])),
            const("M", rand(2, 6)),
        ],
    )
    ShapeInferencePass()(model)
    return model


def test_layer_macs_match_hand_computed_numbers():
    model = stats_model()
    stats = model_stats(model)
    layers = stats.layers
    # Conv: out 1x4x8x8 = 256 outputs, each 3*3*3 = 27 MACs; bias adds 256 FLOPs.
    assert layers["conv"].macs == 256 * 27
    assert layers["conv"].flops == 2 * 256 * 27 + 256
    assert layers["conv"].params == 4 * 3 * 3 * 3 + 4
    # Grouped conv, stride 2: out 1x4x4x4 = 64 outputs, each (4/2)*2*2 = 8 MACs.
    assert layers["gconv"].output_shape == [1, 4, 4, 4]
    assert layers["gconv"].macs == 64 * 8
    assert layers["gconv"].flops == 2 * 64 * 8
    # Gemm, transB: (1x64) x (10x64)^T -> 1x10, K = 64.
    assert layers["gemm"].macs == 10 * 64
    assert layers["gemm"].flops == 2 * 640 + 10
    # Gemm with the constant as A (transA): (1x7)^T x (1x10) -> 7x10, K = 1.
    assert layers["gemm_a"].macs == 70 * 1
    # MatMul: (7x5x2) x (2x6) -> 7x5x6 = 210 outputs, K = 2.
    assert layers["mm"].macs == 210 * 2
    assert stats.flops == sum(s.flops for s in layers.values())
    assert stats.params == sum(v.const_value.size for v in model.graph.initializers.values())
    assert stats.nodes == 7
    assert layer_stats(find_layers(model)[0]).macs == 256 * 27


def test_stats_unknown_without_static_shapes():
    model = build(
        [oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [vi("x", ["n", 4])],
        [vi("y", ["n", 3])],
        [const("W", rand(4, 3))],
    )
    stats = model_stats(model)
    assert stats.layers["mm"].macs is None and stats.flops is None
    assert stats.params == 12

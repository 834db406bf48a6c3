"""Property tests: every exact pass, and the ``cleanup`` pipeline, on random small models.

The generator builds valid models of 2-12 nodes from Conv, Gemm, MatMul, Add, Mul, Relu,
Concat, BatchNormalization and Identity over initializers and Constant nodes, on a conv branch
(input ``X``: ``[N, 4, 6, 6]``, ``N`` sometimes symbolic) and a dense branch (input ``D``:
``[3, 8]``). It plants work for each pass: Conv/Gemm followed by BatchNormalization, MatMul
followed by Add, constant-only subexpressions, duplicated nodes, Identity nodes (also on graph
inputs and outputs) and dead branches.

For each pass and model: onnxruntime outputs equal the original's within
:func:`graphsurgeon.verify.compare_exact`; ``modified`` is True exactly when the serialized
model changed; :func:`graphsurgeon.verify.check_structure` passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphsurgeon.data import generate_inputs
from graphsurgeon.execution import make_session, run
from graphsurgeon.instruments import Instrument, default_instruments
from graphsurgeon.layers import find_layers
from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.registry import all_passes
from graphsurgeon.shapes import ShapeInferencePass
from graphsurgeon.verify import Signature, check_structure, compare_exact

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EXACT_PASSES = sorted(name for name, cls in all_passes().items() if cls.kind == "exact")
# Options that give a pass something to do on generated models (N is the only symbolic dim).
PASS_OPTIONS = {"fix-shapes": {"default": 1}}
SPATIAL = 6
DENSE_ROWS = 3
MAX_CHANNELS = 12


# -- the generator -----------------------------------------------------------------------------
@dataclass
class Tensor:
    name: str
    branch: str  # "conv": [N, C, 6, 6]; "dense": [3, C]
    channels: int


@dataclass
class Builder:
    rng: np.random.Generator
    batch: str | int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    counter: int = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def shape(self, t: Tensor) -> list:
        if t.branch == "conv":
            return [self.batch, t.channels, SPATIAL, SPATIAL]
        return [DENSE_ROWS, t.channels]

    def array(self, *shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
        return self.rng.uniform(low, high, size=shape).astype(np.float32)

    def constant(self, array: np.ndarray, as_node: bool) -> str:
        """An initializer, or a Constant node (which counts against the node budget)."""
        name = self.fresh("k")
        if as_node:
            self.add_node("Constant", [], name, value=nh.from_array(array, name + "_value"))
        else:
            self.initializers.append(nh.from_array(array, name))
        return name

    def add_node(self, op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
        named = self.rng.random() < 0.8
        node = oh.make_node(op, inputs, [output], name=self.fresh("n") if named else "", **attrs)
        self.nodes.append(node)
        return node

    def emit(self, op: str, inputs: list[str], branch: str, channels: int, **attrs) -> Tensor:
        out = Tensor(self.fresh("t"), branch, channels)
        self.add_node(op, inputs, out.name, **attrs)
        self.tensors.append(out)
        return out


def _pick(draw, pool: list[Tensor]) -> Tensor:
    return pool[draw(st.integers(0, len(pool) - 1))]


def _bias_shape(draw, t: Tensor, channels: int | None = None) -> tuple[int, ...]:
    c = t.channels if channels is None else channels
    if t.branch == "conv":
        return draw(st.sampled_from([(c, 1, 1), (1, c, 1, 1), (1,), (SPATIAL,), ()]))
    return draw(st.sampled_from([(c,), (1, c), (DENSE_ROWS, c), (DENSE_ROWS, 1), ()]))


def _conv(draw, b: Builder, t: Tensor, c_out: int | None = None) -> Tensor:
    c_out = draw(st.sampled_from([2, 3, 4])) if c_out is None else c_out
    k = draw(st.sampled_from([1, 3]))
    group = 2 if t.channels % 2 == 0 and c_out % 2 == 0 and draw(st.booleans()) else 1
    inputs = [t.name, b.constant(b.array(c_out, t.channels // group, k, k), as_node=False)]
    if draw(st.booleans()):
        inputs.append(b.constant(b.array(c_out), as_node=False))
    pad = (k - 1) // 2
    return b.emit("Conv", inputs, "conv", c_out, pads=[pad] * 4, group=group)


def _gemm(draw, b: Builder, t: Tensor) -> Tensor:
    n = draw(st.sampled_from([2, 3, 5]))
    trans_b = draw(st.booleans())
    w = b.array(n, t.channels) if trans_b else b.array(t.channels, n)
    inputs = [t.name, b.constant(w, as_node=False)]
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(n,), (1, n), (DENSE_ROWS, n), (1,)]))
        inputs.append(b.constant(b.array(*shape), as_node=False))
    attrs = {"transB": int(trans_b)}
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.sampled_from([0.5, 2.0]))
        attrs["beta"] = draw(st.sampled_from([0.5, 1.5]))
    return b.emit("Gemm", inputs, "dense", n, **attrs)


def _matmul(draw, b: Builder, t: Tensor, n: int | None = None) -> Tensor:
    n = draw(st.sampled_from([2, 4, 5])) if n is None else n
    weight = b.constant(b.array(t.channels, n), as_node=draw(st.booleans()))
    return b.emit("MatMul", [t.name, weight], "dense", n)


def _batchnorm(draw, b: Builder, t: Tensor) -> Tensor:
    c = t.channels
    params = [
        b.constant(b.array(c, low=0.5, high=2.0), as_node=False),
        b.constant(b.array(c), as_node=False),
        b.constant(b.array(c), as_node=False),
        b.constant(b.array(c, low=0.2, high=2.0), as_node=False),
    ]
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    return b.emit("BatchNormalization", [t.name, *params], t.branch, c, epsilon=eps)


def _binary(draw, b: Builder, t: Tensor, op: str) -> Tensor:
    mates = [u for u in b.tensors if u.branch == t.branch and u.channels == t.channels]
    choice = draw(st.sampled_from(["tensor", "const", "const-expr"]))
    if choice == "tensor":
        other = _pick(draw, mates).name
    else:
        shape = _bias_shape(draw, t)
        other = b.constant(b.array(*shape), as_node=draw(st.booleans()))
        if choice == "const-expr":  # a constant-only subexpression for fold-constants
            second = b.constant(b.array(*shape), as_node=draw(st.booleans()))
            inner_op = draw(st.sampled_from(["Add", "Mul"]))
            folded = b.fresh("c")
            b.add_node(inner_op, [other, second], folded)
            other = folded
    inputs = [t.name, other] if draw(st.booleans()) else [other, t.name]
    return b.emit(op, inputs, t.branch, t.channels)


def _concat(draw, b: Builder, t: Tensor) -> Tensor | None:
    mates = [
        u for u in b.tensors if u.branch == t.branch and u.channels + t.channels <= MAX_CHANNELS
    ]
    if not mates:
        return None
    u = _pick(draw, mates)
    return b.emit("Concat", [t.name, u.name], t.branch, t.channels + u.channels, axis=1)


def _duplicate(draw, b: Builder) -> Tensor | None:
    """Repeat an earlier node with the same inputs and attributes (work for CSE)."""
    candidates = [
        (n, t)
        for n in b.nodes
        for t in b.tensors
        if n.op_type not in ("Constant", "If") and list(n.output) == [t.name]
    ]
    if not candidates:
        return None
    original, t = candidates[draw(st.integers(0, len(candidates) - 1))]
    copy = onnx.NodeProto()
    copy.CopyFrom(original)
    out = Tensor(b.fresh("t"), t.branch, t.channels)
    copy.output[0] = out.name
    copy.name = b.fresh("n") if original.name else ""
    b.nodes.append(copy)
    b.tensors.append(out)
    return out


def _branch(draw, b: Builder, t: Tensor, name: str) -> onnx.GraphProto:
    """An If branch computing a tensor shaped like ``t`` from outer-scope values."""
    outer_nodes, outer_tensors = b.nodes, b.tensors
    b.nodes, b.tensors = [], list(outer_tensors)  # the branch reads the outer scope
    kind = draw(st.sampled_from(["identity", "relu", "add", "layer", "layer-bn"]))
    if kind == "identity":  # returns an outer value through an Identity
        out = b.emit("Identity", [t.name], t.branch, t.channels)
    elif kind == "relu":
        out = b.emit("Relu", [t.name], t.branch, t.channels)
    elif kind == "add":
        out = _binary(draw, b, t, "Add")
    else:
        if t.branch == "conv":
            out = _conv(draw, b, t, c_out=t.channels)
        else:
            out = _matmul(draw, b, t, n=t.channels)
            if draw(st.booleans()):
                bias = b.constant(b.array(t.channels), as_node=draw(st.booleans()))
                out = b.emit("Add", [out.name, bias], "dense", t.channels)
        if kind == "layer-bn":
            out = _batchnorm(draw, b, out)
    if draw(st.booleans()):  # dead code inside the branch
        u = _pick(draw, b.tensors)
        b.emit("Relu", [u.name], u.branch, u.channels)
    if draw(st.booleans()):  # an inner duplicate
        _duplicate(draw, b)
    graph = oh.make_graph(
        b.nodes,
        name,
        [],
        [oh.make_tensor_value_info(out.name, TensorProto.FLOAT, b.shape(t))],
    )
    b.nodes, b.tensors = outer_nodes, outer_tensors
    return graph


def _if(draw, b: Builder, t: Tensor, inputs: list[Tensor]) -> Tensor:
    if draw(st.booleans()):
        cond = b.constant(np.array(draw(st.booleans())), as_node=draw(st.booleans()))
    else:
        if not any(u.name == "C" for u in inputs):
            inputs.append(Tensor("C", "cond", 0))
        cond = "C"
    then_branch = _branch(draw, b, t, b.fresh("then"))
    else_branch = _branch(draw, b, t, b.fresh("else"))
    return b.emit(
        "If", [cond], t.branch, t.channels, then_branch=then_branch, else_branch=else_branch
    )


OPS = [
    "conv",
    "conv-bn",
    "gemm",
    "gemm-bn",
    "matmul",
    "matmul-add",
    "bn",
    "add",
    "mul",
    "relu",
    "concat",
    "identity",
    "duplicate",
    "if",
]


class Spec:
    def __init__(self, proto: bytes, ops: list[str]) -> None:
        self.proto, self.ops = proto, ops

    def model(self) -> ir.Model:
        return ir.serde.deserialize_model(onnx.load_from_string(self.proto))

    def __repr__(self) -> str:  # shown by Hypothesis on failure
        model = onnx.load_from_string(self.proto)
        return f"Spec(ops={self.ops})\n{onnx.printer.to_text(model)}"


@st.composite
def models(draw) -> Spec:
    symbolic = draw(st.booleans())
    b = Builder(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), "N" if symbolic else 1)
    inputs = [Tensor("X", "conv", 4), Tensor("D", "dense", 8)]
    b.tensors.extend(inputs)
    budget = draw(st.integers(2, 12))
    ops: list[str] = []
    while len(b.nodes) < budget:
        op = draw(st.sampled_from(OPS))
        t = _pick(draw, b.tensors)
        before = len(b.nodes)
        conv_pool = [u for u in b.tensors if u.branch == "conv"]
        dense_pool = [u for u in b.tensors if u.branch == "dense"]
        if op in ("conv", "conv-bn"):
            out = _conv(draw, b, _pick(draw, conv_pool))
            if op == "conv-bn":
                _batchnorm(draw, b, out)
        elif op in ("gemm", "gemm-bn"):
            out = _gemm(draw, b, _pick(draw, dense_pool))
            if op == "gemm-bn":
                _batchnorm(draw, b, out)
        elif op in ("matmul", "matmul-add"):
            out = _matmul(draw, b, _pick(draw, dense_pool))
            if op == "matmul-add":
                shape = _bias_shape(draw, out)
                bias = b.constant(b.array(*shape), as_node=draw(st.booleans()))
                b.emit("Add", [out.name, bias], "dense", out.channels)
        elif op == "bn":
            _batchnorm(draw, b, t)
        elif op in ("add", "mul"):
            _binary(draw, b, t, op.capitalize())
        elif op == "relu":
            b.emit("Relu", [t.name], t.branch, t.channels)
        elif op == "concat":
            _concat(draw, b, t)
        elif op == "identity":
            b.emit("Identity", [t.name], t.branch, t.channels)
        elif op == "duplicate":
            _duplicate(draw, b)
        elif op == "if":
            _if(draw, b, t, inputs)
        if len(b.nodes) > before:
            ops.append(op)
    produced = [u for u in b.tensors if u not in inputs]
    assert all(u.branch != "cond" for u in produced)
    # Graph outputs: the last tensor, sometimes more; everything else that reaches none is dead.
    chosen = [produced[-1]]
    for u in draw(st.lists(st.sampled_from(produced), max_size=2)):
        if u not in chosen:
            chosen.append(u)
    if draw(st.integers(0, 9)) == 0:  # an Identity of a graph input as a graph output
        src = _pick(draw, inputs[:2])
        chosen.append(b.emit("Identity", [src.name], src.branch, src.channels))
        ops.append("input-identity")
    graph = oh.make_graph(
        b.nodes,
        "random",
        [_input_info(b, u) for u in inputs],
        [oh.make_tensor_value_info(u.name, TensorProto.FLOAT, b.shape(u)) for u in chosen],
        initializer=b.initializers,
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)  # the generator only makes valid models
    return Spec(proto.SerializeToString(), ops)


def _input_info(b: Builder, u: Tensor) -> onnx.ValueInfoProto:
    if u.branch == "cond":
        return oh.make_tensor_value_info(u.name, TensorProto.BOOL, [])
    return oh.make_tensor_value_info(u.name, TensorProto.FLOAT, b.shape(u))


# -- checks ------------------------------------------------------------------------------------
def proto_bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


Feed = dict[str, np.ndarray]


def reference(model: ir.Model) -> list[tuple[Feed, Feed]]:
    """Inputs and the original's outputs; both branches of an If on input C are taken."""
    feed = generate_inputs(model, seed=0)
    feeds = [feed, {**feed, "C": np.array(False)}] if "C" in feed else [feed]
    session = make_session(model)
    return [(f, run(session, f)) for f in feeds]


def assert_same_outputs(refs: list[tuple[Feed, Feed]], model: ir.Model) -> None:
    session = make_session(model)
    for feed, ref in refs:
        got = run(session, feed)
        assert list(got) == list(ref)
        bad = compare_exact(ref, got)
        assert bad is None, f"output {bad[0]!r} differs by {bad[1]:.3g}"


@pytest.mark.parametrize("name", EXACT_PASSES)
@SETTINGS
@given(spec=models())
def test_exact_pass_preserves_outputs_and_reports_modified_exactly(name, spec):
    model = spec.model()
    refs = reference(model)
    signature = Signature.of(model)
    before = proto_bytes(model)
    result = all_passes()[name](PASS_OPTIONS.get(name))(model)
    changed = proto_bytes(model) != before
    event(f"modified={result.modified}")
    assert result.modified is changed
    check_structure(model, signature, step=name, strict_shapes=True)
    assert_same_outputs(refs, model)


class ModifiedIsExact(Instrument):
    """Within a pipeline: each pass's ``modified`` is True exactly when it changed the proto."""

    def __init__(self) -> None:
        self.checked = 0

    def before(self, step, pass_, model) -> None:
        self._bytes = proto_bytes(model)

    def after(self, step, pass_, model, record) -> None:
        assert record.modified is (proto_bytes(model) != self._bytes), step
        self.checked += 1


@SETTINGS
@given(spec=models())
def test_cleanup_pipeline(spec):
    model = spec.model()
    refs = reference(model)
    signature = Signature.of(model)
    # What run_pipeline does before its first pass; the rest must be the passes' doing.
    ShapeInferencePass()(model)
    find_layers(model)
    before = proto_bytes(model)
    exact = ModifiedIsExact()
    result = run_pipeline(model, "cleanup", instruments=[*default_instruments(), exact])
    assert exact.checked == len(result.records) >= 6
    assert result.modified is (proto_bytes(model) != before)
    event(f"modified={result.modified}")
    assert result.modified is any(r.modified for r in result.records)
    check_structure(model, signature, step="cleanup", strict_shapes=True)
    assert_same_outputs(refs, model)
    # Cleaned up: nothing left for the passes to do, unless the repeat hit its cap.
    rounds = len(result.records) // 6
    if rounds < 4 or not any(r.modified for r in result.records[-6:]):
        again = run_pipeline(model, "cleanup")
        assert again.modified is False, [r.name for r in again.records if r.modified]
    identities = [n for n in model.graph if n.op_type == "Identity"]
    assert all(_needed(n, model) for n in identities)


def _needed(identity: ir.Node, model: ir.Model) -> bool:
    """An Identity stays only between a graph output and a graph input or another output."""
    x, y = identity.inputs[0], identity.outputs[0]
    return y in model.graph.outputs and (x in model.graph.inputs or x in model.graph.outputs)

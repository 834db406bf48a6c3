"""add-skips and merge-channels.

add-skips promises the function is unchanged at insertion: outputs are compared with the
source model in onnxruntime, bit for bit. merge-channels is checked against prune-channels at
the same ratio (it must lose strictly less on the calibration data), and is exact when the
removed unit is an exact multiple of a survivor.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphsurgeon.passes.channel_pruning import PruneChannels
from graphsurgeon.passes.merge_channels import MergeChannels
from graphsurgeon.passes.skips import AddSkips
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.data import Dataset
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(11)


def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def proto(nodes, inputs, outputs, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = oh.make_graph(
        nodes, "g", inputs, outputs, [nh.from_array(a, n) for n, a in inits.items()]
    )
    m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(m, full_check=True)
    return m


def vi(name: str, shape) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, FLOAT, shape)


def outs(m: ir.Model | onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(m, onnx.ModelProto):
        m = ir.serde.deserialize_model(m)
    onnx.checker.check_model(ir.to_proto(m), full_check=True)
    return run(make_session(m), feed)


def apply(cls, src: onnx.ModelProto, x: dict[str, np.ndarray], **options):
    """Run one pass on a fresh copy of ``src`` with ``x`` as calibration data."""
    m = ir.serde.deserialize_model(src)
    p = cls(options)
    p.calib = Dataset(dict(x), None, {k: True for k in x})
    result = p(m)
    return result.model, p, result.modified


# -- add-skips ------------------------------------------------------------------------
def cnn() -> onnx.ModelProto:
    """conv 3->4 (8x8) - relu - maxpool - conv 4->6 (4x4) - relu - conv 6->6 - y."""
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c1"], ["r1"]),
        oh.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c2"], ["r2"]),
        oh.make_node("Conv", ["r2", "w3"], ["y"], name="c3"),
    ]
    inits = {"w1": rand(4, 3, 3, 3), "b1": rand(4), "w2": rand(6, 4, 3, 3), "b2": rand(6)}
    inits["w3"] = rand(6, 6, 1, 1)
    return proto(nodes, [vi("x", ["n", 3, 8, 8])], [vi("y", ["n", 6, 4, 4])], inits)


@pytest.mark.parametrize("criterion", ["kl", "wasserstein", "correlation"])
def test_add_skips_keeps_the_function_exactly(criterion):
    src = cnn()
    x = {"x": rand(16, 3, 8, 8)}
    m, p, modified = apply(AddSkips, src, x, criterion=criterion, radius=2, max_skips=3)
    assert modified
    skips = p.report()["skips"]
    assert skips and all(s["divergence"] > 0 for s in skips)
    np.testing.assert_array_equal(outs(m, x)["y"], outs(src, x)["y"])  # bit for bit
    ops = [n.op_type for n in m.graph]
    # c1 (8x8, 4 ch) -> c2 (4x4, 6 ch) needs a pool and a projection
    pair = next(s for s in skips if s["dst"] == "c2")  # c1 is c2's only source
    assert pair["src"] == "c1" and "AveragePool" in ops and pair["params_added"] == 4 * 6 + 6
    gains = [v.const_value.numpy() for k, v in m.graph.initializers.items() if k.endswith(".gain")]
    assert len(gains) == len(skips) and not any(g.any() for g in gains)
    proj = [v for k, v in m.graph.initializers.items() if k.endswith("proj.weight")]
    assert all(np.abs(v.const_value.numpy()).sum() > 0 for v in proj)  # gain gets a gradient


def test_add_skips_into_a_graph_output_keeps_its_name():
    """MLP x -MatMul- relu -MatMul- relu -Gemm- y: skips land on the output layer too."""
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        oh.make_node("Relu", ["h1"], ["r1"]),
        oh.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
        oh.make_node("Relu", ["h2"], ["r2"]),
        oh.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3"),
    ]
    inits = {"w1": rand(5, 12), "w2": rand(12, 7), "w3": rand(7, 3), "b3": rand(3)}
    src = proto(nodes, [vi("x", ["n", 5])], [vi("y", ["n", 3])], inits)
    x = {"x": rand(64, 5)}
    m, p, _ = apply(AddSkips, src, x, radius=2, max_skips=2, granularity="tensor")
    dsts = {s["dst"] for s in p.report()["skips"]}
    assert "fc3" in dsts and len(dsts) == 2
    assert [v.name for v in m.graph.outputs] == ["y"]
    np.testing.assert_array_equal(outs(m, x)["y"], outs(src, x)["y"])
    # a nonzero gain really adds the projected source: the path is wired
    gain = next(v for k, v in m.graph.initializers.items() if k.endswith(".gain"))
    gain.const_value = ir.tensor(np.ones((), np.float32), name=gain.name)
    assert not np.allclose(outs(m, x)["y"], outs(src, x)["y"])


def test_add_skips_lstsq_recovers_a_pruned_digits_cnn(digits):
    """90% magnitude pruning wipes out the digits CNN; skips fitted to the residual the
    pruned layers lost against the original win much of it back without training."""
    data = np.load(digits["test"])
    feed = {"input": data["input"]}

    def accuracy(m: ir.Model) -> float:
        return float((outs(m, feed)["logits"].argmax(1) == data["labels"]).mean())

    prune = {"name": "prune-magnitude", "options": {"sparsity": 0.9}}
    acc = {"pruned": accuracy(gs.run_pipeline(digits["model"], [prune]).model)}
    # no reference option: the pipeline hands the pass its input model as the original
    skips = {"name": "add-skips", "options": {"fit": "lstsq", "max_skips": 3}}
    skipped = gs.run_pipeline(digits["model"], [prune, skips], calib=digits["train"])
    notes = skipped.records[-1].notes
    assert all(0 < s["residual_explained"] <= 1 for s in notes["skips"])
    acc["skips"] = accuracy(skipped.model)
    print(f"digits 90% pruned: accuracy {acc}")
    assert acc["skips"] > acc["pruned"] + 0.3
    plast = skipped.records[-1].plasticity
    assert plast["created"] > 0 and plast["pruned"] == 0


def test_add_skips_bad_input(digits):
    with pytest.raises(GraphSurgeonError, match="radius: Input should be greater than or equal"):
        gs.run_pipeline(digits["model"], [{"name": "add-skips", "options": {"radius": 0}}])
    with pytest.raises(GraphSurgeonError, match="needs calibration data"):
        gs.run_pipeline(digits["model"], ["add-skips"])
    with pytest.raises(GraphSurgeonError, match=r"options\.reference"):  # outside a pipeline
        apply(AddSkips, cnn(), {"x": rand(8, 3, 8, 8)}, fit="lstsq")


def test_add_skips_names_the_pairs_it_refuses():
    """conv (4x4) -> Flatten -> Gemm: ranks differ; the only layer pair is refused."""
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        oh.make_node("Flatten", ["c"], ["f"]),
        oh.make_node("Gemm", ["f", "g"], ["y"], name="fc"),
    ]
    src = proto(
        nodes,
        [vi("x", ["n", 2, 4, 4])],
        [vi("y", ["n", 3])],
        {"w": rand(3, 2, 1, 1), "g": rand(48, 3)},
    )
    _, p, modified = apply(AddSkips, src, {"x": rand(8, 2, 4, 4)})
    assert not modified and p.report()["skipped"] == {"ranks differ (4 vs 2)": 1}


# -- merge-channels -------------------------------------------------------------------
def mlp(duplicate: bool, consumer: str = "Gemm") -> onnx.ModelProto:
    """x[6] -Gemm- h[8] -Relu- r -{Gemm with bias | MatMul}- y[3]; h3 = 0.3 * h1 if duplicate."""
    w1, b1 = rand(6, 8), rand(8)
    w1[:, 3] *= 0.2  # the weakest unit by L1 ...
    b1[3] *= 0.2
    if duplicate:  # ... is an exact multiple of unit 1 (Relu commutes with a positive scale)
        w1[:, 3], b1[3] = 0.3 * w1[:, 1], 0.3 * b1[1]
    inits = {"w1": w1, "b1": b1, "w2": rand(8, 3)}
    last = oh.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")
    if consumer == "Gemm":
        inits["b2"] = rand(3)
        last = oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")
    nodes = [
        oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        oh.make_node("Relu", ["h"], ["r"]),
        last,
    ]
    return proto(nodes, [vi("x", ["n", 6])], [vi("y", ["n", 3])], inits)


def conv_pair(duplicate: bool) -> onnx.ModelProto:
    """conv 3->8 -Relu- conv 8->4 (3x3, pads 1): merge through a kernel window and padding."""
    w1, b1 = rand(8, 3, 3, 3), rand(8)
    w1[5] *= 0.1
    b1[5] *= 0.1
    if duplicate:
        w1[5], b1[5] = 0.5 * w1[2], 0.5 * b1[2]
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c"], name="c1", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c"], ["r"]),
        oh.make_node("Conv", ["r", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    return proto(
        nodes,
        [vi("x", ["n", 3, 6, 6])],
        [vi("y", ["n", 4, 6, 6])],
        {"w1": w1, "b1": b1, "w2": rand(4, 8, 3, 3)},
    )


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: mlp(True), {"x": rand(128, 6)}),
        (lambda: mlp(True, "MatMul"), {"x": rand(128, 6)}),
        (lambda: conv_pair(True), {"x": rand(32, 3, 6, 6)}),
    ],
    ids=["gemm", "matmul-no-bias", "conv-3x3-padded"],
)
def test_merging_an_exact_duplicate_is_exact(make, x):
    src = make()
    ref = outs(src, x)["y"]
    merged, p, modified = apply(MergeChannels, src, x, ratio=0.125)
    assert modified and p.report()["merged_units"] == 1
    assert p.report()["mean_abs_corr"] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(outs(merged, x)["y"], ref, rtol=1e-4, atol=1e-4)
    pruned, _, _ = apply(PruneChannels, src, x, ratio=0.125)
    assert np.abs(outs(pruned, x)["y"] - ref).max() > 1e-2  # plain removal does lose it
    shapes = [[tuple(v.shape) for v in n.inputs[1:2]] for n in merged.graph]
    assert shapes == [[tuple(v.shape) for v in n.inputs[1:2]] for n in pruned.graph]


def _error(src, m, x) -> float:
    return float(((outs(m, x)["y"] - outs(src, x)["y"]) ** 2).mean())


@pytest.mark.parametrize("make, shape", [(mlp, (256, 6)), (conv_pair, (64, 3, 6, 6))])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_merge_beats_plain_pruning_on_calibration_data(make, shape, ratio):
    src = make(False)
    x = {"x": rand(*shape)}
    merged, _, _ = apply(MergeChannels, src, x, ratio=ratio)
    pruned, _, _ = apply(PruneChannels, src, x, ratio=ratio)
    assert _error(src, merged, x) < _error(src, pruned, x)


def test_merge_beats_plain_pruning_on_the_digits_cnn(digits):
    train = np.load(digits["train"])
    feed = {"input": train["input"][:128]}  # the calibration samples the passes read
    src = gs.load(digits["model"])
    ref = outs(src, feed)["logits"]
    errors = {}
    for name in ("prune-channels", "merge-channels"):
        result = gs.run_pipeline(
            digits["model"],
            [{"name": name, "options": {"ratio": 0.25}}],
            calib=digits["train"],
            verify="numeric",
        )
        errors[name] = float(((outs(result.model, feed)["logits"] - ref) ** 2).mean())
        params = result.records[-1].after.params
    assert params < 0.6 * result.records[-1].before.params  # the same physical shrinking
    print(f"digits 25% channels, logits MSE on calibration data: {errors}")
    assert errors["merge-channels"] < 0.8 * errors["prune-channels"]


def test_merge_refuses_groups_it_cannot_compensate():
    """Channels normalized by a LayerNorm, and channels contracted by a MatMul of two
    activations: prune-channels takes them, merge-channels names why it does not."""
    nodes = [
        oh.make_node("MatMul", ["x", "wa"], ["a"], name="fa"),
        oh.make_node("LayerNormalization", ["a", "s", "t"], ["n"], axis=-1),
        oh.make_node("MatMul", ["n", "wb"], ["y1"], name="fb"),
        oh.make_node("MatMul", ["x", "wq"], ["q"], name="fq"),
        oh.make_node("MatMul", ["x", "wk"], ["k"], name="fk"),
        oh.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
        oh.make_node("MatMul", ["q", "kt"], ["y2"], name="scores"),
    ]
    inits = {"wa": rand(4, 8), "s": rand(8), "t": rand(8), "wb": rand(8, 2)}
    inits |= {"wq": rand(4, 8), "wk": rand(4, 8)}
    src = proto(nodes, [vi("x", [5, 4])], [vi("y1", [5, 2]), vi("y2", [5, 5])], inits)
    x = {"x": rand(5, 4)}
    _, p, modified = apply(MergeChannels, src, x, ratio=0.25)
    skipped = p.report()["skipped"]
    assert not modified
    assert skipped["merge: a LayerNorm over the channels changes the kept values"] == 1
    assert skipped["merge: MatMul combines the channels without a weight"] == 1
    _, _, modified = apply(PruneChannels, src, x, ratio=0.25)
    assert modified

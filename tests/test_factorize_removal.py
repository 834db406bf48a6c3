"""factorize-lowrank and remove-layers: hand-built graphs checked in onnxruntime against the
source model or a numpy reference, the digits CNN and MiniLM, sizes measured on saved files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphsurgeon.passes.factorize import FactorizeLowRank, energy_rank
from graphsurgeon.passes.layer_removal import RemoveLayers, find_units
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.data import load_npz
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers
from graphsurgeon.metrics import evaluate
from graphsurgeon.stats import model_stats
from graphsurgeon.targets import Targets

RNG = np.random.default_rng(7)
FLOAT = TensorProto.FLOAT


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def build(nodes, inits: dict[str, np.ndarray], x_shape, y_shape, extra_outputs=()) -> ir.Model:
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", FLOAT, x_shape)],
        [oh.make_tensor_value_info(n, FLOAT, s) for n, s in (("y", y_shape), *extra_outputs)],
        [nh.from_array(a, n) for n, a in inits.items()],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    model = ir.from_proto(proto)
    find_layers(model)
    return model


def outputs(model: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    return run(make_session(model), {"x": x})


def file_size(model: ir.Model, path: Path) -> int:
    gs.save(model, path)
    return path.stat().st_size


def check_valid(model: ir.Model) -> None:
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


# -- factorize-lowrank ----------------------------------------------------------------------
def test_energy_rule_picks_smallest_rank_reaching_the_ratio() -> None:
    s = np.array([4.0, 3.0, 2.0, 1.0])  # squares 16, 9, 4, 1 of a total 30
    assert [energy_rank(s, e) for e in (0.5, 0.8, 0.84, 0.9, 0.97, 1.0)] == [1, 2, 3, 3, 4, 4]
    # The same rule through the pass on a matrix built with these singular values.
    u, _ = np.linalg.qr(RNG.standard_normal((12, 4)))
    v, _ = np.linalg.qr(RNG.standard_normal((10, 4)))
    w = (u * s) @ v.T
    model = build(
        [oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": w.astype(np.float32)},
        [2, 12], [2, 10],
    )  # fmt: skip
    p = FactorizeLowRank({"energy": 0.8})
    assert p(model).modified
    assert p.report()["ranks"] == {"mm": 2}
    shapes = sorted(list(v.const_value.shape) for v in model.graph.initializers.values())
    assert shapes == [[2, 10], [12, 2]]


def _gemm() -> tuple[ir.Model, tuple[int, ...]]:
    node = oh.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)
    return build([node], {"w": rand(6, 8), "b": rand(6)}, [3, 8], [3, 6]), (3, 8)


def _matmul_left() -> tuple[ir.Model, tuple[int, ...]]:
    node = oh.make_node("MatMul", ["w", "x"], ["y"], name="mm")
    return build([node], {"w": rand(6, 8)}, [2, 8, 3], [2, 6, 3]), (2, 8, 3)


def _conv(kernel: int, y_shape: list[int], **attrs) -> tuple[ir.Model, tuple[int, ...]]:
    node = oh.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    w = {"w": rand(6, 5, kernel, kernel), "b": rand(6)}
    return build([node], w, [1, 5, 9, 9], y_shape), (1, 5, 9, 9)


ODD = {"strides": [2, 1], "pads": [1, 2, 0, 1], "dilations": [1, 2]}  # -> 4 x 8


CASES = {
    "gemm-transB-alpha-beta": (_gemm, {}),
    "matmul-weight-left": (_matmul_left, {}),
    "conv1x1-strided-padded": (lambda: _conv(1, [1, 6, 6, 6], strides=[2, 2], pads=[1] * 4), {}),
    "conv3x3-tucker2": (lambda: _conv(3, [1, 6, 4, 8], **ODD), {"method": "tucker2"}),
    "conv3x3-spatial": (lambda: _conv(3, [1, 6, 4, 8], **ODD), {"method": "spatial"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_full_rank_is_exact(case: str) -> None:
    make, extra = CASES[case]
    model, x_shape = make()
    x = rand(*x_shape)
    before = outputs(model, x)["y"]
    (original_id,) = [layer.id for layer in find_layers(model)]
    result = FactorizeLowRank({"energy": 1.0, "only_if_smaller": False, **extra})(model)
    assert result.modified
    check_valid(model)
    after = outputs(model, x)["y"]
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    ids = [layer.id for layer in find_layers(model)]
    assert ids[-1] == original_id and ids[0] == f"{original_id}/lowrank.in"
    assert len(ids) == (3 if "tucker" in case else 2)
    assert model.graph.outputs[0].name == "y"


def _reconstructed(model: ir.Model, method: str) -> np.ndarray:
    """The conv weight the factors in ``model`` multiply out to."""
    weights = [layer.weight.numpy().astype(np.float64) for layer in find_layers(model)]
    if method == "tucker2":
        u_in, core, u_out = weights
        return np.einsum("rs...,or,sc->oc...", core, u_out[:, :, 0, 0], u_in[:, :, 0, 0])
    vertical, horizontal = weights  # [r, Cin, kh, 1], [Cout, r, 1, kw]
    return np.einsum("rci,orj->ocij", vertical[..., 0], horizontal[:, :, 0, :])


@pytest.mark.parametrize("method", ["tucker2", "spatial"])
def test_low_rank_conv_runs_and_equals_its_reconstructed_weight(method: str) -> None:
    attrs = {"strides": [2, 1], "pads": [1, 1, 1, 1]}
    model, x_shape = _conv(3, [1, 6, 5, 9], **attrs)
    x = rand(*x_shape)
    bias = model.graph.initializers["b"].const_value.numpy()
    p = FactorizeLowRank({"rank": 2, "method": method})
    assert p(model).modified
    check_valid(model)
    w_hat = _reconstructed(model, method).astype(np.float32)
    reference, _ = _conv(3, [1, 6, 5, 9], **attrs)
    reference.graph.initializers["w"].const_value = ir.tensor(w_hat, name="w")
    reference.graph.initializers["b"].const_value = ir.tensor(bias, name="b")
    got, want = outputs(model, x)["y"], outputs(reference, x)["y"]
    assert got.shape == want.shape == (1, 6, 5, 9)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert p.report()["params_saved"] > 0


def test_low_rank_shrinks_params_and_file(tmp_path: Path) -> None:
    w = rand(64, 64)
    model = build(
        [oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": w}, [4, 64], [4, 64]
    )
    size_before = file_size(model, tmp_path / "before.onnx")
    params_before = model_stats(model).params
    assert FactorizeLowRank({"rank": 8})(model).modified
    assert model_stats(model).params == 8 * (64 + 64) < params_before == 64 * 64
    size_after = file_size(model, tmp_path / "after.onnx")
    assert size_after < size_before * 0.3
    # The stats see the two halves as layers, with the shrink on the original id.
    stats = model_stats(model).layers
    assert stats["mm"].params == 8 * 64 and stats["mm/lowrank.in"].params == 64 * 8
    x = rand(4, 64)
    u, s, vt = np.linalg.svd(w.astype(np.float64))
    expected = x @ ((u[:, :8] * s[:8]) @ vt[:8])
    np.testing.assert_allclose(outputs(model, x)["y"], expected, rtol=1e-3, atol=1e-3)


def test_refuses_what_would_not_shrink_and_what_it_cannot_split() -> None:
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        oh.make_node("Reshape", ["h", "shape"], ["h4"]),
        oh.make_node("Conv", ["h4", "wg"], ["y"], name="grouped", group=2),
    ]
    inits = {"w": rand(16, 16), "shape": np.array([1, 4, 2, 2]), "wg": rand(4, 2, 1, 1)}
    model = build(nodes, inits, [1, 16], [1, 4, 2, 2])
    before = ir.to_proto(model).SerializeToString()
    p = FactorizeLowRank({"rank": 12})  # 12 * 32 = 384 > 256
    assert not p(model).modified
    assert ir.to_proto(model).SerializeToString() == before
    assert p.report()["skipped"] == {
        "low rank would not reduce params": 1,
        "grouped convolution": 1,
    }


def test_targets_and_per_layer_overrides() -> None:
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h"], name="a"),
        oh.make_node("MatMul", ["h", "w2"], ["h2"], name="b"),
        oh.make_node("MatMul", ["h2", "w3"], ["y"], name="c"),
    ]
    model = build(nodes, {f"w{i}": rand(32, 32) for i in (1, 2, 3)}, [2, 32], [2, 32])
    p = FactorizeLowRank({"rank": 4, "overrides": {"b": {"rank": 2}}}, Targets(layers=["a", "b"]))
    assert p(model).modified
    assert p.report()["ranks"] == {"a": 4, "b": 2}
    assert sorted(layer.id for layer in find_layers(model)) == [
        "a", "a/lowrank.in", "b", "b/lowrank.in", "c",
    ]  # fmt: skip


def test_digits_energy_09_runs_and_reports_accuracy(digits, tmp_path: Path) -> None:
    model = gs.load(digits["model"])
    size_before = file_size(model, tmp_path / "before.onnx")
    spec = ["cleanup", {"name": "factorize-lowrank", "options": {"energy": 0.9}}]
    result = gs.run_pipeline(model, spec, calib=digits["test"], verify="numeric")
    record = result.records[-1]
    assert record.name == "factorize-lowrank" and record.modified
    assert record.after.params < record.before.params
    assert any(lid.endswith("/lowrank.in") for lid in record.after.layers)
    original = gs.load(digits["model"])
    base = evaluate(original, digits["test"])
    scores = evaluate(result.model, digits["test"], reference=original)
    print(f"digits accuracy {base['accuracy']:.4f} -> {scores['accuracy']:.4f} at energy 0.9")
    assert base["accuracy"] > 0.95
    assert 0.5 < scores["accuracy"] <= 1.0 and scores["cosine"] > 0.7
    assert file_size(result.model, tmp_path / "after.onnx") < size_before


# -- remove-layers --------------------------------------------------------------------------
def residual_model(extra_reader: bool = False) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x -> Relu -> r; b = MatMul(Relu(MatMul(r, w1)), w2); s = r + b; y = s @ w3."""
    inits = {"w1": rand(8, 8), "w2": rand(8, 8), "w3": rand(8, 4)}
    nodes = [
        oh.make_node("Relu", ["x"], ["r"], name="pre/Relu"),
        oh.make_node("MatMul", ["r", "w1"], ["h1"], name="res/fc1"),
        oh.make_node("Relu", ["h1"], ["a1"], name="res/relu"),
        oh.make_node("MatMul", ["a1", "w2"], ["b"], name="res/fc2"),
        oh.make_node("Add", ["r", "b"], ["s"], name="res/Add"),
        oh.make_node("MatMul", ["s", "w3"], ["y"], name="head"),
    ]
    extra = [("b", [2, 8])] if extra_reader else []
    return build(nodes, inits, [2, 8], [2, 4], extra), inits


def test_residual_bypass_equals_numpy_reference(tmp_path: Path) -> None:
    model, inits = residual_model()
    size_before = file_size(model, tmp_path / "before.onnx")
    (unit,) = [u for u in find_units(model) if u.problem is None]
    assert unit.id == "res/Add" and unit.kind == "residual"
    assert unit.layers == ["res/fc1", "res/fc2"]
    p = RemoveLayers({"layers": ["res/Add"]})
    assert p(model).modified
    check_valid(model)
    assert [n.op_type for n in model.graph] == ["Relu", "MatMul"]
    assert set(model.graph.initializers) == {"w3"}
    x = rand(2, 8)
    np.testing.assert_allclose(outputs(model, x)["y"], np.maximum(x, 0) @ inits["w3"], rtol=1e-5)
    assert file_size(model, tmp_path / "after.onnx") < size_before / 2


def test_illegal_picks_are_refused_with_a_reason() -> None:
    # Add(f(x), g(x)): neither operand is the skip path.
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["f"], name="f"),
        oh.make_node("MatMul", ["x", "w2"], ["g"], name="g"),
        oh.make_node("Add", ["f", "g"], ["y"], name="two/Add"),
    ]
    two = build(nodes, {"w1": rand(8, 8), "w2": rand(8, 8)}, [2, 8], [2, 8])
    # The branch output is also a graph output: removing the Add would not remove it.
    shared, _ = residual_model(extra_reader=True)
    # x [2, 1] + f(x) [2, 8] broadcasts x up: the sum does not have x's shape.
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["f"], name="fc"),
        oh.make_node("Add", ["x", "f"], ["y"], name="wide/Add"),
    ]
    wide = build(nodes, {"w": rand(1, 8)}, [2, 1], [2, 8])
    cases = [
        (two, "two/Add", "neither operand is a skip path"),
        (shared, "res/Add", "also read elsewhere"),
        (wide, "wide/Add", "broadcast into the skip path"),
        (two, "f", "not identity-like"),  # a layer, but not ~I
    ]
    for model, pick, reason in cases:
        before = ir.to_proto(model).SerializeToString()
        p = RemoveLayers({"layers": [pick]})
        assert not p(model).modified, pick
        (skipped,) = p.report()["skipped"]
        assert skipped.startswith(f"{pick}: ") and reason in skipped, skipped
        assert ir.to_proto(model).SerializeToString() == before
    with pytest.raises(GraphSurgeonError, match="matches no removable unit"):
        RemoveLayers({"layers": ["no/such/unit"]})(two)


def test_identity_like_layer_is_removed() -> None:
    eye = np.eye(8, dtype=np.float32) + 1e-5 * rand(8, 8)
    nodes = [
        oh.make_node("Relu", ["x"], ["r"]),
        oh.make_node("MatMul", ["r", "eye"], ["e"], name="eye"),
        oh.make_node("MatMul", ["e", "w"], ["y"], name="fc"),
    ]
    model = build(nodes, {"eye": eye, "w": rand(8, 3)}, [2, 8], [2, 3])
    x = rand(2, 8)
    before = outputs(model, x)["y"]
    p = RemoveLayers({"kind": "identity", "count": 1, "by": "depth"})
    assert p(model).modified and p.report()["removed"] == ["eye"]
    assert [n.op_type for n in model.graph] == ["Relu", "MatMul"]
    np.testing.assert_allclose(outputs(model, x)["y"], before, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def minilm_small(minilm, tmp_path_factory) -> dict[str, Path]:
    """MiniLM with a 12-sentence calibration file (the model is slow on 2 cores)."""
    with np.load(minilm["sentences"]) as data:
        arrays = {k: data[k][:12] for k in data.files}
    path = tmp_path_factory.mktemp("minilm") / "sentences12.npz"
    np.savez(path, **arrays)
    return {"model": minilm["model"], "calib": path}


def test_minilm_drop_one_transformer_block(minilm_small, tmp_path: Path) -> None:
    model = gs.load(minilm_small["model"])
    size_before = file_size(model, tmp_path / "before.onnx")
    blocks = [u.id for u in find_units(model) if u.kind == "block" and u.problem is None]
    assert blocks == [f"bert/encoder/layer.{i}" for i in range(6)]
    spec = [{"name": "remove-layers", "options": {"layers": ["bert/encoder/layer.3"]}}]
    result = gs.run_pipeline(model, spec, calib=minilm_small["calib"], verify="numeric")
    record = result.records[0]
    assert record.notes["removed"] == ["bert/encoder/layer.3"]
    gone = [lid for lid in record.before.layers if lid not in record.after.layers]
    assert len(gone) == 6 and all(lid.startswith("bert/encoder/layer.3/") for lid in gone)
    # 6 weights, their biases (4 x 384, 1536, 384), 2 LayerNorms (2 x 768), a few constants.
    block = sum(record.before.layers[lid].params for lid in gone) + 3456 + 1536
    assert block == 1_774_464
    assert block <= record.before.params - record.after.params <= block + 100
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("LayerNormalization") == 1 + 2 * 5
    scores = evaluate(result.model, minilm_small["calib"], reference=gs.load(minilm_small["model"]))
    print(f"MiniLM without block 3: cosine {scores['cosine']:.4f}")
    assert 0.5 < scores["cosine"] < 0.9999
    assert file_size(result.model, tmp_path / "after.onnx") < size_before - 6_000_000


def test_minilm_last_block_and_post_ln_branch(minilm_small) -> None:
    calib = load_npz(minilm_small["calib"], gs.load(minilm_small["model"]))
    feed = calib.feeds(4)[0]
    # The last block's output is the graph output last_hidden_state: its input takes the name.
    model = gs.load(minilm_small["model"])
    assert RemoveLayers({"layers": ["bert/encoder/layer.5"]})(model).modified
    check_valid(model)
    got = run(make_session(model), feed)
    assert [v.name for v in model.graph.outputs] == ["sentence_embedding", "last_hidden_state"]
    assert got["last_hidden_state"].shape == (*feed["input_ids"].shape, 384)
    # Post-LN: bypassing the attention branch keeps that sublayer's LayerNorm (LN(x + 0)).
    model = gs.load(minilm_small["model"])
    p = RemoveLayers({"layers": ["bert/encoder/layer.0/attention/output/Add"]})
    assert p(model).modified
    names = [n.name for n in model.graph]
    assert "/bert/encoder/layer.0/attention/output/LayerNorm/LayerNormalization" in names
    assert not any(n.startswith("/bert/encoder/layer.0/attention/self/") for n in names)
    assert run(make_session(model), feed)["sentence_embedding"].shape == (4, 384)


@pytest.mark.slow
def test_minilm_count_by_sensitivity_picks_least_sensitive_block(minilm_small) -> None:
    model = gs.load(minilm_small["model"])
    p = RemoveLayers({"count": 1, "by": "sensitivity"})
    p.calib = load_npz(minilm_small["calib"], model)
    assert p(model).modified
    drift = p.report()["sensitivity"]
    assert set(drift) == {f"bert/encoder/layer.{i}" for i in range(6)}
    assert p.report()["removed"] == [min(drift, key=drift.get)]

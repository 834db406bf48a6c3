"""prune-magnitude, prune-nm and prune-blocks: exact sparsity, patterns, masks, accuracy.

Tiny hand-built graphs check the arithmetic (which weights go, per layout) against numpy and
onnxruntime; the digits CNN and MiniLM check that real models still run and stay accurate;
the CLI runs a YAML pipeline with per-layer overrides end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphsurgeon.passes.pruning import (
    MASK_KEY,
    PruneBlocks,
    PruneMagnitude,
    PruneNM,
    read_mask,
)
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.data import load_npz
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers
from graphsurgeon.options import Choice, FloatRange, search_spaces
from graphsurgeon.targets import Targets

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(7)


def rand(*shape: int) -> np.ndarray:
    return RNG.uniform(-1, 1, size=shape).astype(np.float32)


def make_model(nodes, inputs, outputs, inits, opset: int = 17) -> ir.Model:
    graph = oh.make_graph(nodes, "g", inputs, outputs, [nh.from_array(a, n) for n, a in inits])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def mlp(w1: np.ndarray | None = None) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x[2,8] -MatMul W1[8,16]- Relu -Gemm(W2[4,16], transB=1, b)- y[2,4]."""
    weights = {"W1": rand(8, 16) if w1 is None else w1, "W2": rand(4, 16), "b": rand(4)}
    model = make_model(
        [
            oh.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            oh.make_node("Relu", ["h"], ["r"], name="relu"),
            oh.make_node("Gemm", ["r", "W2", "b"], ["y"], name="fc2", transB=1),
        ],
        [oh.make_tensor_value_info("x", FLOAT, [2, 8])],
        [oh.make_tensor_value_info("y", FLOAT, [2, 4])],
        list(weights.items()),
    )
    return model, weights


def convs() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Conv (group 1), grouped Conv (group 2) and ConvTranspose (group 2) in a chain."""
    weights = {"C1": rand(8, 4, 3, 3), "C2": rand(8, 4, 1, 1), "T": rand(8, 2, 2, 2)}
    model = make_model(
        [
            oh.make_node("Conv", ["x", "C1"], ["a"], name="conv", pads=[1, 1, 1, 1]),
            oh.make_node("Conv", ["a", "C2"], ["b"], name="gconv", group=2),
            oh.make_node("ConvTranspose", ["b", "T"], ["y"], name="deconv", group=2),
        ],
        [oh.make_tensor_value_info("x", FLOAT, [1, 4, 5, 5])],
        [oh.make_tensor_value_info("y", FLOAT, [1, 4, 6, 6])],
        list(weights.items()),
    )
    return model, weights


def weights_of(model: ir.Model) -> dict[str, np.ndarray]:
    return {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}


def layer_ids(model: ir.Model) -> dict[str, str]:
    """Node name -> layer id."""
    return {layer.node.name: layer.id for layer in find_layers(model)}


def outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run(make_session(model), feed)


def serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


# -- prune-magnitude --------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_magnitude_exact_sparsity_smallest_go_and_outputs_match_numpy(sparsity: float) -> None:
    model, w = mlp()
    p = PruneMagnitude({"sparsity": sparsity})
    assert p(model).modified
    new = weights_of(model)
    for name, layer in (("W1", "fc1"), ("W2", "fc2")):
        zeros = int((new[name] == 0).sum())
        assert zeros == round(sparsity * w[name].size)
        kept = new[name] != 0
        assert np.array_equal(new[name][kept], w[name][kept])  # survivors untouched
        assert np.abs(w[name][~kept]).max() <= np.abs(w[name][kept]).min()
        assert p.notes["sparsity"][layer] == pytest.approx(zeros / w[name].size, abs=1e-6)
        assert np.array_equal(read_mask(model, layer), kept)
    assert np.array_equal(new["b"], w["b"])  # the bias is not a weight to prune
    x = rand(2, 8)
    expected = np.maximum(x @ new["W1"], 0) @ new["W2"].T + new["b"]
    np.testing.assert_allclose(outputs(model, {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


def test_per_layer_overrides_targets_and_min_params() -> None:
    model, w = mlp()
    p = PruneMagnitude({"sparsity": 0.5, "overrides": {"fc2.*": {"sparsity": 0.75}}})
    p(model)
    new = weights_of(model)
    assert (new["W1"] == 0).sum() == 64 and (new["W2"] == 0).sum() == 48
    assert p.notes["sparsity"] == {"fc1": 0.5, "fc2": 0.75}

    model, w = mlp()
    p = PruneMagnitude({"sparsity": 0.5}, Targets(exclude=["fc1"]))
    p(model)
    assert np.array_equal(weights_of(model)["W1"], w["W1"])
    assert MASK_KEY not in model.graph.node(0).metadata_props
    assert p.skipped["not selected by the targets"] == 1

    model, w = mlp()
    p = PruneMagnitude({"sparsity": 0.5, "min_params": 100})  # W2 has 64 weights
    p(model)
    assert np.array_equal(weights_of(model)["W2"], w["W2"])
    assert (weights_of(model)["W1"] == 0).sum() == 64
    assert p.skipped["fewer than min_params=100 weights"] == 1


def test_modified_is_exact() -> None:
    model, _ = mlp()
    before = serialized(model)
    result = PruneMagnitude({"sparsity": 0.5}, Targets(exclude=["fc1", "fc2"]))(model)
    assert not result.modified and serialized(model) == before  # ids it assigned rolled back

    model, _ = mlp()
    assert PruneMagnitude({"sparsity": 0.5})(model).modified
    once = serialized(model)
    again = PruneMagnitude({"sparsity": 0.5})(model)  # the same zeros, the same metadata
    assert not again.modified and serialized(model) == once
    assert PruneMagnitude({"sparsity": 0.6})(model).modified  # prunes further
    assert (weights_of(model)["W1"] == 0).sum() == round(0.6 * 128)


def test_float16_weight_in_a_constant_node() -> None:
    w = rand(8, 8).astype(np.float16)
    model = make_model(
        [
            oh.make_node("Constant", [], ["W"], name="c", value=nh.from_array(w, "W")),
            oh.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
        ],
        [oh.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 8])],
        [],
    )
    assert PruneMagnitude({"sparsity": 0.5})(model).modified
    model = ir.from_proto(ir.to_proto(model))  # what a reload sees: the attribute
    new = model.graph.node(0).attributes["value"].as_tensor().numpy()
    assert new.dtype == np.float16 and (new == 0).sum() == 32
    assert np.array_equal(read_mask(model, "mm"), new != 0)
    x = rand(2, 8).astype(np.float16)
    got = outputs(model, {"x": x})["y"].astype(np.float32)
    np.testing.assert_allclose(got, x.astype(np.float32) @ new.astype(np.float32), atol=1e-2)


def test_activation_criterion_keeps_weights_on_loud_channels(tmp_path: Path) -> None:
    """W[2,2]: channel 0 carries |w| = 0.5, channel 1 |w| = 1.0, but channel 0's input is 10x
    louder. L1 prunes channel 0's row; the activation criterion (0.5*10 > 1.0*1) channel 1's."""
    w = np.array([[0.5, -0.5], [1.0, -1.0]], dtype=np.float32)

    def build() -> ir.Model:
        return make_model(
            [oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
            [oh.make_tensor_value_info("x", FLOAT, ["batch", 2])],
            [oh.make_tensor_value_info("y", FLOAT, ["batch", 2])],
            [("W", w)],
        )

    x = RNG.standard_normal((32, 2)).astype(np.float32) * np.array([10.0, 1.0], np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    l1_model, act_model = build(), build()
    PruneMagnitude({"sparsity": 0.5, "criterion": "l1"})(l1_model)
    p = PruneMagnitude({"sparsity": 0.5, "criterion": "activation"})
    p.calib = load_npz(tmp_path / "calib.npz", act_model)
    p(act_model)
    assert np.array_equal(weights_of(l1_model)["W"], [[0, 0], [1.0, -1.0]])
    assert np.array_equal(weights_of(act_model)["W"], [[0.5, -0.5], [0, 0]])
    assert json.loads(act_model.graph.node(0).metadata_props[MASK_KEY])["criterion"] == (
        "activation"
    )


def test_activation_criterion_conv_maps_groups_to_input_channels(tmp_path: Path) -> None:
    """Grouped Conv: output channel o of group g reads input channels of group g only. Input 2
    (column 0 of group 1's weights) is quiet, input 0 (column 0 of group 0's) loud: the two
    weights that read input 2 go. Ignoring the group offset would prune column 1 instead."""
    w = np.ones((4, 2, 1, 1), dtype=np.float32)  # equal magnitudes: only the norms decide
    model = make_model(
        [oh.make_node("Conv", ["x", "W"], ["y"], name="gconv", group=2)],
        [oh.make_tensor_value_info("x", FLOAT, ["batch", 4, 3, 3])],
        [oh.make_tensor_value_info("y", FLOAT, ["batch", 4, 3, 3])],
        [("W", w)],
    )
    x = RNG.standard_normal((16, 4, 3, 3)).astype(np.float32)
    x[:, 0] *= 50.0
    x[:, 2] *= 0.01
    np.savez(tmp_path / "calib.npz", x=x)
    p = PruneMagnitude({"sparsity": 0.25, "criterion": "activation"})  # 2 of 8 weights
    p.calib = load_npz(tmp_path / "calib.npz", model)
    p(model)
    new = weights_of(model)["W"][:, :, 0, 0]
    expected = np.ones((4, 2), dtype=np.float32)
    expected[2:, 0] = 0  # output channels 2, 3 (group 1) on input 2 + 0
    np.testing.assert_array_equal(new, expected)


def test_mask_round_trips_losslessly_both_encodings(tmp_path: Path) -> None:
    w1 = rand(8, 16)
    w1.flat[[3, 40, 77]] = 0.0  # already-zero weights: one gets pruned, two are kept
    for encoding in ("zeros", "bits"):
        model, _ = mlp(w1.copy())
        PruneMagnitude({"sparsity": 1 / 128, "mask_encoding": encoding})(model)
        mask = read_mask(model, "fc1")
        assert (~mask).sum() == 1 and not mask.flat[3] and mask.flat[40] and mask.flat[77]
        gs.save(model, tmp_path / f"{encoding}.onnx")
        loaded = gs.load(tmp_path / f"{encoding}.onnx")
        assert np.array_equal(read_mask(loaded, "fc1"), mask)
        assert np.array_equal(read_mask(loaded, "fc2"), weights_of(loaded)["W2"] != 0)
    fresh, _ = mlp()
    find_layers(fresh)
    with pytest.raises(GraphSurgeonError, match="no pruning mask"):
        read_mask(fresh, "fc1")


def test_zeros_mask_refuses_a_changed_weight_bits_mask_survives() -> None:
    for encoding in ("zeros", "bits"):
        model, _ = mlp()
        PruneMagnitude({"sparsity": 0.5, "mask_encoding": encoding})(model)
        mask = read_mask(model, "fc1")
        value = model.graph.initializers["W1"]
        changed = value.const_value.numpy().copy()
        changed[mask] = np.where(np.abs(changed[mask]) < 0.6, 0, changed[mask])  # "quantized"
        value.const_value = ir.tensor(changed, name="W1")
        if encoding == "zeros":
            with pytest.raises(GraphSurgeonError, match="no longer matches"):
                read_mask(model, "fc1")
        else:
            assert np.array_equal(read_mask(model, "fc1"), mask)


def test_shared_weight_pruned_once_or_skipped() -> None:
    def build() -> ir.Model:
        return make_model(
            [
                oh.make_node("MatMul", ["x", "W"], ["a"], name="left"),
                oh.make_node("MatMul", ["a", "W"], ["y"], name="right"),
            ],
            [oh.make_tensor_value_info("x", FLOAT, [2, 8])],
            [oh.make_tensor_value_info("y", FLOAT, [2, 8])],
            [("W", rand(8, 8))],
        )

    model = build()
    p = PruneMagnitude({"sparsity": 0.5})
    p(model)
    assert (weights_of(model)["W"] == 0).sum() == 32
    assert p.notes["sparsity"] == {"left": 0.5, "right": 0.5}
    assert all(MASK_KEY in n.metadata_props for n in model.graph)

    model = build()
    before = weights_of(model)["W"]
    p = PruneMagnitude({"sparsity": 0.5, "overrides": {"right": {"sparsity": 0.7}}})
    assert not p(model).modified
    assert np.array_equal(weights_of(model)["W"], before)
    assert p.skipped["weight shared by layers with different options"] == 2

    model = build()
    p = PruneMagnitude({"sparsity": 0.5}, Targets(layers=["left"]))
    assert not p(model).modified
    assert p.skipped["weight shared with a node this pass does not prune"] == 1


def test_embeddings_only_on_request() -> None:
    table = rand(10, 8)

    def build() -> ir.Model:
        return make_model(
            [oh.make_node("Gather", ["E", "ids"], ["y"], name="embed")],
            [oh.make_tensor_value_info("ids", TensorProto.INT64, [3])],
            [oh.make_tensor_value_info("y", FLOAT, [3, 8])],
            [("E", table)],
        )

    model = build()
    p = PruneMagnitude({"sparsity": 0.5})
    assert not p(model).modified
    assert p.skipped["embedding table (include_embeddings is off)"] == 1
    model = build()
    assert PruneMagnitude({"sparsity": 0.5, "include_embeddings": True})(model).modified
    assert (weights_of(model)["E"] == 0).sum() == 40
    ids = np.array([0, 9, 4], dtype=np.int64)
    np.testing.assert_array_equal(outputs(model, {"ids": ids})["y"], weights_of(model)["E"][ids])
    p = PruneNM({"include_embeddings": True})
    assert not p(build()).modified
    assert p.skipped["Gather has no reduction axis"] == 1


# -- prune-nm ---------------------------------------------------------------------------------
def groups_along(weight: np.ndarray, axes: list[int], m: int) -> np.ndarray:
    rest = [a for a in range(weight.ndim) if a not in axes]
    return np.transpose(weight, rest + axes).reshape(-1, m)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_pattern_holds_in_every_group_for_each_layout(pattern: str) -> None:
    n, m = (int(v) for v in pattern.split(":"))
    model, w = mlp()
    cmodel, cw = convs()
    assert PruneNM({"pattern": pattern})(model).modified
    p = PruneNM({"pattern": pattern})
    assert p(cmodel).modified == (m == 4)
    new = {**weights_of(model), **weights_of(cmodel)}
    orig = {**w, **cw}
    # MatMul [K,N]: K is axis 0; Gemm transB [N,K]: axis 1; Conv: axes 1..3 (per group);
    # ConvTranspose: Cin (axis 0), per group. Reduction lengths 8, 16, 36, 4, 4.
    layouts = {"W1": [0], "W2": [1], "C1": [1, 2, 3], "C2": [1, 2, 3], "T": [0]}
    segments = {"W1": 8, "W2": 16, "C1": 36, "C2": 4, "T": 4}
    for name, axes in layouts.items():
        if segments[name] % m:
            assert np.array_equal(new[name], orig[name])
            continue
        groups, before = groups_along(new[name], axes, m), groups_along(orig[name], axes, m)
        assert ((groups != 0).sum(axis=1) == n).all(), name
        # the N kept are the N largest of the group, and they are unchanged
        kth = -np.sort(-np.abs(before), axis=1)[:, n - 1 : n]
        assert (np.abs(before)[groups != 0].reshape(-1, n) >= kth).all()
        assert np.array_equal(groups[groups != 0], before[groups != 0])
    x = rand(1, 4, 5, 5)
    ref_model, _ = convs()
    ref = ref_model.graph.initializers
    for name, array in weights_of(cmodel).items():  # the same math in onnxruntime
        ref[name].const_value = ir.tensor(array, name=name)
    np.testing.assert_allclose(
        outputs(cmodel, {"x": x})["y"], outputs(ref_model, {"x": x})["y"], rtol=1e-6
    )


def test_nm_skips_reduction_not_multiple_of_m_and_records_axes() -> None:
    model = make_model(
        [oh.make_node("Conv", ["x", "W"], ["y"], name="conv")],
        [oh.make_tensor_value_info("x", FLOAT, [1, 1, 4, 4])],
        [oh.make_tensor_value_info("y", FLOAT, [1, 8, 2, 2])],
        [("W", rand(8, 1, 3, 3))],
    )
    before = serialized(model)
    p = PruneNM({"pattern": "2:4"})
    assert not p(model).modified and serialized(model) == before
    assert p.skipped["reduction length 9 is not a multiple of M=4"] == 1
    model, _ = mlp()
    PruneNM()(model)
    meta = json.loads(model.graph.node(2).metadata_props[MASK_KEY])
    assert (meta["method"], meta["pattern"], meta["reduction_axes"]) == ("nm", "2:4", [1])
    assert np.array_equal(read_mask(model, "fc2"), weights_of(model)["W2"] != 0)


# -- prune-blocks -----------------------------------------------------------------------------
@pytest.mark.parametrize("block", ["1x4", "4x4", "16x16"])
def test_blocks_fully_zero_or_untouched_with_partial_edges(block: str) -> None:
    bh, bw = (int(v) for v in block.split("x"))
    w = {"W": rand(10, 36)}  # 10 x 36: partial edge blocks for 4x4 and 16x16
    model = make_model(
        [oh.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)],
        [oh.make_tensor_value_info("x", FLOAT, [2, 36])],
        [oh.make_tensor_value_info("y", FLOAT, [2, 10])],
        list(w.items()),
    )
    p = PruneBlocks({"block": block, "sparsity": 0.5})
    p(model)
    new = weights_of(model)["W"]
    zeroed = 0
    blocks = 0
    for r in range(0, 10, bh):
        for c in range(0, 36, bw):
            got, orig = new[r : r + bh, c : c + bw], w["W"][r : r + bh, c : c + bw]
            blocks += 1
            if (got == 0).all():
                zeroed += 1
            else:
                assert np.array_equal(got, orig)
    assert zeroed == round(0.5 * blocks)
    meta = json.loads(model.graph.node(0).metadata_props[MASK_KEY])
    assert meta["block"] == [bh, bw] and meta["view"] == [10, 36]
    assert np.array_equal(read_mask(model, "fc"), new != 0)
    x = rand(2, 36)
    np.testing.assert_allclose(outputs(model, {"x": x})["y"], x @ new.T, rtol=1e-5, atol=1e-6)


def test_blocks_rank_by_norm_and_conv_view() -> None:
    model, w = convs()
    w1 = w["C1"].reshape(8, 36)
    PruneBlocks({"block": "4x4", "sparsity": 0.5, "criterion": "l2"})(model)
    new = weights_of(model)["C1"].reshape(8, 36)  # the [Cout, Cin*kh*kw] view
    rms = np.array([[np.sqrt(np.mean(w1[r : r + 4, c : c + 4] ** 2)) for c in range(0, 36, 4)]
                    for r in range(0, 8, 4)])  # fmt: skip
    gone = np.array([[(new[r : r + 4, c : c + 4] == 0).all() for c in range(0, 36, 4)]
                     for r in range(0, 8, 4)])  # fmt: skip
    assert gone.sum() == 9 and rms[gone].max() <= rms[~gone].min()


def test_options_declare_search_spaces_and_validate() -> None:
    spaces = search_spaces(PruneMagnitude.Options)
    assert isinstance(spaces["sparsity"], FloatRange)
    assert set(spaces["criterion"].values) == {"l1", "l2", "activation"}
    assert isinstance(search_spaces(PruneNM.Options)["pattern"], Choice)
    assert "16x16" in search_spaces(PruneBlocks.Options)["block"].values
    for cls, bad in (
        (PruneNM, {"pattern": "4:2"}),
        (PruneNM, {"pattern": "2-4"}),
        (PruneBlocks, {"block": "0x4"}),
        (PruneMagnitude, {"sparsity": 1.0}),
        (PruneMagnitude, {"overrides": {"fc1": {"criterion": "l3"}}}),
    ):
        with pytest.raises(GraphSurgeonError):
            cls(bad)


# -- real models ------------------------------------------------------------------------------
def digits_accuracy(model: ir.Model, test: Path) -> float:
    data = np.load(test)
    logits = outputs(model, {"input": data["input"]})["logits"]
    return float((logits.argmax(axis=1) == data["labels"]).mean())


def test_digits_half_sparsity_accuracy_and_file_size(digits, tmp_path: Path) -> None:
    # The baseline goes through the same pipeline (shape annotations, layer ids) and writer,
    # with every layer excluded: only the pruning differs.
    dense = gs.run_pipeline(
        gs.load(digits["model"]),
        [{"name": "prune-magnitude", "targets": {"exclude": [".*"]}}],
    )
    assert not dense.modified
    base = digits_accuracy(dense.model, digits["test"])
    gs.save(dense.model, tmp_path / "dense.onnx")
    result = gs.run_pipeline(
        gs.load(digits["model"]), "prune-magnitude", calib=digits["train"], verify="numeric"
    )
    model = result.model
    for layer in find_layers(model):
        w = layer.weight.numpy()
        assert (w == 0).sum() == round(0.5 * w.size), layer.id
    pruned = digits_accuracy(model, digits["test"])
    assert pruned >= base - 0.04, (base, pruned)  # measured 0.993 -> 0.960
    gs.save(model, tmp_path / "pruned.onnx")
    dense_size, pruned_size = (
        (tmp_path / "dense.onnx").stat().st_size,
        (tmp_path / "pruned.onnx").stat().st_size,
    )
    metadata = sum(len(MASK_KEY) + len(n.metadata_props[MASK_KEY]) + 8 for n in model.graph if MASK_KEY in n.metadata_props)  # fmt: skip
    # zeros cost as much as any float: the file does not shrink, and grows only by the masks
    assert dense_size <= pruned_size <= dense_size + metadata
    assert pruned_size - dense_size < 0.01 * dense_size
    record = result.records[0]
    assert record.before.bytes == record.after.bytes  # no shrink is claimed
    assert record.drift["logits"]["top1_agreement"] >= 0.9
    # skipping the 144-weight first conv keeps the accuracy within one point
    tiny = gs.run_pipeline(
        gs.load(digits["model"]),
        [{"name": "prune-magnitude", "options": {"min_params": 500}}],
        calib=digits["train"],
    )
    assert digits_accuracy(tiny.model, digits["test"]) >= base - 0.01


def test_digits_nm_and_blocks_run_in_onnxruntime(digits) -> None:
    result = gs.run_pipeline(
        gs.load(digits["model"]),
        [
            {"name": "prune-nm", "options": {"pattern": "2:4", "criterion": "activation"}},
            {"name": "prune-blocks", "options": {"block": "1x4", "sparsity": 0.2}},
        ],
        calib=digits["train"],
        verify="numeric",
    )
    nm_notes = result.records[0].notes
    assert nm_notes["skipped"] == {"reduction length 9 is not a multiple of M=4": 1}
    for layer in find_layers(result.model):
        if layer.id == "features/features.0/Conv":
            continue
        mask = read_mask(result.model, layer.id)
        w = layer.weight.numpy()
        assert np.array_equal(mask, w != 0)
        groups = groups_along(w, [1, 2, 3] if layer.op_type == "Conv" else [1], 4)
        assert ((groups != 0).sum(axis=1) <= 2).all(), layer.id  # blocks only add zeros
    assert digits_accuracy(result.model, digits["test"]) > 0.5


def test_minilm_activation_criterion_beats_magnitude(minilm) -> None:
    data = np.load(minilm["sentences"])
    feed = {k: data[k][:32] for k in ("input_ids", "attention_mask", "token_type_ids")}
    reference = outputs(gs.load(minilm["model"]), feed)["sentence_embedding"]
    cosine = {}
    for criterion in ("l1", "activation"):
        model = gs.load(minilm["model"])
        p = PruneMagnitude({"sparsity": 0.3, "criterion": criterion, "calibration_samples": 16})
        p.calib = load_npz(minilm["sentences"], model)
        assert p(model).modified
        assert p.skipped["embedding table (include_embeddings is off)"] == 3
        assert len(p.notes["sparsity"]) == 36
        out = outputs(model, feed)["sentence_embedding"]
        cosine[criterion] = float(
            np.mean(
                (out * reference).sum(1) / np.linalg.norm(out, axis=1)
                / np.linalg.norm(reference, axis=1)
            )
        )  # fmt: skip
    assert cosine["activation"] >= 0.95, cosine  # measured 0.972; l1 0.934
    assert cosine["activation"] > cosine["l1"], cosine


def test_minilm_two_four_on_every_matmul(minilm) -> None:
    model = gs.load(minilm["model"])
    assert PruneNM({"pattern": "2:4"})(model).modified
    count = 0
    for layer in find_layers(model):
        if layer.op_type != "MatMul":
            continue
        groups = groups_along(layer.weight.numpy(), [0], 4)
        assert ((groups != 0).sum(axis=1) == 2).all(), layer.id
        count += 1
    assert count == 36
    data = np.load(minilm["sentences"])
    feed = {k: data[k][:4] for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert outputs(model, feed)["sentence_embedding"].shape == (4, 384)


# -- the CLI ----------------------------------------------------------------------------------
def test_cli_yaml_pipeline_with_overrides(digits, tmp_path: Path) -> None:
    pipe = tmp_path / "prune.yaml"
    pipe.write_text(
        "steps:\n"
        "  - name: prune-magnitude\n"
        "    options:\n"
        "      sparsity: 0.4\n"
        "      criterion: activation\n"
        "      overrides: {'classifier.*': {sparsity: 0.8}}\n"
        "    targets: {exclude: ['features/features.0/Conv']}\n"
        "  - name: prune-nm\n"
        "    options: {pattern: '4:8'}\n"
        "    targets: {layers: ['classifier/classifier.1/Gemm']}\n"
    )
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "graphsurgeon.cli", "run", str(pipe), str(digits["model"]),
         "-o", str(out), "--verify", "numeric", "--calib", str(digits["test"]),
         "--report", str(report)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = json.loads(report.read_text())["passes"][0]["notes"]
    assert notes["sparsity"] == {  # round(s * n) of n weights
        "features/features.3/Conv": pytest.approx(0.4, abs=1e-4),
        "features/features.7/Conv": pytest.approx(0.4, abs=1e-4),
        "classifier/classifier.1/Gemm": pytest.approx(0.8, abs=1e-4),
        "classifier/classifier.3/Gemm": pytest.approx(0.8, abs=1e-4),
    }
    model = gs.load(out)
    layers = {layer.id: layer for layer in find_layers(model)}
    first = layers["features/features.0/Conv"].weight.numpy()
    assert (first != 0).all() and MASK_KEY not in layers["features/features.0/Conv"].node.metadata_props  # fmt: skip
    fc1 = layers["classifier/classifier.1/Gemm"].weight.numpy()  # [64, 512], transB=1
    assert ((groups_along(fc1, [1], 8) != 0).sum(axis=1) <= 4).all()
    assert (fc1 == 0).sum() >= 0.8 * fc1.size
    assert np.array_equal(read_mask(model, "classifier/classifier.1/Gemm"), fc1 != 0)
    assert digits_accuracy(model, digits["test"]) > 0.7  # measured 0.78 (fc1 at 80%, then 4:8)


# -- bias correction ---------------------------------------------------------------------------
def _bias_case(kind: str):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    nodes, inits = [], []
    if kind == "Conv":  # no bias input: the correction must add one
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 4, 4])
        inits.append(
            numpy_helper.from_array(rng.standard_normal((5, 4, 3, 3)).astype(np.float32), "W")
        )
        nodes.append(helper.make_node("Conv", ["x", "W"], ["y"], name="layer"))
        data = rng.standard_normal((64, 4, 6, 6)).astype(np.float32) + 2.0
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"))
        inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B"))
        if kind == "Gemm":
            nodes.append(helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="layer"))
        else:
            nodes.append(helper.make_node("MatMul", ["x", "W"], ["h"], name="layer"))
            nodes.append(helper.make_node("Add", ["h", "B"], ["y"], name="bias"))
        data = rng.standard_normal((64, 8)).astype(np.float32) + 2.0
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto), data


@pytest.mark.parametrize("kind", ["Gemm", "MatMul", "Conv"])
def test_bias_correction_keeps_output_means(kind: str) -> None:
    """E[y] - E[y'] = (W - W') E[x]: with the correction the mean output on the calibration
    data is unchanged (exactly for Gemm/MatMul; for a Conv up to the border pixels, which the
    per-channel input mean averages in); without it, it moves."""
    import graphsurgeon as gs
    from graphsurgeon.data import Dataset
    from graphsurgeon.execution import make_session, run

    shifts = {}
    for correct in (False, True):
        model, data = _bias_case(kind)
        reference = run(make_session(model), {"x": data})["y"]
        calib = Dataset({"x": data}, None, {"x": True})
        step = {"name": "prune-magnitude", "options": {"sparsity": 0.5, "bias_correction": correct}}
        result = gs.run_pipeline(model, [step], calib=calib, verify="structural")
        got = run(make_session(result.model), {"x": data})["y"]
        axes = (0, 2, 3) if kind == "Conv" else (0,)
        shifts[correct] = np.abs((reference - got).mean(axis=axes)).max()
        skipped = result.records[0].notes.get("skipped", {})
        assert not any("bias correction" in k for k in skipped), skipped
    assert shifts[False] > 1e-2
    if kind == "Conv":
        assert shifts[True] < 0.25 * shifts[False]
    else:
        assert shifts[True] < 1e-4

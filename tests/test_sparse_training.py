"""prune-iterative (geometric schedule, training between rounds, rewinding) and regrow (RigL).

The drop-and-grow arithmetic is checked on a hand-built layer with known weights and
gradients; the digits CNN checks that both passes keep exact per-layer sparsity, write masks
that read back, recover accuracy that one-shot 90% pruning loses, and run in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from graphsurgeon.passes.pruning import PruneMagnitude, PruneNM, read_mask
from graphsurgeon.passes.sparse_training import PruneIterative, Regrow, scheduled_sparsity
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers
from graphsurgeon.options import search_spaces
from graphsurgeon.registry import get_pass
from graphsurgeon.training import to_torch
from graphsurgeon.training.sparse import RigL, rewind

torch.set_num_threads(1)


def accuracy(model: ir.Model, test) -> float:
    data = np.load(test)
    logits = run(make_session(model), {"input": data["input"]})["logits"]
    return float((logits.argmax(1) == data["labels"]).mean())


def masks(model: ir.Model) -> dict[str, np.ndarray]:
    return {layer.id: read_mask(model, layer.id) for layer in find_layers(model)}


def test_registered_with_search_spaces() -> None:
    assert get_pass("prune-iterative") is PruneIterative and PruneIterative.kind == "lossy"
    assert get_pass("regrow") is Regrow and Regrow.kind == "surgery"
    assert {"sparsity", "rounds", "rewind", "steps"} <= set(search_spaces(PruneIterative.Options))
    assert {"interval", "drop_fraction", "criterion"} <= set(search_spaces(Regrow.Options))


def test_geometric_schedule_removes_the_same_share_each_round() -> None:
    kept = [1 - scheduled_sparsity(0.9, r, 3) for r in range(4)]
    assert kept[0] == 1 and kept[3] == pytest.approx(0.1)
    ratios = [kept[i + 1] / kept[i] for i in range(3)]
    assert ratios == pytest.approx([0.1 ** (1 / 3)] * 3)


# -- RigL arithmetic on a known layer -----------------------------------------------------------
def one_layer(weight: np.ndarray, mask: np.ndarray) -> ir.Model:
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [nh.from_array(weight, "W")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(proto)
    model = ir.from_proto(proto)
    PruneMagnitude({"sparsity": float(1 - mask.mean())})(model)
    np.testing.assert_array_equal(read_mask(model, "fc"), mask)
    return model


def test_rigl_drops_smallest_active_and_grows_largest_gradient() -> None:
    weight = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    weight[:2] = 0.0  # rows 0-1 pruned (the 8 smallest), rows 2-3 active: 9..16
    mask = weight != 0
    model = one_layer(np.arange(1, 17, dtype=np.float32).reshape(4, 4), mask)
    module = to_torch(model)
    hook = RigL({"fc": "W"}, 100, interval=1, drop_fraction=0.5, end_fraction=1.0)
    grad = torch.zeros(4, 4)
    grad[0, 3], grad[1, 1], grad[0, 0] = 5.0, -7.0, 0.5  # |grad| ranks pruned (1,1), (0,3)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    # step 0 of 100 with drop_fraction 0.5: k = 0.5 * 8 active = 4 -> but only 2 grow
    # candidates have a gradient; k follows the fraction, so pick a step where k = 2
    step = 50  # cosine: 0.5/2 * (1 + cos(pi/2)) = 0.25 -> k = 2
    hook.after_backward(step, module, {"W": grad}, optimizer)
    new = module.masks["W"].numpy()
    expected = mask.copy()
    expected[2, 0] = expected[2, 1] = False  # 9 and 10: the smallest active weights
    expected[1, 1] = expected[0, 3] = True  # largest |grad| among the pruned
    np.testing.assert_array_equal(new, expected)
    w = module.param("W").detach().numpy()
    assert w[1, 1] == 0 and w[0, 3] == 0  # new connections start at zero
    assert hook.created == {"fc": 2} and hook.dropped == {"fc": 2}
    assert new.sum() == mask.sum()  # the sparsity is fixed


def test_rewind_restores_survivors_and_keeps_masks() -> None:
    original = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    model = one_layer(original, original > 8)
    module = to_torch(model)
    with torch.no_grad():
        module.param("W").add_(3.0)
    rewind(module, {"W": original})
    np.testing.assert_array_equal(module.param("W").detach().numpy(), original * (original > 8))


# -- the digits CNN ---------------------------------------------------------------------------
def test_regrow_keeps_sparsity_moves_connections_and_recovers(digits) -> None:
    model = gs.load(digits["model"])
    spec = [
        {"name": "prune-magnitude", "options": {"sparsity": 0.9}},
        {"name": "regrow", "options": {"steps": 60, "interval": 10}},
    ]
    pruned = gs.run_pipeline(gs.load(digits["model"]), spec[:1]).model
    before = masks(pruned)
    result = gs.run_pipeline(model, spec, calib=digits["train"])
    notes = result.records[-1].notes
    after = masks(result.model)
    assert notes["created_total"] == notes["dropped_total"] > 0
    for lid, mask in after.items():
        assert mask.sum() == before[lid].sum()  # per-layer sparsity is fixed
        grown = int((mask & ~before[lid]).sum())
        assert grown <= notes["connections_created"][lid]
        weight = next(la for la in find_layers(result.model) if la.id == lid).weight.numpy()
        assert np.all(weight[~mask] == 0)
    assert any((after[lid] & ~before[lid]).any() for lid in after)
    assert notes["loss_after"] < notes["loss_before"]
    assert accuracy(result.model, digits["test"]) > accuracy(pruned, digits["test"]) + 0.3


def test_regrow_skips_layers_without_an_unstructured_mask(digits) -> None:
    model = gs.load(digits["model"])
    regrow = Regrow({"steps": 2})
    assert not regrow(model).modified
    assert "no pruning mask on a trainable weight (prune first)" in regrow.skipped
    PruneNM({"pattern": "2:4"})(model)
    regrow = Regrow({"steps": 2})
    assert not regrow(model).modified
    assert "nm mask: regrowth would break its pattern" in regrow.skipped


def test_prune_iterative_reaches_the_target_and_beats_one_shot(digits) -> None:
    one_shot = gs.run_pipeline(
        gs.load(digits["model"]), [{"name": "prune-magnitude", "options": {"sparsity": 0.9}}]
    ).model
    model = gs.load(digits["model"])
    spec = [{"name": "prune-iterative", "options": {"sparsity": 0.9, "rounds": 2, "steps": 30}}]
    result = gs.run_pipeline(model, spec, calib=digits["train"])
    notes = result.records[-1].notes
    assert [r["sparsity"] for r in notes["rounds"]] == pytest.approx(
        [scheduled_sparsity(0.9, 1, 2), 0.9], abs=1e-4
    )
    assert all(r["loss_after"] < r["loss_before"] for r in notes["rounds"])
    for lid, mask in masks(result.model).items():
        assert 1 - mask.mean() == pytest.approx(0.9, abs=0.01), lid
    assert accuracy(result.model, digits["test"]) > accuracy(one_shot, digits["test"]) + 0.3

"""Policy transfer between two CNNs of the same design but other widths, names and depth."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers
from graphsurgeon.search import Decision, Policy, SearchSpace
from graphsurgeon.search.transfer import transfer

RNG = np.random.default_rng(5)


def cnn(widths: list[int], prefix: str, hidden: int | None, path) -> SearchSpace:
    """conv(3x3)+relu per width, global pool, [fc hidden + relu], fc 10."""
    nodes, inits, c, x = [], [], 3, "x"
    for i, w in enumerate(widths):
        inits += [nh.from_array(RNG.normal(0, 0.3, (w, c, 3, 3)).astype(np.float32), f"w{i}")]
        nodes += [
            oh.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"{prefix}/conv{i}", pads=[1] * 4),
            oh.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"{prefix}/relu{i}"),
        ]
        x, c = f"r{i}", w
    nodes += [
        oh.make_node("GlobalAveragePool", [x], ["p"]),
        oh.make_node("Flatten", ["p"], ["f"]),
    ]
    x = "f"
    if hidden:
        inits += [nh.from_array(RNG.normal(0, 0.3, (c, hidden)).astype(np.float32), "wh")]
        nodes += [
            oh.make_node("MatMul", [x, "wh"], ["h"], name="head/hidden"),
            oh.make_node("Relu", ["h"], ["hr"]),
        ]
        x, c = "hr", hidden
    inits += [nh.from_array(RNG.normal(0, 0.3, (c, 10)).astype(np.float32), "wo")]
    nodes += [oh.make_node("MatMul", [x, "wo"], ["y"], name="head/classifier")]
    graph = oh.make_graph(
        nodes, "cnn",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 12, 12])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
        inits,
    )  # fmt: skip
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10), path)
    return SearchSpace.build(gs.load(path))


def test_transfer_matches_roles_and_reports_the_rest(tmp_path):
    src = cnn([8, 16, 16], "backbone", 32, tmp_path / "a.onnx")
    dst = cnn([12, 24, 24, 48], "features", None, tmp_path / "b.onnx")
    by_id = {s.id: s for s in src.slots}
    choices = {
        "backbone/conv0": ("prune-magnitude", {"sparsity": 0.3}),
        "backbone/conv1": ("prune-channels", {"ratio": 0.25}),
        "backbone/conv2": ("factorize-lowrank", {"rank": 6}),
        "head/hidden": ("quantize-dynamic", {}),
        "head/classifier": ("prune-nm", {"pattern": "2:4"}),
    }
    policy = src.decode(
        src.encode(
            Policy(
                tuple(
                    Decision(sid, tuple(by_id[sid].layers), m, tuple(sorted(p.items())))
                    for sid, (m, p) in choices.items()
                )
            )
        )
    )
    moved, report = transfer(policy, dst)
    got = {d.slot: d.summary() for d in moved.decisions}
    assert got["features/conv0"] == "prune-magnitude(sparsity=0.3)"
    assert got["features/conv1"] == "prune-channels(ratio=0.25)"
    assert got["head/classifier"] == "prune-nm(pattern=2:4)"  # same role, other shape
    assert got["features/conv3"] != "none"  # the deepest conv took the nearest conv's choice
    unmapped = {u["source"] for u in report.unmapped_source}
    assert "head/hidden" in unmapped  # the target has no hidden MatMul
    # the transferred policy is a pipeline that runs on the target
    model = gs.run_pipeline(gs.load(tmp_path / "b.onnx"), moved.to_pipeline()).model
    zeros = {layer.id: float(np.mean(layer.weight.numpy() == 0)) for layer in find_layers(model)}
    assert abs(zeros["features/conv0"] - 0.3) < 0.02
    x = RNG.normal(size=(2, 3, 12, 12)).astype(np.float32)
    assert np.isfinite(run(make_session(model), {"x": x})["y"]).all()


def test_transfer_keeps_the_sources_options_outside_the_search(tmp_path):
    """A decision's settings that are not genes (a method's fixed accuracy_level, an option
    edited into a stored policy) travel with it; an option the target pass does not declare
    is reported, not silently dropped."""
    src = cnn([8, 16], "backbone", None, tmp_path / "a.onnx")
    dst = cnn([12, 24], "features", None, tmp_path / "b.onnx")
    (head,) = [s for s in src.slots if s.id == "head/classifier"]
    params = {"bits": 4, "group_size": 32, "accuracy_level": 1, "no_such_option": 3}
    policy = Policy(
        (
            Decision(
                head.id,
                tuple(head.layers),
                "quantize-weights",
                tuple(sorted(params.items())),
                role=src.roles[head.id],
            ),
        )
    )
    moved, report = transfer(policy, dst)
    (d,) = [d for d in moved.decisions if d.slot == "head/classifier"]
    assert d.method == "quantize-weights"
    assert d.options["accuracy_level"] == 1  # not the catalogue's fixed 4
    assert "no_such_option" not in d.options
    (entry,) = [m for m in report.mapped if m["target"] == "head/classifier"]
    assert entry["options_not_taken"] == ["no_such_option"]
    # and it replays: the MatMul becomes MatMulNBits with the carried accuracy level
    model = gs.run_pipeline(gs.load(tmp_path / "b.onnx"), moved.to_pipeline()).model
    (nbits,) = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert nbits.attributes["accuracy_level"].value == 1

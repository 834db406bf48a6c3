"""Search space: slots from the registry, the vector encoding, policies as replayable pipelines.

The digits CNN gives real slots (Conv, Gemm, channel groups); a hand-built residual MLP gives
a removable unit and a coupled channel group whose results are checked against numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.cli import main as cli_main
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers
from graphsurgeon.options import Choice, IntRange, search_spaces
from graphsurgeon.registry import get_pass
from graphsurgeon.search import Decision, Policy, SearchSpace
from graphsurgeon.search.seeds import seed_policies
from graphsurgeon.search.space import resolve_methods

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def digits_space(digits):
    model = gs.run_pipeline(gs.load(digits["model"]), "cleanup").model
    return model, SearchSpace.build(model, prelude=["cleanup"])


def test_round_trip_and_stable_keys(digits_space):
    _, space = digits_space
    seen = set()
    for _ in range(120):
        policy = space.decode(RNG.random(space.dim))
        assert space.decode(space.encode(policy)) == policy
        again = Policy.from_dict(yaml.safe_load(yaml.safe_dump(policy.to_dict())))
        assert again == policy and again.key() == policy.key()
        seen.add(policy.key())
    assert len(seen) > 100  # the encoding reaches many distinct policies
    assert space.decode(space.identity()).active == []


def test_ranges_come_from_the_registry(digits_space):
    _, space = digits_space
    methods = set()
    for slot in space.slots:
        for method, spaces in zip(slot.methods, slot.spaces, strict=True):
            methods.add(method.name)
            if method.name in ("none", "remove"):
                continue
            declared = search_spaces(get_pass(method.name).Options)
            for name, sp in spaces.items():
                if name == "rank":  # capped at the layer's size
                    assert isinstance(sp, IntRange) and sp.low == declared[name].low
                    assert sp.high <= declared[name].high
                elif method.name == "quantize-weights" and name == "bits":
                    assert isinstance(sp, Choice) and set(sp.values) == {4, 2}
                else:
                    assert sp == declared[name], (method.name, name)
    assert {"prune-channels", "quantize-int8", "factorize-lowrank"} <= methods
    # the last Gemm writes the graph output: no channel pruning there
    last = space.slots[-1]
    assert "prune-channels" not in [m.name for m in last.methods]


def test_policy_replays_with_graphsurgeon_run(digits, digits_space, tmp_path):
    """Per-layer values reach their layers, and `graphsurgeon run policy.yaml` replays it."""
    _, space = digits_space
    conv0, conv1 = space.slots[0], space.slots[1]
    policy = Policy(
        (
            Decision(conv0.id, tuple(conv0.layers), "prune-magnitude", (("sparsity", 0.3),)),
            Decision(conv1.id, tuple(conv1.layers), "prune-magnitude", (("sparsity", 0.8),)),
        ),
        ("cleanup",),
    )
    spec = tmp_path / "policy.yaml"
    spec.write_text(yaml.safe_dump(policy.to_pipeline()))
    out = tmp_path / "out.onnx"
    assert cli_main(["run", str(spec), str(digits["model"]), "-o", str(out)]) == 0
    model = gs.load(out)
    zeros = {layer.id: float(np.mean(layer.weight.numpy() == 0)) for layer in find_layers(model)}
    assert zeros[conv0.id] == pytest.approx(0.3, abs=0.02)
    assert zeros[conv1.id] == pytest.approx(0.8, abs=0.02)
    assert zeros[space.slots[2].id] == 0.0  # untouched
    x = np.load(digits["test"])["input"][:32]
    assert np.isfinite(run(make_session(model), {"input": x})["logits"]).all()


def _residual_mlp() -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) -> Add(x) -> MatMul(W3) -> y."""
    w1, w2, w3 = (RNG.normal(size=s).astype(np.float32) for s in ((16, 32), (32, 16), (16, 4)))
    nodes = [
        oh.make_node("MatMul", ["x", "W1"], ["h"], name="block/fc1"),
        oh.make_node("Relu", ["h"], ["r"], name="block/relu"),
        oh.make_node("MatMul", ["r", "W2"], ["b"], name="block/fc2"),
        oh.make_node("Add", ["x", "b"], ["s"], name="block/add"),
        oh.make_node("MatMul", ["s", "W3"], ["y"], name="head/fc"),
    ]
    graph = oh.make_graph(
        nodes,
        "mlp",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])],
        [nh.from_array(w, n) for w, n in ((w1, "W1"), (w2, "W2"), (w3, "W3"))],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)


def test_removal_and_channel_groups_on_a_residual_mlp(tmp_path):
    proto = _residual_mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(proto, path)
    model = gs.load(path)
    space = SearchSpace.build(model)
    by_id = {s.id: s for s in space.slots}
    assert list(by_id) == ["block/fc1", "block/fc2", "head/fc"]
    fc1 = by_id["block/fc1"]
    names = [m.name for m in fc1.methods]
    assert "prune-channels" in names and "remove" in names  # hidden units; a residual branch
    assert "prune-channels" not in [m.name for m in by_id["block/fc2"].methods]  # meets x
    # remove on fc1 removes the branch: fc2's own decision is dropped
    x = np.zeros(space.dim)
    start, _ = space.slot_dims[0]
    x[start] = (names.index("remove") + 0.5) / len(names)
    x[space.slot_dims[1][0]] = 0.99  # fc2 asks for its last method
    policy = space.decode(x)
    assert [d.method for d in policy.decisions] == ["remove", "none", "none"]
    result = gs.run_pipeline(gs.load(path), policy.to_pipeline())
    feed = {"x": RNG.normal(size=(8, 16)).astype(np.float32)}
    got = run(make_session(result.model), feed)["y"]
    w3 = nh.to_array(proto.graph.initializer[2])
    np.testing.assert_allclose(got, feed["x"] @ w3, rtol=1e-5, atol=1e-5)  # y = x W3
    # removal runs first, on the graph its units were found on, whatever else is chosen
    head = by_id["head/fc"]
    with_head = Policy(
        (
            policy.decisions[0],
            policy.decisions[1],
            Decision(head.id, tuple(head.layers), "prune-magnitude", (("sparsity", 0.5),)),
        )
    )
    spec = with_head.to_pipeline()
    assert [s["name"] for s in spec["steps"]] == ["remove-layers", "prune-magnitude"]
    gs.run_pipeline(gs.load(path), spec)


def test_features_describe_each_slot(digits, digits_space):
    model, space = digits_space
    calib = gs.data.load_npz(digits["test"], model)
    space = SearchSpace.build(model, calib=calib)
    f = space.features()
    assert f.shape == (len(space.slots), len(SearchSpace.FEATURE_NAMES))
    assert np.isfinite(f).all()
    col = {n: i for i, n in enumerate(SearchSpace.FEATURE_NAMES)}
    assert f[0, col["op_Conv"]] == 1 and f[-1, col["op_Gemm"]] == 1
    assert (f[:, col["act_entropy"]] > 0).all()  # real activation histograms
    assert f[:, col["log_params"]].max() > f[:, col["log_params"]].min()


def test_bad_methods_and_vectors(digits_space):
    _, space = digits_space
    with pytest.raises(GraphSurgeonError, match="unknown method 'prune-everything'"):
        resolve_methods("prune-everything")
    assert {m.name for m in resolve_methods("quantize")} >= {"quantize-int8", "quantize-weights"}
    with pytest.raises(GraphSurgeonError, match="policy vector has shape"):
        space.decode(np.zeros(space.dim + 1))


def test_distillation_targets_are_a_flag_gene(digits_space):
    model, _ = digits_space
    try:
        space = SearchSpace.build(model, methods="prune-magnitude,distill")
    except GraphSurgeonError as e:  # the training bridge is optional
        pytest.skip(str(e))
    assert space.dim == sum(s.width for s in space.slots)
    flagged = None
    for _ in range(50):
        policy = space.decode(RNG.random(space.dim))
        assert space.decode(space.encode(policy)) == policy
        flagged = [lid for d in policy.decisions if d.distill for lid in d.layers]
        if flagged:
            break
    assert flagged
    last = policy.to_pipeline()["steps"][-1]
    assert last == {"name": "distill", "options": {"feature_layers": flagged}}


# -- seeds ------------------------------------------------------------------------------------
def test_seeds_are_valid_policies_that_run(digits, digits_space):
    """Every seed round-trips through the encoding, and its pipeline runs in onnxruntime with
    outputs close to the original's (the seeds are mild settings, not random ones)."""
    model, plain = digits_space
    slots = plain.slots
    sensitivity = {slots[1].layers[0]: 0.3, slots[3].layers[0]: 0.2, slots[0].layers[0]: 0.01}
    space = SearchSpace.build(model, sensitivity=sensitivity, prelude=["cleanup"])
    seeds = seed_policies(space)
    assert len({p.key() for p in seeds}) == len(seeds) and all(p.active for p in seeds)
    for p in seeds:
        assert space.decode(space.encode(p)) == p
    methods = [{d.method for d in p.active} for p in seeds]
    offered = {m.name for s in space.slots for m in s.methods} - {"none", "remove"}
    assert offered - {"factorize-lowrank"} <= set().union(*methods)  # a uniform seed each
    assert methods[0] == {"quantize-int8"}  # the most promising first
    # all but the k most sensitive: int8 (mse) everywhere except slots[1], then slots[1], [3]
    mse = [
        p
        for p in seeds
        if all(
            d.method == "quantize-int8" and d.options == {"calibration": "mse"} for d in p.active
        )
    ]
    kept = [{d.slot for d in p.decisions if d.method == "none"} for p in mse[1:]]  # [0]: uniform
    assert kept[:2] == [{slots[1].id}, {slots[1].id, slots[3].id}]
    assert len(kept) == 3 and len(kept[2]) == 4 and kept[2] > kept[1]  # k = 1, 2, 4
    # dynamic int8: uniform per channel, uniform per tensor, then per channel but for the
    # most sensitive of its slots
    dynamic = [p for p in seeds if {d.method for d in p.active} == {"quantize-dynamic"}]
    flags = [{d.options["per_channel"] for d in p.active} for p in dynamic]
    assert flags[:2] == [{True}, {False}] and all(f == {True} for f in flags[2:])
    assert len(dynamic) > 2 and len(dynamic[2].active) < len(dynamic[0].active)
    x = np.load(digits["test"])["input"][:64]
    want = run(make_session(model), {"input": x})["logits"]
    calib = gs.data.load_npz(digits["train"], model)
    for p in seeds:
        got = gs.run_pipeline(gs.load(digits["model"]), p.to_pipeline(), calib=calib).model
        logits = run(make_session(got), {"input": x})["logits"]
        cos = (logits * want).sum() / (np.linalg.norm(logits) * np.linalg.norm(want))
        quantized = all(d.method.startswith("quantize") for d in p.active)
        assert cos > (0.98 if quantized else 0.6), p.summary()  # pruning: not fine-tuned


def test_seeds_without_sensitivity_are_uniform_only(digits_space):
    _, space = digits_space
    seeds = seed_policies(space)
    for p in seeds:
        methods = {d.method for d in p.decisions if d.slot in {s.id for s in space.slots}}
        active = {d.method for d in p.active}
        assert len(active) == 1
        # uniform: every slot that allows the method uses it
        (method,) = active
        allows = [method in [m.name for m in s.methods] for s in space.slots]
        assert [d.method == method for d in p.decisions] == allows, methods


def test_fixed_options_reach_the_pass(tmp_path):
    """quantize-weights decisions carry accuracy_level 4 (no gene): MatMulNBits gets it."""
    path = tmp_path / "mlp.onnx"
    onnx.save(_residual_mlp(), path)
    space = SearchSpace.build(gs.load(path), methods="quantize-weights")
    dims = [len(sp) for s in space.slots for sp in s.spaces]
    assert dims == [0, 2] * len(space.slots)  # bits, group_size: accuracy_level is fixed
    policy = space.uniform("quantize-weights", bits=4, group_size=32)
    assert space.decode(space.encode(policy)) == policy
    assert all(d.options["accuracy_level"] == 4 for d in policy.active)
    model = gs.run_pipeline(gs.load(path), policy.to_pipeline()).model
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert nbits and all(n.attributes["accuracy_level"].value == 4 for n in nbits)


def test_embedding_tables_are_slots_for_weight_quantization(tmp_path) -> None:
    """An embedding table (Gather) is a slot that can be quantized (dynamic int8 rows, or
    int4/int2 groups) but not pruned or factorized; a policy quantizing it replays and looks
    rows up within the int8 step of the float table."""
    table = RNG.normal(0, 1, (50, 16)).astype(np.float32)
    w = RNG.normal(0, 1, (16, 8)).astype(np.float32)
    graph = oh.make_graph(
        [
            oh.make_node("Gather", ["table", "ids"], ["e"], name="embeddings/Gather"),
            oh.make_node("MatMul", ["e", "w"], ["y"], name="head/MatMul"),
        ],
        "emb",
        [oh.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])],
        [nh.from_array(table, "table"), nh.from_array(w, "w")],
    )
    path = tmp_path / "emb.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10), path)
    model = gs.load(path)
    space = SearchSpace.build(model)
    (slot,) = [s for s in space.slots if s.op == "Gather"]
    assert [m.name for m in slot.methods] == ["none", "quantize-dynamic", "quantize-weights"]
    decision = Decision(slot.id, tuple(slot.layers), "quantize-dynamic", (("per_channel", False),))
    policy = space.decode(space.encode(Policy((decision,))))
    out = gs.run_pipeline(gs.load(path), policy.to_pipeline()).model
    assert not any(n.op_type == "Gather" and n.inputs[0].name == "table" for n in out.graph)
    ids = RNG.integers(0, 50, (2, 5)).astype(np.int64)
    y, ref = run(make_session(out), {"ids": ids})["y"], run(make_session(model), {"ids": ids})["y"]
    # each table entry is within half an int8 step (range / 255) of its float value, so
    # |dy_j| <= step / 2 * sum_k |w_kj|
    step = (table.max() - min(table.min(), 0)) / 255
    bound = step / 2 * np.abs(w).sum(0) * 1.01
    assert (np.abs(y - ref) <= bound).all()
    assert np.abs(y - ref).max() > 0  # it was quantized

"""graphsurgeon.latency: statistics over timed runs, session settings. No timing thresholds:
the statistics are checked exactly against a scripted clock, and real runs only for order."""

from __future__ import annotations

import itertools
import statistics
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphsurgeon import latency
from graphsurgeon.latency import measure_latency, session_for


def _tiny_model() -> bytes:
    """y = relu(x @ W) with x [batch, 4], W [4, 3]."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) - 5, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _feeds(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((b + 1, 4)).astype(np.float32)} for b in range(n)]


class _CountingSession:
    """Wraps a real session's ``run`` to record which feeds it got."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.batches: list[int] = []
        self._run = session.run

    def __call__(self, names, feed, *args):
        assert set(feed) == {"x"}  # inputs the model does not have are dropped
        self.batches.append(len(feed["x"]))
        return self._run(names, feed, *args)


def test_real_runs_have_ordered_statistics() -> None:
    stats = measure_latency(_tiny_model(), _feeds(), threads=1, warmup=2, repeats=11)
    assert stats.runs == 11
    assert stats.threads == 1
    assert 0 < stats.min_s <= stats.median_s <= stats.p90_s <= stats.max_s
    assert stats.cv >= 0


def test_statistics_match_a_scripted_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    durations = [0.005, 0.001, 0.004, 0.002, 0.003, 0.010, 0.0015]
    # perf_counter is read before and after every timed run; warm-up runs read nothing.
    ticks = itertools.chain.from_iterable((10.0 * i, 10.0 * i + d) for i, d in enumerate(durations))
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    stats = measure_latency(_tiny_model(), _feeds(), warmup=3, repeats=len(durations))
    assert stats.runs == len(durations)
    assert stats.median_s == pytest.approx(statistics.median(durations))
    assert stats.p90_s == pytest.approx(np.percentile(durations, 90, method="nearest"))
    assert stats.min_s == pytest.approx(min(durations))
    assert stats.max_s == pytest.approx(max(durations))
    assert stats.cv == pytest.approx(np.std(durations) / np.mean(durations))


def test_warmup_and_repeats_cycle_through_the_feeds(monkeypatch: pytest.MonkeyPatch) -> None:
    session = session_for(_tiny_model(), threads=1)
    counter = _CountingSession(session)
    monkeypatch.setattr(session, "run", counter)
    feeds = [{**f, "labels": np.zeros(1)} for f in _feeds(3)]  # extra keys are ignored
    stats = measure_latency(session, feeds, warmup=4, repeats=5)
    assert stats.runs == 5
    warmup, timed = [1, 2, 3, 1], [1, 2, 3, 1, 2]  # each cycles over batches 1, 2, 3
    assert counter.batches == [*warmup, *timed]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_reach_the_session_options(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    session = session_for(_tiny_model(), threads=threads)
    options = session.get_session_options()
    assert options.intra_op_num_threads == threads
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL

    made: list[ort.InferenceSession] = []

    def spy(model, *, threads: int = 2, optimize: bool = True) -> ort.InferenceSession:
        made.append(session_for(model, threads=threads, optimize=optimize))
        return made[-1]

    monkeypatch.setattr(latency, "session_for", spy)
    stats = measure_latency(_tiny_model(), _feeds(1), threads=threads, warmup=0, repeats=2)
    assert stats.threads == threads
    assert made[0].get_session_options().intra_op_num_threads == threads


def test_a_given_session_reports_its_own_threads() -> None:
    session = session_for(_tiny_model(), threads=3)
    stats = measure_latency(session, _feeds(1), threads=2, warmup=0, repeats=2)
    assert stats.threads == 3


def test_optimize_false_disables_graph_optimizations() -> None:
    off = session_for(_tiny_model(), optimize=False).get_session_options()
    on = session_for(_tiny_model()).get_session_options()
    assert off.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert on.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_outputs_of_the_timed_session_are_right() -> None:
    feed = _feeds(1)[0]
    (y,) = session_for(_tiny_model()).run(None, feed)
    w = np.arange(12, dtype=np.float32).reshape(4, 3) - 5
    np.testing.assert_allclose(y, np.maximum(feed["x"] @ w, 0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("feeds", "kwargs"), [([], {}), (_feeds(1), {"repeats": 0})])
def test_bad_arguments(feeds, kwargs) -> None:
    with pytest.raises(ValueError):
        measure_latency(_tiny_model(), feeds, **kwargs)


def test_fit_corrections_recovers_fusion_scales_and_keeps_unseen_ops_at_one() -> None:
    """Whole-model times made from known per-op scales (BatchNormalization fused away: 0, Conv
    slower in the model than alone: 1.5) come back from the fit; an op type whose time never
    varies across samples stays near 1 (the regularization), and no scale is negative."""
    from graphsurgeon.latency_model import LatencyTable, fit_corrections
    from graphsurgeon.profiles import load_profile

    profile = load_profile("x86-avx512-vnni")
    rng = np.random.default_rng(0)
    truth = {"Conv": 1.5, "BatchNormalization": 0.0, "Gemm": 1.0}
    samples = []
    for _ in range(12):
        per_op = {
            "Conv": float(rng.uniform(1e-4, 5e-4)),
            "BatchNormalization": float(rng.uniform(1e-5, 5e-5)),
            "Gemm": float(rng.uniform(1e-4, 2e-4)),
            "Relu": 2e-5,  # constant: the samples cannot tell its scale from the offset
        }
        seconds = 3e-5 + sum(truth.get(op, 1.0) * t for op, t in per_op.items())
        samples.append((per_op, seconds + 2e-6))  # + the launch overhead predict adds back
    table = LatencyTable(profile.name)
    error = fit_corrections(samples, profile, table, strength=1e-4)
    assert error < 0.02
    assert table.scales["Conv"] == pytest.approx(1.5, abs=0.05)
    assert table.scales["BatchNormalization"] == pytest.approx(0.0, abs=0.1)
    assert table.scales["Gemm"] == pytest.approx(1.0, abs=0.1)
    assert table.scales["Relu"] == pytest.approx(1.0, abs=0.2)
    assert all(s >= 0 for s in table.scales.values())
    with pytest.raises(ValueError, match="at least two"):
        fit_corrections(samples[:1], profile, table)


def test_interleaved_timing_takes_turns_and_reports_round_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two models, 3 rounds of 2 runs: the runs alternate model by model, round by round;
    each model's median is the median of its round medians, ``quiet_s`` the lowest of them."""
    a, b = session_for(_tiny_model(), threads=1), session_for(_tiny_model(), threads=2)
    order: list[str] = []
    for name, s in (("a", a), ("b", b)):
        run = s.run
        monkeypatch.setattr(
            s, "run", lambda n, f, *r, _n=name, _run=run: (order.append(_n), _run(n, f))[1]
        )
    # durations in call order: a a | b b per round
    durations = [1, 3, 10, 10, 2, 2, 20, 40, 9, 9, 30, 30]
    ticks = itertools.chain.from_iterable(
        (100.0 * i, 100.0 * i + d) for i, d in enumerate(durations)
    )
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    sa, sb = latency.measure_interleaved(
        [(a, _feeds(1)), (b, _feeds(1))], warmup=1, rounds=3, repeats=2
    )
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then turns
    assert (sa.runs, sb.runs) == (6, 6)
    assert (sa.threads, sb.threads) == (1, 2)
    assert sa.median_s == pytest.approx(statistics.median([2, 2, 9]))
    assert sa.quiet_s == pytest.approx(2)
    assert sb.median_s == pytest.approx(statistics.median([10, 30, 30]))
    assert sb.quiet_s == pytest.approx(10)
    assert (sb.min_s, sb.max_s) == (pytest.approx(10), pytest.approx(40))


def test_interleaved_timing_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        latency.measure_interleaved([(_tiny_model(), [])])
    with pytest.raises(ValueError):
        latency.measure_interleaved([(_tiny_model(), _feeds(1))], rounds=0)
    assert latency.measure_interleaved([]) == []


def test_unseen_signatures_are_charged_by_the_ops_fit_over_the_table() -> None:
    """Table entries made from a known cost law (t = 2 ns/FLOP + 0.5 ns/byte + 3 us) give that
    law back; a MatMul the table has never seen is charged by it, not by the roofline."""
    import onnx_ir as ir

    from graphsurgeon.latency_model import LatencyTable, _node_features, breakdown
    from graphsurgeon.layers import find_layers
    from graphsurgeon.profiles import load_profile
    from graphsurgeon.shapes import ShapeInferencePass

    profile = load_profile("x86-avx512-vnni")
    law = (2e-9, 0.5e-9, 3e-6)
    table = LatencyTable(profile.name)
    for i, (flops, nbytes) in enumerate([(1e5, 4e4), (4e6, 1e5), (3e7, 9e5), (5e5, 2e6)]):
        table.entries[f"sig{i}"] = law[0] * flops + law[1] * nbytes + law[2]
        table.features[f"sig{i}"] = ["MatMul", flops, nbytes]
    *fit, error = table.op_fit("MatMul")
    assert fit == pytest.approx(law, rel=1e-6) and error < 1e-6
    assert table.op_fit("Conv") is None  # no entries: roofline

    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(_tiny_model()))
    model.graph.inputs[0].shape = ir.Shape([8, 4])
    ShapeInferencePass()(model)
    per_op, hits, misses = breakdown(model, profile, table)
    assert (hits, misses) == (0, 2)
    (layer,) = find_layers(model)
    flops, nbytes = _node_features(layer.node)
    assert flops == 2 * 8 * 4 * 3
    assert nbytes == 4 * (8 * 4 + 4 * 3 + 8 * 3)  # x, W, h in fp32
    assert per_op["MatMul"] == pytest.approx(law[0] * flops + law[1] * nbytes + law[2])
    # what a search times: only the Relu (no law); the MatMul's law is trusted
    from graphsurgeon.latency_model import node_signature, predict

    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert predict(model, profile, table).uncovered == {node_signature(relu, None)}


def test_interleaved_rounds_fill_the_minimum_round_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose timed warm run takes 1 ms gets 5 runs a round for min_round_s=5 ms; one
    whose warm run takes 10 ms keeps the minimum of 2."""
    fast, slow = session_for(_tiny_model(), threads=1), session_for(_tiny_model(), threads=1)
    # sizing runs (fast, slow), then 1 round: fast x5, slow x2
    durations = [0.001, 0.010] + [0.001] * 5 + [0.010] * 2
    ticks = itertools.chain.from_iterable(
        (100.0 * i, 100.0 * i + d) for i, d in enumerate(durations)
    )
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    a, b = latency.measure_interleaved(
        [(fast, _feeds(1)), (slow, _feeds(1))], warmup=0, rounds=1, repeats=2, min_round_s=0.005
    )
    assert (a.runs, b.runs) == (5, 2)


def test_a_trusted_law_smooths_its_familys_entries_and_a_poor_one_does_not() -> None:
    """A timed MatMul whose entry is off its family's law (one noisy timing among consistent
    ones) is charged by the law; when the family's entries do not follow one law (RMS relative
    error over 25%), every node keeps its own entry."""
    import onnx_ir as ir

    from graphsurgeon.latency_model import LatencyTable, _node_features, breakdown, node_signature
    from graphsurgeon.layers import find_layers
    from graphsurgeon.profiles import load_profile
    from graphsurgeon.shapes import ShapeInferencePass

    profile = load_profile("x86-avx512-vnni")
    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(_tiny_model()))
    model.graph.inputs[0].shape = ir.Shape([8, 4])
    ShapeInferencePass()(model)
    (layer,) = find_layers(model)
    sig = node_signature(layer.node, layer)
    flops, nbytes = _node_features(layer.node)
    law = (2e-9, 0.5e-9, 3e-6)
    exact = law[0] * flops + law[1] * nbytes + law[2]

    def table_with(others: list[float]) -> LatencyTable:
        table = LatencyTable(profile.name)
        points = [(1e5, 4e4), (4e6, 1e5), (3e7, 9e5), (5e5, 2e6)]
        for i, ((f, b), scale) in enumerate(zip(points, others, strict=True)):
            table.entries[f"sig{i}"] = scale * (law[0] * f + law[1] * b + law[2])
            table.features[f"sig{i}"] = ["MatMul", f, b]
        table.entries[sig] = 3 * exact  # a noisy timing of this very node
        table.features[sig] = ["MatMul", flops, nbytes]
        return table

    consistent = table_with([1, 1, 1, 1])
    per_op, hits, _ = breakdown(model, profile, consistent)
    assert hits == 1  # the MatMul (the Relu has no entry)
    a, b, c, error = consistent.op_fit("MatMul")
    assert error <= 0.25
    assert per_op["MatMul"] == pytest.approx(a * flops + b * nbytes + c)
    assert per_op["MatMul"] < 2 * exact  # pulled toward the law, away from the 3x timing
    per_op, _, _ = breakdown(model, profile, table_with([0.2, 3.0, 0.3, 4.0]))
    assert per_op["MatMul"] == pytest.approx(3 * exact)


def test_timings_handed_between_tables_keep_their_features() -> None:
    """A search worker's new timings reach another table with the features the family laws
    are fitted on; an entry the receiver already has is kept, and bare numbers still load."""
    from graphsurgeon.latency_model import LatencyTable

    law = (2e-9, 0.5e-9, 3e-6)
    worker = LatencyTable("p")
    for i, (flops, nbytes) in enumerate([(1e5, 4e4), (4e6, 1e5), (3e7, 9e5)]):
        worker.entries[f"sig{i}"] = law[0] * flops + law[1] * nbytes + law[2]
        worker.features[f"sig{i}"] = ["MatMul", flops, nbytes]
    driver = LatencyTable("p", {"sig0": 1.0})
    assert driver.op_fit("MatMul") is None
    assert driver.adopt(worker.timings({"sig0", "sig1", "sig2", "nope"})) == 2
    assert driver.entries["sig0"] == 1.0  # not overwritten
    assert driver.features["sig2"] == ["MatMul", 3e7, 9e5]
    assert driver.adopt({"old": 0.5}) == 1 and driver.entries["old"] == 0.5
    fresh = LatencyTable("p")
    fresh.adopt(worker.timings(set(worker.entries)))
    *fit, _ = fresh.op_fit("MatMul")
    assert fit == pytest.approx(law, rel=1e-6)  # the adopted entries carry the law

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

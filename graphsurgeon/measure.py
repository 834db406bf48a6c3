"""``graphsurgeon measure``: latency, peak memory and energy of a model on a device profile.

Latency: warm-up, then timed runs in rounds of ``repeats`` until the coefficient of
variation falls below the profile's ``target_cv`` or ``max_repeats`` is reached (reported as
not stable). Threads are pinned: onnxruntime gets the profile's thread count and the process
is bound to that many CPUs for the measurement.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphsurgeon.data import Feed, generate_inputs
from graphsurgeon.energy import MIN_WINDOW_S, NvmlCounter, RaplCounter, estimate_energy
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session
from graphsurgeon.instruments import reset_peak_rss, status_kib
from graphsurgeon.layers import find_layers
from graphsurgeon.profiles import HardwareProfile
from graphsurgeon.shapes import ShapeInferencePass, apply_input_shapes
from graphsurgeon.stats import model_stats

_PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider"}
_DTYPE_NAMES = {
    ir.DataType.INT8: "int8",
    ir.DataType.UINT8: "int8",
    ir.DataType.INT4: "int4",
    ir.DataType.UINT4: "int4",
    ir.DataType.FLOAT16: "fp16",
    ir.DataType.BFLOAT16: "bf16",
    ir.DataType.DOUBLE: "fp64",
}


@dataclass
class Measurement:
    backend: str
    threads: int
    median_ms: float
    p90_ms: float
    cv: float
    runs: int
    stable: bool
    peak_rss_mb: float | None
    energy_mj: float
    energy_source: str  # "measured (RAPL)", "measured (NVML)" or "estimated (profile model)"
    flops: int | None
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def timed_runs(
    session: ort.InferenceSession,
    feeds: Sequence[Feed],
    *,
    warmup: int,
    repeats: int,
    max_repeats: int,
    target_cv: float,
) -> tuple[list[float], bool]:
    """Run rounds of ``repeats`` until stdev/mean <= ``target_cv`` or ``max_repeats``."""
    for i in range(warmup):
        session.run(None, feeds[i % len(feeds)])
    times: list[float] = []
    while True:
        for _ in range(repeats):
            feed = feeds[len(times) % len(feeds)]
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        cv = coefficient_of_variation(times)
        if cv <= target_cv:
            return times, True
        if len(times) >= max_repeats:
            return times, False


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def coefficient_of_variation(times: Sequence[float]) -> float:
    mean = statistics.fmean(times)
    return statistics.pstdev(times) / mean if mean > 0 else 0.0


def percentile(times: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(times), q))


@contextlib.contextmanager
def pinned(threads: int) -> Iterator[None]:
    """Bind the process to ``threads`` CPUs for the measurement (Linux), then restore."""
    if not hasattr(os, "sched_getaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, sorted(before)[:threads])
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)


def ops_by_dtype(model: ir.Model) -> tuple[dict[str, float], int | None]:
    """FLOPs per compute dtype (a layer computes in its weight's dtype), and the total.

    Counted on a constant-folded copy: exporters compute reshapes from Shape subgraphs,
    and only folding them gives every layer a static output shape.
    """
    from graphsurgeon.passes.folding import FoldConstants

    model = ir.serde.deserialize_model(ir.to_proto(model))
    FoldConstants()(model)
    ShapeInferencePass()(model)
    stats = model_stats(model)
    ops: dict[str, float] = {}
    for layer in find_layers(model):
        flops = stats.layers[layer.id].flops
        if flops:
            dtype = _DTYPE_NAMES.get(layer.weight.dtype, "fp32")
            ops[dtype] = ops.get(dtype, 0.0) + flops
    return ops, stats.flops


def measure_model(
    model: ir.Model,
    profile: HardwareProfile,
    *,
    backend: str = "ort-cpu",
    feeds: Sequence[Feed] | None = None,
    shapes: dict[str, list[int]] | None = None,
) -> Measurement:
    """Measure ``model`` (an IR model; shapes fixed from ``shapes`` and the profile)."""
    if backend not in profile.backends:
        raise GraphSurgeonError(
            f"profile {profile.name} does not list backend {backend!r} (it has {', '.join(profile.backends)})"
        )
    provider = _PROVIDERS.get(backend)
    if provider is None:
        raise GraphSurgeonError(
            f"backend {backend!r} cannot be measured yet (ort-cpu, ort-cuda can)"
        )
    if provider not in ort.get_available_providers():
        raise GraphSurgeonError(
            f"backend {backend!r} needs onnxruntime's {provider}, which this install lacks"
        )
    wanted = {**profile.measurement.shapes, **(shapes or {})}
    if wanted:
        apply_input_shapes(model, wanted)
    ShapeInferencePass()(model)
    if feeds is None:
        feeds = [generate_inputs(model, seed=0, batch=profile.measurement.batch)]
    ops, flops = ops_by_dtype(model)
    weights = model_stats(model).bytes
    io_bytes = sum(a.nbytes for a in feeds[0].values())
    threads = min(profile.threads(), available_cpus())  # a profile of a bigger machine
    m = profile.measurement
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4
    rss0 = status_kib("VmRSS")
    reset_peak_rss()
    with pinned(threads):
        session = make_session(model, options=options, providers=[provider])
        wanted_inputs = {i.name for i in session.get_inputs()}
        prepared = [{k: v for k, v in f.items() if k in wanted_inputs} for f in feeds]
        times, stable = timed_runs(
            session,
            prepared,
            warmup=m.warmup,
            repeats=m.repeats,
            max_repeats=m.max_repeats,
            target_cv=m.target_cv,
        )
        median = statistics.median(times)
        energy_j, source = _measured_energy(session, prepared, backend, median)
    hwm = status_kib("VmHWM")
    if energy_j is None:
        outputs = sum(int(np.prod(o.shape)) * 4 for o in _output_shapes(session, prepared[0]))
        energy_j = estimate_energy(
            profile, median, ops, weights + io_bytes + outputs, cores_used=threads
        ).joules
        source = "estimated (profile model)"
    return Measurement(
        backend=backend,
        threads=threads,
        median_ms=median * 1e3,
        p90_ms=percentile(times, 90) * 1e3,
        cv=coefficient_of_variation(times),
        runs=len(times),
        stable=stable,
        peak_rss_mb=None if hwm is None or rss0 is None else max(0, hwm - rss0) / 1024,
        energy_mj=energy_j * 1e3,
        energy_source=source,
        flops=flops,
        weight_bytes=weights,
    )


def _measured_energy(
    session: ort.InferenceSession, feeds: Sequence[Feed], backend: str, median_s: float
) -> tuple[float | None, str]:
    """Joules per inference over a window of at least MIN_WINDOW_S, if a counter exists."""
    counter: RaplCounter | NvmlCounter
    if backend == "ort-cpu":
        counter, label = RaplCounter(), "measured (RAPL)"
    else:
        counter, label = NvmlCounter(), "measured (NVML)"
    if not counter.available:
        return None, ""
    runs = max(1, int(MIN_WINDOW_S / max(median_s, 1e-6)) + 1)
    start = counter.read()
    for i in range(runs):
        session.run(None, feeds[i % len(feeds)])
    end = counter.read()
    return counter.joules_between(start, end) / runs, label  # type: ignore[arg-type]


def _output_shapes(session: ort.InferenceSession, feed: Feed) -> list[np.ndarray]:
    return session.run(None, feed)

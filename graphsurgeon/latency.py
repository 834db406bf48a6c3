"""Latency in onnxruntime on the CPU: warm-up, then timed runs; median, p90 and spread.

Every latency figure graphsurgeon reports comes from here, so that ours and a baseline are
always measured the same way (same threads, same session options, same feeds).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import onnxruntime as ort

from graphsurgeon.data import Feed


@dataclass(frozen=True)
class LatencyStats:
    median_s: float
    p90_s: float
    cv: float  # coefficient of variation: stdev / mean over the timed runs
    runs: int
    threads: int
    min_s: float = math.nan
    max_s: float = math.nan


def session_for(
    model: str | os.PathLike | bytes, *, threads: int = 2, optimize: bool = True
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def measure_latency(
    model: str | os.PathLike | bytes | ort.InferenceSession,
    feeds: Sequence[Feed],
    *,
    threads: int = 2,
    warmup: int = 5,
    repeats: int = 30,
    optimize: bool = True,
) -> LatencyStats:
    """Time ``repeats`` runs (cycling through ``feeds``) after ``warmup`` untimed ones.

    Given a session, its own intra-op thread count is reported (``threads`` is ignored).
    """
    if not feeds:
        raise ValueError("measure_latency needs at least one feed")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    if isinstance(model, ort.InferenceSession):
        session = model
        threads = session.get_session_options().intra_op_num_threads
    else:
        session = session_for(model, threads=threads, optimize=optimize)
    wanted = {i.name for i in session.get_inputs()}
    prepared = [{k: v for k, v in f.items() if k in wanted} for f in feeds]
    for i in range(warmup):
        session.run(None, prepared[i % len(prepared)])
    times = []
    for i in range(repeats):
        feed = prepared[i % len(prepared)]
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    times.sort()
    mean = statistics.fmean(times)
    return LatencyStats(
        median_s=statistics.median(times),
        p90_s=times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
        cv=(statistics.pstdev(times) / mean) if mean > 0 else 0.0,
        runs=len(times),
        threads=threads,
        min_s=times[0],
        max_s=times[-1],
    )

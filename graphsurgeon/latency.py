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
    #: interleaved timing only: the lowest per-round median, the model's latency in the
    #: quietest round (a shared machine's other tenants only ever add time)
    quiet_s: float = math.nan


def session_for(
    model: str | os.PathLike | bytes,
    *,
    threads: int = 2,
    optimize: bool = True,
    save_optimized: str | os.PathLike | None = None,
    config: dict[str, str] | None = None,
) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads, sequential; ``save_optimized`` writes
    the graph onnxruntime's optimizer produced (what the session runs) to that path;
    ``config``: session config entries."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save_optimized is not None:
        options.optimized_model_filepath = os.fspath(save_optimized)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _prepare(session: ort.InferenceSession, feeds: Sequence[Feed]) -> list[Feed]:
    wanted = {i.name for i in session.get_inputs()}
    return [{k: v for k, v in f.items() if k in wanted} for f in feeds]


def _stats(
    times: list[float], threads: int, median: float | None = None, quiet: float = math.nan
) -> LatencyStats:
    times = sorted(times)
    mean = statistics.fmean(times)
    return LatencyStats(
        median_s=statistics.median(times) if median is None else median,
        p90_s=times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
        cv=(statistics.pstdev(times) / mean) if mean > 0 else 0.0,
        runs=len(times),
        threads=threads,
        min_s=times[0],
        max_s=times[-1],
        quiet_s=quiet,
    )


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
    prepared = _prepare(session, feeds)
    for i in range(warmup):
        session.run(None, prepared[i % len(prepared)])
    times = []
    for i in range(repeats):
        feed = prepared[i % len(prepared)]
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return _stats(times, threads)


def measure_interleaved(
    models: Sequence[tuple[str | os.PathLike | bytes | ort.InferenceSession, Sequence[Feed]]],
    *,
    threads: int = 2,
    warmup: int = 3,
    rounds: int = 7,
    repeats: int = 10,
    min_round_s: float = 0.0,
) -> list[LatencyStats]:
    """Time several models in turn: ``rounds`` rounds, each running every model ``repeats``
    times (after ``warmup`` untimed runs of each at the start), or, with ``min_round_s``, as
    many more times as its warm-up says fill that long (a 20 us model gets enough runs for
    a stable round median where a 10 ms model needs few).

    On a shared machine the load drifts over seconds; timing models one after the other lets
    a slow spell land on some of them and not the others, which reorders models whose
    latencies differ by less than the drift. In turns, every model sees the same spells.
    Sessions made here do not spin their threads while idle (see below); sessions passed in
    should not either. Each model's ``median_s`` is the median of its per-round medians (a spell that covers a
    whole round moves one of them), ``quiet_s`` the lowest of them; p90, cv, min and max are
    over all its runs.
    """
    if not models:
        return []
    # onnxruntime's pool threads spin for a while after each run, waiting for more work; with
    # several sessions in turn, the idle ones' spinning threads take the cores from the one
    # being timed (MiniLM, 8 sessions: 18 ms median instead of 11 ms). Blocking threads cost
    # a session well under that, alike for every model.
    quiet_pool = {"session.intra_op.allow_spinning": "0"} if len(models) > 1 else None
    if rounds < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need rounds, repeats >= 1 and warmup >= 0 (got {rounds}, {repeats})")
    runs = []
    for model, feeds in models:
        if not feeds:
            raise ValueError("measure_interleaved needs at least one feed per model")
        session = (
            model
            if isinstance(model, ort.InferenceSession)
            else session_for(model, threads=threads, config=quiet_pool)
        )
        prepared = _prepare(session, feeds)
        for i in range(warmup):
            session.run(None, prepared[i % len(prepared)])
        count = repeats
        if min_round_s > 0:  # one more warm run, timed, sizes the rounds
            t0 = time.perf_counter()
            session.run(None, prepared[0])
            took = time.perf_counter() - t0
            count = max(repeats, min(10_000, math.ceil(min_round_s / max(took, 1e-7))))
        runs.append((session, prepared, count))
    times: list[list[float]] = [[] for _ in runs]
    round_medians: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for k, (session, prepared, count) in enumerate(runs):
            mine = []
            for i in range(count):
                feed = prepared[i % len(prepared)]
                t0 = time.perf_counter()
                session.run(None, feed)
                mine.append(time.perf_counter() - t0)
            times[k].extend(mine)
            round_medians[k].append(statistics.median(mine))
    return [
        _stats(t, s.get_session_options().intra_op_num_threads, statistics.median(m), min(m))
        for t, m, (s, _, _) in zip(times, round_medians, runs, strict=True)
    ]

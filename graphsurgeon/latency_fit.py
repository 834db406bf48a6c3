"""Whole-model calibration of the latency model: random per-layer policies, measured end to end.

``graphsurgeon profile calibrate MODEL --profile P --policies N`` draws N policies the way
search explores them (each policy first draws how much it compresses, then each layer is
touched with that chance: 25% or 50% of its output channels removed, or, for a MatMul, int4
weights), fills the node table for every variant, and measures the whole models in turn
(interleaved rounds, so the machine's drift hits them alike); the measurements fit the
per-op-type corrections of :func:`graphsurgeon.latency_model.fit_corrections`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import onnx
import onnx_ir as ir

from graphsurgeon.data import generate_inputs
from graphsurgeon.latency import measure_interleaved
from graphsurgeon.latency_model import LatencyTable, breakdown, calibrate, fit_corrections
from graphsurgeon.layers import find_layers
from graphsurgeon.measure import available_cpus
from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.profiles import HardwareProfile

__all__ = ["calibrate_policies", "random_policy"]


def random_policy(layer_ops: dict[str, str], rng: random.Random) -> list[dict[str, Any]]:
    """One pipeline of per-layer channel ratios and int4 picks (overrides and targets)."""
    prune: dict[str, float] = {}
    int4: list[str] = []
    intensity = rng.random()
    for lid, op in layer_ops.items():
        if rng.random() > intensity:
            continue
        choices = ["prune25", "prune50", "int4"] if op == "MatMul" else ["prune25", "prune50"]
        choice = rng.choice(choices)
        if choice == "int4":
            int4.append(lid)
        else:
            prune[lid] = 0.25 if choice == "prune25" else 0.5
    steps: list[dict[str, Any]] = []
    if prune:
        steps.append(
            {
                "name": "prune-channels",
                "options": {
                    "ratio": 0.25,
                    "overrides": {k: {"ratio": v} for k, v in prune.items()},
                },
                "targets": {"layers": sorted(prune)},
            }
        )
    if int4:
        steps.append(
            {"name": "quantize-weights", "options": {"bits": 4}, "targets": {"layers": int4}}
        )
    return steps


def calibrate_policies(
    model: ir.Model,
    profile: HardwareProfile,
    table: LatencyTable,
    *,
    policies: int = 8,
    repeats: int = 30,
    seed: int = 0,
    log: Callable[[str], None] = lambda _s: None,
) -> dict[str, Any]:
    """Calibrate ``model`` and ``policies`` random variants of it, then fit the corrections.

    ``model`` must have static input shapes (``--shape``). Returns what was measured."""
    layer_ops = {
        layer.id: layer.op_type for layer in find_layers(model) if layer.op_type != "Gather"
    }
    rng = random.Random(seed)
    threads = min(profile.threads(), available_cpus())
    added = 0
    proto = ir.to_proto(model).SerializeToString()
    variants, seen, drawn = [], set(), []
    for _ in range(8 * (policies + 1)):  # distinct policies: a duplicate teaches the fit nothing
        if len(variants) == policies + 1:
            break
        steps = random_policy(layer_ops, rng) if variants else []
        key = json.dumps(steps, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        drawn.append(steps)
        variant = ir.serde.deserialize_model(onnx.ModelProto.FromString(proto))
        if steps:
            run_pipeline(variant, steps, verify="off")
        added += calibrate(variant, profile, table, repeats=repeats)
        variants.append(variant)
    measured = measure_interleaved(
        [(ir.to_proto(v).SerializeToString(), [generate_inputs(v, seed=0)]) for v in variants],
        threads=threads,
        rounds=5,
        repeats=max(1, repeats // 5),
        min_round_s=0.02,
    )
    samples = []
    for i, (variant, stats) in enumerate(zip(variants, measured, strict=True)):
        samples.append((breakdown(variant, profile, table)[0], stats.quiet_s))
        log(f"  variant {i}: measured {stats.quiet_s * 1e3:.3f} ms (quietest round)")
    error = fit_corrections(samples, profile, table) if len(samples) >= 2 else None
    return {
        "added": added,
        "measured": len(samples),
        "fit_rms_relative_error": error,
        "policies": drawn,
        "measured_ms": [st.quiet_s * 1e3 for st in measured],
    }

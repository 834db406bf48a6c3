"""How well does the latency model rank compression policies? Predicted against measured.

For the digits CNN (batch 64) and MiniLM-L6 (1 x 128), it draws random per-layer policies:
a policy draws an intensity, then each layer is touched with that chance and loses 25% or
50% of its output channels (``prune-channels``) or, for a MatMul, gets int4 weights
(``quantize-weights``). The first
``--train`` policies fill the lookup table (``graphsurgeon profile calibrate`` does the same);
the next ``--policies`` (>= 30) are predicted with that table, nodes it has never seen falling
back to the roofline, and then measured in onnxruntime (2 threads, median of ``--repeats``
runs after warm-up). It prints the Spearman rank correlation (target >= 0.9) and the time to
predict one policy against the time to measure it.

    python benchmarks/latency_model.py [--models digits,minilm] [--policies 30] [--train 8]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import graphsurgeon as gs
from graphsurgeon.data import generate_inputs
from graphsurgeon.detect import detect_profile
from graphsurgeon.latency import measure_latency
from graphsurgeon.latency_model import LatencyTable, calibrate, predict
from graphsurgeon.layers import find_layers

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "digits": {"input": [64, 1, 8, 8]},
    "minilm": {"input_ids": [1, 128], "attention_mask": [1, 128], "token_type_ids": [1, 128]},
}


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks (ties get their mean rank)."""

    def ranks(x: list[float]) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        values = np.asarray(x)
        for v in np.unique(values):
            tie = values == v
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def random_policy(layer_ops: dict[str, str], rng: random.Random) -> list[dict]:
    """One pipeline: per-layer channel ratios and int4 picks, as overrides and targets.

    Each policy first draws how much it compresses (the chance that a layer is touched at
    all), so that policies range from nearly the original to heavily compressed, as search
    explores them; each touched layer then draws its own method and strength.
    """
    prune: dict[str, float] = {}
    int4: list[str] = []
    intensity = rng.random()
    for lid, op in layer_ops.items():
        if rng.random() > intensity:
            continue
        choice = rng.choice(
            ["prune25", "prune50", "int4"] if op == "MatMul" else ["prune25", "prune50"]
        )
        if choice.startswith("prune"):
            prune[lid] = 0.25 if choice == "prune25" else 0.5
        elif choice == "int4":
            int4.append(lid)
    steps: list[dict] = []
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


def build(model_path: Path, shapes: dict, steps: list[dict]):
    model = gs.load(model_path, shapes=shapes)
    gs.run_pipeline(model, "cleanup", verify="off")
    if steps:
        gs.run_pipeline(model, steps, verify="off")
    return model


def run_model(name: str, path: Path, args: argparse.Namespace, profile) -> dict:
    shapes = SHAPES[name]
    base = build(path, shapes, [])
    layer_ops = {
        layer.id: layer.op_type for layer in find_layers(base) if layer.op_type != "Gather"
    }
    rng = random.Random(args.seed)
    table = LatencyTable(profile.name)
    t0 = time.perf_counter()
    calibrate(base, profile, table, repeats=args.repeats)
    for _ in range(args.train):
        calibrate(
            build(path, shapes, random_policy(layer_ops, rng)), profile, table, repeats=args.repeats
        )
    calibration_s = time.perf_counter() - t0
    predicted, measured, t_predict, t_measure, coverage = [], [], [], [], []
    for i in range(args.policies):
        steps = random_policy(layer_ops, rng)
        model = build(path, shapes, steps)
        t0 = time.perf_counter()
        guess = predict(model, profile, table)
        t_predict.append(time.perf_counter() - t0)
        coverage.append(guess.from_table / max(1, guess.from_table + guess.from_roofline))
        feed = generate_inputs(model, seed=0)
        t0 = time.perf_counter()
        stats = measure_latency(
            _serialize(model), [feed], threads=profile.measurement.threads, repeats=args.repeats
        )
        t_measure.append(time.perf_counter() - t0)
        predicted.append(guess.seconds)
        measured.append(stats.median_s)
        print(
            f"  {name} policy {i + 1:>2}: predicted {guess.seconds * 1e3:8.3f} ms  "
            f"measured {stats.median_s * 1e3:8.3f} ms  table coverage {coverage[-1]:.0%}",
            flush=True,
        )
    rho = spearman(predicted, measured)
    result = {
        "model": name,
        "policies": args.policies,
        "train_policies": args.train,
        "table_entries": len(table.entries),
        "calibration_s": calibration_s,
        "spearman": rho,
        "predict_s_median": statistics.median(t_predict),
        "measure_s_median": statistics.median(t_measure),
        "table_coverage_mean": float(np.mean(coverage)),
        "predicted_ms": [p * 1e3 for p in predicted],
        "measured_ms": [m * 1e3 for m in measured],
    }
    speed = result["measure_s_median"] / result["predict_s_median"]
    print(
        f"{name}: Spearman {rho:.3f} (target >= 0.9) {'OK' if rho >= 0.9 else 'MISSED'}; "
        f"predict {result['predict_s_median'] * 1e3:.1f} ms vs measure "
        f"{result['measure_s_median'] * 1e3:.1f} ms per policy ({speed:.1f}x faster); "
        f"table {len(table.entries)} entries, {result['table_coverage_mean']:.0%} of nodes covered",
        flush=True,
    )
    return result


def _serialize(model) -> bytes:
    import onnx_ir as ir

    return ir.to_proto(model).SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--policies", type=int, default=30)
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "examples"))
    import build as examples  # examples/build.py

    folder = ROOT / "examples" / "models"
    paths = {
        "digits": examples.build_digits(folder)["model"],
        "minilm": examples.build_minilm(folder)["model"],
    }
    profile = detect_profile(quick=True)
    print(f"profile: detected {profile.device.model}, {profile.measurement.threads} threads")
    results = [run_model(m, paths[m], args, profile) for m in args.models.split(",") if m]
    if args.json:
        args.json.write_text(
            json.dumps({"profile": profile.device.model, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How well does the latency model rank compression policies? Predicted against measured.

For the digits CNN (batch 64) and MiniLM-L6 (1 x 128), it draws random per-layer policies:
a policy draws an intensity, then each layer is touched with that chance and loses 25% or
50% of its output channels (``prune-channels``) or, for a MatMul, gets int4 weights
(``quantize-weights``). The first
``--train`` policies fill the lookup table (``graphsurgeon profile calibrate`` does the same);
the same training models, measured whole, fit the per-op-type corrections
(``fit_corrections``). The next ``--policies`` (>= 30) are predicted with that table, nodes it
has never seen falling back to the roofline, and then measured in onnxruntime (2 threads, median of ``--repeats``
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
from graphsurgeon.latency_fit import random_policy
from graphsurgeon.latency_model import LatencyTable, breakdown, calibrate, fit_corrections, predict
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
    samples = []
    for i in range(args.train + 1):
        model = base if i == 0 else build(path, shapes, random_policy(layer_ops, rng))
        calibrate(model, profile, table, repeats=args.repeats)
        feed = generate_inputs(model, seed=0)
        stats = measure_latency(
            _serialize(model), [feed], threads=profile.measurement.threads, repeats=args.repeats
        )
        samples.append((breakdown(model, profile, table)[0], stats.median_s))
    # the node table alone (uncorrected), then the whole-model corrections fitted on the
    # same training models (no test policy is ever seen by the fit)
    raw_table = LatencyTable(table.profile, dict(table.entries))
    fit_error = fit_corrections(samples, profile, table)
    calibration_s = time.perf_counter() - t0
    predicted, raw, measured, t_predict, t_measure, coverage = [], [], [], [], [], []
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
        raw.append(predict(model, profile, raw_table).seconds)
        measured.append(stats.median_s)
        print(
            f"  {name} policy {i + 1:>2}: predicted {guess.seconds * 1e3:8.3f} ms  "
            f"measured {stats.median_s * 1e3:8.3f} ms  table coverage {coverage[-1]:.0%}",
            flush=True,
        )
    rho = spearman(predicted, measured)
    rho_raw = spearman(raw, measured)
    result = {
        "spearman_uncorrected": rho_raw,
        "fit_rms_relative_error": fit_error,
        "scales": table.scales,
        "offset_ms": table.offset * 1e3,
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
        f"{name}: Spearman {rho:.3f} (target >= 0.9) {'OK' if rho >= 0.9 else 'MISSED'}, "
        f"node table alone {rho_raw:.3f}; "
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

"""How well does the latency model rank compression policies? Predicted against measured.

For the digits CNN (batch 64) and MiniLM-L6 (1 x 128), it draws distinct random per-layer
policies: a policy draws an intensity, then each layer is touched with that chance and loses
25% or 50% of its output channels (``prune-channels``) or, for a MatMul, gets int4 weights
(``quantize-weights``). ``--train`` of them calibrate the model exactly as
``graphsurgeon profile calibrate --policies N`` does (node table, then whole models measured to
fit the per-op-type corrections). ``--policies`` (>= 30) others, never seen by the fit, are
predicted, then measured in onnxruntime (the profile's threads) *in turn*: ``--rounds``
rounds, each timing every policy, so a slow spell of a shared machine lands on all of them
rather than reordering them. It prints the Spearman rank correlation (target >= 0.9) and the
time to predict one policy against the time to measure it.

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
from graphsurgeon.latency import measure_interleaved
from graphsurgeon.latency_fit import calibrate_policies, random_policy
from graphsurgeon.latency_model import LatencyTable, predict
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
    threads = profile.measurement.threads
    table = LatencyTable(profile.name)
    t0 = time.perf_counter()
    # what `graphsurgeon profile calibrate --policies N` does: node table for the original and
    # N random variants, the whole variants measured in turn, the corrections fitted on them
    fit = calibrate_policies(
        base, profile, table, policies=args.train, repeats=args.repeats, seed=args.seed
    )
    calibration_s = time.perf_counter() - t0
    raw_table = LatencyTable(table.profile, dict(table.entries))  # the node table alone
    seen = {json.dumps(steps, sort_keys=True) for steps in fit["policies"]}
    rng = random.Random(args.seed + 1)
    models, t_predict, predicted, raw, coverage = [], [], [], [], []
    while len(models) < args.policies:  # distinct policies, none seen by the fit
        steps = random_policy(layer_ops, rng)
        key = json.dumps(steps, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        model = build(path, shapes, steps)
        t0 = time.perf_counter()
        guess = predict(model, profile, table)
        t_predict.append(time.perf_counter() - t0)
        coverage.append(guess.from_table / max(1, guess.from_table + guess.from_roofline))
        predicted.append(guess.seconds)
        raw.append(predict(model, profile, raw_table).seconds)
        models.append(model)
    # every test policy timed in turn, round after round: the machine's drift hits all alike;
    # twice, so that the agreement of two measurements shows how well ranks *can* be predicted
    t0 = time.perf_counter()
    passes = []
    for _ in range(2):
        passes.append(
            measure_interleaved(
                [(_serialize(m), [generate_inputs(m, seed=0)]) for m in models],
                threads=threads,
                rounds=args.rounds,
                repeats=max(1, args.repeats // args.rounds),
                min_round_s=args.min_round_ms / 1e3,
            )
        )
    t_measure = (time.perf_counter() - t0) / (2 * len(models))
    repeatability = spearman([s.quiet_s for s in passes[0]], [s.quiet_s for s in passes[1]])
    stats = [a if a.quiet_s <= b.quiet_s else b for a, b in zip(*passes, strict=True)]
    measured = [st.quiet_s for st in stats]  # quietest round of both: see calibrate()
    medians = [st.median_s for st in stats]
    for i, (guess, st) in enumerate(zip(predicted, stats, strict=True)):
        print(
            f"  {name} policy {i + 1:>2}: predicted {guess * 1e3:8.3f} ms  "
            f"measured {st.quiet_s * 1e3:8.3f} ms quietest round, "
            f"{st.median_s * 1e3:8.3f} ms median (cv {st.cv:.0%})  "
            f"table coverage {coverage[i]:.0%}",
            flush=True,
        )
    rho = spearman(predicted, measured)
    rho_raw = spearman(raw, measured)
    rho_median = spearman(predicted, medians)
    result = {
        "spearman_uncorrected": rho_raw,
        "spearman_vs_median": rho_median,
        "measurement_repeatability": repeatability,
        "fit_rms_relative_error": fit["fit_rms_relative_error"],
        "scales": table.scales,
        "offset_ms": table.offset * 1e3,
        "model": name,
        "policies": args.policies,
        "train_policies": args.train,
        "rounds": args.rounds,
        "min_round_ms": args.min_round_ms,
        "table_entries": len(table.entries),
        "calibration_s": calibration_s,
        "spearman": rho,
        "predict_s_median": statistics.median(t_predict),
        "measure_s_mean": t_measure,
        "table_coverage_mean": float(np.mean(coverage)),
        "predicted_ms": [p * 1e3 for p in predicted],
        "measured_ms": [m * 1e3 for m in measured],
        "measured_median_ms": [m * 1e3 for m in medians],
    }
    speed = t_measure / result["predict_s_median"]
    print(
        f"{name}: Spearman {rho:.3f} (target >= 0.9) {'OK' if rho >= 0.9 else 'MISSED'}, "
        f"node table alone {rho_raw:.3f}, against round medians {rho_median:.3f}; "
        f"two measurements of the same policies agree at {repeatability:.3f}; "
        f"predict {result['predict_s_median'] * 1e3:.1f} ms vs measure "
        f"{t_measure * 1e3:.1f} ms per policy ({speed:.1f}x faster); "
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
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument(
        "--min-round-ms", type=float, default=20.0, help="at least this long per policy a round"
    )
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

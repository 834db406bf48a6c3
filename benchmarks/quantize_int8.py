"""quantize-int8 against onnxruntime's ``quantize_static`` (its defaults), side by side.

Both start from the same float model and calibrate on the same samples (digits: the first 64
training images, after ``cleanup``; MiniLM: the 64 shipped sentences, which are also the
evaluation set). Fidelity: digits test accuracy, MiniLM mean cosine of sentence embeddings
against the float model. Latency: :func:`graphsurgeon.latency.measure_latency` (2 threads,
graph optimizations on, batch 1), the sessions measured in interleaved rounds so that load
from other processes hits all of them alike; the figure is the median of the round medians.

    python benchmarks/quantize_int8.py [--rounds 5] [--repeats 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, quantize_static

import graphsurgeon as gs
from graphsurgeon.data import load_npz
from graphsurgeon.latency import measure_latency, session_for

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"
CALIB = 64


class Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def digits_case(tmp: Path) -> dict:
    train = np.load(MODELS / "digits_train.npz")
    test = np.load(MODELS / "digits_test.npz")
    float_path = tmp / "digits_float.onnx"
    gs.save(gs.run_pipeline(MODELS / "digits_cnn.onnx", "cleanup").model, float_path)
    calib = tmp / "digits_calib.npz"
    np.savez(calib, input=train["input"][:CALIB])

    def fidelity(path: Path) -> float:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": test["input"]})[0]
        return float((logits.argmax(1) == test["labels"]).mean())

    return {
        "name": "digits CNN",
        "float": float_path,
        "calib_npz": calib,
        "ort_feeds": [{"input": train["input"][i : i + 16]} for i in range(0, CALIB, 16)],
        "bench_feeds": [{"input": test["input"][i : i + 1]} for i in range(8)],
        "fidelity": fidelity,
        "metric": "test accuracy",
    }


def minilm_case(tmp: Path) -> dict:
    source = MODELS / "minilm_l6.onnx"
    data = dict(np.load(MODELS / "minilm_sentences.npz"))
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(
        ["sentence_embedding"], data
    )[0]

    def fidelity(path: Path) -> float:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(["sentence_embedding"], data)[0].astype(np.float64)
        ref = reference.astype(np.float64)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        return float(cos.mean())

    return {
        "name": "MiniLM-L6",
        "float": source,
        "calib_npz": MODELS / "minilm_sentences.npz",
        "ort_feeds": [{k: v[i : i + 16] for k, v in data.items()} for i in range(0, CALIB, 16)],
        "bench_feeds": [{k: v[i : i + 1] for k, v in data.items()} for i in range(8)],
        "fidelity": fidelity,
        "metric": "mean cosine",
    }


def run_case(case: dict, tmp: Path, rounds: int, repeats: int) -> dict:
    stem = case["name"].split()[0].lower()
    ours, theirs = tmp / f"{stem}_ours.onnx", tmp / f"{stem}_ort.onnx"
    model = gs.load(case["float"])
    calib = load_npz(case["calib_npz"], model)
    gs.save(gs.run_pipeline(model, "quantize-int8", calib=calib).model, ours)
    quantize_static(str(case["float"]), str(theirs), Reader(case["ort_feeds"]))
    paths = {"float": Path(case["float"]), "quantize-int8": ours, "ort quantize_static": theirs}
    sessions = {k: session_for(p, threads=2) for k, p in paths.items()}
    medians: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for key, session in sessions.items():
            stats = measure_latency(session, case["bench_feeds"], warmup=10, repeats=repeats)
            medians[key].append(stats.median_s)
    rows = {}
    for key, path in paths.items():
        rows[key] = {
            "latency_ms": 1e3 * statistics.median(medians[key]),
            "round_medians_ms": [round(1e3 * m, 4) for m in medians[key]],
            case["metric"]: case["fidelity"](path),
            "file_bytes": path.stat().st_size,
        }
    return {"model": case["name"], "metric": case["metric"], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="gs-bench-int8-") as tmp_dir:
        tmp = Path(tmp_dir)
        for make in (digits_case, minilm_case):
            result = run_case(make(tmp), tmp, args.rounds, args.repeats)
            results.append(result)
            print(f"\n{result['model']}  (latency: median of {args.rounds} round medians, "
                  f"{args.repeats} runs each, 2 threads, batch 1)")  # fmt: skip
            print(f"  {'model':22s} {'latency ms':>10s} {result['metric']:>14s} {'file MB':>9s}")
            for key, row in result["rows"].items():
                print(
                    f"  {key:22s} {row['latency_ms']:10.4f} {row[result['metric']]:14.5f} "
                    f"{row['file_bytes'] / 1e6:9.2f}"
                )
            ours, theirs = result["rows"]["quantize-int8"], result["rows"]["ort quantize_static"]
            print(f"  speed ratio ORT/ours: {theirs['latency_ms'] / ours['latency_ms']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

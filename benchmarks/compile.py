"""TVM-compiled models against onnxruntime on the CPU, same thread count, side by side.

For the digits CNN (batch 1, [1, 1, 8, 8], and batch 64), MiniLM-L6 (batch 1 x 35 tokens: the real
tokenized sentences, cut to 35) and MiniLM-L6 after ``quantize-weights`` int4 (ORT runs its
``MatMulNBits`` kernel, TVM our fused dequantize-matmul), it:

1. builds the model with ``graphsurgeon.kernels.tvm.compile_model`` untuned (hand schedules
   with default knobs), then tuned (``--tune-minutes`` in total, split over the models, with
   a fresh tuning database unless ``--database`` names one);
2. checks correctness on real inputs against onnxruntime on the *source* model (max abs
   error, cosine);
3. times onnxruntime (graph optimizations on, ``intra_op_num_threads = --threads``) and both
   TVM builds (thread pool of the same size) in interleaved rounds, and reports the median of
   the per-round latency ratios (TVM / ORT; < 1 is faster than ORT), so load from other jobs
   on a shared machine drifts out of the ratio.

The ``sparse`` section times one block-sparse layer (``x @ W``, ``W`` 512x2048 after
``prune-blocks`` at 90%, blocks 1x4 / 4x4 / 16x1, batch 1 and 16) three ways side by side:
onnxruntime and a dense TVM build on the pruned weight (zeros included), and the TVM build
whose BSR kernel skips the zero blocks (:mod:`graphsurgeon.kernels.tvm.sparse`).

    python benchmarks/compile.py [--models digits,digits-b64,minilm,minilm-int4] [--threads 1]
                                 [--tune-minutes 10] [--sections models,sparse] [--merge]
                                 [--rounds 15] [--json benchmarks/results/compile-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from graphsurgeon.kernels.tvm import compile_model, load

import graphsurgeon as gs
from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.profiles import load_profile

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("GRAPHSURGEON_EXAMPLES", ROOT / "examples" / "models"))
MINILM_SEQ = 35


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cases() -> dict[str, dict]:
    digits = np.load(MODELS / "digits_test.npz")
    sentences = np.load(MODELS / "minilm_sentences.npz")

    def cut(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[:, :MINILM_SEQ])

    minilm_feeds = [
        {k: cut(sentences[k])[i : i + 1] for k in ("input_ids", "attention_mask", "token_type_ids")}
        for i in range(16)
    ]
    return {
        "digits": {
            "model": MODELS / "digits_cnn.onnx",
            "shapes": {"input": [1, 1, 8, 8]},
            "feeds": [{"input": digits["input"][i : i + 1]} for i in range(16)],
        },
        # the same CNN at batch 64: the kernels' work, not the per-call overhead, dominates
        "digits-b64": {
            "model": MODELS / "digits_cnn.onnx",
            "shapes": {"input": [64, 1, 8, 8]},
            "feeds": [{"input": digits["input"][i * 64 : (i + 1) * 64]} for i in range(4)],
        },
        "minilm": {
            "model": MODELS / "minilm_l6.onnx",
            "shapes": {
                k: [1, MINILM_SEQ] for k in ("input_ids", "attention_mask", "token_type_ids")
            },
            "feeds": minilm_feeds,
        },
        # quantize-weights int4 (MatMulNBits, group 32): ORT's MatMulNBits kernel vs our fused
        # dequantize-matmul; both run the same quantized model
        "minilm-int4": {
            "model": MODELS / "minilm_l6.onnx",
            "quantize": [{"name": "quantize-weights", "options": {"bits": 4, "group_size": 32}}],
            "shapes": {
                k: [1, MINILM_SEQ] for k in ("input_ids", "attention_mask", "token_type_ids")
            },
            "feeds": minilm_feeds,
        },
    }


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def accuracy(fn, session, feeds) -> dict:
    names = [o.name for o in session.get_outputs()]
    worst, cosines = 0.0, []
    for feed in feeds:
        ref = dict(zip(names, session.run(None, feed), strict=True))
        got = fn(feed)
        for name in names:
            a, b = got[name].ravel().astype(np.float64), ref[name].ravel().astype(np.float64)
            worst = max(worst, float(np.abs(a - b).max()))
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return {"max_abs": worst, "min_cosine": min(cosines)}


def timed(run, feeds, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        run(feeds[i % len(feeds)])
    return (time.perf_counter() - t0) / n


def bench(runners: dict, feeds, rounds: int, target_s: float = 0.2) -> dict:
    for run in runners.values():  # warm-up
        timed(run, feeds, 5)
    per_call = timed(runners["ort"], feeds, 5)
    n = max(3, int(target_s / max(per_call, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            samples[name].append(timed(run, feeds, n))
    result = {f"{name}_ms": statistics.median(s) * 1e3 for name, s in samples.items()}
    for name in runners:
        if name != "ort":
            ratios = [t / o for t, o in zip(samples[name], samples["ort"], strict=True)]
            result[f"{name}_over_ort"] = statistics.median(ratios)
    result["calls_per_round"] = n
    return result


def sparse_model(k: int, n: int, block: str, sparsity: float) -> ir.Model:
    """``y = x @ W`` with ``W [k, n]`` Gaussian, then ``prune-blocks`` at ``sparsity``."""
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "bsr",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    spec = [{"name": "prune-blocks", "options": {"sparsity": sparsity, "block": block}}]
    return run_pipeline(ir.from_proto(proto), spec, verify="off").model


def bench_sparse(args, profile, work: Path) -> dict:
    """ORT (the pruned model, dense zeros), TVM dense and TVM BSR on one block-sparse MatMul.

    Both TVM builds are untuned (hand schedules, default knobs): the BSR kernels have no knobs.
    """
    k, n = (int(v) for v in args.sparse_shape.split("x"))
    rows = []
    for block in args.sparse_blocks.split(","):
        model = sparse_model(k, n, block, args.sparse_sparsity)
        path = work / f"sparse-{block}.onnx"
        gs.save(model, path)
        session = ort_session(path, args.threads)
        for batch in (int(b) for b in args.sparse_batches.split(",")):
            rng = np.random.default_rng(batch)
            feeds = [{"x": rng.standard_normal((batch, k)).astype(np.float32)} for _ in range(8)]
            runners = {"ort": lambda f, s=session: s.run(None, f)}
            row: dict = {"block": block, "batch": batch}
            for label, lower in (("tvm_dense", False), ("tvm_bsr", True)):
                build = compile_model(
                    path,
                    profile,
                    work / f"sparse-{block}-{batch}-{label}",
                    shapes={"x": [batch, k]},
                    threads=args.threads,
                    mcpu=args.mcpu,
                    block_sparse=lower,
                    database=work / "sparse-untuned.json",
                )
                meta = json.loads(build.meta_path.read_text())
                fn = load(build.lib_path, build.meta_path, threads=args.threads)
                runners[label] = fn
                row[f"{label}_accuracy"] = accuracy(fn, session, feeds[:4])
                if lower:
                    row["lowered"] = meta["block_sparse"]
            row.update(bench(runners, feeds, args.rounds))
            row["tvm_bsr_over_tvm_dense"] = row["tvm_bsr_ms"] / row["tvm_dense_ms"]
            rows.append(row)
            print(
                f"block {block:5s} batch {batch:3d} | ort {row['ort_ms'] * 1e3:8.1f} us | "
                f"tvm dense {row['tvm_dense_ms'] * 1e3:8.1f} us | tvm bsr "
                f"{row['tvm_bsr_ms'] * 1e3:8.1f} us ({row['tvm_bsr_over_ort']:.2f}x ORT, "
                f"{row['tvm_bsr_over_tvm_dense']:.2f}x dense TVM) | max abs err "
                f"{row['tvm_bsr_accuracy']['max_abs']:.1e}",
                flush=True,
            )
    return {
        "weight": [k, n],
        "block_sparsity": args.sparse_sparsity,
        "note": "prune-blocks on W [K, N]; block ROWSxCOLS of W; ORT and TVM dense run the "
        "pruned weight with its zeros; ratios are medians of per-round ratios",
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,digits-b64,minilm,minilm-int4")
    parser.add_argument("--sections", default="models,sparse", help="models and/or sparse")
    parser.add_argument("--sparse-shape", default="512x2048", help="weight KxN")
    parser.add_argument("--sparse-blocks", default="1x4,4x4,16x1")
    parser.add_argument("--sparse-batches", default="1,16")
    parser.add_argument("--sparse-sparsity", type=float, default=0.9)
    parser.add_argument(
        "--merge", action="store_true", help="keep the --json file's entries not re-measured"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tune-minutes", type=float, default=10.0, help="total, <= 20")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", default="x86-avx512-vnni")
    parser.add_argument("--mcpu", default="host", help="LLVM CPU; 'host' = this machine's")
    parser.add_argument("--database", default=None, help="tuning database (default: fresh)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/compile-cpu.json"))
    args = parser.parse_args(argv)
    if not 0 <= args.tune_minutes <= 20:
        parser.error("--tune-minutes must be within 0..20")
    sections = {x for x in args.sections.split(",") if x}
    names = [m for m in args.models.split(",") if m] if "models" in sections else []
    profile = load_profile(args.profile)
    work = Path(tempfile.mkdtemp(prefix="gs-compile-bench-"))
    database = Path(args.database) if args.database else work / "tuning.json"
    all_cases = cases()
    results: dict = {
        "device": {
            "cpu": cpu_name(),
            "llvm_cpu": __import__("tvm").target.codegen.llvm_get_system_cpu(),
            "cores_visible": os.cpu_count(),
            "mcpu": args.mcpu,
        },
        "settings": {
            "threads": args.threads,
            "tune_minutes": args.tune_minutes,
            "rounds": args.rounds,
            "profile": args.profile,
            "onnxruntime": ort.__version__,
            "tvm": __import__("tvm").__version__,
            "note": "shared machine: other jobs ran on the same cores; ratios are medians of "
            "interleaved rounds",
        },
        "models": {},
    }
    for name in names:
        case = all_cases[name]
        row: dict = {"shapes": case["shapes"]}
        if "quantize" in case:
            model = gs.load(case["model"], shapes=case["shapes"])
            quantized = run_pipeline(model, case["quantize"], verify="off").model
            case["model"] = work / f"{name}.onnx"
            gs.save(quantized, case["model"])
            row["quantize"] = case["quantize"]
        session = ort_session(case["model"], args.threads)
        builds = {}
        for label, seconds in (
            ("tvm_untuned", 0.0),
            ("tvm_tuned", args.tune_minutes * 60 / len(names)),
        ):
            build = compile_model(
                case["model"],
                profile,
                work / name / label,
                shapes=case["shapes"],
                threads=args.threads,
                tune_seconds=seconds,
                mcpu=args.mcpu,
                database=work / f"{label}-{name}.json" if label == "tvm_untuned" else database,
            )
            builds[label] = build
            meta = json.loads(build.meta_path.read_text())
            row[label] = {
                "build_seconds": round(build.seconds, 1),
                "tune_seconds": seconds,
                "tuning": meta["tuned"],
            }
        runners = {"ort": lambda f, s=session: s.run(None, f)}
        for label, build in builds.items():
            fn = load(build.lib_path, build.meta_path, threads=args.threads)
            row[label]["accuracy"] = accuracy(fn, session, case["feeds"])
            runners[label] = fn
        row["latency"] = bench(runners, case["feeds"], args.rounds)
        row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results["models"][name] = row
        lat = row["latency"]
        print(
            f"{name:7s} ort {lat['ort_ms']:.3f} ms | tvm untuned {lat['tvm_untuned_ms']:.3f} ms "
            f"({lat['tvm_untuned_over_ort']:.2f}x ORT) | tvm tuned {lat['tvm_tuned_ms']:.3f} ms "
            f"({lat['tvm_tuned_over_ort']:.2f}x ORT, target <= 1.0: "
            f"{'OK' if lat['tvm_tuned_over_ort'] <= 1.0 else 'MISSED'}) | max abs err "
            f"{row['tvm_tuned']['accuracy']['max_abs']:.1e}",
            flush=True,
        )
    if "sparse" in sections:
        results["block_sparse"] = bench_sparse(args, profile, work)
    out = Path(args.json)
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        results["models"] = {**old.get("models", {}), **results["models"]}
        results.setdefault("block_sparse", old.get("block_sparse"))
        # the rows kept were measured with the earlier run's settings
        results["settings"]["merged_from"] = old.get("settings")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

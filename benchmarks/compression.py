"""Every compression pass at a few strengths on the digits CNN and MiniLM-L6, side by side with
onnxruntime.quantization's ``quantize_dynamic`` and ``quantize_static`` (their defaults).

For each configuration (a pipeline spec run with ``run_pipeline(..., verify="structural")``
and written with ``graphsurgeon.save``) it measures:

- file size (the saved file, stat'ed) and parameter count (``graphsurgeon.stats.model_stats``);
- MatMul/Gemm weight bytes: every constant feeding a MatMul-family node (MatMul, Gemm,
  MatMulNBits, MatMulInteger, DynamicQuantizeMatMul, QLinearMatMul, MatMulIntegerToFloat), through any constant
  subgraph in front of it (DequantizeLinear with its scales and zero points, Cast, a codebook
  Gather...), biases and activation quantization parameters excluded;
- latency in onnxruntime (``graphsurgeon.latency``: 2 threads, graph optimizations on, median
  after warm-up) at a fixed shape applied the same way to every model (``--shape``-equivalent
  ``graphsurgeon.load(shapes=...)``): digits batch 64, MiniLM batch 1 x sequence 128 (sentence
  tokens padded). The original is re-measured alongside every configuration, the two taking
  turns in rounds, and the speedup is the median of the per-round ratios, so background load
  on a shared machine drifts out of the ratio;
- fidelity: digits test accuracy from the labels; MiniLM mean cosine of ``sentence_embedding``
  against the original over the real sentences, at their natural padded length, in batches.

Passes are discovered in the registry; a configuration whose pass is not registered, whose
options the pass does not accept, or that fails, becomes a row that says so: this script never
stops on a pass. Issue targets are printed OK/MISSED:
(a) prune-channels 50% of MiniLM's FFN neurons >= 1.3x faster than the original;
(b) quantize-int8 at least as fast as ORT quantize_static (ratio >= 1.0), equal or better
    fidelity;
(c) quantize-weights int4: MatMul weight bytes original / compressed >= 6x.

    python benchmarks/compression.py [--models digits,minilm] [--repeats 30] [--json OUT]
                                     [--quick] [--only PASS,...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static
from rich.console import Console
from rich.table import Table

import graphsurgeon as gs
from graphsurgeon.latency import LatencyStats, measure_latency, session_for
from graphsurgeon.stats import model_stats

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("GRAPHSURGEON_EXAMPLES", ROOT / "examples" / "models"))
THREADS = 2
WARMUP = 5
ROUNDS = 5  # latency: the original and the model under test alternate this many times
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_SEQ = 128
MINILM_CALIB = 64  # the first sentences calibrate (ours and ORT's static quantization)
DIGITS_LATENCY_BATCH = 64
EVAL_BATCH = 32
FFN_LAYERS = ".*intermediate/dense.*"
console = Console(width=200)


# -- configurations ---------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One row: a pass at one strength. ``options`` lists spellings of the same setting; the
    first one the registered pass's Options accepts is used (the passes are being written
    while this script is)."""

    label: str
    pass_name: str
    options: tuple[dict[str, Any], ...] = ({},)
    targets: dict[str, Any] | None = None

    def spec(self, options: dict[str, Any]) -> list[dict[str, Any]]:
        step: dict[str, Any] = {"name": self.pass_name, "options": options}
        if self.targets:
            step["targets"] = self.targets
        return [step]


def _calib_method(method: str) -> tuple[dict[str, Any], ...]:
    keys = ("calibration", "method", "calibrate_method", "calib_method", "calibration_method")
    return tuple({k: v} for k in keys for v in (method, method.lower()))


def _weight_bits(bits: int, group: int) -> tuple[dict[str, Any], ...]:
    return tuple(
        {"bits": b, g: group}
        for b in (bits, str(bits), f"int{bits}")
        for g in ("group_size", "block_size")
    )


FP16 = tuple({k: v} for k in ("dtype", "precision", "to") for v in ("fp16", "float16", "FLOAT16"))

COMMON_CONFIGS = (
    Config("prune-magnitude 50%", "prune-magnitude", ({"sparsity": 0.5},)),
    Config("prune-magnitude 75%", "prune-magnitude", ({"sparsity": 0.75},)),
    Config("prune-nm 2:4", "prune-nm", ({"pattern": "2:4"}, {"n": 2, "m": 4}, {"nm": "2:4"})),
    Config(
        "prune-blocks 4x4 50%",
        "prune-blocks",
        tuple(
            {k: v, "sparsity": 0.5}
            for k in ("block", "block_shape", "blocks")
            for v in ("4x4", [4, 4], (4, 4))
        ),
    ),
    Config("prune-channels 25%", "prune-channels", ({"ratio": 0.25},)),
    Config("prune-channels 50%", "prune-channels", ({"ratio": 0.5},)),
    Config("quantize-int8 minmax", "quantize-int8", _calib_method("minmax")),
    Config("quantize-int8 percentile", "quantize-int8", _calib_method("percentile")),
    Config("quantize-dynamic", "quantize-dynamic"),
    Config("quantize-weights int4 g32", "quantize-weights", _weight_bits(4, 32)),
    Config("quantize-weights int4 g128", "quantize-weights", _weight_bits(4, 128)),
    Config("quantize-weights int2 g32", "quantize-weights", _weight_bits(2, 32)),
    Config("cast-precision fp16", "cast-precision", FP16),
    Config("share-weights 4 bits", "share-weights", ({"bits": 4},)),
    Config("factorize-lowrank energy 0.9", "factorize-lowrank", ({"energy": 0.9},)),
    Config("factorize-lowrank energy 0.95", "factorize-lowrank", ({"energy": 0.95},)),
)
FFN_CONFIG = Config(
    "prune-channels FFN 50%", "prune-channels", ({"ratio": 0.5},), {"layers": [FFN_LAYERS]}
)
REMOVE_BLOCK = Config(
    "remove-layers 1 block",
    "remove-layers",
    ({"count": 1, "by": "sensitivity"}, {"count": 1}, {"blocks": 1}),
)
# The digits CNN is a plain chain: no residual branch or block that remove-layers could drop.
CONFIGS = {"digits": COMMON_CONFIGS, "minilm": (*COMMON_CONFIGS, FFN_CONFIG, REMOVE_BLOCK)}
INT8 = ("quantize-int8 minmax", "quantize-int8 percentile")
INT4 = ("quantize-weights int4 g32", "quantize-weights int4 g128")


# -- results ----------------------------------------------------------------------------
@dataclass
class Row:
    config: str
    status: str  # ok | not available | failed | unchanged | original | baseline
    pass_name: str | None = None
    spec: list[dict[str, Any]] | None = None
    note: str = ""
    pass_time_s: float | None = None
    size_bytes: int | None = None
    size_ratio: float | None = None  # original / this
    params: int | None = None
    matmul_weight_bytes: int | None = None
    matmul_ratio: float | None = None  # original / this
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_cv: float | None = None
    latency_runs: int | None = None
    original_latency_ms: float | None = None  # measured right before this row
    speedup: float | None = None  # original / this: median of the per-round ratios
    fidelity: float | None = None  # digits: test accuracy; minilm: mean cosine
    fidelity_min: float | None = None  # minilm: worst sentence's cosine
    fidelity_delta: float | None = None


@dataclass
class Case:
    """A model plus everything needed to measure one of its variants."""

    name: str
    path: Path
    calib: Path  # npz for our passes
    calib_feeds: list[dict[str, np.ndarray]]  # for ORT's CalibrationDataReader
    eval_feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    latency_shapes: dict[str, list[int]]
    latency_feeds: list[dict[str, np.ndarray]]
    fidelity_name: str
    reference: np.ndarray | None = None  # original's outputs on eval_feeds
    original_session: ort.InferenceSession | None = None
    rows: list[Row] = field(default_factory=list)

    def fidelity(self, path: Path) -> tuple[float, float | None]:
        session = session_for(path, threads=THREADS)
        out = np.concatenate([session.run([self.output], f)[0] for f in self.eval_feeds])
        if self.labels is not None:
            return float((out.argmax(1) == self.labels).mean()), None
        if self.reference is None:
            return 1.0, 1.0
        ref = self.reference
        cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
        return float(cos.mean()), float(cos.min())

    @property
    def output(self) -> str:
        return "logits" if self.name == "digits" else "sentence_embedding"


def _batches(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: a[i : i + size] for k, a in arrays.items()} for i in range(0, n, size)]


def _builder() -> Any:
    spec = importlib.util.spec_from_file_location("gs_examples_build", ROOT / "examples/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_case(tmp: Path, quick: bool) -> Case:
    paths = _builder().build_digits(MODELS_DIR)
    with np.load(paths["test"]) as test, np.load(paths["train"]) as train:
        x_test, labels, x_train = test["input"], test["labels"], train["input"]
    if quick:  # ORT's calibrator and our passes see fewer samples
        calib = tmp / "digits_calib.npz"
        np.savez(calib, input=x_train[:128])
        x_train = x_train[:128]
    else:
        calib = paths["train"]
    latency = [
        {"input": x_test[i : i + DIGITS_LATENCY_BATCH]}
        for i in range(0, 4 * DIGITS_LATENCY_BATCH, DIGITS_LATENCY_BATCH)
    ]
    return Case(
        name="digits",
        path=paths["model"],
        calib=calib,
        calib_feeds=_batches({"input": x_train}, 16),
        eval_feeds=_batches({"input": x_test}, 128),
        labels=labels,
        latency_shapes={"input": [DIGITS_LATENCY_BATCH, 1, 8, 8]},
        latency_feeds=latency,
        fidelity_name="accuracy",
    )


def _trim(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop padding columns past the longest sentence in this subset."""
    length = int(arrays["attention_mask"].sum(1).max())
    return {k: a[:, :length] for k, a in arrays.items()}


def _pad_to(arrays: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Pad (token id 0, mask 0, type 0: BERT's padding) or trim to ``length`` tokens."""
    seq = arrays["input_ids"].shape[1]
    if seq >= length:
        return {k: a[:, :length] for k, a in arrays.items()}
    return {k: np.pad(a, ((0, 0), (0, length - seq))) for k, a in arrays.items()}


def minilm_case(tmp: Path, quick: bool) -> Case:
    paths = _builder().build_minilm(MODELS_DIR)  # rebuilds the npz if sentences.txt changed
    with np.load(paths["sentences"]) as npz:
        tokens = {k: npz[k] for k in MINILM_INPUTS}
    n = len(tokens["input_ids"])
    if n < 200 and not quick:
        raise SystemExit(f"minilm: only {n} sentences in {paths['sentences']}; need >= 200")
    calib_tokens = _trim({k: a[:MINILM_CALIB] for k, a in tokens.items()})
    calib = tmp / "minilm_calib.npz"
    np.savez(calib, **calib_tokens)
    evaluate = {k: a[:48] for k, a in tokens.items()} if quick else tokens
    fixed = _pad_to({k: a[:8] for k, a in tokens.items()}, MINILM_SEQ)
    return Case(
        name="minilm",
        path=paths["model"],
        calib=calib,
        calib_feeds=_batches(calib_tokens, 8),
        eval_feeds=_batches(_trim(evaluate), EVAL_BATCH),
        labels=None,
        latency_shapes={k: [1, MINILM_SEQ] for k in MINILM_INPUTS},
        latency_feeds=_batches(fixed, 1),
        fidelity_name="cosine",
    )


# -- measuring --------------------------------------------------------------------------
_MATMUL_OPS = {
    "MatMul",
    "Gemm",
    "MatMulNBits",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "FusedMatMul",
}
# inputs that are not weights: biases, and the activation's quantization parameters
_NOT_WEIGHT = {
    "Gemm": {2},
    "MatMulNBits": {5},
    "MatMulInteger": {2},
    "DynamicQuantizeMatMul": {4},
    "QLinearMatMul": {1, 2, 6, 7},
    "MatMulIntegerToFloat": {2, 4, 6},  # a_scale, a_zero_point, bias
}


def matmul_weight_bytes(model: ir.Model) -> int:
    """Bytes of the constants feeding MatMul-family nodes (see the module docstring)."""
    memo: dict[ir.Value, list[ir.Value] | None] = {}

    def constants(value: ir.Value) -> list[ir.Value] | None:
        """The constant values ``value`` is computed from, or None if it needs an input."""
        if value in memo:
            return memo[value]
        memo[value] = None  # guards cycles (none in a valid graph)
        result: list[ir.Value] | None
        producer = value.producer()
        if value.const_value is not None and not value.is_graph_input():
            result = [value]
        elif producer is None:
            result = None
        elif producer.op_type == "Constant":
            result = [value]
        else:
            result = []
            for x in producer.inputs:
                if x is None:
                    continue
                sub = constants(x)
                if sub is None:
                    result = None
                    break
                result.extend(sub)
        memo[value] = result
        return result

    seen: dict[ir.Value, int] = {}
    for node in model.graph:
        if node.op_type not in _MATMUL_OPS:
            continue
        skip = _NOT_WEIGHT.get(node.op_type, set())
        for i, x in enumerate(node.inputs):
            if x is None or i in skip:
                continue
            for c in constants(x) or []:
                seen[c] = _tensor_bytes(c)
    return sum(seen.values())


def _tensor_bytes(value: ir.Value) -> int:
    tensor = value.const_value
    if tensor is None:  # a Constant node's output
        node = value.producer()
        attr = node.attributes.get("value") if node is not None else None
        if attr is None or attr.type != ir.AttributeType.TENSOR:
            return 0
        tensor = attr.as_tensor()
    return int(tensor.nbytes)


def _file_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def _fixed_shape_copy(path: Path, shapes: dict[str, list[int]]) -> Path:
    """The model with the latency shapes applied, as ``--shape`` would."""
    fixed = path.with_name(path.stem + ".fixed.onnx")
    gs.save(gs.load(path, shapes=shapes), fixed)
    return fixed


def _latency(case: Case, path: Path, repeats: int) -> tuple[LatencyStats, LatencyStats, float]:
    """(original, this model, speedup), measured in interleaved rounds.

    The machine is shared, so the load drifts: the original and this model take turns, a
    few runs each per round (order alternating), and the speedup is the median over rounds
    of the two round medians' ratio. The latencies reported are medians of round medians.
    """
    fixed = _fixed_shape_copy(path, case.latency_shapes)
    try:
        session = session_for(fixed, threads=THREADS)
        assert case.original_session is not None
        rounds = max(1, min(ROUNDS, repeats // 6))
        per_round = -(-repeats // rounds)  # at least ``repeats`` runs in all
        pairs = []
        for r in range(rounds):
            warmup = WARMUP if r == 0 else 1
            order = [case.original_session, session][:: 1 if r % 2 == 0 else -1]
            timed = {
                id(s): measure_latency(s, case.latency_feeds, warmup=warmup, repeats=per_round)
                for s in order
            }
            pairs.append((timed[id(case.original_session)], timed[id(session)]))
    finally:
        for p in fixed.parent.glob(fixed.name + "*"):
            p.unlink()
    speedup = statistics.median(o.median_s / t.median_s for o, t in pairs)
    return _pooled([o for o, _ in pairs]), _pooled([t for _, t in pairs]), speedup


def _pooled(rounds: list[LatencyStats]) -> LatencyStats:
    return LatencyStats(
        median_s=statistics.median(r.median_s for r in rounds),
        p90_s=statistics.median(r.p90_s for r in rounds),
        cv=statistics.median(r.cv for r in rounds),
        runs=sum(r.runs for r in rounds),
        threads=rounds[0].threads,
        min_s=min(r.min_s for r in rounds),
        max_s=max(r.max_s for r in rounds),
    )


def measure(case: Case, row: Row, files: list[Path], repeats: int) -> Row:
    """Fill in size, params, MatMul bytes, latency and fidelity for the model at files[0]."""
    path = files[0]
    original = case.rows[0] if case.rows else None
    row.size_bytes = _file_bytes(files)
    model = gs.load(path)
    row.params = model_stats(model).params
    row.matmul_weight_bytes = matmul_weight_bytes(model)
    del model
    before, this, row.speedup = _latency(case, path, repeats)
    row.latency_ms = this.median_s * 1e3
    row.latency_p90_ms = this.p90_s * 1e3
    row.latency_cv = this.cv
    row.original_latency_ms = before.median_s * 1e3
    row.latency_runs = this.runs
    row.fidelity, row.fidelity_min = case.fidelity(path)
    if original is not None:
        row.size_ratio = _ratio(original.size_bytes, row.size_bytes)
        row.matmul_ratio = _ratio(original.matmul_weight_bytes, row.matmul_weight_bytes)
        row.fidelity_delta = row.fidelity - (original.fidelity or 0.0)
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# -- running ----------------------------------------------------------------------------
def _resolve_options(cls: type, config: Config) -> dict[str, Any] | None:
    for options in config.options:
        try:
            cls.Options(**options)
        except Exception:
            continue
        return dict(options)
    return None


def run_config(case: Case, config: Config, passes: dict[str, type], tmp: Path, repeats: int) -> Row:
    row = Row(config.label, "not available", config.pass_name)
    cls = passes.get(config.pass_name)
    if cls is None:
        row.note = f"pass {config.pass_name!r} is not registered yet"
        return row
    options = _resolve_options(cls, config)
    if options is None:
        fields = ", ".join(getattr(cls.Options, "model_fields", {})) or "none"
        tried = " | ".join(json.dumps(o) for o in config.options[:3])
        row.note = f"{config.pass_name} accepts none of {tried} (its options: {fields})"
        return row
    row.spec = config.spec(options)
    try:
        model = gs.load(case.path)
        start = time.perf_counter()
        result = gs.run_pipeline(model, row.spec, calib=case.calib, verify="structural")
        row.pass_time_s = time.perf_counter() - start
        notes = {k: v for r in result.records for k, v in r.notes.items()}
        if not result.modified:
            row.status = "unchanged"
            row.note = _short(f"the pass changed nothing: {notes.get('skipped') or notes}")
            return row
        out = tmp / f"{case.name}-{_slug(config.label)}.onnx"
        files = gs.save(result.model, out)
        del model, result
        measure(case, row, files, repeats)
        row.status = "ok"
        if "skipped" in notes:
            row.note = _short(f"skipped: {notes['skipped']}")
        for p in files:
            p.unlink()
    except Exception as e:  # a pass under construction must not stop the benchmark
        row.status = "failed"
        row.note = _short(f"{type(e).__name__}: {e}")
        if os.environ.get("GS_BENCH_TRACEBACK"):
            traceback.print_exc()
    return row


class _Reader(CalibrationDataReader):
    """ORT's calibration data reader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._next = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._feeds)


def run_baseline(case: Case, label: str, tmp: Path, repeats: int) -> Row:
    row = Row(label, "baseline")
    out = tmp / f"{case.name}-{_slug(label)}.onnx"
    try:
        start = time.perf_counter()
        if label == "ort quantize_dynamic":
            quantize_dynamic(case.path, out)
        else:
            quantize_static(case.path, out, _Reader(case.calib_feeds))
        row.pass_time_s = time.perf_counter() - start
        row.spec = [{"onnxruntime.quantization": label.split()[-1], "options": "defaults"}]
        measure(case, row, [out], repeats)
    except Exception as e:
        row.status = "failed"
        row.note = _short(f"{type(e).__name__}: {e}")
    finally:
        out.unlink(missing_ok=True)
    return row


def run_case(
    case: Case, configs: tuple[Config, ...], passes: dict[str, type], tmp: Path, repeats: int
) -> None:
    console.print(f"[bold]{case.name}[/]: {case.path.name}")
    original = Row("original", "original", spec=[])
    files = gs.save(gs.load(case.path), tmp / f"{case.name}-original.onnx")
    fixed = _fixed_shape_copy(files[0], case.latency_shapes)
    case.original_session = session_for(fixed, threads=THREADS)
    if case.labels is None:
        session = session_for(files[0], threads=THREADS)
        case.reference = np.concatenate([session.run([case.output], f)[0] for f in case.eval_feeds])
    measure(case, original, files, repeats)
    original.size_ratio = original.matmul_ratio = 1.0
    original.fidelity_delta = 0.0
    case.rows.append(original)
    for label in ("ort quantize_dynamic", "ort quantize_static"):
        case.rows.append(_report(run_baseline(case, label, tmp, repeats)))
    for config in configs:
        case.rows.append(_report(run_config(case, config, passes, tmp, repeats)))


def _report(row: Row) -> Row:
    if row.status in ("ok", "baseline"):
        console.print(
            f"  {row.config}: {row.size_bytes / 1e6:.2f} MB, {row.latency_ms:.2f} ms "
            f"(x{row.speedup:.2f}), fidelity {row.fidelity:.4f}"
        )
    else:
        console.print(f"  {row.config}: [yellow]{row.status}[/]: {row.note}")
    return row


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- targets ----------------------------------------------------------------------------
def targets(case: Case) -> list[dict[str, Any]]:
    rows = {r.config: r for r in case.rows}

    def ok(row: Row | None) -> bool:
        return row is not None and row.status == "ok"

    out = []
    if case.name == "minilm":
        r = rows.get(FFN_CONFIG.label)
        out.append(
            _target(
                "(a) prune-channels FFN 50% speedup vs original >= 1.3x",
                r.speedup if ok(r) else None,
                1.3,
                _why(r),
            )
        )
    static = rows.get("ort quantize_static")
    for label in INT8:
        r = rows.get(label)
        have = ok(r) and static is not None and static.status == "baseline"
        # speedups are each relative to an adjacent original run: their ratio is ours vs ORT
        ratio = r.speedup / static.speedup if have else None
        out.append(
            _target(f"(b) {label} latency vs ORT quantize_static >= 1.0", ratio, 1.0, _why(r))
        )
        tolerance = 1e-3 if case.labels is not None else 1e-4
        delta = r.fidelity - static.fidelity if have else None
        out.append(
            _target(
                f"(b) {label} {case.fidelity_name} minus quantize_static's >= 0",
                delta,
                -tolerance,
                _why(r),
            )
        )
    for label in INT4:
        r = rows.get(label)
        out.append(
            _target(
                f"(c) {label} MatMul weight bytes original / compressed >= 6x",
                r.matmul_ratio if ok(r) else None,
                6.0,
                _why(r),
            )
        )
    return out


def _why(row: Row | None) -> str:
    if row is None:
        return "not configured"
    return "" if row.status == "ok" else f"{row.status}: {row.note}"


def _target(name: str, value: float | None, threshold: float, why: str) -> dict[str, Any]:
    status = "not available" if value is None else "OK" if value >= threshold else "MISSED"
    return {"target": name, "value": value, "threshold": threshold, "status": status, "why": why}


# -- output -----------------------------------------------------------------------------
def table(case: Case) -> Table:
    t = Table(title=f"{case.name}: compression vs original ({THREADS} threads)", show_lines=False)
    for col in ("config", "size MB (x)", "params", "MatMul bytes (x)", "latency ms (x)"):
        t.add_column(col, justify="left" if col == "config" else "right")
    t.add_column(f"{case.fidelity_name} (delta)", justify="right")
    t.add_column("note", overflow="fold", max_width=60)
    for r in case.rows:
        if r.size_bytes is None:
            t.add_row(r.config, *["-"] * 5, f"{r.status}: {r.note}")
            continue
        t.add_row(
            r.config,
            f"{r.size_bytes / 1e6:.3f} ({_x(r.size_ratio)})",
            f"{r.params / 1e6:.3f}M" if r.params is not None else "?",
            f"{r.matmul_weight_bytes / 1e6:.3f}M ({_x(r.matmul_ratio)})",
            f"{r.latency_ms:.3f} ({_x(r.speedup)})",
            f"{r.fidelity:.4f} ({r.fidelity_delta:+.4f})",
            r.note if r.status != "original" else f"cv {r.latency_cv:.2f}",
        )
    return t


def _x(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f}x"


def print_targets(rows: list[dict[str, Any]]) -> None:
    for t in rows:
        color = {"OK": "green", "MISSED": "red"}.get(t["status"], "yellow")
        value = "-" if t["value"] is None else f"{t['value']:.4g}"
        why = f"  ({_short(t['why'], 120)})" if t["why"] and t["value"] is None else ""
        console.print(f"  [{color}]{t['status']:>13}[/]  {t['target']}: {value}{why}")


def discover_passes() -> dict[str, type]:
    from graphsurgeon.registry import all_passes

    try:
        return all_passes()
    except Exception as e:  # a pass module mid-edit: keep whatever registered before it
        console.print(f"[yellow]note: loading passes failed ({_short(e, 200)}); using the rest")
        try:
            return all_passes()
        except Exception:
            return {}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm", help="comma list: digits,minilm")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per latency")
    parser.add_argument("--json", type=Path, help="write machine-readable results here")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer runs and samples")
    parser.add_argument(
        "--only", help="comma list of pass names to run (default: all); '' runs baselines only"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(CONFIGS)
    if unknown or not models:
        parser.error(f"--models takes {', '.join(CONFIGS)}")
    repeats = max(1, min(args.repeats, 5) if args.quick else args.repeats)
    only = None if args.only is None else {p.strip() for p in args.only.split(",") if p.strip()}

    passes = discover_passes()
    wanted = {c.pass_name for m in models for c in CONFIGS[m]}
    console.print(
        "registered compression passes: "
        + (", ".join(sorted(wanted & set(passes))) or "none")
        + "; missing: "
        + (", ".join(sorted(wanted - set(passes))) or "none")
    )
    results: dict[str, Any] = {
        "settings": {
            "threads": THREADS,
            "warmup": WARMUP,
            "repeats": repeats,
            "quick": args.quick,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="gs-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name in models:
            case = (digits_case if name == "digits" else minilm_case)(tmp, args.quick)
            configs = tuple(c for c in CONFIGS[name] if only is None or c.pass_name in only)
            start = time.perf_counter()
            run_case(case, configs, passes, tmp, repeats)
            console.print(table(case))
            checks = targets(case)
            print_targets(checks)
            results["models"][name] = {
                "model": str(case.path),
                "fidelity": case.fidelity_name,
                "latency_shape": case.latency_shapes,
                "eval_samples": int(sum(len(next(iter(f.values()))) for f in case.eval_feeds)),
                "rows": [asdict(r) for r in case.rows],
                "targets": checks,
                "time_s": time.perf_counter() - start,
            }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_name(args.json.name + ".tmp")
        tmp_json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        os.replace(tmp_json, args.json)
        console.print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

"""Self-surgery and recovery after heavy pruning, side by side with the same training budget.

On the digits CNN (train split: calibration and training; test split: accuracy) and MiniLM-L6
(mean cosine of ``sentence_embedding`` against the original over the real sentences), at 70%
and 90% unstructured sparsity (``prune-magnitude``; MiniLM: its MatMuls) and 50% of the
channels (``prune-channels``; MiniLM: its FFN neurons), each row is one pipeline run with
``graphsurgeon.run_pipeline`` from the original:

- prune only;
- prune + distill (S steps);
- prune + add-skips (lstsq fit to what the original computed, no training);
- prune + add-skips + distill (S steps);
- prune + regrow (S/2 steps) + distill (S/2 steps)  (unstructured settings);
- merge-channels, and merge-channels + distill (S steps)  (channel setting).

"nonzero" counts the layer weight elements that are not zero after the row's pipeline
(connections): add-skips adds dense projections, so its rows end up with more of them than
the prune-only row of the same setting, and the table says how many.

Rows that share leading steps (the pruning, the fitted skips) run them once and continue from
a copy; a row's time is the sum over all its steps. Every trained row spends the same S
optimizer steps (same batch size and learning rate: the pass's default on the digits CNN,
1e-4 on MiniLM, where a few Adam steps at the default 1e-3 wreck the pretrained weights). Distillation matches outputs (KD with
temperature, plus the labels where the data has them) and no intermediate features: a skip
adds to its destination layer's output, and matching that layer's own output to the
teacher's would pull against the skip.
"recovered" is the share of what prune-only lost that the row wins back:
``(metric - prune_only) / (original - prune_only)``. Target (issue #4): at 90% on the digits
CNN, surgery + recovery recovers >= 50%.

Torch runs on one thread and onnxruntime sessions of this script on one thread (the machine
is shared); timings are wall-clock and noisy. A pass that is not registered, or a row that
fails, becomes a row that says so.

    python benchmarks/surgery.py [--quick] [--models digits,minilm] [--steps S]
                                 [--minilm-steps S] [--json benchmarks/results/surgery-cpu.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

import graphsurgeon as gs
from graphsurgeon.plasticity import snapshot, summarize

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("GRAPHSURGEON_EXAMPLES", ROOT / "examples" / "models"))
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FFN_LAYERS = ".*intermediate/dense.*"
console = Console(width=180)


@dataclass
class Model:
    name: str
    path: Path
    calib: Path
    metric: str  # accuracy | cosine
    eval_feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    output: str
    steps: int
    batch_size: int
    lr: float | None  # None: the training pass's default
    matmul_targets: dict[str, Any] | None  # unstructured pruning targets
    channel_targets: dict[str, Any] | None
    skip_options: dict[str, Any]
    reference: np.ndarray | None = None


@dataclass
class Row:
    model: str
    setting: str
    variant: str
    status: str = "ok"  # ok | not available | failed
    metric: float | None = None
    delta: float | None = None  # vs the original
    recovered: float | None = None  # share of prune-only's loss won back
    train_steps: int = 0
    params: int | None = None
    nonzero: int | None = None  # layer weight elements that are not zero (connections)
    created: int | None = None
    pruned: int | None = None
    plasticity: float | None = None
    time_s: float | None = None
    note: str = ""


# -- models -----------------------------------------------------------------------------
def _builder() -> Any:
    spec = importlib.util.spec_from_file_location("gs_examples_build", ROOT / "examples/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batches(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: a[i : i + size] for k, a in arrays.items()} for i in range(0, n, size)]


def _trim(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    length = int(arrays["attention_mask"].sum(1).max())
    return {k: a[:, :length] for k, a in arrays.items()}


def digits(tmp: Path, quick: bool, steps: int) -> Model:
    paths = _builder().build_digits(MODELS_DIR)
    with np.load(paths["test"]) as test:
        x, labels = test["input"], test["labels"]
    return Model(
        name="digits",
        path=paths["model"],
        calib=paths["train"],
        metric="accuracy",
        eval_feeds=_batches({"input": x}, 256),
        labels=labels,
        output="logits",
        steps=steps,
        batch_size=32,
        lr=None,
        matmul_targets=None,
        channel_targets=None,
        skip_options={"max_skips": 3, "calib_samples": 256},
    )


def minilm(tmp: Path, quick: bool, steps: int) -> Model:
    paths = _builder().build_minilm(MODELS_DIR)
    with np.load(paths["sentences"]) as npz:
        tokens = {k: npz[k] for k in MINILM_INPUTS}
    calib = tmp / "minilm_calib.npz"
    np.savez(calib, **_trim({k: a[:64] for k, a in tokens.items()}))
    evaluate = {k: a[:48] for k, a in tokens.items()} if quick else tokens
    return Model(
        name="minilm",
        path=paths["model"],
        calib=calib,
        metric="cosine",
        eval_feeds=[_trim(b) for b in _batches(evaluate, 32)],
        labels=None,
        output="sentence_embedding",
        steps=steps,
        batch_size=8,
        lr=1e-4,
        matmul_targets={"op_types": ["MatMul"]},
        channel_targets={"layers": [FFN_LAYERS]},
        skip_options={"max_skips": 2, "calib_samples": 64, "ridge": 0.1},
    )


def evaluate(model: Model, onnx_model) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    session = gs.execution.make_session(onnx_model, options=options)
    out = np.concatenate([session.run([model.output], f)[0] for f in model.eval_feeds])
    if model.labels is not None:
        return float((out.argmax(1) == model.labels).mean())
    if model.reference is None:
        model.reference = out
    ref = model.reference
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    return float(cos.mean())


# -- rows -------------------------------------------------------------------------------
def _step(name: str, options: dict[str, Any], targets: dict[str, Any] | None = None) -> dict:
    step: dict[str, Any] = {"name": name, "options": options}
    if targets:
        step["targets"] = targets
    return step


def _train(model: Model, name: str, steps: int, passes: dict[str, type]) -> dict | None:
    """A training step (distill / regrow) with the options the registered pass accepts."""
    cls = passes.get(name)
    if cls is None:
        return None
    common = {
        "steps": steps,
        "progress": False,
        "batch_size": model.batch_size,
        "feature_layers": "none",
    }
    if model.lr is not None:
        common["lr"] = model.lr
    for extra in ({"teacher": str(model.path)}, {}):
        for drop in ((), ("feature_layers",), ("feature_layers", "batch_size")):
            options = {k: v for k, v in {**common, **extra}.items() if k not in drop}
            try:
                cls.Options(**options)
            except ValidationError:
                continue
            return _step(name, options)
    return None


def variants(model: Model, setting: str, passes: dict[str, type]) -> list[tuple[str, Any, int]]:
    """(label, pipeline or a reason it cannot run, training steps) for one setting."""
    s = model.steps
    if setting.startswith("unstructured"):
        sparsity = int(setting.split()[1].rstrip("%")) / 100
        prune = _step("prune-magnitude", {"sparsity": sparsity}, model.matmul_targets)
    else:
        prune = _step("prune-channels", {"ratio": 0.5}, model.channel_targets)
    skips = _step("add-skips", {"fit": "lstsq", "reference": str(model.path), **model.skip_options})
    distill = _train(model, "distill", s, passes)
    half = _train(model, "distill", s - s // 2, passes)
    regrow = _train(model, "regrow", s // 2, passes)
    rows: list[tuple[str, Any, int]] = [
        ("prune only", [prune], 0),
        ("prune + distill", [prune, distill] if distill else "distill not registered", s),
        ("prune + add-skips (lstsq)", [prune, skips], 0),
        (
            "prune + add-skips + distill",
            [prune, skips, distill] if distill else "distill not registered",
            s,
        ),
    ]
    if setting.startswith("unstructured"):
        ok = regrow and half
        rows.append(
            (
                "prune + regrow + distill",
                [prune, regrow, half] if ok else "regrow or distill not registered",
                s,
            )
        )
    else:
        merge = _step("merge-channels", {"ratio": 0.5}, model.channel_targets)
        rows.append(("merge-channels", [merge], 0))
        rows.append(
            ("merge-channels + distill", [merge, distill] if distill else "not registered", s)
        )
    return rows


class Prefixes:
    """Rows sharing leading steps (the same pruning, the same skips) run them once: the model
    after each prefix is kept and copied, with its records and time, for the rows after it."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[ir.Model, list[Any], float]] = {}

    def run(self, model: Model, spec: list[dict]) -> tuple[ir.Model, list[Any], float]:
        done, current, records, seconds = 0, None, [], 0.0
        for i in range(len(spec), 0, -1):
            hit = self.cache.get(json.dumps(spec[:i], sort_keys=True))
            if hit is not None:
                done, (cached, records, seconds) = i, hit
                current = ir.from_proto(ir.to_proto(cached))
                break
        for i in range(done, len(spec)):
            start = time.perf_counter()
            result = gs.run_pipeline(
                current if current is not None else model.path,
                [spec[i]],
                calib=model.calib,
                verify="structural",
            )
            current, records = result.model, [*records, *result.records]
            seconds += time.perf_counter() - start
            key = json.dumps(spec[: i + 1], sort_keys=True)
            self.cache[key] = (ir.from_proto(ir.to_proto(current)), records, seconds)
        assert current is not None
        return current, records, seconds


def run_row(model: Model, setting: str, label: str, spec: Any, steps: int, cache: Prefixes) -> Row:
    row = Row(model.name, setting, label, train_steps=steps)
    if isinstance(spec, str):
        row.status, row.note = "not available", spec
        return row
    try:
        onnx_model, records, seconds = cache.run(model, spec)
        row.metric = evaluate(model, onnx_model)
    except Exception as e:  # a row that fails says so; the benchmark goes on
        row.status = "failed"
        row.note = f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc(limit=3)
        return row
    row.time_s = round(seconds, 2)
    conn = summarize(records)
    row.created, row.pruned, row.plasticity = conn["created"], conn["pruned"], conn["plasticity"]
    row.params = records[-1].after.params if records[-1].after else None
    row.nonzero = sum(m.nonzero for m in snapshot(onnx_model).values())
    notes = [r.notes for r in records]
    for n in notes:
        if "skips" in n:
            row.note = "skips " + ", ".join(
                f"{s['src'].split('/')[-2]}->{s['dst'].split('/')[-2]}" for s in n["skips"]
            )
        if "merged_units" in n:
            row.note = f"merged {n['merged_units']} units, mean |corr| {n.get('mean_abs_corr')}"
    return row


def _finish(rows: list[Row], original: float) -> None:
    base = {r.setting: r.metric for r in rows if r.variant == "prune only" and r.metric}
    for r in rows:
        if r.metric is None:
            continue
        r.delta = round(r.metric - original, 6)
        lost = original - base.get(r.setting, original)
        if lost > 1e-9:
            r.recovered = round((r.metric - base[r.setting]) / lost, 4)


def table(model: Model, rows: list[Row], original: float) -> Table:
    t = Table(title=f"{model.name}: original {model.metric} {original:.4f}", title_justify="left")
    for col in ("setting", "variant", model.metric, "vs original", "recovered", "steps"):
        t.add_column(col)
    for col in ("params", "nonzero", "pruned", "created", "plasticity", "time", "note"):
        t.add_column(col)
    for r in rows:
        if r.metric is None:
            t.add_row(r.setting, r.variant, "-", "-", "-", str(r.train_steps), *["-"] * 6, r.note)
            continue
        t.add_row(
            r.setting,
            r.variant,
            f"{r.metric:.4f}",
            f"{r.delta:+.4f}",
            "-" if r.recovered is None else f"{100 * r.recovered:.0f}%",
            str(r.train_steps),
            f"{r.params / 1e3:.1f}K" if r.params else "?",
            f"{r.nonzero / 1e3:.1f}K" if r.nonzero is not None else "?",
            str(r.pruned),
            str(r.created),
            "-" if r.plasticity is None else f"{r.plasticity:.4f}",
            f"{r.time_s:.1f}s",
            r.note[:60],
        )
    return t


def target(rows: list[Row]) -> dict[str, Any]:
    surgery = [
        r
        for r in rows
        if r.model == "digits"
        and r.setting == "unstructured 90%"
        and r.recovered is not None
        and ("add-skips" in r.variant or "regrow" in r.variant)
    ]
    best = max(surgery, key=lambda r: r.recovered, default=None)
    value = None if best is None else best.recovered
    return {
        "target": "digits 90%: surgery + recovery wins back >= 50% of what prune-only lost",
        "best": None if best is None else best.variant,
        "recovered": value,
        "status": "n/a" if value is None else ("OK" if value >= 0.5 else "MISSED"),
    }


def device() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name} ({os.cpu_count()} cores, shared with other jobs)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--steps", type=int, default=None, help="digits training steps")
    parser.add_argument("--minilm-steps", type=int, default=None, help="MiniLM training steps")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    steps = {
        "digits": args.steps or (10 if args.quick else 100),
        "minilm": args.minilm_steps or (2 if args.quick else 4),
    }
    from graphsurgeon.registry import all_passes

    passes = all_passes()
    console.print(
        "passes: "
        + ", ".join(
            f"{p} {'ok' if p in passes else 'MISSING'}"
            for p in ("distill", "regrow", "add-skips", "merge-channels")
        )
    )
    settings = ["unstructured 70%", "unstructured 90%", "channels 50%"]
    results: dict[str, Any] = {
        "device": device(),
        "settings": {
            "quick": args.quick,
            "steps": steps,
            "torch_threads": 1,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
        "models": {},
    }
    all_rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gs-surgery-") as tmp_dir:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            build = {"digits": digits, "minilm": minilm}[name]
            model = build(Path(tmp_dir), args.quick, steps[name])
            original = evaluate(model, gs.load(model.path))  # MiniLM: its own reference, 1.0
            start = time.perf_counter()
            rows: list[Row] = []
            cache = Prefixes()
            for setting in settings:
                for label, spec, n in variants(model, setting, passes):
                    row = run_row(model, setting, label, spec, n, cache)
                    rows.append(row)
                    console.print(
                        f"  {name} {setting} {label}: "
                        + ("-" if row.metric is None else f"{row.metric:.4f}")
                        + (f" ({row.time_s}s)" if row.time_s else f" [{row.status}] {row.note}")
                    )
            _finish(rows, original)
            console.print(table(model, rows, original))
            all_rows += rows
            results["models"][name] = {
                "model": str(model.path),
                "metric": model.metric,
                "original": original,
                "train_steps": model.steps,
                "batch_size": model.batch_size,
                "lr": model.lr,
                "rows": [asdict(r) for r in rows],
                "time_s": round(time.perf_counter() - start, 1),
            }
    results["target"] = target(all_rows)
    t = results["target"]
    if t["recovered"] is not None:
        console.print(
            f"target {t['status']}: {t['target']}: recovered {100 * t['recovered']:.0f}% "
            f"({t['best']})"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_name(args.json.name + ".tmp")
        tmp_json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        os.replace(tmp_json, args.json)
        console.print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

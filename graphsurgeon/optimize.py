"""``graphsurgeon optimize``: from an ONNX file and a device profile to a verified bundle.

Stages, each checkpointed in a work folder so that an interrupted run (Ctrl-C, kill -9)
resumes where it stopped when the same command is run again:

1. **cleanup**: the ``cleanup`` pipeline, every pass verified numerically;
2. **sensitivity**: each layer pruned alone, the metric's drop recorded (a search feature and
   a report column);
3. **search**: :func:`graphsurgeon.search.tune` within the time left, policies committed to
   SQLite as they finish (so a resumed search loses no finished evaluation);
4. **selection**: the front's points, best reward first (then the baselines: onnxruntime's
   quantizers and uniform pruning), are rebuilt and checked against the two promises: accuracy no more than ``max_accuracy_drop`` below the original on the
   evaluation data, a smaller file, and latency measured side by side with the original
   (interleaved rounds, same backend and threads) no higher than the original's, beyond the
   original's own round-to-round spread. The first that keeps all three wins; if none does, nothing
   is written and the error says why;
5. **recovery**: when the pick prunes, a short ``distill`` from the original is tried and kept
   only if the metric improves;
6. **compile**: the fastest correct backend of the profile, bundled;
7. **verify**: the bundle against the source model (``graphsurgeon verify``'s checks);
8. **report**: ``report.html`` in the bundle, which then moves into place atomically.

Defaults are embedded: the local machine detected when no profile is given, generated inputs
when no data is (with a warning: "accuracy" then means fidelity to the original's outputs),
local workers and a SQLite study.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import atomic_write, load, save

STAGES = ("cleanup", "sensitivity", "search", "selection", "recovery", "compile", "verify")
DEFAULT_BUDGET = "5m"
# seconds kept back from the search for selection, recovery, compile, verify and the report
_RESERVE_S = 75.0
_MAX_CANDIDATES = 10


class NoSolutionError(GraphSurgeonError):
    """No compressed model kept the promises (faster, within the accuracy limit)."""

    exit_code = 4


@dataclass
class OptimizeConfig:
    model: Path
    output: Path
    profile: str | None = None
    calib: Path | None = None
    eval: Path | None = None
    metric: str | None = None
    max_accuracy_drop: float = 0.01
    budget: str = DEFAULT_BUDGET
    strategy: str = "ga"
    workers: int = 1
    seed: int = 0
    shapes: dict[str, list[int]] | None = None
    fresh: bool = False  # ignore saved progress
    work_root: Path | None = None

    def key(self) -> str:
        """What identifies a run for resuming: inputs and settings, not the budget."""
        h = hashlib.sha256()
        for path in (self.model, self.calib, self.eval):
            h.update(_digest(path).encode() if path else b"-")
        profile = self.profile or "detected"
        if self.profile and Path(self.profile).is_file():
            profile = _digest(Path(self.profile))
        rest = [profile, self.metric, self.max_accuracy_drop, self.strategy, self.seed, self.shapes]
        h.update(json.dumps(rest, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


def _digest(path: Path) -> str:
    from graphsurgeon.bundle import sha256_file

    return sha256_file(path)


def seconds(budget: str | float) -> float:
    """``300``, ``90s``, ``5m``, ``1h30m`` -> seconds."""
    import re

    if isinstance(budget, (int, float)):
        return float(budget)
    text = budget.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise GraphSurgeonError(
            f"--budget {budget!r}: expected seconds or a duration like 5m, 1h30m"
        )
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


class State:
    """Stage results in ``state.json``, written atomically after every stage."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "state.json"
        self.data: dict[str, Any] = {"stages": {}, "spent_s": 0.0}
        if self.path.is_file():
            # a state we cannot read is a fresh start, never a crash
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                self.data = json.loads(self.path.read_text())

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def record(self, stage: str, value: dict[str, Any]) -> None:
        self.data["stages"][stage] = value
        self.save()

    def save(self) -> None:
        with atomic_write(self.path) as f:
            json.dump(self.data, f, indent=2, default=str)


@dataclass
class OptimizeResult:
    bundle: Path
    backend: str
    original: dict[str, Any]
    final: dict[str, Any]
    policy: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def work_folder(config: OptimizeConfig) -> Path:
    root = config.work_root or Path(
        os.environ.get("GRAPHSURGEON_CACHE", Path.home() / ".cache" / "graphsurgeon")
    )
    return root / "optimize" / config.key()


def optimize(config: OptimizeConfig, log: Callable[[str], None] = print) -> OptimizeResult:
    from graphsurgeon.cli_artifacts import check_bundle_destination

    check_bundle_destination(config.output)
    budget_s = seconds(config.budget)
    work = work_folder(config)
    if config.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    state = State(work)
    if state.data["stages"]:
        log(f"resuming from {work} (done: {', '.join(state.data['stages'])})")
    started = time.perf_counter()
    spent_before = float(state.data.get("spent_s", 0.0))
    notes: list[str] = []

    def elapsed() -> float:
        return spent_before + time.perf_counter() - started

    def checkpoint(stage: str, value: dict[str, Any]) -> None:
        state.data["spent_s"] = elapsed()
        state.record(stage, value)

    profile, profile_path = _profile(config, work, log)
    calib, eval_path, generated = _data(config, work, log)
    if generated:
        notes.append(
            "no --calib/--eval: generated inputs were used, so 'accuracy' is fidelity to the "
            "original model's outputs"
        )

    # 1. cleanup
    clean_path = work / "clean.onnx"
    if not (state.done("cleanup") and clean_path.is_file()):
        t0 = time.perf_counter()
        log("1/7 cleanup")
        from graphsurgeon.pipeline import run_pipeline

        model = load(config.model, shapes=config.shapes)
        nodes_before = sum(1 for _ in model.graph.all_nodes())
        result = run_pipeline(model, "cleanup", calib=calib, verify="numeric")
        save(model, clean_path)
        checkpoint(
            "cleanup",
            {
                "seconds": time.perf_counter() - t0,
                "nodes": [nodes_before, sum(1 for _ in model.graph.all_nodes())],
                "passes": [{"pass": r.name, "time_s": r.time_s} for r in result.records],
            },
        )
    # 2. sensitivity
    if not state.done("sensitivity"):
        t0 = time.perf_counter()
        log("2/7 sensitivity (each layer pruned 50% alone)")
        from graphsurgeon.sensitivity import sensitivity_report

        report = sensitivity_report(
            load(clean_path),
            "prune-magnitude",
            calib=calib,
            eval_data=eval_path,
            metric=config.metric,
            strengths=[0.5],
            max_samples=128,
        )
        drift = {
            r["layer"]: r["drift"]
            for r in report["rows"]
            if isinstance(r.get("drift"), (int, float))
        }
        checkpoint("sensitivity", {"seconds": time.perf_counter() - t0, "drift": drift})
    sensitivity: dict[str, float] = state.done("sensitivity")["drift"]  # type: ignore[index]

    # 3. search
    search_dir = work / "search"
    search = state.done("search")
    if not search:
        t0 = time.perf_counter()
        left = budget_s - elapsed() - _RESERVE_S
        search_s = max(20.0, left)
        log(f"3/7 search ({config.strategy}, {search_s:.0f} s)")
        search = _search(
            config, clean_path, profile_path, calib, eval_path, search_dir, search_s, sensitivity
        )
        search["seconds"] = time.perf_counter() - t0
        checkpoint("search", search)

    # 4. selection
    clean = load(clean_path)
    selection = state.done("selection")
    chosen_path = work / "chosen.onnx"
    if not (selection and chosen_path.is_file()):
        t0 = time.perf_counter()
        log("4/7 selection (accuracy on the evaluation data, latency side by side)")
        selection = _select(config, clean, search, profile, calib, eval_path, chosen_path, log)
        selection["seconds"] = time.perf_counter() - t0
        checkpoint("selection", selection)
    if selection.get("failed"):
        raise NoSolutionError(selection["failed"])

    # 5. recovery
    recovered_path = work / "recovered.onnx"
    recovery = state.done("recovery")
    if not recovery:
        t0 = time.perf_counter()
        log("5/7 recovery")
        recovery = _recover(
            config, clean_path, chosen_path, recovered_path, selection, calib, eval_path, log
        )
        log(f"    {recovery['detail']}")
        recovery["seconds"] = time.perf_counter() - t0
        checkpoint("recovery", recovery)
    final_path = recovered_path if recovery.get("kept") else chosen_path
    final_model = load(final_path)

    # 6. compile (into the work folder; the bundle moves into place after verify)
    staging = work / "bundle"
    t0 = time.perf_counter()
    log("6/7 compile")
    from graphsurgeon.cli_artifacts import build_bundle

    final_metrics = recovery.get("metrics") or selection["metrics"]
    acceptance = {
        # the limit is on the metric optimize scored with; verify checks labelled accuracy
        # against it only when that metric was accuracy
        "metric": final_metrics.get("metric"),
        "max_accuracy_drop": config.max_accuracy_drop,
        "min_cosine": max(
            0.0,
            min(selection.get("cosine_generated", 1.0), final_metrics.get("cosine", 1.0)) - 0.005,
        ),
    }
    results = build_bundle(
        final_model,
        profile,
        staging,
        backend="auto",
        calib=_dataset(calib, final_model),
        shapes=config.shapes,
        tune_seconds=0.0,
        source=config.model,
        policy=selection.get("policy_spec"),
        metrics={"optimize": {"original": selection["original"], "final": final_metrics}},
        acceptance=acceptance,
        log=lambda s: log(f"    {s}"),
    )
    chosen_backend = next(r for r in results if r.status == "chosen")
    compile_s = time.perf_counter() - t0

    # 7. verify
    t0 = time.perf_counter()
    log("7/7 verify")
    from graphsurgeon.bundle_verify import verify_bundle

    verdict = verify_bundle(staging, config.model, data=eval_path)
    if not verdict.ok:
        failed = next(c for c in verdict.checks if not c.ok)
        raise NoSolutionError(
            f"the compiled bundle failed verification: {failed.name}: {failed.detail}"
        )
    verify_s = time.perf_counter() - t0

    stages = [
        {"stage": "cleanup", "status": "done", "seconds": state.done("cleanup")["seconds"],
         "detail": "nodes {} -> {}".format(*state.done("cleanup")["nodes"])},
        {"stage": "sensitivity", "status": "done", "seconds": state.done("sensitivity")["seconds"],
         "detail": f"{len(sensitivity)} layers"},
        {"stage": "search", "status": "done", "seconds": search.get("seconds"),
         "detail": f"{search.get('evaluations', 0)} policies, {len(search.get('front', []))} on the front"},
        {"stage": "selection", "status": "done", "seconds": selection.get("seconds"),
         "detail": selection.get("detail", "")},
        {"stage": "recovery", "status": "kept" if recovery.get("kept") else "skipped",
         "seconds": recovery.get("seconds"), "detail": recovery.get("detail", "")},
        {"stage": "compile", "status": chosen_backend.backend, "seconds": compile_s,
         "detail": "; ".join(f"{r.backend}: {r.status}" for r in results)},
        {"stage": "verify", "status": "ok", "seconds": verify_s,
         "detail": "; ".join(f"{c.name}: {c.detail}" for c in verdict.checks)},
    ]  # fmt: skip
    final = {**final_metrics, "latency_ms_bundle": chosen_backend.latency_ms}
    energy = {"original": _energy(clean, profile), "final": _energy(final_model, profile)}
    selection["original"]["energy"], final["energy"] = energy["original"], energy["final"]
    data = _report_data(
        config, profile, state, search, selection, final, stages, sensitivity, notes
    )
    from graphsurgeon.bundle import finalize_bundle
    from graphsurgeon.report import render_report

    finalize_bundle(staging, config.output, render_report(data))
    shutil.rmtree(work, ignore_errors=True)  # done: nothing left to resume
    return OptimizeResult(
        bundle=config.output,
        backend=chosen_backend.backend,
        original=selection["original"],
        final=final,
        policy=selection.get("policy", ""),
        stages=stages,
        notes=notes,
    )


# -- stages -----------------------------------------------------------------------------------
def _energy(model: ir.Model, profile) -> dict[str, Any] | None:
    """Energy per inference, measured (RAPL/NVML) where the machine allows, else estimated
    from the profile; None when the profile's device is not this machine's kind."""
    from graphsurgeon.measure import measure_model

    backend = "ort-cpu" if "ort-cpu" in profile.backends else None
    if backend is None:
        return None
    try:
        m = measure_model(model, profile, backend=backend)
    except GraphSurgeonError:
        return None
    return {"mj": m.energy_mj, "kind": m.energy_source}


def _profile(config: OptimizeConfig, work: Path, log: Callable[[str], None]):
    from graphsurgeon.profiles import dump_profile, load_profile

    if config.profile:
        profile = load_profile(config.profile)
        from graphsurgeon.profiles import shipped_profiles

        path = shipped_profiles().get(config.profile) or Path(config.profile)
        return profile, Path(path)
    path = work / "profile.yaml"
    if path.is_file():
        return load_profile(path), path
    from graphsurgeon.detect import detect_profile

    log("no --profile: detecting this machine (quick microbenchmarks)")
    profile = detect_profile(quick=True)
    with atomic_write(path) as f:
        f.write(dump_profile(profile))
    return profile, path


def _data(config: OptimizeConfig, work: Path, log: Callable[[str], None]):
    """(calib path, eval path, generated?) - generated inputs when none are given."""
    if config.calib or config.eval:
        calib = config.calib or config.eval
        return calib, config.eval or calib, False
    path = work / "generated.npz"
    if not path.is_file():
        from graphsurgeon.data import generate_inputs

        model = load(config.model, shapes=config.shapes)
        feeds = [generate_inputs(model, seed=i) for i in range(64)]
        arrays = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)
    log(
        "warning: no --calib or --eval: using generated inputs, so 'accuracy' means fidelity "
        "to the original model's outputs"
    )
    return path, path, True


def _dataset(path: Path | None, model: ir.Model):
    from graphsurgeon.data import load_npz

    return load_npz(path, model) if path else None


def _search(config, clean_path, profile_path, calib, eval_path, out, search_s, sensitivity):
    from graphsurgeon.search.db import PolicyDB
    from graphsurgeon.search.tune import tune

    url = f"sqlite:///{(out.parent / 'search.db').resolve()}"
    out.mkdir(parents=True, exist_ok=True)
    db = PolicyDB(url)
    exists = db.study("optimize") is not None
    db.close()
    kwargs: dict[str, Any] = {}
    import inspect

    if "sensitivity" in inspect.signature(tune).parameters:
        kwargs["sensitivity"] = sensitivity
    result = tune(
        clean_path,
        profile=str(profile_path),
        out_dir=out,
        calib=calib,
        eval_data=eval_path,
        metric=config.metric,
        strategy=config.strategy,
        budget=float(search_s),
        objectives=("accuracy", "latency", "size"),
        storage=url,
        resume=exists,
        study="optimize",
        workers=config.workers,
        max_accuracy_drop=config.max_accuracy_drop,
        seed=config.seed,
        shapes=config.shapes,
        prelude=(),
        progress=True,
        **kwargs,
    )
    front = sorted(result.front, key=lambda d: -(d.get("reward") or -1e18))
    return {
        "evaluations": result.evaluations,
        "failed": result.failed,
        "hypervolume": result.hypervolume,
        "front": front,
        "baselines": result.baselines,
        "storage": url,
        "notes": result.notes,
    }


def _policy_spec(search: dict[str, Any], point: dict[str, Any]) -> tuple[dict[str, Any], str]:
    from graphsurgeon.search.db import PolicyDB
    from graphsurgeon.search.policy import Policy

    db = PolicyDB(search["storage"])
    try:
        row = db.get(point["id"])
        if row is None:
            raise GraphSurgeonError(f"policy {point['id']} is not in the search database")
        raw = dict(row.policy)
    finally:
        db.close()
    if "decisions" in raw:
        policy = Policy.from_dict(raw)
        return policy.to_pipeline(prelude=False), policy.summary(limit=100)
    return {"steps": raw.get("steps", [])}, str(raw.get("steps"))


def _interleaved_latency(
    models: list[ir.Model], profile, feeds, rounds: int = 7
) -> tuple[list[float], float]:
    """Median over ``rounds`` of each model's median latency, the models timed in turn so
    that the machine's drift hits them alike, and the noise: the spread of the first model's
    round medians around their median (interquartile range / median, at least 0.5%)."""
    from graphsurgeon.compiler import measure_runner, ort_runner

    runners = [ort_runner(m, profile, spin=False) for m in models]
    samples: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, run in enumerate(runners):
            samples[i].append(measure_runner(run, feeds, profile)[0])
    medians = [float(np.median(s)) for s in samples]
    q1, q3 = np.percentile(samples[0], [25, 75])
    return medians, max(0.005, float(q3 - q1) / medians[0])


def _fidelity(model: ir.Model, reference: ir.Model, feeds) -> float:
    from graphsurgeon import execution
    from graphsurgeon.verify import drift

    a, b = execution.make_session(reference), execution.make_session(model)
    worst = 1.0
    for feed in feeds:
        d = drift(execution.run(a, feed), execution.run(b, feed))
        worst = min([worst, *(v["cosine"] for v in d.values())])
    return worst


def _score(model: ir.Model, clean: ir.Model, eval_path, metric) -> dict[str, float]:
    from graphsurgeon.metrics import evaluate

    return evaluate(model, eval_path, metric, reference=clean, max_samples=512)


def _select(config, clean, search, profile, calib, eval_path, chosen_path, log) -> dict[str, Any]:
    from graphsurgeon.compiler import static_feeds
    from graphsurgeon.model_io import weight_bytes
    from graphsurgeon.pipeline import run_pipeline
    from graphsurgeon.plasticity import summarize as summarize_plasticity

    base_scores = _score(clean, clean, eval_path, config.metric)
    head = next(iter(base_scores))
    feeds = static_feeds(clean, profile, _dataset(calib, clean), config.shapes)
    original = {
        "metric": head,
        "score": base_scores[head],
        "size_bytes": _file_size(clean),
        "weight_bytes": weight_bytes(clean),
    }
    reasons = []
    # The front, best reward first, then the baselines (onnxruntime's quantizers, uniform
    # pruning): a baseline that keeps the promises is a valid answer, and better than none.
    # Points the search measured as faster than the original come first (best reward first),
    # then the rest of the front (fastest first), then the baselines.
    baselines = [b for b in search.get("baselines", []) if b.get("name") != "original"]
    base_ms = next(
        (
            b["objectives"].get("latency_ms")
            for b in search.get("baselines", [])
            if b.get("name") == "original"
        ),
        None,
    )

    def latency(d: dict[str, Any]) -> float:
        return float(d.get("objectives", {}).get("latency_ms", float("inf")))

    faster = [d for d in search["front"] if base_ms is not None and latency(d) < base_ms]
    rest = sorted((d for d in search["front"] if d not in faster), key=latency)
    candidates = [*faster, *rest, *sorted(baselines, key=latency)]
    for point in candidates[:_MAX_CANDIDATES]:
        spec, summary = _policy_spec(search, point)
        model = clean.clone()
        try:
            rebuilt = run_pipeline(model, spec, calib=calib, verify="structural")
        except GraphSurgeonError as e:
            reasons.append(f"policy {point['id']} failed to rebuild: {e}")
            continue
        scores = _score(model, clean, eval_path, config.metric)
        drop = base_scores[head] - scores[head]
        if drop > config.max_accuracy_drop + 1e-9:
            reasons.append(
                f"policy {point['id']}: {head} drops {drop:.4f} > {config.max_accuracy_drop}"
            )
            log(f"    policy {point['id']}: rejected, {head} drops {drop:.4f}")
            continue
        size = _file_size(model)
        if size >= original["size_bytes"]:
            reasons.append(f"policy {point['id']}: {size} bytes is not smaller than the original")
            log(f"    policy {point['id']}: rejected, not smaller ({size} bytes)")
            continue
        (orig_ms, cand_ms), noise = _interleaved_latency([clean, model], profile, feeds)
        # "slower" = slower than the original's own round-to-round spread: two graphs that
        # compute the same thing (pruned zeros, weights decoded at load) tie within noise
        if cand_ms > orig_ms * (1 + noise):
            reasons.append(
                f"policy {point['id']}: {cand_ms:.4f} ms is slower than the original's "
                f"{orig_ms:.4f} ms (beyond its {noise:.1%} spread)"
            )
            log(
                f"    policy {point['id']}: rejected, {cand_ms:.4f} ms vs original {orig_ms:.4f} ms"
            )
            continue
        save(model, chosen_path)
        original["latency_ms"] = orig_ms
        cos_generated = _fidelity(model, clean, static_feeds(clean, profile, None, config.shapes))
        metrics = {
            "metric": head,
            "score": scores[head],
            "scores": scores,
            "drop": drop,
            "latency_ms": cand_ms,
            "latency_noise": noise,
            "size_bytes": size,
            "weight_bytes": weight_bytes(model),
            "cosine": scores.get("cosine", _fidelity(model, clean, feeds)),
        }
        log(
            f"    policy {point['id']}: {head} {scores[head]:.4f} (drop {drop:.4f}), "
            f"{cand_ms:.4f} ms vs {orig_ms:.4f} ms, {metrics['size_bytes']} vs {original['size_bytes']} bytes"
        )
        return {
            "original": original,
            "metrics": metrics,
            "policy": summary,
            "policy_spec": spec,
            "policy_id": point["id"],
            "cosine_generated": cos_generated,
            "plasticity": summarize_plasticity(rebuilt.records),
            "detail": f"policy {point['id']} of {len(search['front'])} on the front",
            "rejected": reasons,
        }
    why = "; ".join(reasons) if reasons else "the search found no policy within the constraints"
    return {
        "failed": f"nothing qualifies (faster than the original and within the accuracy limit): {why}"
    }


def _file_size(model: ir.Model) -> int:
    return len(ir.to_proto(model).SerializeToString())


def _recover(
    config, clean_path, chosen_path, out_path, selection, calib, eval_path, log
) -> dict[str, Any]:
    """A short distillation from the original when the pick prunes; kept only if it helps."""
    spec = selection.get("policy_spec") or {}
    text = json.dumps(spec)
    if "prune" not in text and "factorize" not in text and "share" not in text:
        return {"kept": False, "detail": "the pick does not prune, factorize or share weights"}
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return {"kept": False, "detail": "distill needs torch (pip install 'graphsurgeon[train]')"}
    from graphsurgeon.pipeline import run_pipeline

    model = load(chosen_path)
    try:
        trained = run_pipeline(
            model,
            [{"name": "distill", "options": {"teacher": str(clean_path), "steps": 150}}],
            calib=calib,
            verify="structural",
        )
    except GraphSurgeonError as e:
        return {"kept": False, "detail": f"distill failed: {e}"}
    clean = load(clean_path)
    scores = _score(model, clean, eval_path, config.metric)
    head = selection["metrics"]["metric"]
    before = selection["metrics"]["score"]
    if scores[head] <= before:
        return {
            "kept": False,
            "detail": f"distill: {head} {before:.4f} -> {scores[head]:.4f}, not kept",
        }
    save(model, out_path)
    metrics = {**selection["metrics"], "score": scores[head], "scores": scores}
    metrics["drop"] = selection["original"]["score"] - scores[head]
    metrics["cosine"] = scores.get("cosine", metrics.get("cosine"))
    from graphsurgeon.plasticity import summarize

    return {
        "plasticity": summarize(trained.records),
        "kept": True,
        "detail": f"{head} {before:.4f} -> {scores[head]:.4f}",
        "metrics": metrics,
    }


def _plasticity_text(selection: dict[str, Any], recovery: dict[str, Any]) -> str:
    parts = []
    for name, entry in (
        ("policy", selection.get("plasticity")),
        ("recovery", recovery.get("plasticity")),
    ):
        if entry:
            ratio = "n/a" if entry["plasticity"] is None else f"{entry['plasticity']:.4g}"
            parts.append(
                f"{name}: {entry['created']:,} created / {entry['pruned']:,} pruned = {ratio}"
            )
    return "; ".join(parts) or "-"


def _report_data(
    config, profile, state, search, selection, final, stages, sensitivity, notes, recovery=None
):
    original = selection["original"]
    head = original["metric"]

    def point(d: dict[str, Any], pareto: bool) -> dict[str, Any]:
        o, k = d.get("objectives", {}), d.get("kinds", {})
        acc = original["score"] - o["accuracy_drop"] if "accuracy_drop" in o else None
        return {
            "id": d.get("name") or d.get("id"),
            "accuracy": acc,
            "latency_ms": o.get("latency_ms"),
            "size_bytes": o.get("size_bytes"),
            "energy_mj": o.get("energy_mj"),
            "energy_kind": k.get("energy_mj"),
            "pareto": pareto,
            "policy": d.get("policy", ""),
            "status": d.get("status", "ok"),
        }

    points = [point(d, True) for d in search.get("front", [])]
    baselines = [point(d, False) for d in search.get("baselines", [])]
    for b in baselines:
        b["name"] = b.pop("id")
        if b["name"] == "original" and original.get("energy"):
            b["energy_mj"], b["energy_kind"] = original["energy"]["mj"], original["energy"]["kind"]
    energy = final.get("energy") or {}
    baselines.append(
        {
            "name": "graphsurgeon (bundle)",
            "accuracy": final.get("score"),
            "latency_ms": final.get("latency_ms"),
            "size_bytes": final.get("size_bytes"),
            "energy_mj": energy.get("mj"),
            "energy_kind": energy.get("kind"),
            "note": f"policy {selection.get('policy_id')}",
        }
    )
    layers = []
    decisions: dict[str, str] = {}
    for part in (selection.get("policy") or "").split(";"):
        if ":" in part:
            slot, _, what = part.partition(":")
            decisions[slot.strip()] = what.strip()
    from graphsurgeon.layers import find_layers

    ops = {layer.id: layer.op_type for layer in find_layers(load(state.folder / "clean.onnx"))}
    for layer, drift in sensitivity.items():
        layers.append(
            {
                "layer": layer,
                "op": ops.get(layer, ""),
                "decision": decisions.get(layer, "none"),
                "sensitivity": drift,
            }
        )
    for slot, what in decisions.items():
        if slot not in sensitivity:
            layers.append(
                {"layer": slot, "op": ops.get(slot, ""), "decision": what, "sensitivity": None}
            )
    passes = list((state.done("cleanup") or {}).get("passes", []))
    ratio = original.get("latency_ms", 0) / final["latency_ms"] if final.get("latency_ms") else None
    summary = [
        [f"{head} (original -> bundle)", f"{original['score']:.4f} -> {final['score']:.4f} (limit: drop <= {config.max_accuracy_drop})"],
        ["latency, ORT side by side", f"{original.get('latency_ms', float('nan')):.4f} ms -> {final['latency_ms']:.4f} ms ({ratio:.2f}x faster)" if ratio else "-"],
        ["size", f"{original['size_bytes']:,} -> {final['size_bytes']:,} bytes ({original['size_bytes'] / max(1, final['size_bytes']):.2f}x smaller)"],
        ["policy", selection.get("policy", "")],
        ["plasticity (connections created / pruned)", _plasticity_text(selection, recovery or {})],
        ["profile", profile.name],
        ["search", f"{config.strategy}, {search.get('evaluations', 0)} policies, {search.get('failed', 0)} failed"],
    ]  # fmt: skip
    return {
        "title": f"graphsurgeon optimize: {config.model.name}",
        "metric": head,
        "model": {"path": str(config.model)},
        "profile": profile.name,
        "objectives": ["accuracy", "latency", "size"],
        "summary": summary,
        "points": points,
        "baselines": baselines,
        "layers": layers,
        "passes": passes,
        "stages": stages,
        "notes": [*notes, *search.get("notes", []), *selection.get("rejected", [])],
    }

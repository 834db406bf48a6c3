"""``graphsurgeon compile``: pick a backend for a model on a device profile and write a bundle.

For every backend asked for (``auto``: every backend the profile lists), in order:

1. *available?* the library is installed and the device is here (no CUDA GPU means no
   ``ort-cuda``/``triton-cuda``: a clear skip, not a crash);
2. *build* the artifact (TVM: static shapes, Relax build, ``export_library``; Triton: lower
   packed/sparse layers to ``graphsurgeon`` custom ops bound to our kernels);
3. *correct?* its outputs on the measurement inputs match onnxruntime running the model given
   (cosine and max-abs error within the backend's tolerance: fp32 backends tight, fp16 ones
   looser);
4. *measure* its latency with the profile's settings (warm-up, repeats until the coefficient
   of variation is low, threads pinned).

The fastest correct backend wins. ``model.onnx`` is always in the bundle and runs in stock
onnxruntime, so onnxruntime on the CPU is the fallback when nothing the profile lists can run
here.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphsurgeon import execution
from graphsurgeon.data import Dataset, Feed, generate_inputs
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.measure import available_cpus, coefficient_of_variation, percentile, pinned
from graphsurgeon.profiles import HardwareProfile
from graphsurgeon.verify import drift

Runner = Callable[[Feed], dict[str, np.ndarray]]
CHOICES = ("auto", "ort", "tvm", "triton")
# (min cosine, max abs error relative to max(1, max|reference|)) per numeric precision
_TOLERANCE = {"fp32": (0.99999, 1e-3), "fp16": (0.999, 2e-2)}

__all__ = [
    "BackendResult",
    "candidate_backends",
    "compile_model_bundle",
    "measure_runner",
    "static_feeds",
]


@dataclass
class BackendResult:
    backend: str
    status: str  # chosen | ok | incorrect | unavailable | failed | slower
    detail: str = ""
    latency_ms: float | None = None
    p90_ms: float | None = None
    cv: float | None = None
    cosine: float | None = None
    max_abs: float | None = None
    build_s: float | None = None
    files: dict[str, Path] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("files")
        return out


def candidate_backends(profile: HardwareProfile, choice: str) -> list[str]:
    """The profile backends ``choice`` means, in the profile's order."""
    if choice not in CHOICES:
        raise GraphSurgeonError(f"--backend must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "auto":
        return list(profile.backends)
    listed = [b for b in profile.backends if b.startswith(choice)]
    if not listed:
        raise GraphSurgeonError(
            f"profile {profile.name} lists no {choice} backend (it has {', '.join(profile.backends)})"
        )
    return listed


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def availability(backend: str) -> str | None:
    """None when ``backend`` can run here, else why not."""
    if backend == "ort-cpu":
        return None
    if backend == "ort-cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDA provider here (needs onnxruntime-gpu and a CUDA GPU)"
        return None
    if backend.startswith("tvm"):
        if importlib.util.find_spec("tvm") is None:
            return "TVM is not installed (pip install 'graphsurgeon[tvm]')"
        if backend == "tvm-cuda" and not _cuda_available():
            return "no CUDA GPU on this machine"
        return None
    if backend == "triton-cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install 'graphsurgeon[triton]')"
        if not _cuda_available():
            return "no CUDA GPU on this machine: GPU kernels skipped"
        return None
    return f"unknown backend {backend}"


class _CallableSession:
    """Adapts a runner to the ``session.run(None, feed)`` that the timing loop calls."""

    def __init__(self, fn: Runner) -> None:
        self.fn = fn

    def run(self, _names: Any, feed: Feed) -> Any:
        return self.fn(feed)


def measure_runner(
    fn: Runner, feeds: Sequence[Feed], profile: HardwareProfile
) -> tuple[float, float, float]:
    """(median ms, p90 ms, cv) of ``fn`` with the profile's measurement settings."""
    from graphsurgeon.measure import timed_runs

    m = profile.measurement
    threads = min(profile.threads(), available_cpus())
    with pinned(threads):
        times, _stable = timed_runs(
            _CallableSession(fn),  # type: ignore[arg-type]
            feeds,
            warmup=m.warmup,
            repeats=m.repeats,
            max_repeats=m.max_repeats,
            target_cv=m.target_cv,
        )
    return (
        float(np.median(times)) * 1e3,
        percentile(times, 90) * 1e3,
        coefficient_of_variation(times),
    )


def ort_runner(
    model: ir.Model, profile: HardwareProfile, *, cuda: bool = False, spin: bool = True
) -> Runner:
    """onnxruntime with full graph optimizations, as a deployment would run it. ``spin=False``
    for sessions timed in turn with others: idle sessions' spinning pool threads would take
    the cores from the one being timed (see :func:`graphsurgeon.latency.measure_interleaved`)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = min(profile.threads(), available_cpus())
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None
    session = execution.make_session(model, options=options, providers=providers)
    return lambda feed: execution.run(session, feed)


def _build(
    backend: str,
    model: ir.Model,
    profile: HardwareProfile,
    work: Path,
    shapes: Mapping[str, list[int]],
    tune_seconds: float,
) -> tuple[Runner, dict[str, Path], dict[str, str], str]:
    """(runner, files for the bundle, artifact roles, precision) for one backend."""
    if backend.startswith("ort"):
        return ort_runner(model, profile, cuda=backend == "ort-cuda"), {}, {}, "fp32"
    if backend.startswith("tvm"):
        from graphsurgeon.kernels.tvm import compile_model, load

        build = compile_model(
            model,
            profile,
            work / "tvm",
            shapes=dict(shapes),
            tune_seconds=tune_seconds,
            target="cuda" if backend == "tvm-cuda" else "cpu",
        )
        lib, meta = Path(build.lib_path), Path(build.meta_path)
        files = {f"tvm/{lib.name}": lib, f"tvm/{meta.name}": meta}
        roles = {"tvm_lib": f"tvm/{lib.name}", "tvm_meta": f"tvm/{meta.name}"}
        return load(lib, meta), files, roles, "fp32"
    if backend == "triton-cuda":
        from graphsurgeon.kernels.triton.bind import bundle_files, load_lowered
        from graphsurgeon.model_io import save
        from graphsurgeon.pipeline import run_pipeline

        lowered = ir.from_proto(ir.to_proto(model))
        run_pipeline(lowered, "lower-kernels", verify="off")
        path = work / "triton" / "model_lowered.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        save(lowered, path)
        files = {"triton/model_lowered.onnx": path, **bundle_files(profile)}
        roles = {"triton_model": "triton/model_lowered.onnx"}
        return load_lowered(lowered), files, roles, "fp16"
    raise GraphSurgeonError(f"unknown backend {backend}")


def compile_model_bundle(
    model: ir.Model,
    profile: HardwareProfile,
    *,
    backend: str = "auto",
    feeds: Sequence[Feed],
    tune_seconds: float = 0.0,
    log: Callable[[str], None] = lambda _s: None,
) -> tuple[list[BackendResult], Path]:
    """Build, check and time every candidate backend; return the results (the winner marked
    ``chosen``) and the work folder holding their artifacts (the caller removes it)."""
    if not feeds:
        raise GraphSurgeonError("compile needs at least one input to check and time with")
    shapes = {k: list(v.shape) for k, v in feeds[0].items()}
    reference = ort_runner(model, profile)
    expected = [reference(f) for f in feeds]
    work = Path(tempfile.mkdtemp(prefix="gs-compile-"))
    results: list[BackendResult] = []
    explicit = backend != "auto"
    for name in candidate_backends(profile, backend):
        why = availability(name)
        if why:
            if explicit:
                shutil.rmtree(work, ignore_errors=True)
                raise GraphSurgeonError(f"--backend {backend}: {name} cannot run here: {why}")
            results.append(BackendResult(name, "unavailable", why))
            log(f"{name}: skipped ({why})")
            continue
        log(f"{name}: building")
        t0 = time.perf_counter()
        try:
            runner, files, roles, precision = _build(
                name, model, profile, work, shapes, tune_seconds
            )
            got = [runner(f) for f in feeds]
        except Exception as e:  # a backend that fails to build never stops the others
            if explicit:
                shutil.rmtree(work, ignore_errors=True)
                if isinstance(e, GraphSurgeonError):
                    raise
                raise GraphSurgeonError(f"{name} failed: {type(e).__name__}: {e}") from None
            text = str(e) if isinstance(e, GraphSurgeonError) else f"{type(e).__name__}: {e}"
            e = GraphSurgeonError(text.splitlines()[0] if text else type(e).__name__)
            results.append(BackendResult(name, "failed", str(e)))
            log(f"{name}: failed ({e})")
            continue
        build_s = time.perf_counter() - t0
        result = BackendResult(name, "ok", build_s=build_s, files=files, artifacts=roles)
        min_cos, max_rel = _TOLERANCE[precision]
        worst_cos, worst_abs, ok = 1.0, 0.0, True
        for ref, out in zip(expected, got, strict=True):
            for out_name, d in drift(ref, out).items():
                scale = max(1.0, float(np.max(np.abs(ref[out_name]), initial=0.0)))
                worst_cos = min(worst_cos, d["cosine"])
                worst_abs = max(worst_abs, d["max_abs"])
                if d["cosine"] < min_cos or d["max_abs"] > max_rel * scale:
                    ok = False
        result.cosine, result.max_abs = worst_cos, worst_abs
        if not ok:
            result.status = "incorrect"
            result.detail = (
                f"outputs differ from onnxruntime: cosine {worst_cos:.6f}, max abs {worst_abs:.3g}"
            )
            results.append(result)
            log(f"{name}: rejected ({result.detail})")
            if explicit:
                shutil.rmtree(work, ignore_errors=True)
                raise GraphSurgeonError(f"--backend {backend}: {result.detail}")
            continue
        result.latency_ms, result.p90_ms, result.cv = measure_runner(runner, feeds, profile)
        log(f"{name}: {result.latency_ms:.3f} ms median")
        results.append(result)
    timed = [r for r in results if r.status == "ok"]
    if not timed:
        # Nothing the profile lists runs here; model.onnx in onnxruntime on the CPU always does.
        result = BackendResult("ort-cpu", "ok", "fallback: no listed backend can run here")
        result.latency_ms, result.p90_ms, result.cv = measure_runner(reference, feeds, profile)
        result.cosine, result.max_abs = 1.0, 0.0
        results.append(result)
        timed = [result]
    best = min(timed, key=lambda r: r.latency_ms or float("inf"))
    best.status = "chosen"
    for r in timed:
        if r is not best:
            r.status = "slower"
    return results, work


def static_feeds(
    model: ir.Model,
    profile: HardwareProfile,
    calib: Dataset | None,
    shapes: Mapping[str, list[int]] | None = None,
) -> list[Feed]:
    """The inputs compile checks and times with: one batch of ``calib`` (the profile's batch
    size), else generated inputs with the model's static dims, ``shapes`` and the profile's
    ``measurement.shapes``."""
    if calib is not None:
        feeds = calib.feeds(
            max_samples=profile.measurement.batch, batch_size=profile.measurement.batch
        )
        if feeds:
            return feeds[:1]
    wanted = {**profile.measurement.shapes, **(shapes or {})}
    feed = generate_inputs(model, seed=0, batch=profile.measurement.batch)
    for value in model.graph.inputs:
        dims = wanted.get(value.name or "")
        if dims is not None and value.name in feed:
            feed[value.name] = _resize(feed[value.name], dims)
    return [feed]


def _resize(array: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """``array``'s values tiled into ``dims`` (keeps valid token ids / mask ones)."""
    flat = array.ravel()
    n = int(np.prod(dims))
    return np.resize(flat, n).reshape(tuple(dims)).astype(array.dtype)

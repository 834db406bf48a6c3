"""Load a bundle and run it: ``graphsurgeon.runtime.load(BUNDLE)(input=array)``.

Before anything runs, every file the manifest lists is hashed and compared: a missing or
altered file refuses the bundle (a file that is not what was verified must not be deployed).
The callable takes the source model's input names and returns its output names, whatever the
backend. When the bundle's backend cannot run here (TVM not installed, no CUDA GPU), ``load``
falls back to ``model.onnx`` in onnxruntime with a warning, unless ``strict=True``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphsurgeon.bundle import FORMAT, MANIFEST, MODEL, sha256_file
from graphsurgeon.errors import GraphSurgeonError

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

__all__ = ["Bundle", "backend_runner", "check_bundle", "load"]


def check_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the bundle at ``path``, after checking every file's sha256."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise GraphSurgeonError("no such bundle folder", where=root)
    if not manifest_path.is_file():
        raise GraphSurgeonError(f"not a bundle: {MANIFEST} is missing", where=root)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphSurgeonError(f"{MANIFEST} is not valid JSON: {e}", where=root) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise GraphSurgeonError(f"{MANIFEST} has no file list", where=root)
    if manifest.get("format") != FORMAT:
        raise GraphSurgeonError(
            f"bundle format {manifest.get('format')!r} is not {FORMAT} (made by another version)",
            where=root,
        )
    if MODEL not in manifest["files"]:
        raise GraphSurgeonError(f"{MANIFEST} does not list {MODEL}", where=root)
    for rel, expected in manifest["files"].items():
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts:
            raise GraphSurgeonError(
                f"{MANIFEST} lists a path outside the bundle: {rel}", where=root
            )
        file = root / rel_path
        if not file.is_file():
            raise GraphSurgeonError(f"file {rel} is missing", where=root)
        if sha256_file(file) != expected:
            raise GraphSurgeonError(
                f"file {rel} was altered (sha256 does not match the manifest)", where=root
            )
    return manifest


def backend_runner(root: Path, manifest: Mapping[str, Any], backend: str) -> Runner:
    """A callable running the bundle with ``backend``; raises GraphSurgeonError when the
    backend cannot run on this machine."""
    artifacts = manifest.get("artifacts") or {}
    if backend.startswith("ort"):
        return _ort_runner(root / MODEL, cuda=backend == "ort-cuda")
    if backend.startswith("tvm"):
        try:
            from graphsurgeon.kernels.tvm import load as tvm_load
        except ImportError as e:
            raise GraphSurgeonError(f"backend {backend} needs TVM ({e})") from None
        lib = artifacts.get("tvm_lib", "tvm/model.so")
        meta = artifacts.get("tvm_meta", "tvm/model.json")
        return tvm_load(root / lib, root / meta)
    if backend.startswith("triton"):
        try:
            from graphsurgeon.kernels.triton.bind import load_lowered
        except ImportError as e:
            raise GraphSurgeonError(f"backend {backend} needs Triton ({e})") from None
        from graphsurgeon.model_io import load as load_model

        lowered = artifacts.get("triton_model", "triton/model_lowered.onnx")
        return load_lowered(load_model(root / lowered))
    raise GraphSurgeonError(f"unknown backend {backend!r} in {MANIFEST}")


def _ort_runner(path: Path, *, cuda: bool = False) -> Runner:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if cuda:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise GraphSurgeonError("backend ort-cuda needs onnxruntime-gpu and a CUDA GPU")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=providers)
    except Exception as e:
        raise GraphSurgeonError(f"onnxruntime cannot load {path.name}: {e}") from None
    names = [o.name for o in session.get_outputs()]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feed), strict=True))

    return run


class Bundle:
    """A loaded bundle: call it with the source model's inputs, get its outputs by name."""

    def __init__(self, path: Path, manifest: dict[str, Any], runner: Runner, backend: str):
        self.path = path
        self.manifest = manifest
        self.backend = backend
        signature = manifest.get("signature") or {}
        self.input_names = [i["name"] for i in signature.get("inputs", [])]
        self.output_names = [o["name"] for o in signature.get("outputs", [])]
        self._runner = runner

    def __call__(
        self, feed: Mapping[str, np.ndarray] | None = None, /, **inputs: np.ndarray
    ) -> dict[str, np.ndarray]:
        given = {**(feed or {}), **inputs}
        missing = [n for n in self.input_names if n not in given]
        unknown = [n for n in given if n not in self.input_names]
        if missing or unknown:
            problem = f"missing inputs {missing}" if missing else f"unknown inputs {unknown}"
            raise GraphSurgeonError(f"{problem}; the model takes {self.input_names}")
        outputs = self._runner({n: np.asarray(given[n]) for n in self.input_names})
        return {n: outputs[n] for n in self.output_names}

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, backend={self.backend!r})"


def load(path: str | os.PathLike, *, backend: str | None = None, strict: bool = False) -> Bundle:
    """Check the bundle's hashes and return a callable for it.

    ``backend`` overrides the manifest's; ``strict`` makes an unavailable backend an error
    instead of a fallback to ``model.onnx`` in onnxruntime.
    """
    root = Path(path)
    manifest = check_bundle(root)
    chosen = backend or manifest.get("backend") or "ort-cpu"
    try:
        runner = backend_runner(root, manifest, chosen)
    except GraphSurgeonError as e:
        if strict or chosen == "ort-cpu":
            raise
        warnings.warn(f"{e}; running {MODEL} in onnxruntime on the CPU instead", stacklevel=2)
        chosen, runner = "ort-cpu", _ort_runner(root / MODEL)
    return Bundle(root, manifest, runner, chosen)

"""Deployable bundles: a folder with ``manifest.json``, ``model.onnx`` and backend artifacts.

Layout::

    BUNDLE/manifest.json     format, versions, backend, profile, policy, metrics, signature,
                             and the sha256 of every other file
    BUNDLE/model.onnx        always: the compressed model in standard ONNX (stock onnxruntime)
    BUNDLE/tvm/...           the TVM library (``export_library`` .so) and its metadata, when
                             TVM was chosen
    BUNDLE/triton/...        the lowered model, the Triton kernel sources and tuned configs,
                             when Triton was chosen
    BUNDLE/report.html       the run's report

A bundle is built in a temporary folder beside the destination and renamed into place, so a
failure (a full disk, an unwritable folder, Ctrl-C) never leaves a half-written bundle. An
existing bundle at the destination is replaced; any other non-empty folder is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import save
from graphsurgeon.profiles import HardwareProfile

MANIFEST = "manifest.json"
MODEL = "model.onnx"
REPORT = "report.html"
FORMAT = 1

__all__ = [
    "FORMAT",
    "MANIFEST",
    "MODEL",
    "REPORT",
    "finalize_bundle",
    "sha256_file",
    "versions",
    "write_bundle",
]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of everything that produced or can run the bundle (None: not installed)."""
    from graphsurgeon import __version__

    return {
        "graphsurgeon": __version__,
        "onnx": _dist_version("onnx"),
        "onnxruntime": _dist_version("onnxruntime") or _dist_version("onnxruntime-gpu"),
        "onnx-ir": _dist_version("onnx-ir"),
        "tvm": _dist_version("apache-tvm"),
        "triton": _dist_version("triton"),
        "torch": _dist_version("torch"),
    }


def _signature(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.is_initializer():
                continue
            dims = (
                None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
            )
            out.append(
                {"name": v.name, "dtype": None if v.dtype is None else v.dtype.name, "shape": dims}
            )
        return out

    return {"inputs": describe(model.graph.inputs), "outputs": describe(model.graph.outputs)}


def _is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def write_bundle(
    out_dir: str | os.PathLike,
    *,
    model: ir.Model,
    backend: str,
    profile: HardwareProfile,
    policy: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    acceptance: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    files: Mapping[str, str | os.PathLike | bytes] | None = None,
    artifacts: Mapping[str, str] | None = None,
    report_html: str | None = None,
) -> Path:
    """Write a bundle to ``out_dir`` atomically and return its path.

    ``files`` maps bundle-relative paths (``tvm/model.so``) to a file to copy or to bytes;
    ``artifacts`` names the ones the runtime needs by role (``{"tvm_lib": "tvm/model.so"}``).
    ``acceptance`` holds the thresholds ``graphsurgeon verify`` checks by default (for example
    ``{"min_cosine": 0.99}``); ``metrics`` what the producer measured.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GraphSurgeonError("exists and is not a folder", where=out)
    if out.is_dir() and any(out.iterdir()) and not _is_bundle(out):
        raise GraphSurgeonError(
            "folder is not empty and is not a graphsurgeon bundle; choose another -o", where=out
        )
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise GraphSurgeonError(f"cannot write here: {e.strerror or e}", where=parent) from None
    try:
        save(model, tmp / MODEL)
        for rel, content in (files or {}).items():
            target = _inside(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        if report_html is not None:
            (tmp / REPORT).write_text(report_html, encoding="utf-8")
        hashes = {
            p.relative_to(tmp).as_posix(): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "backend": backend,
            "versions": versions(),
            "profile": profile.model_dump(mode="json", exclude_none=True),
            "policy": dict(policy) if policy is not None else None,
            "metrics": dict(metrics or {}),
            "acceptance": dict(acceptance or {}),
            "source": dict(source or {}),
            "signature": _signature(model),
            "artifacts": dict(artifacts or {}),
            "files": hashes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, out)
    except BaseException as e:
        _discard(tmp, e, out)
        raise
    return out


def _discard(tmp: Path, error: BaseException, out: Path) -> None:
    """Remove the half-built bundle; an OS error (a full disk...) becomes one line."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(error, OSError):
        full = error.errno == errno.ENOSPC
        why = "no space left on device" if full else (error.strerror or str(error))
        if error.filename and not full:
            why = f"{why}: {error.filename}"
        raise GraphSurgeonError(f"cannot write the bundle: {why}", where=out) from None


def _inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths and ``..`` (bundle paths stay in the bundle)."""
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise GraphSurgeonError(f"bundle file path {rel!r} must be relative and inside the bundle")
    return root / path


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing bundle there is moved aside first and removed
    only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finalize_bundle(staging: Path, out: str | os.PathLike, report_html: str) -> Path:
    """Copy the checked bundle at ``staging`` to ``out`` with its final ``report.html``
    (re-hashed in the manifest), atomically, as :func:`write_bundle` does."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir() and any(out.iterdir()) and not _is_bundle(out):
        raise GraphSurgeonError(
            "folder is not empty and is not a graphsurgeon bundle; choose another -o", where=out
        )
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise GraphSurgeonError(f"cannot write here: {e.strerror or e}", where=parent) from None
    try:
        shutil.copytree(staging, tmp, dirs_exist_ok=True)
        (tmp / REPORT).write_text(report_html, encoding="utf-8")
        manifest = json.loads((tmp / MANIFEST).read_text())
        manifest["files"][REPORT] = sha256_file(tmp / REPORT)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, out)
    except BaseException as e:
        _discard(tmp, e, out)
        raise
    return out

"""Bundles: `compile` writes one, `runtime.load` runs it (and refuses a tampered one), `verify`
compares it with a reference. Outputs are checked against onnxruntime on the source model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from graphsurgeon import runtime
from graphsurgeon.bundle import sha256_file, write_bundle
from graphsurgeon.compiler import compile_model_bundle, static_feeds
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import load
from graphsurgeon.profiles import load_profile

CLI = [sys.executable, "-m", "graphsurgeon.cli"]


def gs(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def bundle(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "digits.bundle"
    r = gs(
        "compile", digits["model"], "--profile", "x86-avx512-vnni", "--backend", "ort",
        "-o", out, "--calib", digits["test"],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def test_compile_writes_a_complete_manifest(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backend"] == "ort-cpu"
    assert set(manifest["files"]) == {"model.onnx", "report.html"}
    for rel, digest in manifest["files"].items():
        assert sha256_file(bundle / rel) == digest
    assert manifest["versions"]["onnxruntime"] == ort.__version__
    assert manifest["profile"]["name"] == "x86-avx512-vnni"
    assert manifest["metrics"]["latency_ms"] > 0
    assert manifest["signature"]["inputs"][0]["name"] == "input"
    html = (bundle / "report.html").read_text()
    assert "<script src" not in html and "http" not in html.split("<body>", 1)[1]


def test_runtime_load_matches_onnxruntime_on_the_source(bundle: Path, digits) -> None:
    run = runtime.load(bundle)
    x = np.load(digits["test"])["input"][:32]
    session = ort.InferenceSession(str(digits["model"]), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    got = run(input=x)
    assert list(got) == [o.name for o in session.get_outputs()]
    np.testing.assert_allclose(got["logits"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(GraphSurgeonError, match="missing inputs"):
        run()


def test_tampered_bundles_are_refused(bundle: Path, tmp_path: Path) -> None:
    import shutil

    altered = tmp_path / "altered"
    shutil.copytree(bundle, altered)
    with open(altered / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(GraphSurgeonError, match=r"model\.onnx was altered"):
        runtime.load(altered)
    missing = tmp_path / "missing"
    shutil.copytree(bundle, missing)
    (missing / "report.html").unlink()
    with pytest.raises(GraphSurgeonError, match=r"report\.html is missing"):
        runtime.load(missing)
    r = gs("verify", altered, "--reference", bundle / "model.onnx")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "altered" in r.stderr


def test_verify_accepts_the_bundle_and_rejects_a_different_reference(
    bundle: Path, digits, tmp_path: Path
) -> None:
    r = gs("verify", bundle, "--reference", digits["model"], "--data", digits["test"], "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["fidelity"]["logits"]["cosine"] > 0.99999
    # A reference whose weights differ: the bundle does not reproduce it.
    proto = onnx.load(str(digits["model"]))
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim >= 2:
            rng = np.random.default_rng(0)
            init.CopyFrom(
                numpy_helper.from_array(rng.normal(size=w.shape).astype(w.dtype), init.name)
            )
    other = tmp_path / "other.onnx"
    onnx.save(proto, other)
    r = gs("verify", bundle, "--reference", other, "--data", digits["test"])
    assert r.returncode == 3
    assert "fidelity" in r.stderr and r.stderr.strip().count("\n") == 0


def test_gpu_backends_are_a_clear_skip_without_a_gpu(digits, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "b"
    r = gs(
        "compile", digits["model"], "--profile", "nvidia-h100-sxm", "--backend", "triton", "-o", out
    )
    assert r.returncode == 2
    assert "no CUDA GPU" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # auto: nothing the GPU profile lists runs here, so model.onnx in onnxruntime (CPU) is kept
    r = gs("compile", digits["model"], "--profile", "nvidia-h100-sxm", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    statuses = {x["backend"]: x["status"] for x in json.loads(r.stdout)}
    assert statuses["ort-cuda"] == "unavailable" and statuses["triton-cuda"] == "unavailable"
    assert statuses["ort-cpu"] == "chosen"


def test_auto_skips_a_backend_that_is_not_installed(digits, monkeypatch) -> None:
    import graphsurgeon.compiler as compiler

    real = compiler.importlib.util.find_spec
    monkeypatch.setattr(
        compiler.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tvm" else real(name, *a),
    )
    profile = load_profile("x86-avx512-vnni")
    model = load(digits["model"])
    results, work = compile_model_bundle(model, profile, feeds=static_feeds(model, profile, None))
    try:
        by = {r.backend: r for r in results}
        assert by["tvm-llvm"].status == "unavailable" and "not installed" in by["tvm-llvm"].detail
        assert by["ort-cpu"].status == "chosen"
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    with pytest.raises(GraphSurgeonError, match="TVM is not installed"):
        compile_model_bundle(
            model, profile, backend="tvm", feeds=static_feeds(model, profile, None)
        )


def test_bundle_writes_are_atomic(digits, tmp_path: Path) -> None:
    profile = load_profile("x86-avx512-vnni")
    model = load(digits["model"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(GraphSurgeonError, match="not a graphsurgeon bundle"):
        write_bundle(busy, model=model, backend="ort-cpu", profile=profile)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    # A failure half-way (an artifact that cannot be read) leaves nothing behind.
    out = tmp_path / "b"
    with pytest.raises(GraphSurgeonError, match=r"No such file or directory: .*nope"):
        write_bundle(
            out,
            model=model,
            backend="ort-cpu",
            profile=profile,
            files={"x/y.bin": tmp_path / "nope"},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    # An existing bundle is replaced whole.
    write_bundle(out, model=model, backend="ort-cpu", profile=profile, files={"a.txt": b"1"})
    write_bundle(out, model=model, backend="ort-cpu", profile=profile)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "busy"]
    with pytest.raises(GraphSurgeonError, match="inside the bundle"):
        write_bundle(out, model=model, backend="ort-cpu", profile=profile, files={"../x": b"1"})


def test_a_full_disk_is_one_line_and_leaves_nothing(digits, tmp_path: Path, monkeypatch) -> None:
    import errno

    import graphsurgeon.bundle as bundle_mod

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_mod.shutil, "copyfile", full)
    profile = load_profile("x86-avx512-vnni")
    model = load(digits["model"])
    out = tmp_path / "b"
    with pytest.raises(GraphSurgeonError, match="no space left on device"):
        write_bundle(
            out, model=model, backend="ort-cpu", profile=profile, files={"x.bin": digits["model"]}
        )
    assert list(tmp_path.iterdir()) == []

"""Round trip and ``cleanup`` on every model test shipped with the installed onnx package.

The models under ``onnx/backend/test/data/{light,simple,pytorch-converted,pytorch-operator}``
come from old exporters (opsets 6 to 12, IR versions 3 to 7), so they exercise the loader, the
saver and the ``cleanup`` passes on graphs we did not write. Most are IR 3, where every
initializer is also an overridable graph input, so ``cleanup`` rightly folds little there; the
point is that nothing breaks. For each model:

* our loader accepts it (the ONNX checker passes on the original);
* onnxruntime runs the original, else the case is skipped with onnxruntime's reason;
* saved and reloaded unchanged, it gives bitwise the same outputs as the original;
* after ``cleanup`` (structurally verified after every pass) it gives the original's outputs
  within :func:`graphsurgeon.verify.compare_exact`'s tolerance, and the stored reference
  outputs within the backend-test tolerance wherever onnxruntime itself agrees with them on
  the original;
* so does each pass of ``cleanup`` run alone, since inside ``cleanup`` a later pass can
  repair what an earlier one broke (fold-constants re-infers every type, for one).

``light/`` models have no input files: their stored outputs were computed by onnx's backend
runner on its deterministic dummy inputs (``arange(n) / n``), which we rebuild here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import graphsurgeon as gs
from graphsurgeon.pipeline import compile_pipeline, iter_pass_steps
from graphsurgeon.verify import compare_exact

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
KINDS = ("light", "simple", "pytorch-converted", "pytorch-operator")
# Stored outputs: onnx's backend tests use rtol 1e-3 (atol 1e-7) unless data.json says more;
# cleanup reassociates float math (BN folding, Gemm fusion), so allow atol 1e-4 on top.
REF_RTOL = 1e-3
REF_ATOL = 1e-4
# Light models that take over 2 s each on two cores; they still run in CI.
SLOW = {
    "light/light_densenet121",
    "light/light_inception_v2",
    "light/light_vgg19",
    "light/light_zfnet512",
}
CLEANUP_PASSES = [step.cls.name for step in iter_pass_steps(compile_pipeline("cleanup"))]

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Case:
    """One backend model: its file, its stored inputs and reference outputs."""

    id: str
    model: Path
    inputs: tuple[Path, ...]  # input_<i>.pb; empty for light models (dummy inputs)
    outputs: tuple[Path, ...]  # output_<i>.pb, or light_<name>_output_<i>.pb
    rtol: float
    atol: float


def _numbered(folder: Path, prefix: str) -> tuple[Path, ...]:
    files = []
    while (folder / f"{prefix}{len(files)}.pb").is_file():
        files.append(folder / f"{prefix}{len(files)}.pb")
    return tuple(files)


def _discover() -> list[Case]:
    cases = []
    for kind in KINDS:
        for entry in sorted((DATA / kind).iterdir()):
            if kind == "light":
                if entry.suffix == ".onnx":
                    outputs = _numbered(entry.parent, f"{entry.stem}_output_")
                    cases.append(Case(f"light/{entry.stem}", entry, (), outputs, 1e-3, 1e-7))
                continue
            if not (entry / "model.onnx").is_file():
                continue
            tolerances = {}
            if (entry / "data.json").is_file():
                tolerances = json.loads((entry / "data.json").read_text())
            data_set = entry / "test_data_set_0"
            cases.append(
                Case(
                    f"{kind}/{entry.name}",
                    entry / "model.onnx",
                    _numbered(data_set, "input_"),
                    _numbered(data_set, "output_"),
                    float(tolerances.get("rtol", 1e-3)),
                    float(tolerances.get("atol", 1e-7)),
                )
            )
    return cases


CASES = _discover()


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def _feeds(case: Case, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The stored inputs by name (``input_<i>`` is graph input ``i``), or the dummy inputs
    onnx's runner fed light models: ``arange(n) / n`` in the input's shape, unknown dims 1."""
    if case.inputs:
        feeds = {}
        for value, path in zip(proto.graph.input, case.inputs, strict=False):
            feeds[value.name] = numpy_helper.to_array(onnx.load_tensor(str(path)))
        return feeds
    initializers = {init.name for init in proto.graph.initializer}
    feeds = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
        n = int(np.prod(shape))
        feeds[value.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    return feeds


def _run(path: Path, feeds: Mapping[str, np.ndarray]) -> Outputs:
    """Outputs by name from a CPU session with graph optimizations off (our graph runs)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions; keep stderr quiet
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1  # bitwise-reproducible reductions
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values, strict=True))


def _stored(case: Case, proto: onnx.ModelProto) -> Outputs:
    return {
        value.name: numpy_helper.to_array(onnx.load_tensor(str(path)))
        for value, path in zip(proto.graph.output, case.outputs, strict=False)
    }


def _matches(got: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> bool:
    if got.shape != ref.shape:
        return False
    if ref.dtype.kind in "OSU" or got.dtype.kind in "OSU" or ref.dtype == np.bool_:
        return bool(np.array_equal(got, ref))
    return bool(np.allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True))


def _assert_bitwise(expected: Outputs, got: Outputs, what: str) -> None:
    assert list(got) == list(expected), f"{what}: outputs {list(got)} != {list(expected)}"
    for name, ref in expected.items():
        assert got[name].dtype == ref.dtype, f"{what}: output {name!r} dtype changed"
        np.testing.assert_array_equal(got[name], ref, err_msg=f"{what}: output {name!r}")


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.id in SLOW else []) for c in CASES],
)
def test_backend_model(case: Case, tmp_path: Path) -> None:
    proto = onnx.load(case.model)
    model = gs.load(case.model)  # runs the ONNX checker: every shipped model must pass
    non_tensor = [
        v.name
        for v in (*proto.graph.input, *proto.graph.output)
        if not v.type.HasField("tensor_type")
    ]
    if non_tensor:  # data sets would hold SequenceProto/MapProto/OptionalProto, not tensors
        pytest.skip(f"graph inputs/outputs {non_tensor} are not tensors; only tensors are compared")
    feeds = _feeds(case, proto)
    try:
        original = _run(case.model, feeds)
    except Exception as e:  # onnxruntime raises its own exception types per failure
        reason = _first_line(e).replace(str(case.model), case.id)
        pytest.skip(f"onnxruntime cannot run the original: {reason}")

    # Stored outputs are trusted for the outputs where onnxruntime reproduces them.
    tol = {"rtol": max(case.rtol, REF_RTOL), "atol": max(case.atol, REF_ATOL)}
    stored = _stored(case, proto)
    trusted = {k: v for k, v in stored.items() if k in original and _matches(original[k], v, **tol)}
    disagree = sorted(set(stored) - set(trusted))
    note = (
        f" (onnxruntime disagrees with the stored {disagree} on the original)" if disagree else ""
    )

    # (a) Round trip: load -> save -> load changes nothing observable.
    saved = tmp_path / "roundtrip.onnx"
    gs.save(model, saved)
    gs.load(saved)
    _assert_bitwise(original, _run(saved, feeds), "round trip")

    # (b) cleanup keeps the outputs within the exact-pass tolerance.
    result = gs.run_pipeline(model, "cleanup", verify="structural")
    cleaned_path = tmp_path / "cleanup.onnx"
    gs.save(result.model, cleaned_path)
    gs.load(cleaned_path)
    cleaned = _run(cleaned_path, feeds)
    assert list(cleaned) == list(original), f"cleanup changed the outputs {list(original)}"
    bad = compare_exact(original, cleaned)
    assert bad is None, f"cleanup changed output {bad[0]!r} by {bad[1]:.3g}{note}"
    for name, ref in trusted.items():
        assert _matches(cleaned[name], ref, **tol), (
            f"cleanup output {name!r} no longer matches the stored reference{note}"
        )

    # (c) Each cleanup pass alone: a pipeline that ends on any pass must give a valid model
    # (in `cleanup`, fold-constants runs last and could mask what an earlier step broke).
    for pass_name in CLEANUP_PASSES:
        single = gs.load(case.model)
        gs.run_pipeline(single, pass_name, verify="structural")
        path = tmp_path / f"{pass_name}.onnx"
        gs.save(single, path)
        bad = compare_exact(original, _run(path, feeds))
        assert bad is None, f"{pass_name} alone changed output {bad[0]!r} by {bad[1]:.3g}"

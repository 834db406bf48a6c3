"""Bad input never crashes: one line ``graphsurgeon: error: <file>: <problem>``, exit code 2,
no traceback, and nothing written.

Every case drives the real CLI in a subprocess, so what is checked is what a user sees: the
exit code, the whole of stderr, and the output folder afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphsurgeon.errors import ModelError
from graphsurgeon.model_io import load

CLI = [sys.executable, "-m", "graphsurgeon.cli"]
N = 16  # the tiny model: y = Relu(x @ W), x: [batch, N], W: [N, N] float32 (1 KiB)


# -- helpers ------------------------------------------------------------------------------
def gs(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def assert_user_error(
    result: subprocess.CompletedProcess[str], *needles: str, nothing_in: Path | None = None
) -> str:
    """Exit 2, exactly one stderr line starting ``graphsurgeon: error:`` that contains every
    needle, no traceback anywhere, and (if given) nothing left in the output folder."""
    shown = f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith("graphsurgeon: error: "), shown
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    if nothing_in is not None:
        assert_nothing_written(nothing_in)
    return line


def assert_nothing_written(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir())
    temps = [n for n in left if n.startswith(".gs-tmp-") or n.endswith(".tmp")]
    assert not temps, f"temp files left behind: {temps}"
    assert not left, f"a failed run wrote {left}"


def tiny_model(
    *,
    nodes: list[onnx.NodeProto] | None = None,
    weight: onnx.TensorProto | None = None,
    opsets: list[onnx.OperatorSetIdProto] | None = None,
) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])
    if weight is None:
        w = (np.arange(N * N, dtype=np.float32).reshape(N, N) / (N * N)) - 0.5
        weight = numpy_helper.from_array(w, "W")
    if nodes is None:
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ]
    graph = helper.make_graph(nodes, "tiny", [x], [y], [weight])
    return helper.make_model(
        graph, opset_imports=opsets or [helper.make_opsetid("", 17)], ir_version=8
    )


def external_weight(**entries: object) -> onnx.TensorProto:
    """W as an external tensor with hand-written ``external_data`` entries (location...)."""
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[N, N])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def write(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def work(tmp_path: Path) -> dict[str, Path]:
    """``models/`` holds inputs, ``out/`` receives outputs (and must stay empty on failure)."""
    models, out = tmp_path / "models", tmp_path / "out"
    models.mkdir()
    out.mkdir()
    good = write(tiny_model(), models / "good.onnx")
    return {"root": tmp_path, "models": models, "out": out, "good": good}


def run_cleanup(work: dict[str, Path], model: Path, *extra: object):
    out = work["out"]
    return gs("run", "cleanup", model, "-o", out / "out.onnx", "--report", out / "r.json", *extra)


# -- model files ----------------------------------------------------------------------------
def _missing(d: Path) -> Path:
    return d / "missing.onnx"


def _urandom(d: Path) -> Path:
    path = d / "random.onnx"
    path.write_bytes(np.random.default_rng(1234).bytes(4096))
    return path


def _text(d: Path) -> Path:
    path = d / "notes.onnx"
    path.write_text("this is not an ONNX model\nbut a text file\n")
    return path


def _empty(d: Path) -> Path:
    path = d / "empty.onnx"
    path.write_bytes(b"")
    return path


def _folder(d: Path) -> Path:
    path = d / "folder.onnx"
    path.mkdir()
    return path


def _truncated(fraction: float) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        data = tiny_model().SerializeToString()
        path = d / f"cut{int(fraction * 100)}.onnx"
        path.write_bytes(data[: max(1, int(len(data) * fraction))])
        return path

    return make


def _truncated_at(cut: int) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        data = tiny_model().SerializeToString()
        path = d / f"cut_at_{cut}.onnx"
        path.write_bytes(data[:cut])
        return path

    return make


def _undefined_value(d: Path) -> Path:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "ghost"], ["y"], name="add"),
    ]
    return write(tiny_model(nodes=nodes), d / "undefined.onnx")


def _dangling_output(d: Path) -> Path:
    model = tiny_model()
    model.graph.output[0].name = "nowhere"
    return write(model, d / "dangling_output.onnx")


def _unknown_op(d: Path) -> Path:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("FooBar", ["h"], ["y"], name="foo"),
    ]
    return write(tiny_model(nodes=nodes), d / "foobar.onnx")


MODEL_CASES = {
    "missing": (_missing, ["missing.onnx", "no such file"]),
    "urandom": (_urandom, ["random.onnx", "ONNX"]),
    "text": (_text, ["notes.onnx", "ONNX"]),
    "empty": (_empty, ["empty.onnx", "empty"]),
    "folder": (_folder, ["folder.onnx", "not a file"]),
    "truncated-half": (_truncated(0.5), ["cut50.onnx", "truncated"]),
    "truncated-1-byte": (_truncated_at(1), ["cut_at_1.onnx"]),
    "truncated-7-bytes": (_truncated_at(7), ["cut_at_7.onnx"]),
    "truncated-10%": (_truncated(0.1), ["cut10.onnx"]),
    "truncated-90%": (_truncated(0.9), ["cut90.onnx"]),
    "truncated-last-3-bytes": (_truncated_at(-3), ["cut_at_-3.onnx"]),
    "undefined-value": (_undefined_value, ["undefined.onnx", "'ghost'"]),
    "dangling-output": (_dangling_output, ["dangling_output.onnx", "'nowhere'"]),
    "unknown-op": (_unknown_op, ["foobar.onnx", "checker", "FooBar"]),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_file_run(work: dict[str, Path], case: str) -> None:
    make, needles = MODEL_CASES[case]
    result = run_cleanup(work, make(work["models"]))
    assert_user_error(result, *needles, nothing_in=work["out"])


@pytest.mark.parametrize(
    "case", ["missing", "urandom", "truncated-half", "undefined-value", "unknown-op"]
)
def test_bad_model_file_inspect(work: dict[str, Path], case: str) -> None:
    make, needles = MODEL_CASES[case]
    assert_user_error(gs("inspect", make(work["models"])), *needles)
    assert_user_error(gs("inspect", make(work["models"]), "--json"), *needles)


def test_truncated_digits_model(work: dict[str, Path], digits: dict[str, Path]) -> None:
    data = digits["model"].read_bytes()
    path = work["models"] / "digits_half.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_user_error(run_cleanup(work, path), "digits_half.onnx", nothing_in=work["out"])


def test_every_truncation_is_a_model_error(tmp_path: Path) -> None:
    """Each strict prefix of a model is refused with a one-line ModelError (in process: the
    subprocess cases above cover the CLI around it)."""
    data = tiny_model().SerializeToString()
    path = tmp_path / "prefix.onnx"
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelError) as info:
            load(path)
        message = str(info.value)
        assert message.startswith(str(path) + ": "), (cut, message)
        assert "\n" not in message, (cut, message)


def test_custom_domain_op_is_not_an_error(work: dict[str, Path]) -> None:
    """An op from a domain onnx does not know is someone's custom op, not a broken model."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Identity", ["h"], ["h2"], name="id"),
        helper.make_node("MyOp", ["h2"], ["y"], name="custom", domain="com.example", alpha=0.5),
    ]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    model = write(tiny_model(nodes=nodes, opsets=opsets), work["models"] / "custom.onnx")
    out = work["out"] / "out.onnx"
    result = gs("run", "cleanup", model, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    saved = onnx.load(out)
    custom = [n for n in saved.graph.node if n.op_type == "MyOp"]
    assert len(custom) == 1 and custom[0].domain == "com.example"
    assert custom[0].attribute[0].f == pytest.approx(0.5)
    assert [n.op_type for n in saved.graph.node] == ["MatMul", "MyOp"]  # cleanup still ran
    assert {o.domain: o.version for o in saved.opset_import}["com.example"] == 1
    inspected = gs("inspect", model, "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert '"com.example::MyOp": 1' in inspected.stdout


def test_model_onnxruntime_cannot_run_with_numeric_verify(work: dict[str, Path]) -> None:
    """--verify numeric needs onnxruntime; a model it cannot load is a user error, not a crash."""
    import onnxruntime as ort

    model = tiny_model()
    model.ir_version = onnx.IR_VERSION  # the checker's newest; onnxruntime often lags behind
    path = write(model, work["models"] / "future.onnx")
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ort_can_load = True
    except Exception:
        ort_can_load = False
    if not ort_can_load:
        line = assert_user_error(
            run_cleanup(work, path, "--verify", "numeric"),
            "future.onnx",
            "onnxruntime",
            nothing_in=work["out"],
        )
        assert "IR version" in line

    nodes = [helper.make_node("MyOp", ["x"], ["y"], name="custom", domain="com.example")]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    path = write(tiny_model(nodes=nodes, opsets=opsets), work["models"] / "custom.onnx")
    assert_user_error(
        run_cleanup(work, path, "--verify", "numeric"),
        "custom.onnx",
        "onnxruntime",
        "MyOp",
        nothing_in=work["out"],
    )


# -- external data ---------------------------------------------------------------------------
def _ext_model(d: Path, name: str, **entries: object) -> Path:
    return write(tiny_model(weight=external_weight(**entries)), d / name)


def test_external_data_absolute_location(work: dict[str, Path]) -> None:
    secret = work["root"] / "secret.bin"
    secret.write_bytes(b"\0" * 4 * N * N)
    model = _ext_model(work["models"], "abs.onnx", location=secret, offset=0, length=4 * N * N)
    line = assert_user_error(
        run_cleanup(work, model), "abs.onnx", "'W'", "absolute", nothing_in=work["out"]
    )
    assert str(secret) in line


def test_external_data_leaving_the_folder(work: dict[str, Path]) -> None:
    (work["root"] / "outside.bin").write_bytes(b"\0" * 4 * N * N)
    model = _ext_model(work["models"], "dotdot.onnx", location="../outside.bin")
    assert_user_error(
        run_cleanup(work, model),
        "dotdot.onnx",
        "'../outside.bin'",
        "outside",
        nothing_in=work["out"],
    )


def test_external_data_symlink_out_of_the_folder(work: dict[str, Path]) -> None:
    target = work["root"] / "outside.bin"
    target.write_bytes(b"\0" * 4 * N * N)
    (work["models"] / "weights.bin").symlink_to(target)
    model = _ext_model(work["models"], "link.onnx", location="weights.bin", length=4 * N * N)
    assert_user_error(
        run_cleanup(work, model), "link.onnx", "'weights.bin'", "outside", nothing_in=work["out"]
    )


def test_external_data_symlink_inside_the_folder_is_fine(work: dict[str, Path]) -> None:
    w = np.arange(N * N, dtype=np.float32)
    (work["models"] / "real.bin").write_bytes(w.tobytes())
    (work["models"] / "alias.bin").symlink_to("real.bin")
    model = _ext_model(work["models"], "alias.onnx", location="alias.bin", length=w.nbytes)
    result = run_cleanup(work, model)
    assert result.returncode == 0, result.stderr


def test_external_data_missing_file(work: dict[str, Path]) -> None:
    model = _ext_model(work["models"], "nodata.onnx", location="nodata.bin", length=4 * N * N)
    assert_user_error(
        run_cleanup(work, model), "nodata.onnx", "'nodata.bin'", "missing", nothing_in=work["out"]
    )


@pytest.mark.parametrize(
    ("size", "entries", "needle"),
    [
        (100, {"offset": 0, "length": 4 * N * N}, "truncated"),  # data shorter than length
        (4 * N * N, {"offset": 512, "length": 4 * N * N}, "truncated"),  # offset + length
        (100, {}, "truncated"),  # no length: the tensor's dims say how much is needed
        (4 * N * N, {"offset": 0, "length": 16}, "length"),  # length short of the dims
        (4 * N * N, {"offset": "abc"}, "offset"),
        (4 * N * N, {"offset": -8}, "negative"),
    ],
    ids=["short-data", "offset-past-end", "no-length", "length-vs-dims", "bad-offset", "negative"],
)
def test_external_data_too_short_or_bad(
    work: dict[str, Path], size: int, entries: dict, needle: str
) -> None:
    (work["models"] / "short.bin").write_bytes(b"\0" * size)
    model = _ext_model(work["models"], "short.onnx", location="short.bin", **entries)
    assert_user_error(run_cleanup(work, model), "short.onnx", "'W'", needle, nothing_in=work["out"])


# -- pipelines -----------------------------------------------------------------------------
PIPELINES = {
    "unknown-pass": (
        "p.yaml",
        "- fold-constants\n- name: fold-constantz\n",
        ["p.yaml", "step 2", "fold-constantz", "unknown pass", "did you mean fold-constants"],
    ),
    "wrong-type": (
        "p.yaml",
        "steps:\n  - name: fold-constants\n    options: {input_size_limit: lots}\n",
        ["p.yaml", "step 1", "fold-constants", "options.input_size_limit", "'lots'"],
    ),
    "out-of-range": (
        "p.yaml",
        "- eliminate-dead-code\n- name: fold-constants\n  options: {output_size_limit: -5}\n",
        ["p.yaml", "step 2", "options.output_size_limit", "greater than or equal to 0", "-5"],
    ),
    "unknown-option": (
        "p.yaml",
        "- name: fold-batchnorm\n  options: {epsilon: 1}\n",
        ["p.yaml", "step 1", "epsilon"],
    ),
    "nested-step": (
        "p.yaml",
        "- repeat:\n    - eliminate-dead-code\n    - {name: fold-constants, options: {input_size_limit: 1.5}}\n",
        ["p.yaml", "step 1.2", "input_size_limit"],
    ),
    "bad-targets": (
        "p.yaml",
        "- {name: eliminate-dead-code, targets: {op_types: [Conv]}}\n",
        ["p.yaml", "step 1", "targets"],
    ),
    "invalid-yaml": ("p.yaml", "steps: [fold-constants\n  - {name: : x\n", ["p.yaml", "YAML"]),
    "invalid-json": ("p.json", '{"steps": [', ["p.json", "JSON"]),
    "binary": ("p.yaml", None, ["p.yaml", "pipeline file"]),
    "scalar": ("p.yaml", "42\n", ["p.yaml", "list of steps"]),
    "string": ("p.yaml", "fold-constants\n", ["p.yaml", "list of steps"]),
    "empty": ("p.yaml", "", ["p.yaml", "list of steps"]),
    "steps-not-a-list": ("p.yaml", "steps: fold-constants\n", ["p.yaml", "list of steps"]),
    "unknown-key": ("p.yaml", "name: x\nstep: []\n", ["p.yaml", "'step'"]),
}


@pytest.mark.parametrize("case", list(PIPELINES))
def test_bad_pipeline(work: dict[str, Path], case: str) -> None:
    name, text, needles = PIPELINES[case]
    spec = work["models"] / name
    if text is None:
        spec.write_bytes(b"\xae\xff\x00" + np.random.default_rng(7).bytes(256))
    else:
        spec.write_text(text)
    out = work["out"]
    result = gs("run", spec, work["good"], "-o", out / "out.onnx", "--report", out / "r.json")
    assert_user_error(result, *needles, nothing_in=out)


def test_missing_pipeline_file_and_unknown_pass_name(work: dict[str, Path]) -> None:
    out = work["out"] / "out.onnx"
    assert_user_error(
        gs("run", work["models"] / "nope.yaml", work["good"], "-o", out),
        "nope.yaml",
        "no such pipeline file",
        nothing_in=work["out"],
    )
    assert_user_error(
        gs("run", "fold-constantz", work["good"], "-o", out),
        "fold-constantz",
        "unknown pass",
        nothing_in=work["out"],
    )


# -- --shape -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "needles"),
    [
        ("nope=1x16", ["good.onnx", "'nope'", "inputs: x"]),
        ("x=1x16x3", ["good.onnx", "rank 3"]),
        ("x=1x15", ["good.onnx", "dim 1 is fixed to 16"]),
        ("x=1xa", ["--shape", "'x=1xa'", "integers"]),
        ("x", ["--shape", "'x'", "NAME=DIMS"]),
        ("=1x16", ["--shape", "'=1x16'", "NAME=DIMS"]),
        ("x=", ["--shape", "'x='", "NAME=DIMS"]),
        ("x=-1x16", ["--shape", "'x=-1x16'", ">= 0"]),
    ],
)
def test_bad_shape(work: dict[str, Path], shape: str, needles: list[str]) -> None:
    assert_user_error(
        run_cleanup(work, work["good"], "--shape", shape), *needles, nothing_in=work["out"]
    )
    assert_user_error(gs("inspect", work["good"], "--shape", shape), *needles)


# -- calibration data ----------------------------------------------------------------------
def _npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as f:  # a file object: savez must not append ".npz"
        np.savez(f, **arrays)
    return path


def _npy(path: Path, array: np.ndarray) -> Path:
    with open(path, "wb") as f:  # a single .npy array under an .npz name
        np.save(f, array)
    return path


CALIB = {
    "missing-input": (
        lambda p: _npz(p, other=np.zeros((4, N), np.float32)),
        ["missing input(s) x", "other"],
    ),
    "wrong-dtype": (
        lambda p: _npz(p, x=np.zeros((4, N), np.float64)),
        ["'x'", "float64", "float32"],
    ),
    "wrong-shape": (lambda p: _npz(p, x=np.zeros((4, N - 1), np.float32)), ["'x'", "[4, 15]"]),
    "wrong-rank": (lambda p: _npz(p, x=np.zeros((4,), np.float32)), ["'x'", "shape [4]"]),
    "labels-count": (
        lambda p: _npz(p, x=np.zeros((4, N), np.float32), labels=np.zeros(3, np.int64)),
        ["labels"],
    ),
    "no-samples": (lambda p: _npz(p, x=np.zeros((0, N), np.float32)), ["no samples"]),
    "object-array": (
        lambda p: _npz(p, x=np.array([{"a": 1}] * 4, dtype=object)),
        ["not a valid .npz"],
    ),
    "text": (lambda p: p.write_text("x,1,2,3\n") and p, ["not a .npz file"]),
    "npy": (lambda p: _npy(p, np.zeros((4, N), np.float32)), ["not a .npz"]),
    "random": (lambda p: p.write_bytes(np.random.default_rng(3).bytes(999)) and p, ["not a .npz"]),
}


@pytest.mark.parametrize("case", list(CALIB))
def test_bad_calibration_file(work: dict[str, Path], case: str) -> None:
    make, needles = CALIB[case]
    path = work["models"] / "calib.npz"
    make(path)
    result = run_cleanup(work, work["good"], "--calib", path, "--verify", "numeric")
    assert_user_error(result, "calib.npz", *needles, nothing_in=work["out"])


def test_missing_calibration_file(work: dict[str, Path]) -> None:
    result = run_cleanup(work, work["good"], "--calib", work["models"] / "none.npz")
    assert_user_error(result, "none.npz", "no such file", nothing_in=work["out"])


# -- output locations --------------------------------------------------------------------------
def test_output_folder_does_not_exist(work: dict[str, Path]) -> None:
    result = gs("run", "cleanup", work["good"], "-o", work["out"] / "no" / "such" / "m.onnx")
    assert_user_error(result, "such", "folder does not exist", nothing_in=work["out"])


def test_output_folder_is_a_file(work: dict[str, Path]) -> None:
    blocker = work["models"] / "blocker"
    blocker.write_text("")
    result = gs("run", "cleanup", work["good"], "-o", blocker / "m.onnx")
    assert_user_error(result, "blocker", "folder does not exist")
    assert blocker.read_text() == ""


def test_output_is_a_folder(work: dict[str, Path]) -> None:
    target = work["out"] / "taken.onnx"
    target.mkdir()
    result = gs("run", "cleanup", work["good"], "-o", target)
    assert_user_error(result, "taken.onnx", "folder")
    assert [p.name for p in work["out"].iterdir()] == ["taken.onnx"]
    assert not any(target.iterdir())


def test_unwritable_output_folder(work: dict[str, Path]) -> None:
    locked = work["out"] / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes (see the /proc case)")
        result = gs(
            "run", "cleanup", work["good"], "-o", locked / "m.onnx", "--report", locked / "r.json"
        )
        assert_user_error(result, "locked", "not writable", nothing_in=locked)
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_folder_where_nobody_can_write(work: dict[str, Path]) -> None:
    """/proc refuses new files even for root, so this case runs everywhere on Linux."""
    result = gs("run", "cleanup", work["good"], "-o", "/proc/gs-out.onnx")
    assert_user_error(result, "/proc")
    assert not Path("/proc/gs-out.onnx").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_report_writes_no_model(work: dict[str, Path]) -> None:
    """All or nothing: when the report cannot be written, the model is not left behind."""
    out = work["out"] / "out.onnx"
    result = gs("run", "cleanup", work["good"], "-o", out, "--report", "/proc/gs-report.json")
    assert_user_error(result, "/proc", nothing_in=work["out"])


def test_report_folder_problems(work: dict[str, Path]) -> None:
    out = work["out"] / "out.onnx"
    result = gs(
        "run", "cleanup", work["good"], "-o", out, "--report", work["out"] / "no" / "r.json"
    )
    assert_user_error(result, "no", "report folder does not exist", nothing_in=work["out"])
    (work["out"] / "r.json").mkdir()
    result = gs("run", "cleanup", work["good"], "-o", out, "--report", work["out"] / "r.json")
    assert_user_error(result, "r.json", "folder")
    assert [p.name for p in work["out"].iterdir()] == ["r.json"]


def test_dump_ir_on_a_file(work: dict[str, Path]) -> None:
    blocker = work["models"] / "dump"
    blocker.write_text("keep me")
    result = run_cleanup(work, work["good"], "--dump-ir", blocker)
    assert_user_error(result, "dump", nothing_in=work["out"])
    assert blocker.read_text() == "keep me"


def test_failed_run_keeps_the_previous_output(work: dict[str, Path]) -> None:
    """A failure late in the run (bad calibration data) leaves an existing output untouched."""
    out = work["out"] / "out.onnx"
    out.write_bytes(b"previous")
    calib = _npz(work["models"] / "calib.npz", x=np.zeros((4, N), np.float64))
    result = gs("run", "cleanup", work["good"], "-o", out, "--calib", calib, "--verify", "numeric")
    assert_user_error(result, "calib.npz", "float64")
    assert out.read_bytes() == b"previous"
    assert [p.name for p in work["out"].iterdir()] == ["out.onnx"]


def test_numeric_verify_on_generated_inputs_the_model_rejects(work: dict[str, Path]) -> None:
    """Generated ints are not valid shapes for Expand: say so and point to --calib."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c"])
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"], name="expand")], "g", [x, shape], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = write(model, work["models"] / "expand.onnx")
    line = assert_user_error(
        run_cleanup(work, path, "--verify", "numeric"),
        "expand.onnx",
        "--calib",
        nothing_in=work["out"],
    )
    assert "generated inputs" in line

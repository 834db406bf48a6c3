"""Loading and saving: lazy external data, relative data locations, models over 2 GiB,
atomic and deterministic saves."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import load, save
from graphsurgeon.pipeline import run_pipeline

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((64, 64)).astype(np.float32)  # 16 KiB: external
B1 = RNG.standard_normal(64).astype(np.float32)  # 256 B: stays in the .onnx file
W2 = RNG.standard_normal((64, 32)).astype(np.float32)  # 8 KiB: external
B2 = RNG.standard_normal(32).astype(np.float32)
X = RNG.standard_normal((5, 64)).astype(np.float32)


def mlp_proto() -> onnx.ModelProto:
    """x -> Identity -> MatMul+Add -> Relu -> MatMul+Add: cleanup removes the Identity and
    fuses both MatMul+Add pairs into Gemm."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])
    inits = [
        numpy_helper.from_array(W1, "W1"),
        numpy_helper.from_array(B1, "B1"),
        numpy_helper.from_array(W2, "W2"),
        numpy_helper.from_array(B2, "B2"),
    ]
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"], name="id"),
        helper.make_node("MatMul", ["x1", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "B1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "B2"], ["y"], name="add2"),
    ]
    graph = helper.make_graph(nodes, "mlp", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save_with_external_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mlp.onnx"
    onnx.save_model(
        mlp_proto(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.data",
        size_threshold=1024,
    )
    return path


def ort_run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def external_locations(path: Path) -> dict[str, str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        t.name: {e.key: e.value for e in t.external_data}["location"]
        for t in proto.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".gs-tmp-") or p.name.endswith(".tmp")
    )


# -- external data -------------------------------------------------------------------------
def test_external_data_source_layout(tmp_path: Path) -> None:
    path = save_with_external_data(tmp_path / "src")
    assert external_locations(path) == {"W1": "weights.data", "W2": "weights.data"}
    assert (tmp_path / "src" / "weights.data").stat().st_size == W1.nbytes + W2.nbytes


def test_external_data_loads_lazily(tmp_path: Path) -> None:
    path = save_with_external_data(tmp_path / "src")
    data = tmp_path / "src" / "weights.data"
    model = load(path)
    w1, w2 = (model.graph.initializers[n].const_value for n in ("W1", "W2"))
    assert isinstance(w1, ir.ExternalTensor) and isinstance(w2, ir.ExternalTensor)
    assert not isinstance(model.graph.initializers["B1"].const_value, ir.ExternalTensor)
    assert w1.nbytes == W1.nbytes and list(w1.shape) == [64, 64]  # known without reading

    # Swap in a new data file (a new inode) after loading: had load() read or mapped the old
    # one, the old values would still show. Only the first use opens the file.
    old = data.read_bytes()
    data.unlink()
    data.write_bytes((np.frombuffer(old, np.float32) * 2).tobytes())
    np.testing.assert_array_equal(w1.numpy(), 2 * W1)
    np.testing.assert_array_equal(w2.numpy(), 2 * W2)


def test_external_data_cleanup_and_save(tmp_path: Path) -> None:
    src = save_with_external_data(tmp_path / "src")
    src_hashes = {p.name: sha(p) for p in (tmp_path / "src").iterdir()}
    model = load(src)
    result = run_pipeline(model, "cleanup", verify="numeric")
    assert result.modified
    assert [n.op_type for n in model.graph] == ["Gemm", "Relu", "Gemm"]

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    written = save(model, out_dir / "clean.onnx")
    assert written == [out_dir / "clean.onnx.data", out_dir / "clean.onnx"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["clean.onnx", "clean.onnx.data"]
    # Weights stay external, next to the output, under a relative location.
    locations = external_locations(out_dir / "clean.onnx")
    assert set(locations) == {"W1", "W2"}
    assert set(locations.values()) == {"clean.onnx.data"}
    assert (out_dir / "clean.onnx").stat().st_size < 4096  # the graph only
    # The source is untouched.
    assert {p.name: sha(p) for p in (tmp_path / "src").iterdir()} == src_hashes

    # Moving the output folder keeps it loadable: nothing points back at the source.
    moved = tmp_path / "moved"
    out_dir.rename(moved)
    (tmp_path / "src" / "weights.data").unlink()
    expected = X @ W1 + B1
    expected = np.maximum(expected, 0) @ W2 + B2
    (y,) = ort_run(moved / "clean.onnx", {"x": X})
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    reloaded = load(moved / "clean.onnx")
    assert isinstance(reloaded.graph.initializers["W1"].const_value, ir.ExternalTensor)


def test_external_data_outputs_equal_in_onnxruntime(tmp_path: Path) -> None:
    src = save_with_external_data(tmp_path / "src")
    model = load(src)
    run_pipeline(model, "cleanup")
    save(model, tmp_path / "clean.onnx")
    feed = {"x": X}
    np.testing.assert_allclose(
        ort_run(tmp_path / "clean.onnx", feed)[0], ort_run(src, feed)[0], rtol=1e-4, atol=1e-5
    )


def test_embedded_model_stays_embedded(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp_proto(), str(src))
    model = load(src)
    assert not any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )
    assert save(model, tmp_path / "out.onnx") == [tmp_path / "out.onnx"]
    assert external_locations(tmp_path / "out.onnx") == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out.onnx"]


# -- determinism -------------------------------------------------------------------------------
def test_save_is_deterministic_embedded(tmp_path: Path, digits: dict[str, Path]) -> None:
    model = load(digits["model"])
    run_pipeline(model, "cleanup")
    save(model, tmp_path / "a.onnx")
    save(model, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # Loading and saving again is a fixpoint.
    save(load(tmp_path / "a.onnx"), tmp_path / "c.onnx")
    assert (tmp_path / "c.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
    # And a fresh process computing the same thing writes the same bytes.
    other = load(digits["model"])
    run_pipeline(other, "cleanup")
    save(other, tmp_path / "d.onnx")
    assert (tmp_path / "d.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()


def test_save_is_deterministic_external(tmp_path: Path) -> None:
    model = load(save_with_external_data(tmp_path / "src"))
    run_pipeline(model, "cleanup")
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        save(model, tmp_path / name / "m.onnx")
    for file in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()
    save(load(tmp_path / "one" / "m.onnx"), tmp_path / "three.onnx")
    assert (tmp_path / "three.onnx.data").read_bytes() == (
        tmp_path / "one" / "m.onnx.data"
    ).read_bytes()


# -- atomicity -----------------------------------------------------------------------------------
def test_failed_save_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file appears whole or not at all: a failure before the final rename leaves the old
    output as it was and no temp files behind."""
    model = load(save_with_external_data(tmp_path / "src"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.onnx"
    out.write_bytes(b"previous model")

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(GraphSurgeonError, match="No space left on device") as info:
        save(model, out)
    monkeypatch.undo()
    assert "m.onnx" in str(info.value)
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.onnx"]

    save(model, out)  # and it works once the disk has room
    assert leftovers(out_dir) == []
    np.testing.assert_allclose(
        ort_run(out, {"x": X})[0], ort_run(tmp_path / "src" / "mlp.onnx", {"x": X})[0]
    )


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_disk_full_while_writing_leaves_nothing(tmp_path: Path, digits: dict[str, Path]) -> None:
    """Writes that fail half way (a file-size limit stands in for a full disk) leave the old
    output intact and no temp files: the CLI reports it in one line, exit 2."""
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    limit = digits["model"].stat().st_size // 2

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphsurgeon.cli",
            "run",
            "cleanup",
            str(digits["model"]),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphsurgeon: error: "), result.stderr
    assert "out.onnx" in lines[0]
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


# -- models over 2 GiB -----------------------------------------------------------------------------
COLS = 1024
BIG_BYTES = 2_200_000_000  # > 2 GiB (2_147_483_648): more than one protobuf can hold
ROWS = BIG_BYTES // (4 * COLS) + 1
MARKED_ROWS = (0, 1, ROWS // 2, ROWS - 1)  # rows holding known values; the rest are zeros


def _vm_hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def write_big_model(folder: Path) -> Path:
    """A 2.2 GB float32 table read by Gather, then an Identity for cleanup to remove. The
    data file is written by hand (sparse: only the marked rows hold bytes) and referenced
    with external data entries, so building it costs no memory and almost no disk."""
    folder.mkdir()
    nbytes = ROWS * COLS * 4
    with open(folder / "big.data", "wb") as f:
        f.truncate(nbytes)
        for row in MARKED_ROWS:
            f.seek(row * COLS * 4)
            f.write(np.full(COLS, row + 1, np.float32).tobytes())
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[ROWS, COLS])
    table.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "big.data", "offset": 0, "length": nbytes}.items():
        entry = table.external_data.add()
        entry.key, entry.value = key, str(value)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", COLS])
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed"),
        helper.make_node("Identity", ["rows"], ["y"], name="id"),
    ]
    graph = helper.make_graph(nodes, "big", [ids], [y], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def check_big_output(path: Path) -> None:
    """Gather the marked rows and an unmarked one in onnxruntime."""
    ids = np.array([*MARKED_ROWS, 7], np.int64)
    (y,) = ort_run(path, {"ids": ids})
    assert y.shape == (len(ids), COLS)
    expected = np.array([row + 1 for row in MARKED_ROWS] + [0], np.float32)
    np.testing.assert_array_equal(y, np.repeat(expected[:, None], COLS, axis=1))


@pytest.mark.slow
def test_model_over_2gb(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    src = write_big_model(tmp_path / "src")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    tracking = _vm_hwm_reset()
    rss0 = _vm_kib("VmRSS")
    try:
        model = load(src)
        table = model.graph.initializers["table"].const_value
        assert isinstance(table, ir.ExternalTensor)
        assert table.nbytes > 2**31
        result = run_pipeline(model, "cleanup")
        assert result.modified
        assert [n.op_type for n in model.graph] == ["Gather"]
        if tracking:  # loading and passes never touch the 2.2 GB
            assert (_vm_kib("VmHWM") - rss0) * 1024 < 500e6
        written = save(model, out_dir / "big.onnx")
        assert written == [out_dir / "big.onnx.data", out_dir / "big.onnx"]
        assert (out_dir / "big.onnx.data").stat().st_size == ROWS * COLS * 4
        assert (out_dir / "big.onnx").stat().st_size < 4096
        assert external_locations(out_dir / "big.onnx") == {"table": "big.onnx.data"}
        assert leftovers(out_dir) == []

        reloaded = load(out_dir / "big.onnx")
        assert isinstance(reloaded.graph.initializers["table"].const_value, ir.ExternalTensor)
        assert [n.op_type for n in reloaded.graph] == ["Gather"]
        check_big_output(out_dir / "big.onnx")
        if tracking:
            peak = _vm_kib("VmHWM") * 1024
            assert peak - rss0 * 1024 < 8e9, f"peak RSS grew by {(peak - rss0 * 1024) / 1e9:.1f} GB"
    finally:
        for folder in (tmp_path / "src", out_dir):
            for p in folder.iterdir():
                p.unlink()
    assert time.perf_counter() - t0 < 120


@pytest.mark.slow
def test_in_memory_model_over_2gb_is_saved_with_external_data(tmp_path: Path) -> None:
    """Weights built in memory past the protobuf limit go to a .data file by themselves."""
    table = np.zeros((ROWS, COLS), np.float32)  # calloc'd: untouched pages cost no memory
    table[MARKED_ROWS, :] = np.array([r + 1 for r in MARKED_ROWS], np.float32)[:, None]
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["n"]))
    weight = ir.Value(name="table", const_value=ir.Tensor(table, name="table"))
    weight.shape, weight.dtype = ir.Shape([ROWS, COLS]), ir.DataType.FLOAT
    gather = ir.node("Gather", [weight, ids], name="embed")
    identity = ir.node("Identity", [gather.outputs[0]], name="id")
    y = identity.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape(["n", COLS])
    graph = ir.Graph(
        [ids],
        [y],
        nodes=[gather, identity],
        initializers=[weight],
        opset_imports={"": 17},
        name="big",
    )
    model = ir.Model(graph, ir_version=8)
    try:
        run_pipeline(model, "cleanup")
        written = save(model, tmp_path / "big.onnx")
        assert written == [tmp_path / "big.onnx.data", tmp_path / "big.onnx"]
        assert external_locations(tmp_path / "big.onnx") == {"table": "big.onnx.data"}
        del model, graph, weight, table
        check_big_output(tmp_path / "big.onnx")
    finally:
        for p in tmp_path.iterdir():
            p.unlink()


def test_dataset_feeds_cover_exactly_max_samples(digits) -> None:
    import graphsurgeon as gs
    from graphsurgeon.data import load_npz

    data = load_npz(digits["test"], gs.load(digits["model"]))
    feeds = data.feeds(40, batch_size=16)
    assert [len(f["input"]) for f in feeds] == [16, 16, 8]
    fixed = load_npz(digits["test"], gs.load(digits["model"], shapes={"input": [4, 1, 8, 8]}))
    assert [len(f["input"]) for f in fixed.feeds(10)] == [4, 4]  # whole batches, <= 10

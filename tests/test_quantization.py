"""quantize-int8 (static QDQ) and quantize-dynamic.

Tiny hand-built Conv/Gemm/MatMul graphs check the arithmetic: outputs within the error bound
the scales in the quantized graph imply, targets, per-layer overrides (a layer kept in float
has no QDQ; per-layer calibration and symmetric ranges), exact ``modified``, bias correction.
The digits CNN and MiniLM check accuracy, every calibration method, and the saved file size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphsurgeon.passes.quantization import QuantizeDynamic, QuantizeInt8
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import graphsurgeon as gs
from graphsurgeon.data import Dataset, load_npz
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run
from graphsurgeon.layers import find_layers
from graphsurgeon.options import Choice, search_spaces
from graphsurgeon.registry import all_passes
from graphsurgeon.stats import layer_stats
from graphsurgeon.targets import Targets

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(11)


def rand(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, size=shape).astype(np.float32)


def make_model(nodes, inputs, outputs, inits) -> ir.Model:
    graph = oh.make_graph(nodes, "g", inputs, outputs, [nh.from_array(a, n) for n, a in inits])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    model = ir.from_proto(proto)
    find_layers(model)
    return model


def single_layer(op: str) -> tuple[ir.Model, np.ndarray]:
    """One layer reading graph input x; returns the model and calibration inputs."""
    if op == "Conv":
        x = rand(16, 3, 6, 6)
        node = oh.make_node("Conv", ["x", "W", "b"], ["y"], name="layer", pads=[1, 1, 1, 1])
        inits = [("W", rand(4, 3, 3, 3)), ("b", rand(4))]
        shapes = ([16, 3, 6, 6], [16, 4, 6, 6])
    elif op == "Gemm":
        x = rand(16, 12)
        node = oh.make_node("Gemm", ["x", "W", "b"], ["y"], name="layer", transB=1)
        inits = [("W", rand(5, 12)), ("b", rand(5))]
        shapes = ([16, 12], [16, 5])
    else:
        x = rand(16, 7, 12)
        node = oh.make_node("MatMul", ["x", "W"], ["y"], name="layer")
        inits = [("W", rand(12, 5))]
        shapes = ([16, 7, 12], [16, 7, 5])
    model = make_model(
        [node],
        [oh.make_tensor_value_info("x", FLOAT, shapes[0])],
        [oh.make_tensor_value_info("y", FLOAT, shapes[1])],
        inits,
    )
    return model, x


def dataset(**arrays: np.ndarray) -> Dataset:
    return Dataset(dict(arrays), None, {k: True for k in arrays})


def quantize(model: ir.Model, calib: Dataset, cls=QuantizeInt8, targets=None, **options):
    pass_ = cls(options, targets)
    pass_.calib = calib
    result = pass_(model)
    return result, pass_


def outputs(model: ir.Model, feed: dict[str, np.ndarray], optimize: bool = False):
    return run(make_session(model, optimize=optimize), feed)


def const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def qdq_of(layer_node: ir.Node, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(integer data or None, scale, zero point) of the DequantizeLinear feeding an input, or
    of input A/B of a MatMulIntegerToFloat (which takes them directly)."""
    if layer_node.op_type == "MatMulIntegerToFloat":
        data, scale, zero = (layer_node.inputs[i] for i in (index, 2 + index, 4 + index))
        q = data.producer() if data is not None else None
        integers = const(data) if q is None else None  # A comes from a QuantizeLinear
        return integers, const(scale), const(zero)
    dq = layer_node.inputs[index].producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return const(dq.inputs[0]), const(dq.inputs[1]), const(dq.inputs[2])


def layer_node(model: ir.Model, lid: str = "layer") -> ir.Node:
    return next(layer.node for layer in find_layers(model) if layer.id == lid)


def serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


# -- registry and options ---------------------------------------------------------------------
def test_registered_with_search_spaces_and_per_layer_keys_only() -> None:
    passes = all_passes()
    assert passes["quantize-int8"] is QuantizeInt8 and passes["quantize-dynamic"] is QuantizeDynamic
    assert QuantizeInt8.kind == QuantizeDynamic.kind == "lossy"
    spaces = search_spaces(QuantizeInt8.Options)
    assert isinstance(spaces["calibration"], Choice)
    assert set(spaces["calibration"].values) == {"minmax", "percentile", "entropy", "mse"}
    assert {"enabled", "symmetric", "bias_correction", "percentile", "per_channel"} <= set(spaces)
    assert "enabled" in search_spaces(QuantizeDynamic.Options)
    QuantizeInt8({"overrides": {"fc.*": {"calibration": "mse", "enabled": False}}})
    with pytest.raises(GraphSurgeonError, match="whole pass"):
        QuantizeInt8({"overrides": {"fc1": {"activation_type": "int8"}}})
    with pytest.raises(GraphSurgeonError, match="calibration"):
        QuantizeInt8({"calibration": "kl"})
    with pytest.raises(GraphSurgeonError, match="cannot quantize"):
        QuantizeDynamic({"op_types": ["Softmax"]})


# -- hand-built layers: error within the bound the scales imply -------------------------------
@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_single_layer_error_within_scale_bound(op: str) -> None:
    model, x = single_layer(op)
    w_float = find_layers(model)[0].weight.numpy().astype(np.float64)
    reference = outputs(model, {"x": x})["y"]
    result, pass_ = quantize(model, dataset(x=x))
    assert result.modified and pass_.notes["quantized_layers"] == 1
    node = layer_node(model)
    # a float-output MatMul is written as ORT's integer kernel, whatever the session's shapes
    assert (node.op_type == "MatMulIntegerToFloat") == (op == "MatMul")
    weight_q, s_w, zp_w = qdq_of(node, 1)
    _, s_x, zp_x = qdq_of(node, 0)
    assert weight_q.dtype == np.int8 and np.all(zp_w == 0)  # symmetric int8 weights
    assert zp_x.dtype == np.uint8 and s_x.size == 1  # per-tensor uint8 activations
    channels = w_float.shape[0] if op in ("Conv", "Gemm") else w_float.shape[1]
    assert s_w.size == channels  # per output channel
    # |y - y_q| <= s_x/2 sum|W| + s_w/2 sum|x| + K s_x s_w / 4 (+ s_x s_w / 2 for an int32
    # bias): x is inside its calibrated range, so nothing clips.
    s_x = float(s_x)
    if op == "MatMul":
        k = w_float.shape[0]
        w_abs = np.abs(w_float).sum(0)
    else:
        k = int(np.prod(w_float.shape[1:]))
        w_abs = np.abs(w_float).reshape(channels, -1).sum(1)
    bound = s_x / 2 * w_abs + s_w / 2 * np.abs(x).max() * k + k * s_x * s_w / 4 + s_x * s_w
    bound = bound.reshape([1, -1] + [1] * (reference.ndim - 2) if op == "Conv" else [-1])
    for optimize in (False, True):  # our QDQ graph, and ORT's fused integer kernels
        got = outputs(model, {"x": x}, optimize=optimize)["y"]
        assert got.shape == reference.shape
        err = np.abs(got.astype(np.float64) - reference)
        assert np.all(err <= bound * 1.01 + 1e-6), float((err - bound).max())
        assert err.max() > 0  # it really is quantized
    assert float(np.abs(reference).mean()) > 20 * float(err.mean())


def two_layers() -> tuple[ir.Model, np.ndarray]:
    """x -Conv(c1)- Relu - Flatten -Gemm(fc, transB)- y; the same weights every call."""
    rng = np.random.default_rng(5)

    def rand(*shape: int) -> np.ndarray:
        return rng.uniform(-1, 1, size=shape).astype(np.float32)

    model = make_model(
        [
            oh.make_node("Conv", ["x", "W1", "b1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["h"], ["r"], name="relu"),
            oh.make_node("Flatten", ["r"], ["f"], name="flat"),
            oh.make_node("Gemm", ["f", "W2", "b2"], ["y"], name="fc", transB=1),
        ],
        [oh.make_tensor_value_info("x", FLOAT, [8, 2, 4, 4])],
        [oh.make_tensor_value_info("y", FLOAT, [8, 3])],
        [("W1", rand(4, 2, 3, 3)), ("b1", rand(4)), ("W2", rand(3, 64)), ("b2", rand(3))],
    )
    return model, rand(8, 2, 4, 4)


def test_targets_and_disabled_layer_keep_float_without_qdq() -> None:
    for kwargs in (
        {"targets": Targets(op_types=["Conv"])},
        {"targets": Targets(exclude=["fc"])},
        {"overrides": {"f.*": {"enabled": False}}},
    ):
        model, x = two_layers()
        targets = kwargs.pop("targets", None)
        result, pass_ = quantize(model, dataset(x=x), targets=targets, **kwargs)
        assert result.modified
        conv, gemm = layer_node(model, "c1"), layer_node(model, "fc")
        assert qdq_of(conv, 1) is not None and qdq_of(conv, 0) is not None
        assert all(qdq_of(gemm, i) is None for i in range(3))  # no QDQ at all on fc
        assert gemm.inputs[1].const_value.dtype == ir.DataType.FLOAT
        assert sum(pass_.skipped.values()) == 1
        ops = {n.op_type for n in model.graph}
        assert "QuantizeLinear" in ops
        assert outputs(model, {"x": x}, optimize=True)["y"].shape == (8, 3)


def test_conv_chain_stays_int8_through_glue_ops() -> None:
    model, x = two_layers()
    reference = outputs(model, {"x": x})["y"]
    quantize(model, dataset(x=x))
    ops = [n.op_type for n in model.graph]
    assert "Relu" not in ops  # folded into the Conv output's [0, max] range by ORT
    flatten = next(n for n in model.graph if n.op_type == "Flatten")
    assert flatten.inputs[0].producer().op_type == "DequantizeLinear"
    assert flatten.outputs[0].uses()[0].node.op_type == "QuantizeLinear"
    got = outputs(model, {"x": x}, optimize=True)["y"]
    assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()
    model, x = two_layers()  # fc kept in float: the Flatten before it stays float too
    quantize(model, dataset(x=x), overrides={"fc": {"enabled": False}})
    flatten = next(n for n in model.graph if n.op_type == "Flatten")
    assert [u.node.op_type for u in flatten.outputs[0].uses()] == ["Gemm"]


def test_nothing_selected_leaves_model_byte_identical() -> None:
    model, x = two_layers()
    before = serialized(model)
    result, pass_ = quantize(model, dataset(x=x), targets=Targets(op_types=["MatMul"]))
    assert not result.modified and serialized(model) == before
    result, pass_ = quantize(model, dataset(x=x), overrides={".*": {"enabled": False}})
    assert not result.modified and serialized(model) == before
    assert pass_.skipped["disabled for this layer (kept in float)"] == 2


def test_per_layer_calibration_and_symmetric_ranges() -> None:
    model, x = two_layers()
    x = x.copy()
    x[0, 0, 0, 0] = 40.0  # one outlier: min/max stretches the range, a percentile cuts it
    feed = dataset(x=x)
    minmax = two_layers()[0]
    quantize(minmax, feed)
    quantize(model, feed, overrides={"c1": {"calibration": "percentile", "percentile": 99.0}})
    s_minmax = float(qdq_of(layer_node(minmax, "c1"), 0)[1])
    s_pct = float(qdq_of(layer_node(model, "c1"), 0)[1])
    assert s_minmax == pytest.approx((40.0 - x.min()) / 255, rel=1e-3)
    assert s_pct < s_minmax / 5
    # the Gemm kept the pass-wide min/max range
    assert float(qdq_of(layer_node(model, "fc"), 0)[1]) == float(
        qdq_of(layer_node(minmax, "fc"), 0)[1]
    )
    sym = two_layers()[0]
    quantize(sym, feed, overrides={"fc": {"symmetric": True}})
    assert int(qdq_of(layer_node(sym, "fc"), 0)[2]) == 128  # uint8 symmetric: zero at 128
    assert int(qdq_of(layer_node(sym, "c1"), 0)[2]) != 128


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibration_method_on_hand_built_graph(method: str) -> None:
    model, x = two_layers()
    reference = outputs(model, {"x": x})["y"]
    result, pass_ = quantize(model, dataset(x=x), calibration=method)
    assert result.modified and pass_.notes["calibration"] == {method: 2}
    got = outputs(model, {"x": x}, optimize=True)["y"]
    assert np.abs(got - reference).max() < 0.1 * np.abs(reference).max()


def test_mse_range_minimizes_histogram_error() -> None:
    from graphsurgeon.passes._int8_ranges import mse_range

    values = np.concatenate([RNG.normal(0, 1, 100_000), RNG.uniform(5, 60, 20)])
    hist, edges = np.histogram(values, 2048, range=(-60, 60))
    lo, hi = mse_range(hist, edges, float(values.min()), float(values.max()))

    def mse(lo: float, hi: float) -> float:  # real quantize-dequantize error on the values
        s = (hi - lo) / 255
        q = np.clip(np.round((values - lo) / s), 0, 255) * s + lo
        return float(np.mean((q - values) ** 2))

    assert values.min() <= lo < 0 < hi < values.max()  # both tails clipped
    brute = min(
        mse(a, b)
        for a in np.linspace(values.min(), -0.5, 30)
        for b in np.linspace(0.5, values.max(), 60)
    )
    assert mse(lo, hi) <= brute * 1.05
    assert mse(lo, hi) < mse(float(values.min()), float(values.max()))


# -- bias correction ------------------------------------------------------------------------
def biased_gemm() -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """Every weight of a channel sits 0.45 steps above a grid point: rounding always goes the
    same way, so the error adds up over K inputs instead of averaging out."""
    k, n = 64, 4
    step = np.array([0.01, 0.02, 0.015, 0.03], np.float32)  # max|W_c| / 127 after the 1 below
    w = (RNG.integers(-20, 20, size=(n, k)) + 0.45).astype(np.float32) * step[:, None]
    w[:, 0] = 127 * step  # fixes each channel's scale to ``step``
    model = make_model(
        [oh.make_node("Gemm", ["x", "W", "b"], ["y"], name="layer", transB=1)],
        [oh.make_tensor_value_info("x", FLOAT, ["batch", k])],
        [oh.make_tensor_value_info("y", FLOAT, ["batch", n])],
        [("W", w), ("b", np.zeros(n, np.float32))],
    )
    return model, rand(256, k, low=0.5, high=1.5), rand(256, k, low=0.5, high=1.5)


def test_bias_correction_removes_a_systematic_shift() -> None:
    errors = {}
    for corrected in (False, True):
        model, calib, test = biased_gemm()
        reference = outputs(model, {"x": test})["y"]
        _, pass_ = quantize(model, dataset(x=calib), bias_correction=corrected)
        got = outputs(model, {"x": test}, optimize=True)["y"]
        errors[corrected] = np.abs((got - reference).mean(axis=0))  # per-channel mean error
        if corrected:
            assert pass_.notes["bias_corrected_layers"] == 1
            bias_q = qdq_of(layer_node(model), 2)[0]
            assert bias_q.dtype == np.int32 and np.any(bias_q != 0)
    assert errors[False].mean() > 0.05  # the case really is biased
    assert errors[True].mean() < errors[False].mean() / 5


def test_bias_correction_adds_a_bias_or_refuses_with_a_reason() -> None:
    model, x = single_layer("MatMul")  # no Add after it: nothing to absorb the shift
    _, pass_ = quantize(model, dataset(x=x), bias_correction=True)
    assert pass_.notes["bias_corrected_layers"] == 0
    assert any(r.startswith("bias correction: no bias") for r in pass_.skipped)
    model = make_model(  # a Conv without bias gets one
        [oh.make_node("Conv", ["x", "W"], ["y"], name="layer")],
        [oh.make_tensor_value_info("x", FLOAT, [4, 2, 5, 5])],
        [oh.make_tensor_value_info("y", FLOAT, [4, 3, 3, 3])],
        [("W", rand(3, 2, 3, 3))],
    )
    x = rand(4, 2, 5, 5, low=0, high=2)
    reference = outputs(model, {"x": x})["y"]
    _, pass_ = quantize(model, dataset(x=x), bias_correction=True)
    assert pass_.notes["bias_corrected_layers"] == 1 and len(layer_node(model).inputs) == 3
    assert np.abs(outputs(model, {"x": x})["y"] - reference).max() < 0.05


# -- dynamic ----------------------------------------------------------------------------------
def test_dynamic_hand_built_runs_and_keeps_layer_ids() -> None:
    model, x = two_layers()
    reference = outputs(model, {"x": x})["y"]
    result, pass_ = quantize(model, None, cls=QuantizeDynamic)
    assert result.modified and pass_.notes["quantized_layers"] == 2
    ops = {n.op_type for n in model.graph}
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} <= ops
    layers = {layer.id: layer for layer in find_layers(model)}
    assert set(layers) == {"c1", "fc"}
    assert all(layer.weight.dtype == ir.DataType.INT8 for layer in layers.values())
    assert layer_stats(layers["fc"]).bytes == 3 * 64  # one byte per weight
    got = outputs(model, {"x": x}, optimize=True)["y"]
    assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()
    model, x = two_layers()
    result, _ = quantize(model, None, cls=QuantizeDynamic, overrides={"c1": {"enabled": False}})
    assert "ConvInteger" not in {n.op_type for n in model.graph}


# -- real models --------------------------------------------------------------------------------
def accuracy(path: Path, test: Path) -> float:
    data = np.load(test)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data["input"]})[0]
    return float((logits.argmax(1) == data["labels"]).mean())


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_digits_accuracy_and_file_size(digits, tmp_path: Path, method: str) -> None:
    spec = ["cleanup", {"name": "quantize-int8", "options": {"calibration": method}}]
    result = gs.run_pipeline(digits["model"], spec, calib=digits["train"], verify="numeric")
    record = result.records[-1]
    assert record.name == "quantize-int8" and record.verified == "numeric"
    clean = gs.run_pipeline(digits["model"], "cleanup").model
    gs.save(clean, tmp_path / "float.onnx")
    gs.save(result.model, tmp_path / "int8.onnx")
    float_size = (tmp_path / "float.onnx").stat().st_size
    int8_size = (tmp_path / "int8.onnx").stat().st_size
    assert float_size / int8_size > 2.9  # weights 4x; scales, biases and graph stay
    assert record.before.bytes / record.after.bytes > 3.5
    for lid, change in record.layer_changes().items():  # per-layer stats see the int8 weight
        before, after = change["bytes"]
        assert after < before / 3, lid
    float_acc = accuracy(tmp_path / "float.onnx", digits["test"])
    int8_acc = accuracy(tmp_path / "int8.onnx", digits["test"])
    assert int8_acc >= float_acc - 0.015, (method, float_acc, int8_acc)


def test_digits_dynamic_and_cli_end_to_end(digits, tmp_path: Path) -> None:
    spec = tmp_path / "int8.yaml"
    spec.write_text(
        "steps:\n  - cleanup\n  - name: quantize-int8\n"
        "    options: {calibration: mse, bias_correction: true,"
        " overrides: {'classifier/classifier.3/Gemm': {enabled: false}}}\n"
    )
    out = tmp_path / "out.onnx"
    cli = [sys.executable, "-m", "graphsurgeon.cli"]
    done = subprocess.run(
        [*cli, "run", str(spec), str(digits["model"]), "-o", str(out), "--verify", "numeric",
         "--calib", str(digits["train"])],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert accuracy(out, digits["test"]) >= 0.97
    model = gs.load(out)
    kept = next(layer for layer in find_layers(model) if layer.id.endswith("classifier.3/Gemm"))
    assert kept.weight.dtype == ir.DataType.FLOAT and qdq_of(kept.node, 0) is None
    result = gs.run_pipeline(digits["model"], ["cleanup", "quantize-dynamic"], verify="numeric")
    gs.save(result.model, tmp_path / "dyn.onnx")
    assert accuracy(tmp_path / "dyn.onnx", digits["test"]) >= 0.97
    assert result.records[-1].before.bytes / result.records[-1].after.bytes > 3.5


def minilm_cosine(original: Path, quantized: Path, sentences: Path) -> float:
    data = dict(np.load(sentences))
    outs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            ["sentence_embedding"], data
        )[0]
        for p in (original, quantized)
    ]
    a, b = (o.astype(np.float64) for o in outs)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.slow
@pytest.mark.parametrize("name, min_cosine", [("quantize-int8", 0.98), ("quantize-dynamic", 0.95)])
def test_minilm_runs_close_and_shrinks(minilm, tmp_path: Path, name: str, min_cosine: float):
    calib = load_npz(minilm["sentences"], gs.load(minilm["model"]))
    result = gs.run_pipeline(minilm["model"], name, calib=calib)
    assert result.records[-1].notes["quantized_layers"] == 39  # 36 MatMul + 3 embeddings
    out = tmp_path / "q.onnx"
    gs.save(result.model, out)
    assert minilm["model"].stat().st_size / out.stat().st_size > 3.5
    cosine = minilm_cosine(minilm["model"], out, minilm["sentences"])
    print(f"{name}: MiniLM sentence-embedding cosine vs float {cosine:.5f}")
    assert cosine >= min_cosine


def test_entropy_threshold_equals_onnxruntime_search() -> None:
    """Our numpy KL search picks exactly the thresholds of ORT's Python loop."""
    from graphsurgeon.passes._int8_ranges import entropy_threshold
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(0)
    for x in (
        rng.standard_t(3, 20000),  # its best windows tie to float32 rounding: sums must match
        np.abs(rng.standard_normal(20000)) * 2.5,
        np.concatenate([rng.standard_normal(5000), 40 + rng.standard_normal(50)]),
        np.maximum(rng.standard_normal(3000), 0),  # ReLU output: half the mass in one bin
        rng.integers(-3, 4, 2000).astype(float),  # mostly empty bins
        *(rng.standard_t(2 + k, 5000) for k in range(5)),
    ):
        m = float(np.abs(x).max())
        hist, edges = np.histogram(x, bins=512, range=(-m, m))
        h = (hist, edges.astype(np.float32), np.float32(x.min()), np.float32(x.max()))
        ort_low, ort_high = HistogramCollector("entropy", True, 512, 128, None, None).get_entropy_threshold(h, 128)  # fmt: skip
        low, high = entropy_threshold(h, 128)
        assert (float(low), float(high)) == (float(ort_low), float(ort_high))


def test_shared_calibration_run_gives_onnxruntimes_calibrator_ranges(digits, tmp_path) -> None:
    """One run shared by every method gives what ORT's MinMax, Entropy and Percentile
    calibrators give on their own runs (same tensors, same ranges)."""
    from graphsurgeon.passes._int8_ranges import ENTROPY_BINS, ActivationRanges, quiet_ort_tools
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    from graphsurgeon.calibration import calibration_feeds
    from graphsurgeon.data import load_npz

    model = gs.load(digits["model"], shapes={"input": [64, 1, 8, 8]})
    feeds = calibration_feeds(model, load_npz(digits["train"], model), max_samples=192)
    src = tmp_path / "m.onnx"
    gs.save(model, src)
    ops = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool"]
    ours = ActivationRanges(src, tmp_path, feeds, {"input"}, ops, 1024)
    ours.expect({"minmax", "entropy", "percentile"})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    for method, kind, extra in (
        ("minmax", CalibrationMethod.MinMax, {}),
        ("entropy", CalibrationMethod.Entropy, {"num_bins": ENTROPY_BINS}),
        ("percentile", CalibrationMethod.Percentile, {"symmetric": False, "num_bins": 1024}),
    ):
        with quiet_ort_tools():
            cal = create_calibrator(
                src, ops, augmented_model_path=str(tmp_path / f"aug_{method}.onnx"),
                calibrate_method=kind, extra_options=extra,
            )  # fmt: skip
            cal.collect_data(Reader())
            theirs = {
                k: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1])))
                for k, v in cal.compute_data().items()
            }
        mine = ours.get(method, 99.999)
        assert set(mine) == set(theirs) and len(mine) > 5
        for name, (low, high) in theirs.items():
            assert mine[name] == pytest.approx((low, high), rel=1e-6, abs=1e-7), (method, name)

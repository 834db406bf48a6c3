"""int8 quantization: static QDQ (``quantize-int8``) and dynamic (``quantize-dynamic``).

Both wrap ``onnxruntime.quantization`` (``quantize_static`` in QDQ format, ``quantize_dynamic``):
the model is serialized to a temporary file, ORT's tooling quantizes the layers our target
selector and per-layer options chose (``nodes_to_quantize``), and the result replaces the
model's graph. What ORT lacks is added here: per-layer calibration methods and symmetric
ranges (fed to ``quantize_static`` as its calibration cache and ``TensorQuantOverrides``), an
MSE calibration method (:mod:`graphsurgeon.passes._int8_ranges`) and bias correction
(:mod:`graphsurgeon.passes._bias_correction`). Layer ids survive: QDQ keeps the layer nodes;
the dynamic form's new nodes inherit the id through their ``<weight>_quantized`` initializer.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
from pydantic import field_validator

from graphsurgeon.calibration import calibration_feeds, collect_activations
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.layers import LAYER_ID_KEY, Layer, find_layers, layer_id
from graphsurgeon.model_io import EXTERNAL_DATA_THRESHOLD, has_external_data, weight_bytes
from graphsurgeon.options import Choice, FloatRange, IntRange, LayerPassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register
from graphsurgeon.shapes import ShapeInferencePass

from ._bias_correction import (
    apply_shift,
    dequantized,
    fake_quantized,
    find_bias,
    layer_shift,
)
from ._int8_fusion import fuse_matmul_integer_to_float
from ._int8_ranges import METHODS, ActivationRanges, quiet_ort_tools
from .folding import DeadBefore

_QUANT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
_INT_DTYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8})


def _only_per_layer(overrides: dict[str, dict[str, Any]], allowed: frozenset[str]) -> None:
    for key, values in overrides.items():
        wide = sorted(set(values) - allowed)
        if wide:
            raise ValueError(
                f"overrides[{key}]: {', '.join(wide)} apply to the whole pass; per layer: "
                f"{', '.join(sorted(allowed))}"
            )


# -- options --------------------------------------------------------------------------------
INT8_PER_LAYER = frozenset({"enabled", "calibration", "percentile", "symmetric", "bias_correction"})


class QuantizeInt8Options(LayerPassOptions):
    enabled: bool = option(
        True,
        "Quantize this layer; false keeps it in float (mixed precision).",
        Choice([True, False]),
    )
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "minmax",
        "How the activation range is chosen: min/max, a percentile, KL entropy (ORT's "
        "calibrators) or the range minimizing the quantization MSE of the histogram.",
        Choice(list(METHODS)),
    )
    percentile: float = option(
        99.999,
        "Percentile of the activation distribution kept (calibration: percentile).",
        FloatRange(99.9, 99.9999),
        gt=50.0,
        le=100.0,
    )
    symmetric: bool = option(
        False, "Symmetric activation ranges ([-m, m]) instead of [min, max].", Choice([False, True])
    )
    bias_correction: bool = option(
        False,
        "Fold each layer's quantization-induced output mean shift into its bias: "
        "b' = b + E[y_fp] - E[y_q] per output channel, on calibration data.",
        Choice([False, True]),
    )
    per_channel: bool = option(
        True, "One weight scale per output channel (else one per tensor).", Choice([True, False])
    )
    activation_type: Literal["uint8", "int8"] = option(
        "uint8",
        "Activation integer type; uint8 x int8 (U8S8) is ORT's fast path on x86 CPUs.",
        Choice(["uint8", "int8"]),
    )
    reduce_range: bool = option(
        False,
        "7-bit weights, for x86 CPUs without VNNI (avoids saturation).",
        Choice([False, True]),
    )
    quantize_outputs: Literal["auto", "always", "never"] = option(
        "auto",
        "Which layers' outputs get a QDQ too (not only their inputs): auto = Conv and "
        "ConvTranspose (int8 conv chains through Relu/pooling); always also Gemm/MatMul, whose "
        "outputs in transformers carry outliers a static range clips.",
        Choice(["auto", "always", "never"]),
    )
    integer_matmul: bool = option(
        True,
        "Write MatMuls with float outputs as onnxruntime's MatMulIntegerToFloat "
        "(com.microsoft) instead of leaving the fusion to the session: with static shapes "
        "onnxruntime's MatMul+Add->Gemm fusion would otherwise run first and leave float math.",
        Choice([True, False]),
    )
    glue_op_types: list[str] = option(
        ["Relu", "Clip", "MaxPool", "AveragePool", "Flatten", "Reshape", "Squeeze", "Unsqueeze"],
        "Ops that run in int8 between quantized layers when their input is already quantized "
        "(ORT folds Relu/Clip into the range and moves Q/DQ across data movement); selected by "
        "the targets like layers. Elsewhere they stay float.",
    )
    op_types: list[str] = option(
        ["Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"],
        "Layer op types to quantize (Gather: embedding tables).",
    )
    calib_samples: int = option(64, "Calibration samples used.", IntRange(16, 512, log=True), ge=1)
    num_bins: int = option(
        2048, "Histogram bins for percentile and mse.", IntRange(512, 8192, log=True), ge=16
    )

    @field_validator("overrides")
    @classmethod
    def _per_layer(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        _only_per_layer(value, INT8_PER_LAYER)
        return value

    @field_validator("op_types")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        bad = sorted(set(value) - {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"})
        if bad:
            raise ValueError(
                f"cannot quantize {bad}; layer op types: Conv, ConvTranspose, Gemm, MatMul, Gather"
            )
        return value


DYNAMIC_PER_LAYER = frozenset({"enabled", "per_channel"})
_DYNAMIC_OPS = ("Conv", "Gemm", "MatMul", "Gather", "Attention")


class QuantizeDynamicOptions(LayerPassOptions):
    enabled: bool = option(
        True,
        "Quantize this layer; false keeps it in float (mixed precision).",
        Choice([True, False]),
    )
    per_channel: bool = option(
        False,
        "One weight scale per output channel (else one per tensor). On MiniLM it lifts mean "
        "sentence cosine from 0.966 to 0.994, nearly all of it from the FFN output layers.",
        Choice([False, True]),
    )
    weight_type: Literal["int8", "uint8"] = option(
        "int8", "Weight integer type.", Choice(["int8", "uint8"])
    )
    reduce_range: bool = option(
        False,
        "7-bit weights, for x86 CPUs without VNNI (avoids saturation).",
        Choice([False, True]),
    )
    op_types: list[str] = option(
        list(_DYNAMIC_OPS),
        "Layer op types to quantize (Gemm becomes MatMulInteger + Add; Gather: embeddings; "
        "Attention: com.microsoft fused attention from fuse-attention, becomes QAttention).",
    )

    @field_validator("overrides")
    @classmethod
    def _per_layer(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        _only_per_layer(value, DYNAMIC_PER_LAYER)
        return value

    @field_validator("op_types")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        bad = sorted(set(value) - set(_DYNAMIC_OPS))
        if bad:
            raise ValueError(f"cannot quantize {bad}; layer op types: {', '.join(_DYNAMIC_OPS)}")
        return value


# -- shared plumbing --------------------------------------------------------------------------
@dataclass
class _Planned:
    layer: Layer
    options: Any  # the layer's options (QuantizeInt8Options or QuantizeDynamicOptions)
    name: str = ""  # the node's (unique) name in the file handed to onnxruntime


class _OrtQuantizePass(GSPass):
    kind = "lossy"
    strength_option: ClassVar[str | None] = None  # sensitivity: one int8 trial per layer

    def _plan(self, model: ir.Model) -> list[_Planned]:
        """The layers to quantize, each with its options; every refusal is recorded."""
        had_id = {n for n in ir.traversal.RecursiveGraphIterator(model.graph) if layer_id(n)}
        main = set(model.graph)
        planned = []
        for layer in find_layers(model):
            node = layer.node
            if node.op_type not in self.options.op_types:
                continue  # not this pass's business
            reason = _refusal(layer, node in main)
            if reason is None and not self.selects(node):
                reason = "not selected by the targets"
            options = self.options_for(layer.id)
            if reason is None and not options.enabled:
                reason = "disabled for this layer (kept in float)"
            if reason is not None:
                self.skip(node, reason)
                continue
            planned.append(_Planned(layer, options))
        if not planned:  # leave the model exactly as it was: ids assigned here go again
            for node in ir.traversal.RecursiveGraphIterator(model.graph):
                if node not in had_id:
                    node.metadata_props.pop(LAYER_ID_KEY, None)
        return planned

    def _export(self, model: ir.Model, path: Path, planned: list[_Planned]) -> bool:
        """Write ``model`` for onnxruntime's tools with unique node names (the nodes_to_quantize
        handles) and no stale value_info. Returns whether weights went to external data."""
        proto = ir.to_proto(model)
        del proto.graph.value_info[:]  # ORT re-infers; stale entries make it refuse the model
        counts = Counter(n.name for n in proto.graph.node)
        used = set(counts)
        names: dict[ir.Node, str] = {}
        for i, (node, node_proto) in enumerate(zip(model.graph, proto.graph.node, strict=True)):
            if not node_proto.name or counts[node_proto.name] > 1:
                base, n = f"{node_proto.name or node_proto.op_type}_gs{i}", 0
                while f"{base}_{n}" in used:
                    n += 1
                node_proto.name = f"{base}_{n}"
                used.add(node_proto.name)
            names[node] = node_proto.name
        self._names = names
        for item in planned:
            item.name = names[item.layer.node]
            self._prepare(proto, item)
        large = has_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
        onnx.save_model(proto, str(path), save_as_external_data=large, location=f"{path.name}.data")
        return large

    def _prepare(self, proto: onnx.ModelProto, item: _Planned) -> None:
        """A hook to edit the exported copy of one planned layer."""

    def _adopt(self, model: ir.Model, path: Path, planned: list[_Planned]) -> ir.Model | None:
        """Load ORT's output; None if it quantized none of the planned layers."""
        quantized = ir.serde.deserialize_model(onnx.load(str(path)))
        inherit = {f"{p.layer.weight_value.name}_quantized": p.layer.id for p in planned}
        layers = {layer.id: layer for layer in find_layers(quantized, inherit=inherit)}
        initializers = quantized.graph.initializers
        done = 0
        for item in planned:
            layer = layers.get(item.layer.id)
            if (layer is not None and layer.weight.dtype in _INT_DTYPES) or (
                f"{item.layer.weight_value.name}_quantized" in initializers
            ):
                done += 1
            else:
                self.skip(item.layer.node, "onnxruntime's quantizer left it in float")
        self.note("quantized_layers", done)
        return quantized if done else None


def _refusal(layer: Layer, in_main_graph: bool) -> str | None:
    node, weight = layer.node, layer.weight_value
    if not in_main_graph:
        return "inside a subgraph (onnxruntime's quantizer works on the main graph)"
    if not weight.is_initializer() or weight.const_value is None:
        producer = weight.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "weight is already quantized"
        return "weight is not an initializer (run fold-constants)"
    if layer.weight.dtype != ir.DataType.FLOAT:
        return f"weight is {layer.weight.dtype.name}; int8 quantization starts from float32"
    if node.op_type in ("MatMul", "Gemm") and layer.weight_index != 1:
        return "the constant is the first operand; onnxruntime quantizes a constant B only"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm with transA"
    return None


def _quantized_model(model: ir.Model, quantized: ir.Model) -> None:
    """Replace ``model``'s graph by ORT's result in place (the pipeline keeps ``model``)."""
    model.graph = quantized.graph
    model.ir_version = quantized.ir_version
    model.functions.clear()
    model.functions.update(quantized.functions)


# -- passes -----------------------------------------------------------------------------------
_FLOAT_OUTPUT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@register
class QuantizeInt8(_OrtQuantizePass):
    """Static int8 quantization in QDQ form: weights per channel, activations per tensor.

    Cases: Conv, ConvTranspose, Gemm, MatMul (constant B) and Gather (embedding tables). A
    layer's weight becomes ``DequantizeLinear(int8 W, scale[c])`` with symmetric per-channel
    scales ``max|W_c| / 127``; its activation input gets ``DQ(Q(x))`` with ``scale = (hi - lo)
    / 255`` and a zero point placing 0 exactly, ``[lo, hi]`` from the layer's calibration
    method on calibration data; biases become int32 with ``scale = s_x * s_w``. onnxruntime
    fuses the pattern into integer kernels (QLinearConv, MatMulIntegerToFloat, ...). Conv
    outputs are quantized too, so conv chains stay int8 through Relu, pooling and reshapes
    (``glue_op_types``); Gemm/MatMul outputs stay float where onnxruntime can fuse them
    that way (``quantize_outputs``, see ``_quantized_output_ops``): static ranges on
    transformer layer outputs cost accuracy.

    Per layer (``overrides``): ``enabled`` (false: kept in float, no QDQ), ``calibration``,
    ``percentile``, ``symmetric``, ``bias_correction``. A tensor read by several layers with
    different settings takes the first layer's.

    Refused: weights that are not float32 initializers or already quantized, MatMul/Gemm
    with a constant A, Gemm with transA, layers inside subgraphs, unselected layers.
    """

    name = "quantize-int8"
    Options = QuantizeInt8Options

    def call(self, model: ir.Model) -> PassResult:
        planned = self._plan(model)
        if not planned:
            return PassResult(model, False)
        options: QuantizeInt8Options = self.options  # type: ignore[assignment]
        with tempfile.TemporaryDirectory(prefix="gs-int8-") as tmp_dir, quiet_ort_tools():
            tmp = Path(tmp_dir)
            src, out = tmp / "float.onnx", tmp / "int8.onnx"
            large = self._export(model, src, planned)
            glue = [self._names[node] for node in self._glue(model, planned)]
            feeds = calibration_feeds(model, self.calib, max_samples=options.calib_samples)
            inputs = {v.name for v in model.graph.inputs if not v.is_initializer()}
            op_types = [*options.op_types, *options.glue_op_types]
            ranges = ActivationRanges(src, tmp, feeds, inputs, op_types, options.num_bins)
            table, overrides = self._activation_ranges(planned, ranges)
            cache = tmp / "ranges.json"
            save_tensors_data(TensorsData(CalibrationMethod.MinMax, table), cache)
            extra: dict[str, Any] = {"MatMulConstBOnly": True, "TensorQuantOverrides": overrides}
            float_outputs = _FLOAT_OUTPUT_OPS - self._quantized_output_ops(planned)
            extra["OpTypesToExcludeOutputQuantization"] = sorted(float_outputs)
            try:
                quantize_static(
                    str(src),
                    str(out),
                    None,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=op_types,
                    per_channel=options.per_channel,
                    reduce_range=options.reduce_range,
                    activation_type=_QUANT_TYPES[options.activation_type],
                    weight_type=QuantType.QInt8,
                    nodes_to_quantize=[p.name for p in planned] + glue,
                    use_external_data_format=large,
                    calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=str(cache),
                    extra_options=extra,
                )
            except Exception as e:
                raise GraphSurgeonError(f"onnxruntime quantize_static failed: {e}") from None
            quantized = self._adopt(model, out, planned)
            if quantized is None:
                return PassResult(model, False)
            self._correct_biases(model, quantized, planned, feeds)
            if options.integer_matmul:
                dead = DeadBefore(quantized)
                self.note("matmul_integer_to_float", fuse_matmul_integer_to_float(quantized))
                dead.sweep(quantized)  # the weights' DequantizeLinear nodes it made dead
        _quantized_model(model, quantized)
        self.note("calibration", dict(Counter(p.options.calibration for p in planned)))
        return PassResult(model, True)

    def _glue(self, model: ir.Model, planned: list[_Planned]) -> list[ir.Node]:
        """Selected glue ops whose every reader is a planned layer or glue op: a layer kept
        in float never reads a dequantized glue output. ORT gives a glue output the range of
        its input, so layers with their own activation range settings are not glued."""
        keys = ("calibration", "percentile", "symmetric")
        wide = [getattr(self.options, k) for k in keys]
        int8 = {p.layer.node for p in planned if [getattr(p.options, k) for k in keys] == wide}
        glue: list[ir.Node] = []
        for node in reversed(list(model.graph)):  # readers come before their producers
            if node.op_type not in self.options.glue_op_types or not self.selects(node):
                continue
            outputs = [v for v in node.outputs if v is not None]
            if outputs and all(
                not v.is_graph_output() and v.uses() and all(u.node in int8 for u in v.uses())
                for v in outputs
            ):
                int8.add(node)
                glue.append(node)
        return glue

    def _prepare(self, proto: onnx.ModelProto, item: _Planned) -> None:
        """Bias correction needs a bias: give a Conv/Gemm without one a zero bias (exact)."""
        node = item.layer.node
        if not item.options.bias_correction or node.op_type not in (
            "Conv",
            "ConvTranspose",
            "Gemm",
        ):
            return
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return
        shape = list(item.layer.weight.shape)
        channels = {
            "Conv": shape[0],
            "ConvTranspose": shape[1] * node.attributes.get_int("group", 1),
            "Gemm": shape[0] if node.attributes.get_int("transB", 0) else shape[-1],
        }[node.op_type]
        node_proto = next(n for n in proto.graph.node if n.name == item.name)
        names = {i.name for i in proto.graph.initializer}
        bias_name, n = f"{item.name}.gs_bias", 0
        while bias_name in names:
            n += 1
            bias_name = f"{item.name}.gs_bias{n}"
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.zeros(channels, np.float32), bias_name)
        )
        while len(node_proto.input) < 2:
            node_proto.input.append("")
        node_proto.input.append(bias_name)

    def _quantized_output_ops(self, planned: list[_Planned]) -> set[str]:
        """Op types whose outputs get a QDQ as well as their inputs: ``auto`` quantizes
        Conv/ConvTranspose outputs (int8 conv chains) and keeps Gemm/MatMul outputs float
        (transformer layer outputs carry outliers that a static range clips)."""
        mode = self.options.quantize_outputs
        if mode == "never":
            return set()
        return set(_FLOAT_OUTPUT_OPS) if mode == "always" else {"Conv", "ConvTranspose"}

    def _activation_ranges(
        self, planned: list[_Planned], ranges: ActivationRanges
    ) -> tuple[dict[str, TensorData], dict[str, list[dict[str, Any]]]]:
        """The range of every calibrated tensor (pass-wide method), then each layer's own
        activations with the layer's method; symmetric layers get a TensorQuantOverride."""
        o = self.options
        ranges.expect({o.calibration, *(item.options.calibration for item in planned)})
        table = dict(ranges.get(o.calibration, o.percentile, o.symmetric))
        owner: dict[str, str] = {}
        overrides: dict[str, list[dict[str, Any]]] = {}
        conflicts = 0
        for item in planned:
            opts, node = item.options, item.layer.node
            values = [v for i, v in enumerate(node.inputs) if i != item.layer.weight_index][:1]
            quantize_output = node.op_type in self._quantized_output_ops(planned)
            if quantize_output or node.op_type == "Gather":
                values += list(node.outputs[:1])
            mine = ranges.get(opts.calibration, opts.percentile, opts.symmetric)
            for value in values:
                if value is None or value.name not in mine:
                    continue
                if value.name in owner:
                    conflicts += owner[value.name] != repr(opts)
                    continue
                owner[value.name] = repr(opts)
                table[value.name] = mine[value.name]
                if opts.symmetric:
                    overrides[value.name] = [{"symmetric": True}]
        if conflicts:
            self.note("shared_activation_conflicts", conflicts)
        data = {
            name: TensorData(
                lowest=np.array(min(lo, 0.0), np.float32),
                highest=np.array(max(hi, 0.0), np.float32),
            )
            for name, (lo, hi) in table.items()
        }
        return data, overrides

    def _correct_biases(
        self,
        model: ir.Model,
        quantized: ir.Model,
        planned: list[_Planned],
        feeds: list[dict[str, np.ndarray]],
    ) -> None:
        """Add each corrected layer's own output-mean shift to its bias (see _bias_correction)."""
        wanted = [p for p in planned if p.options.bias_correction and p.layer.op_type != "Gather"]
        if not wanted:
            return
        nodes = {layer_id(n): n for n in quantized.graph if layer_id(n)}
        x_names = [
            p.layer.node.inputs[
                1 - p.layer.weight_index if p.layer.op_type in ("MatMul", "Gemm") else 0
            ].name
            for p in wanted
        ]
        graph_inputs = {v.name for v in model.graph.inputs}
        ShapeInferencePass()(model)  # collect_activations needs types; the graph is replaced
        xs = collect_activations(model, feeds, [n for n in x_names if n not in graph_inputs])
        for name in set(x_names) & graph_inputs:
            xs[name] = np.concatenate([f[name] for f in feeds], axis=0)
        corrected = 0
        for item, x_name in zip(wanted, x_names, strict=True):
            layer = item.layer
            node = nodes.get(layer.id)
            x_index = 1 - layer.weight_index if layer.op_type in ("MatMul", "Gemm") else 0
            target = find_bias(node, layer.weight_index) if node is not None else None
            if target is None:
                self.skip(
                    layer.node,
                    "bias correction: no bias of its own (MatMul without one per-channel Add, or a shared bias)",
                )
                continue
            x = xs[x_name]
            xq = fake_quantized(x, node.inputs[x_index])
            w_q = dequantized(node.inputs[layer.weight_index])
            if xq is None or w_q is None:
                self.skip(layer.node, "bias correction: input or weight not in Q/DQ form")
                continue
            float_bias = layer.bias.numpy().astype(np.float32) if layer.bias is not None else None
            q_bias = dequantized(node.inputs[2]) if layer.op_type != "MatMul" else None
            shift = layer_shift(
                node,
                x_index,
                x.mean(axis=0, keepdims=True).astype(np.float32),
                xq.mean(axis=0, keepdims=True),
                ((layer.weight.numpy().astype(np.float32), float_bias), (w_q, q_bias)),
            )
            apply_shift(*target, shift)
            corrected += 1
        self.note("bias_corrected_layers", corrected)


@register
class QuantizeDynamic(_OrtQuantizePass):
    """Dynamic int8 quantization: int8 weights, activations quantized at run time.

    onnxruntime's ``quantize_dynamic``: ``DynamicQuantizeLinear(x)`` computes a per-tensor
    uint8 scale and zero point from each input's own min/max as the model runs, then
    ``MatMulInteger`` / ``ConvInteger`` multiply in integers and the result is rescaled by
    ``s_x * s_w`` (ORT fuses this into its DynamicQuantizeMatMul kernel at load time). Gemm
    becomes MatMulInteger + Add; Gather tables are stored as uint8 with a DequantizeLinear
    after the lookup. A com.microsoft ``Attention`` (from ``fuse-attention``) becomes
    ``QAttention``: one int8 GEMM for Q, K and V (onnxruntime quantizes its weight with 7-bit
    range). No calibration data is needed. Per layer: ``enabled``, ``per_channel`` (layers
    are quantized in one onnxruntime call per distinct setting).

    Refused: weights that are not float32 initializers or already quantized, MatMul/Gemm with
    a constant A, Gemm with transA, layers inside subgraphs, unselected layers.
    """

    name = "quantize-dynamic"
    Options = QuantizeDynamicOptions

    def call(self, model: ir.Model) -> PassResult:
        planned = self._plan(model)
        if not planned:
            return PassResult(model, False)
        options: QuantizeDynamicOptions = self.options  # type: ignore[assignment]
        groups: dict[bool, list[_Planned]] = {}
        for item in planned:  # one quantize_dynamic call per per-layer setting
            groups.setdefault(item.options.per_channel, []).append(item)
        with tempfile.TemporaryDirectory(prefix="gs-dyn-") as tmp_dir, quiet_ort_tools():
            src = Path(tmp_dir) / "float.onnx"
            large = self._export(model, src, planned)
            for i, (per_channel, items) in enumerate(groups.items()):
                out = Path(tmp_dir) / f"int8-{i}.onnx"
                try:
                    quantize_dynamic(
                        str(src),
                        str(out),
                        op_types_to_quantize=options.op_types,
                        per_channel=per_channel,
                        reduce_range=options.reduce_range,
                        weight_type=_QUANT_TYPES[options.weight_type],
                        # ORT turns a Gemm into MatMul "<name>_MatMul" + Add before quantizing
                        nodes_to_quantize=[p.name for p in items]
                        + [f"{p.name}_MatMul" for p in items if p.layer.op_type == "Gemm"],
                        use_external_data_format=large,
                        extra_options={
                            "MatMulConstBOnly": True,
                            # outputs of contrib ops (Attention, an earlier group's integer
                            # ops) have no inferred type; they are float tensors
                            "DefaultTensorType": onnx.TensorProto.FLOAT,
                        },
                    )
                except Exception as e:
                    raise GraphSurgeonError(f"onnxruntime quantize_dynamic failed: {e}") from None
                src = out
            quantized = self._adopt(model, src, planned)
        if quantized is None:
            return PassResult(model, False)
        _quantized_model(model, quantized)
        if len(groups) > 1 or any(groups):
            self.note("per_channel_layers", sum(len(v) for k, v in groups.items() if k))
        return PassResult(model, True)


__all__ = ["QuantizeDynamic", "QuantizeInt8"]

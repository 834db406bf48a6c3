"""``quantize-weights``: weight-only low-bit quantization (int8/4/2, ternary, binary), packed.

Each weight becomes block-wise codes (see :mod:`graphsurgeon.passes._lowbit` for the grids):
groups of ``group_size`` consecutive weights along the reduction dim share one scale (and, if
asymmetric, one zero point). Activations stay float; only the stored weights shrink.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from graphsurgeon.passes._gptq import conv_columns, gptq_quantize, hessian
from graphsurgeon.passes._lowbit import (
    DECODE_OVERHEAD_BYTES,
    Grid,
    emit_codebook_decode,
    matmulnbits_tensors,
    quantize_rtn,
    unique_name,
)

from graphsurgeon.calibration import calibration_feeds, collect_activations
from graphsurgeon.layers import LAYER_ID_KEY, Layer, find_layers
from graphsurgeon.options import Choice, FloatRange, IntRange, LayerPassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register

Bits = Literal[8, 4, 2, 1, "ternary"]
MS_DOMAIN = "com.microsoft"
MATMULNBITS_BITS = (2, 4, 8)  # ORT's CPU kernel (checked on 1.31)


class QuantizeWeightsOptions(LayerPassOptions):
    bits: Bits = option(
        4,
        "Code width: 8, 4 or 2 bit integers, 1 (binary: +-a per group) or 'ternary' "
        "({-a, 0, +a} per group, stored in 2 bits).",
        Choice([8, 4, 2, "ternary", 1]),
    )
    group_size: Literal[16, 32, 64, 128, 256] = option(
        32,
        "Weights per scale, consecutive along the reduction dim.",
        Choice([32, 64, 128]),
    )
    symmetric: bool = option(
        True,
        "Symmetric grid (no zero points). Asymmetric stores a zero point per group and fits "
        "skewed groups better. Binary and ternary are symmetric by construction.",
        Choice([True, False]),
    )
    method: Literal["rtn", "gptq"] = option(
        "rtn",
        "rtn: round to nearest. gptq: compensate each column's rounding error on the "
        "columns after it, weighted by the layer's inputs on calibration data (MatMul/Gemm).",
        Choice(["rtn", "gptq"]),
    )
    damp: float = option(
        0.01,
        "GPTQ: fraction of mean(diag H) added to H's diagonal.",
        FloatRange(0.001, 0.1, log=True),
        gt=0,
        le=1,
    )
    calib_samples: int = option(
        64, "GPTQ: calibration samples used to estimate H.", IntRange(8, 256, log=True), ge=1
    )
    accuracy_level: Literal[0, 1, 4] = option(
        0,
        "MatMulNBits compute type on onnxruntime's CPU: 0 (unset) and 1 (fp32) dequantize the "
        "weight blocks and multiply in fp32; 4 (int8) also quantizes the input per block of "
        "group_size along K (symmetric, scale max|a|/127, round to nearest) and multiplies "
        "int8 x int-b codes in integers (VNNI where the CPU has it): 1.5-2.5x faster at "
        "small M (MiniLM, 41 tokens), at the cost of the input's rounding error. Other forms "
        "ignore it.",
        Choice([0, 1, 4]),
    )
    format: Literal["auto", "codebook"] = option(
        "auto",
        "auto: MatMul -> com.microsoft MatMulNBits (ORT's int-b kernel), int4 embedding "
        "tables -> com.microsoft GatherBlockQuantized (packed in memory), other layers -> a "
        "codebook decode subgraph; codebook: the decode subgraph everywhere (default domain "
        "only, for runtimes without ORT's contrib ops).",
    )


@register
class QuantizeWeights(GSPass):
    """Quantize layer weights to packed low-bit codes, block-wise along the reduction dim.

    Cases:

    - MatMul with a constant 2-D ``[K, N]`` weight and float32 input -> ``MatMulNBits``
      (bits 2/4/8; binary and ternary as 2-bit codes {1, 3} / {1, 2, 3} with the kernel's
      default zero point 2): ORT runs it natively, packed weights stay packed in memory.
      ``accuracy_level: 4`` has ORT quantize the input to int8 per block and multiply in
      integers: on MiniLM (M = 41 tokens) 1.5x (int4) to 2.5x (int8) faster than level 0,
      which dequantizes the weight blocks and runs fp32 math.
    - Gemm (weight as B), Conv, embeddings (Gather tables, groups along each row), and MatMul
      under ``format: codebook`` -> the weight input is
      rebuilt at run time from packed codes by a default-domain decode subgraph (``Cast``,
      integer ``Div``/``Mod`` unpacking, ``Gather`` of a 2^b codebook, ``Mul`` by group
      scales): binary uses 1 bit per weight there. ORT's constant folding (on by default in
      sessions) runs the decode once at load time.
    - GPTQ (``method: gptq``) on MatMul/Gemm: ``H = 2 X^T X / n`` from the layer's inputs on
      calibration data (one run of the original model), then the column-wise OBQ update of
      :mod:`graphsurgeon.passes._gptq`. On 2-D, group-1 Conv the rows of ``X`` are the input
      patches (im2col) the kernel multiplies; grouped Conv falls back to round-to-nearest.

    Refused, with a reason: a weight that is already packed, shared by several nodes or a
    graph input; a constant A operand; ConvTranspose and recurrent layers; weights
    whose packed form would not be smaller; a default opset below 13 for the decode subgraph.
    """

    strength_option: ClassVar[str] = "bits"  # sensitivity: fewer bits compress more

    name = "quantize-weights"
    kind = "lossy"
    Options = QuantizeWeightsOptions

    def call(self, model: ir.Model) -> PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        plans: list[tuple[Layer, QuantizeWeightsOptions, np.ndarray, bool]] = []
        for layer in find_layers(model):
            if not self.selects(layer.node):
                continue
            opts = self.options_for(layer.id)
            assert isinstance(opts, QuantizeWeightsOptions)
            view, reason = _matrix_view(layer)
            if reason is None and opset < 13 and not _uses_matmulnbits(layer, opts):
                reason = f"the decode subgraph needs opset >= 13 (model has {opset})"
            if reason is not None:
                self.skip(layer.node, reason)
                continue
            assert view is not None
            plans.append((layer, opts, view[0], view[1]))
        hessians = self._hessians(model, plans)
        modified = False
        summary: dict[str, str] = {}
        for layer, opts, v, transposed in plans:
            grid = _grid(opts)
            if opts.method == "gptq" and layer.id in hessians:
                codes, scale, zero = gptq_quantize(
                    v, hessians[layer.id], grid, opts.group_size, opts.damp
                )
            else:
                codes, scale, zero = quantize_rtn(v, grid, opts.group_size)
            use_nbits = _uses_matmulnbits(layer, opts)
            use_gbq = not use_nbits and _uses_gather_block(layer, opts, grid)
            packed_bytes = _packed_bytes(codes, scale, grid, use_nbits or use_gbq)
            if packed_bytes >= layer.weight.nbytes:
                self.skip(layer.node, "the packed form would not be smaller than the weight")
                continue
            if use_nbits:
                _to_matmulnbits(
                    model, layer, codes, scale, zero, grid, opts.group_size, opts.accuracy_level
                )
            elif use_gbq:
                _to_gather_block(model, layer, codes, scale, zero, grid, opts.group_size)
            else:
                _to_codebook(layer, codes, scale, zero, grid, transposed)
            method = "gptq" if layer.id in hessians and opts.method == "gptq" else "rtn"
            form = "MatMulNBits" if use_nbits else "GatherBlockQuantized" if use_gbq else "codebook"
            level = f" acc{opts.accuracy_level}" if use_nbits and opts.accuracy_level else ""
            summary[layer.id] = f"{form} {_label(opts)} g{opts.group_size} {method}{level}"
            modified = True
        self.note("quantized", summary)
        return PassResult(model, modified)

    def _hessians(
        self, model: ir.Model, plans: list[tuple[Layer, QuantizeWeightsOptions, np.ndarray, bool]]
    ) -> dict[str, np.ndarray]:
        wanted: dict[str, tuple[Layer, int]] = {}
        for layer, opts, _, _ in plans:
            if opts.method != "gptq":
                continue
            x = layer.node.inputs[0]
            if layer.op_type == "Gather":
                self.skip(layer.node, "gptq: an embedding reads no activations; used rtn")
            elif layer.op_type == "Conv" and (reason := _conv_gptq_refusal(layer)):
                self.skip(layer.node, f"gptq: {reason}; used rtn")
            elif x is None or layer.node.graph is not model.graph or x.type is None:
                self.skip(
                    layer.node, "gptq: layer input not in the main graph or untyped; used rtn"
                )
            else:
                trans_a = layer.op_type == "Gemm" and layer.node.attributes.get_int("transA", 0)
                wanted[layer.id] = (layer, int(bool(trans_a)))
        if not wanted:
            return {}
        samples = max(opts.calib_samples for _, opts, _, _ in plans)
        feeds = calibration_feeds(model, self.calib, max_samples=samples)
        names = [layer.node.inputs[0].name for layer, _ in wanted.values()]
        acts = collect_activations(model, feeds, names)
        out = {}
        for lid, (layer, trans_a) in wanted.items():
            x = acts[layer.node.inputs[0].name]
            if layer.op_type == "Conv":
                attrs = {
                    k: list(layer.node.attributes[k].value)
                    for k in ("strides", "pads", "dilations")
                    if k in layer.node.attributes
                }
                x = conv_columns(x, attrs, tuple(layer.weight.shape[2:]))
            out[lid] = hessian(x.T if trans_a else x)
        self.note("gptq_samples", int(sum(len(next(iter(f.values()))) for f in feeds)))
        return out


def _conv_gptq_refusal(layer: Layer) -> str | None:
    """Why GPTQ's im2col Hessian does not apply to this Conv (None: it does)."""
    attrs = layer.node.attributes
    if len(layer.weight.shape) != 4:
        return "only 2-D Conv"
    if attrs.get_int("group", 1) != 1:
        return "grouped Conv (one Hessian per group is not implemented)"
    if attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "auto_pad SAME_*"
    return None


def _grid(opts: QuantizeWeightsOptions) -> Grid:
    if opts.bits == "ternary":
        return Grid("ternary", 2)
    if opts.bits == 1:
        return Grid("binary", 2)
    return Grid("int", int(opts.bits), opts.symmetric)


def _label(opts: QuantizeWeightsOptions) -> str:
    if opts.bits in ("ternary", 1):
        return "ternary" if opts.bits == "ternary" else "binary"
    return f"int{opts.bits} {'sym' if opts.symmetric else 'asym'}"


def _matrix_view(layer: Layer) -> tuple[tuple[np.ndarray, bool] | None, str | None]:
    """The weight as ``[N, K]`` (K = reduction dim) and whether that is its transpose."""
    node, op = layer.node, layer.op_type
    value = layer.weight_value
    if value.const_value is None or not value.is_initializer():
        return None, "weight is not a plain initializer (already quantized or packed?)"
    if value.is_graph_input() or value.is_graph_output():
        return None, "weight is a graph input or output"
    if len(value.uses()) != 1:
        return None, "weight is shared by several nodes"
    if value.dtype != ir.DataType.FLOAT:
        return None, f"weight dtype {value.dtype} (float32 only)"
    w = value.const_value.numpy()
    if op == "MatMul" and layer.weight_index == 1 and w.ndim == 2:
        return (w.T.astype(np.float64), True), None
    if op == "Gemm" and layer.weight_index == 1:
        if node.attributes.get_int("transB", 0):
            return (w.astype(np.float64), False), None
        return (w.T.astype(np.float64), True), None
    if op == "Conv":
        return (w.reshape(w.shape[0], -1).astype(np.float64), False), None
    if (
        op == "Gather"
        and layer.weight_index == 0
        and w.ndim == 2
        and node.attributes.get_int("axis", 0) == 0
    ):
        return (w.astype(np.float64), False), None  # an embedding: groups run along each row
    if op in ("MatMul", "Gemm"):
        return None, "constant A operand or weight of rank != 2"
    return None, f"{op} weights are not supported"


def _uses_matmulnbits(layer: Layer, opts: QuantizeWeightsOptions) -> bool:
    x = layer.node.inputs[0]
    bits = 2 if opts.bits in ("ternary", 1) else int(opts.bits)
    return (
        opts.format == "auto"
        and layer.op_type == "MatMul"
        and bits in MATMULNBITS_BITS
        and x is not None
        and x.dtype == ir.DataType.FLOAT
    )


def _packed_bytes(codes: np.ndarray, scale: np.ndarray, grid: Grid, nbits: bool) -> int:
    """Stored bytes: codes, float32 scales, zero points (packed uint8 for MatMulNBits,
    float32 offsets in the codebook form), and the decode subgraph."""
    bits = grid.bits if nbits else grid.codebook_bits
    zero_bytes = 0
    if grid.needs_zero_points:
        zero_bytes = scale.size * bits // 8 + 1 if nbits else scale.size * 4
    overhead = 0 if nbits else DECODE_OVERHEAD_BYTES
    return codes.size * bits // 8 + scale.size * 4 + zero_bytes + overhead


def _to_matmulnbits(
    model: ir.Model,
    layer: Layer,
    codes: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    grid: Grid,
    group: int,
    accuracy_level: int = 0,
) -> None:
    k, n = layer.weight.shape
    packed, scales, zero_points = matmulnbits_tensors(codes, scale, zero, grid)
    arrays = [(f"_q{grid.bits}", packed), (f"_scales{grid.bits}", scales)]
    if zero_points is not None:
        arrays.append((f"_zero_points{grid.bits}", zero_points))
    attributes = {"K": int(k), "N": int(n), "bits": grid.bits, "block_size": group}
    if accuracy_level:  # 0 is the kernel's default: leave the attribute out
        attributes["accuracy_level"] = int(accuracy_level)
    _replace_with_contrib_op(model, layer, "MatMulNBits", arrays, attributes, at=0)


def _uses_gather_block(layer: Layer, opts: QuantizeWeightsOptions, grid: Grid) -> bool:
    """An int4 embedding table ORT's ``GatherBlockQuantized`` can look up while packed: row
    groups of a power of two >= 16 that divide the row, integer indices."""
    ids = layer.node.inputs[1] if len(layer.node.inputs) > 1 else None
    width = int(layer.weight.shape[-1])
    group = opts.group_size
    return (
        opts.format == "auto"
        and layer.op_type == "Gather"
        and grid.scheme == "int"
        and grid.bits == 4
        and group >= 16
        and group & (group - 1) == 0
        and width % group == 0
        and ids is not None
        and ids.dtype in (ir.DataType.INT64, ir.DataType.INT32)
    )


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first (padded to even)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], -1)
    values = values.astype(np.uint8)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _to_gather_block(
    model: ir.Model,
    layer: Layer,
    codes: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    grid: Grid,
    group: int,
) -> None:
    """``Gather(table, ids)`` -> ``com.microsoft::GatherBlockQuantized(packed, ids, scales
    [, zero_points])``: the table stays packed in memory and rows are dequantized as they are
    looked up (the codebook form would decode the whole table once, at load)."""
    rows = codes.shape[0]
    arrays = [
        ("_q4", _pack_nibbles(codes.reshape(rows, -1))),
        ("_scales", scale.astype(np.float32)),
    ]
    if grid.needs_zero_points:
        arrays.append(("_zero_points", _pack_nibbles(zero.astype(np.uint8))))
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": group, "bits": 4}
    # the packed table comes first, then the indices the Gather read
    _replace_with_contrib_op(model, layer, "GatherBlockQuantized", arrays, attributes, at=1)


def _replace_with_contrib_op(
    model: ir.Model,
    layer: Layer,
    op_type: str,
    arrays: list[tuple[str, np.ndarray]],
    attributes: dict,
    *,
    at: int,
) -> None:
    """Replace ``layer``'s node by the com.microsoft ``op_type`` reading the node's activation
    input plus ``arrays`` as new initializers (named after the old weight plus their suffix);
    the activation (the input that is not the weight) goes at input ``at``. The node keeps
    its name and layer id, its output its consumers; the old weight goes."""
    node, graph = layer.node, layer.node.graph
    assert graph is not None
    old = layer.weight_value
    base = old.name or f"{layer.id}_weight"
    values = []
    for suffix, array in arrays:
        name = unique_name(graph, f"{base}{suffix}")
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype
        graph.register_initializer(value)
        values.append(value)
    activation = node.inputs[1 - layer.weight_index]
    inputs = [*values[:at], activation, *values[at:]]
    y = node.outputs[0]
    out = ir.Value(
        name=unique_name(graph, f"{y.name}_{op_type.lower()}"), type=y.type, shape=y.shape
    )
    new = ir.node(
        op_type, inputs, attributes=attributes, domain=MS_DOMAIN, name=node.name, outputs=[out]
    )
    new.metadata_props[LAYER_ID_KEY] = layer.id
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [y], [out])
    del graph.initializers[old.name]


def _to_codebook(
    layer: Layer,
    codes: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    grid: Grid,
    transposed: bool,
) -> None:
    node, graph = layer.node, layer.node.graph
    assert graph is not None
    old = layer.weight_value
    levels = np.arange(1 << grid.bits, dtype=np.float64)
    offset = None
    if grid.scheme == "binary":
        codes, levels = (codes == 3).astype(np.uint8), np.array([-1.0, 1.0])
    elif grid.needs_zero_points:
        offset = -zero * scale
    else:
        levels = levels - grid.default_zero
    w = emit_codebook_decode(
        graph,
        node,
        old.name or f"{layer.id}_weight",
        codes,
        grid.codebook_bits,
        levels,
        tuple(layer.weight.shape),
        scale=scale,
        offset=offset,
        transpose=transposed,
    )
    node.replace_input_with(layer.weight_index, w)
    del graph.initializers[old.name]

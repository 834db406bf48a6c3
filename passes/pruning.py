"""Pruning passes: unstructured (magnitude or activation-weighted), N:M, and block sparsity.

They act on the weights of the layers :func:`graphsurgeon.layers.find_layers` reports for
Conv, ConvTranspose, Gemm and MatMul (and Gather embedding tables with
``include_embeddings``), writing zeros into the weights. The graph keeps its ops, so the result
runs in stock onnxruntime; but zeros in a dense tensor take as many bytes as any other value:
**pruning alone never shrinks the file or speeds up a dense kernel** (the kernels issue adds
sparse formats that read the mask below). The file grows only by the mask metadata.

Scores (per weight element; every criterion ranks the elements of one layer):

- ``l1``: ``|w|``; ``l2``: ``w**2`` (the same order for single elements; they differ for blocks,
  where a block scores by its mean ``|w|`` or its RMS).
- ``activation`` (Wanda, Sun et al. 2023): ``|w_ij| * ||x_j||_2``, with ``||x_j||`` the L2 norm of
  input channel ``j`` of the layer's input over the calibration set (``--calib``, else
  generated inputs). Pruning ``w_ij`` changes the output by ``w_ij * x_j``, whose expected size
  is what the score measures; a small weight on a loud channel can matter more than a large
  weight on a quiet one.

Mask metadata (format version 1). Every pruned layer node carries, in ``metadata_props``, the
key ``graphsurgeon.sparsity`` with a JSON object::

    {"v": 1, "method": "magnitude" | "nm" | "blocks", "input": <weight input index>,
     "shape": [weight dims], "sparsity": <fraction of weights pruned>, "criterion": ...,
     "pattern": "2:4", "reduction_axes": [weight axes, in order]  (nm only),
     "block": [rows, cols], "view": [rows, cols]                  (blocks only),
     "encoding": "zeros" | "bits", "data": <base64>, "crc32": <int>}

The mask is a bool array of the weight's shape, True where the weight is kept. Packed with
``np.packbits(mask.ravel(), bitorder="little")`` its CRC-32 is ``crc32``. Encodings:

- ``zeros`` (default): the pass wrote a zero into every pruned weight, so the mask is
  ``weight != 0`` except kept weights that happen to be exactly zero; ``data`` is
  ``zlib(uint64 little-endian gaps between the flat indices of those exceptions)``, almost
  always empty. It costs a few hundred bytes per layer, but depends on the weight: if a later
  pass changes it (quantization rounding small weights to zero), the CRC no longer matches and
  :func:`read_mask` refuses rather than guessing.
- ``bits``: ``data`` is ``zlib(packbits(mask))``: self-contained, 1 bit per weight (1/32 of
  float32 weight bytes, about 4/3 of that in base64).

Layers whose weight is shared by several nodes are pruned once, consistently, when every reader
is a selected layer with the same options and layout; otherwise they are skipped with a reason.
Pruning a layer that already has a mask keeps what was pruned before (the masks are ANDed).
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import field_validator

from graphsurgeon.calibration import calibration_feeds, collect_activations
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.layers import LAYER_ID_KEY, Layer, constant_of, find_layers
from graphsurgeon.options import Choice, FloatRange, LayerPassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register
from graphsurgeon.shapes import ShapeInferencePass

MASK_KEY = "graphsurgeon.sparsity"
MASK_VERSION = 1
PRUNABLE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)

__all__ = ["MASK_KEY", "PruneBlocks", "PruneMagnitude", "PruneNM", "read_mask"]


# -- options ----------------------------------------------------------------------------------
class _PruneOptions(LayerPassOptions):
    min_params: int = option(
        0, "Layers with fewer weights than this are left dense (tiny layers are sensitive).", ge=0
    )
    include_embeddings: bool = option(
        False, "Also prune Gather embedding tables (rows are looked up, not multiplied)."
    )
    mask_encoding: Literal["zeros", "bits"] = option(
        "zeros",
        "How the mask is stored in the node metadata: 'zeros' (relative to the weight's zeros, "
        "a few bytes) or 'bits' (packed bits, independent of later weight changes).",
    )
    calibration_samples: int = option(
        64, "Calibration samples used for the activation criterion and bias correction.", ge=1
    )
    bias_correction: bool = option(
        False,
        "Add the pruned weights' mean contribution (W - W') E[x] to the layer's bias, so that "
        "its outputs keep their mean on the calibration data (recovery without training).",
        Choice([False, True]),
    )


class MagnitudeOptions(_PruneOptions):
    sparsity: float = option(
        0.5, "Fraction of the layer's weights set to zero.", FloatRange(0.1, 0.95), ge=0.0, lt=1.0
    )
    criterion: Literal["l1", "l2", "activation"] = option(
        "l1",
        "Score: |w| (l1), w^2 (l2), or |w| times the input channel's L2 norm on calibration "
        "data (activation, Wanda).",
        Choice(["l1", "l2", "activation"]),
    )


class NMOptions(_PruneOptions):
    pattern: str = option(
        "2:4",
        "N:M: keep N of every M consecutive weights along the reduction axis.",
        Choice(["2:4", "1:4", "4:8"]),
        pattern=r"^\d+:\d+$",
    )
    criterion: Literal["l1", "l2", "activation"] = option(
        "l1",
        "Which N weights of a group are kept (see prune-magnitude).",
        Choice(["l1", "activation"]),
    )

    @field_validator("pattern")
    @classmethod
    def _n_below_m(cls, value: str) -> str:
        n, m = (int(x) for x in value.split(":"))
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {value}")
        return value


class BlockOptions(_PruneOptions):
    sparsity: float = option(
        0.5, "Fraction of the blocks set to zero.", FloatRange(0.1, 0.9), ge=0.0, lt=1.0
    )
    block: str = option(
        "4x4",
        "Block shape ROWSxCOLS in the 2-D view of the weight (its shape[0] by the rest).",
        Choice(["1x4", "4x1", "4x4", "8x8", "16x16"]),
        pattern=r"^[1-9]\d*x[1-9]\d*$",
    )
    criterion: Literal["l1", "l2", "activation"] = option(
        "l1",
        "Block score: mean |w| (l1), RMS (l2), or mean |w| times input norm (activation).",
        Choice(["l1", "l2", "activation"]),
    )


class _Refused(Exception):
    """A layer this pass leaves alone; the message is the reason."""


@dataclass
class _Plan:
    """One weight to prune and every layer that reads it."""

    value: ir.Value
    layers: list[Layer]
    options: Any


# -- the shared pass body ---------------------------------------------------------------------
class _PruningPass(GSPass):
    kind = "lossy"
    method: str

    def mask(
        self, weight: np.ndarray, score: np.ndarray, layer: Layer, opts: Any
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The kept-mask for ``weight`` given per-element ``score``, and extra metadata."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> PassResult:
        had_id = {n for n in _nodes(model) if LAYER_ID_KEY in n.metadata_props}
        layers = find_layers(model)
        plans = self._plans(layers)
        wanted = [
            p for p in plans if p.options.criterion == "activation" or p.options.bias_correction
        ]
        norms, means = self._input_stats(model, wanted) if wanted else ({}, {})
        modified = False
        achieved: dict[str, float] = {}
        pruned = mask_chars = 0
        for plan in plans:
            try:
                result = self._prune(plan, norms, means)
            except _Refused as e:
                for layer in plan.layers:
                    self.skip(layer.node, str(e))
                continue
            changed, meta_text, n_pruned, sparsity = result
            modified |= changed
            pruned += n_pruned
            mask_chars += len(meta_text) * len(plan.layers)
            for layer in plan.layers:
                achieved[layer.id] = sparsity
        if not modified:  # ids find_layers assigned are part of no change: roll them back
            for node in _nodes(model):
                if node not in had_id:
                    node.metadata_props.pop(LAYER_ID_KEY, None)
        self.note("sparsity", achieved)
        self.note("weights_pruned", pruned)
        self.note("mask_metadata_bytes", mask_chars)
        return PassResult(model, modified)

    # -- which layers --------------------------------------------------------------------------
    def _refusal(self, layer: Layer, opts: Any) -> str | None:
        node, value = layer.node, layer.weight_value
        if not self.selects(node):
            return "not selected by the targets"
        if node.op_type == "Gather":
            if not opts.include_embeddings:
                return "embedding table (include_embeddings is off)"
        elif node.op_type not in PRUNABLE_OPS:
            return f"{node.op_type} weights are not pruned"
        if layer.weight.dtype not in _FLOAT_TYPES:
            return "weight is not floating point"
        if len(layer.weight.shape) < 2:
            return "weight has fewer than 2 dims"
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "quantized weight (prune before quantizing)"
        if producer is not None and producer.op_type != "Constant":
            return "weight is computed by a subgraph (packed or decoded): prune before packing"
        if producer is not None and "value" not in producer.attributes:
            return "Constant node without a tensor value"
        if value.is_graph_input():
            return "weight is a graph input (it can be replaced at run time)"
        if layer.weight.size < opts.min_params:
            return f"fewer than min_params={opts.min_params} weights"
        if node.op_type == "Gather" and opts.criterion == "activation":
            return "activation criterion needs a float input; an embedding reads indices"
        return None

    def _plans(self, layers: list[Layer]) -> list[_Plan]:
        groups: dict[ir.Value, list[tuple[Layer, Any]]] = {}
        for layer in layers:
            opts = self.options_for(layer.id)
            reason = self._refusal(layer, opts)
            if reason is not None:
                self.skip(layer.node, reason)
                continue
            groups.setdefault(layer.weight_value, []).append((layer, opts))
        plans = []
        for value, members in groups.items():
            readers = {use.node for use in value.uses()}
            reason = None
            if readers != {layer.node for layer, _ in members} or value.is_graph_output():
                reason = "weight shared with a node this pass does not prune"
            elif len({_dump(opts) for _, opts in members}) > 1:
                reason = "weight shared by layers with different options"
            elif len({_layout(layer) for layer, _ in members}) > 1:
                reason = "weight shared by layers that read it in different layouts"
            if reason is not None:
                for layer, _ in members:
                    self.skip(layer.node, reason)
                continue
            plans.append(_Plan(value, [layer for layer, _ in members], members[0][1]))
        return plans

    # -- activation norms ----------------------------------------------------------------------
    def _input_stats(
        self, model: ir.Model, plans: list[_Plan]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-input-channel L2 norm and mean of each needed activation, keyed by value name."""
        axes: dict[str, int] = {}
        main = set(model.graph)
        for plan in plans:
            for layer in plan.layers:
                x, axis = _activation_input(layer)
                if (
                    x is None
                    or layer.node not in main
                    or ir.convenience.get_const_tensor(x) is not None
                ):
                    continue
                axes[x.name] = axis  # a value has one layout whatever reads it
        if not axes:
            return {}, {}
        feeds = calibration_feeds(model, self.calib, max_samples=self.options.calibration_samples)
        inputs = {v.name for v in model.graph.inputs}
        inner = [n for n in axes if n not in inputs]
        values = {v.name: v for node in model.graph for v in node.outputs}
        if any(values[n].type is None for n in inner):
            ShapeInferencePass()(model)  # collect_activations needs the dtypes
        arrays = collect_activations(model, feeds, inner)
        for name in axes.keys() & inputs:
            arrays[name] = np.concatenate([np.asarray(f[name]) for f in feeds], axis=0)
        norms, means = {}, {}
        for name, axis in axes.items():
            x = np.moveaxis(arrays[name].astype(np.float64), axis, -1).reshape(
                -1, arrays[name].shape[axis]
            )
            norms[name] = np.sqrt(np.square(x).sum(axis=0))
            means[name] = x.mean(axis=0)
        return norms, means

    # -- one weight ----------------------------------------------------------------------------
    def _prune(
        self, plan: _Plan, norms: dict[str, np.ndarray], means: dict[str, np.ndarray]
    ) -> tuple[bool, str, int, float]:
        first, opts = plan.layers[0], plan.options
        old = first.weight.numpy()
        weight = np.asarray(old, dtype=np.float64)
        score = np.abs(weight)
        if opts.criterion == "l2":
            score = np.square(weight)
        elif opts.criterion == "activation":
            scale = np.zeros_like(weight)
            for layer in plan.layers:
                scale += np.square(_broadcast_norm(layer, norms, weight.shape))
            score = score * np.sqrt(scale)
        mask, extra = self.mask(weight, score, first, opts)
        prior = _prior_mask(first)
        if prior is not None:
            mask &= prior
        new = np.where(mask, old, np.zeros((), dtype=old.dtype)).astype(old.dtype)
        meta = {
            "v": MASK_VERSION,
            "method": self.method,
            "input": first.weight_index,
            "shape": list(weight.shape),
            "sparsity": round(float(1.0 - mask.mean()), 6),
            "criterion": opts.criterion,
            **extra,
            **_encode(mask, new, opts.mask_encoding),
        }
        text = json.dumps(meta, separators=(",", ":"))
        changed = new.tobytes() != np.ascontiguousarray(old).tobytes()
        if changed:
            _write_weight(plan.value, new)
            if opts.bias_correction:
                reason = _correct_bias(plan, weight - new.astype(np.float64), means)
                if reason is not None:
                    self.skip(first.node, f"bias correction: {reason}")
        for layer in plan.layers:
            if layer.node.metadata_props.get(MASK_KEY) != text:
                layer.node.metadata_props[MASK_KEY] = text
                changed = True
        return changed, text, int(mask.size - mask.sum()), meta["sparsity"]


# -- the three passes -------------------------------------------------------------------------
@register
class PruneMagnitude(_PruningPass):
    """Unstructured pruning: zero the ``round(sparsity * n)`` lowest-scoring weights of a layer.

    Scores are ``|w|``, ``w^2`` or ``|w| * ||x_j||`` (see the module docstring); ties break by
    flat index, so the result is deterministic. Sparsity counts among the layer's own weights
    (bias excluded). Zeros in a dense tensor do not shrink the file; the mask metadata records
    the pattern for sparse kernels and regrowth.

    Refused (with a reason): unselected layers, embeddings unless ``include_embeddings``, other
    weight-bearing ops (LSTM/GRU/RNN), non-float or 1-D weights, quantized weights, weights that
    are graph inputs, layers under ``min_params``, shared weights read by other nodes or under
    different options.
    """

    name = "prune-magnitude"
    method = "magnitude"
    Options = MagnitudeOptions

    def mask(self, weight, score, layer, opts):  # type: ignore[override]
        k = round(opts.sparsity * weight.size)
        return ~_lowest(score.ravel(), k).reshape(weight.shape), {}


@register
class PruneNM(_PruningPass):
    """N:M sparsity: in every group of M consecutive weights along the reduction axis, keep the
    N highest-scoring ones (2:4 is what sparse tensor cores execute at twice the dense rate).

    The reduction axis is the one the layer sums over: K of a MatMul weight ``[..., K, N]``
    (axis -1 when the weight is the left operand), axis 0 of a Gemm weight ``[K, N]`` or axis 1
    with ``transB`` (likewise ``transA`` when A is the weight), the flattened ``Cin/g*kh*kw`` of
    a Conv weight ``[Cout, Cin/g, kh, kw]``, and the input channels of a ConvTranspose weight
    ``[Cin, Cout/g, kh, kw]`` (per group). The metadata's ``reduction_axes`` lists those axes.
    A layer whose reduction length (per group) is not a multiple of M is skipped; so are
    embeddings, which reduce over nothing.
    """

    name = "prune-nm"
    method = "nm"
    Options = NMOptions

    def mask(self, weight, score, layer, opts):  # type: ignore[override]
        n, m = (int(x) for x in opts.pattern.split(":"))
        axes, segment = _reduction(layer, weight.shape)
        if segment % m:
            raise _Refused(f"reduction length {segment} is not a multiple of M={m}")
        rest = [a for a in range(weight.ndim) if a not in axes]
        view = np.transpose(score, rest + axes).reshape(-1, m)
        order = np.argsort(-view, axis=1, kind="stable")[:, :n]
        keep = np.zeros(view.shape, dtype=bool)
        np.put_along_axis(keep, order, True, axis=1)
        shape = [weight.shape[a] for a in rest + axes]
        mask = np.transpose(keep.reshape(shape), np.argsort(rest + axes))
        return mask, {"pattern": opts.pattern, "reduction_axes": axes}


@register
class PruneBlocks(_PruningPass):
    """Block sparsity: zero whole ``rows x cols`` blocks of the 2-D view of the weight.

    The view is the weight as stored reshaped to ``(shape[0], prod(shape[1:]))``: a Gemm or
    MatMul weight itself, ``[Cout, Cin/g*kh*kw]`` for a Conv. Blocks tile it from the top left;
    where a dim is not a multiple of the block, the edge blocks are partial and compete on the
    same per-element scale (mean ``|w|``, RMS), so a small block is not pruned for being small.
    Sparsity is the fraction of blocks zeroed (``round(sparsity * n_blocks)``); a block is zeroed
    entirely or left untouched (the notes report the fraction of weights, which partial
    blocks make slightly lower). The metadata keeps ``block`` and ``view`` for a BSR kernel.
    MatMul weights of rank > 2 are skipped (their 2-D view is ambiguous).
    """

    name = "prune-blocks"
    method = "blocks"
    Options = BlockOptions

    def mask(self, weight, score, layer, opts):  # type: ignore[override]
        if layer.op_type == "MatMul" and weight.ndim > 2:
            raise _Refused("batched MatMul weight (rank > 2)")
        bh, bw = (int(x) for x in opts.block.split("x"))
        rows = weight.shape[0]
        cols = weight.size // rows
        grid_r, grid_c = -(-rows // bh), -(-cols // bw)
        padded = np.zeros((grid_r * bh, grid_c * bw))
        padded[:rows, :cols] = score.reshape(rows, cols)
        count = np.zeros_like(padded)
        count[:rows, :cols] = 1
        per_block = padded.reshape(grid_r, bh, grid_c, bw).sum(axis=(1, 3))
        per_block /= count.reshape(grid_r, bh, grid_c, bw).sum(axis=(1, 3))
        if opts.criterion == "l2":
            per_block = np.sqrt(per_block)  # same order, but the score is the block's RMS
        k = round(opts.sparsity * per_block.size)
        keep = ~_lowest(per_block.ravel(), k).reshape(grid_r, grid_c)
        keep = np.repeat(np.repeat(keep, bh, axis=0), bw, axis=1)
        mask = keep[:rows, :cols].reshape(weight.shape)
        return mask, {"block": [bh, bw], "view": [rows, cols]}


# -- reading the mask back --------------------------------------------------------------------
def read_mask(model: ir.Model, layer_id: str) -> np.ndarray:
    """The kept-mask (True = kept) of layer ``layer_id``, in the weight's shape.

    Raises GraphSurgeonError if the layer has no mask or if the mask no longer matches (the
    ``zeros`` encoding after the weight was changed by a later pass).
    """
    for node in _nodes(model):
        if node.metadata_props.get(LAYER_ID_KEY) == layer_id:
            break
    else:
        raise GraphSurgeonError(f"no layer {layer_id!r}")
    text = node.metadata_props.get(MASK_KEY)
    if text is None:
        raise GraphSurgeonError(f"layer {layer_id!r} has no pruning mask")
    mask = _decode(json.loads(text), node)
    if mask is None:
        raise GraphSurgeonError(
            f"layer {layer_id!r}: the pruning mask no longer matches the weight "
            "(changed after pruning)"
        )
    return mask


def _encode(mask: np.ndarray, weight: np.ndarray, encoding: str) -> dict[str, Any]:
    packed = np.packbits(mask.ravel(), bitorder="little").tobytes()
    if encoding == "bits":
        data = packed
    else:
        exceptions = np.flatnonzero(mask.ravel() & (weight.ravel() == 0))
        data = np.diff(exceptions, prepend=0).astype("<u8").tobytes()
    return {
        "encoding": encoding,
        "data": base64.b64encode(zlib.compress(data, 9)).decode("ascii"),
        "crc32": zlib.crc32(packed),
    }


def _decode(meta: dict[str, Any], node: ir.Node) -> np.ndarray | None:
    """The mask in ``meta``, or None if it does not match its CRC (a stale ``zeros`` mask)."""
    if meta.get("v") != MASK_VERSION:
        raise GraphSurgeonError(f"unknown pruning mask version {meta.get('v')!r}")
    shape = tuple(meta["shape"])
    size = int(np.prod(shape))
    data = zlib.decompress(base64.b64decode(meta["data"]))
    if meta["encoding"] == "bits":
        bits = np.frombuffer(data, dtype=np.uint8)
        mask = np.unpackbits(bits, count=size, bitorder="little").astype(bool)
    else:
        tensor = constant_of(node.inputs[meta["input"]])
        if tensor is None or tuple(tensor.shape) != shape:
            return None
        mask = np.asarray(tensor.numpy()).ravel() != 0
        mask[np.cumsum(np.frombuffer(data, dtype="<u8")).astype(np.int64)] = True
    if zlib.crc32(np.packbits(mask, bitorder="little").tobytes()) != meta["crc32"]:
        return None
    return mask.reshape(shape)


def _prior_mask(layer: Layer) -> np.ndarray | None:
    text = layer.node.metadata_props.get(MASK_KEY)
    if text is None:
        return None
    try:
        meta = json.loads(text)
        if meta.get("input") != layer.weight_index:
            return None
        mask = _decode(meta, layer.node)
    except (ValueError, KeyError, TypeError, zlib.error, GraphSurgeonError):
        return None  # unreadable or stale: the weights' zeros still carry it
    if mask is None or mask.shape != tuple(layer.weight.shape):
        return None
    return mask


# -- layouts ----------------------------------------------------------------------------------
def _layout(layer: Layer) -> tuple:
    attrs = layer.node.attributes
    return (
        layer.op_type,
        layer.weight_index,
        attrs.get_int("transA", 0),
        attrs.get_int("transB", 0),
        attrs.get_int("group", 1),
    )


def _reduction(layer: Layer, shape: tuple[int, ...]) -> tuple[list[int], int]:
    """The weight axes the layer sums over, in order, and the length of one reduction segment
    (a group's share for grouped convolutions)."""
    op, rank, attrs = layer.op_type, len(shape), layer.node.attributes
    if op == "MatMul":
        axis = rank - 2 if layer.weight_index == 1 else rank - 1
        return [axis], shape[axis]
    if op == "Gemm":
        if layer.weight_index == 1:
            axis = 1 if attrs.get_int("transB", 0) else 0
        else:
            axis = 0 if attrs.get_int("transA", 0) else 1
        return [axis], shape[axis]
    if op == "Conv":
        return list(range(1, rank)), int(np.prod(shape[1:]))
    if op == "ConvTranspose":
        return [0], shape[0] // attrs.get_int("group", 1)
    raise _Refused(f"{op} has no reduction axis")


def _activation_input(layer: Layer) -> tuple[ir.Value | None, int]:
    """The layer's activation input and its channel axis (the one the weight reduces over)."""
    node, op, attrs = layer.node, layer.op_type, layer.node.attributes
    if op in ("Conv", "ConvTranspose"):
        return node.inputs[0], 1
    other = node.inputs[1 - layer.weight_index]
    if op == "MatMul":
        return other, -1 if layer.weight_index == 1 else -2
    if op == "Gemm":
        if layer.weight_index == 1:
            return other, 0 if attrs.get_int("transA", 0) else 1
        return other, 1 if attrs.get_int("transB", 0) else 0
    return None, 0


def _broadcast_norm(
    layer: Layer, norms: dict[str, np.ndarray], shape: tuple[int, ...]
) -> np.ndarray:
    """The input-channel norm for every weight element, in the weight's shape."""
    x, _ = _activation_input(layer)
    if x is None or x.name not in norms:
        raise _Refused("no calibration activation for this layer's input")
    norm = norms[x.name]
    op, rank = layer.op_type, len(shape)
    if op == "Conv":
        groups = layer.node.attributes.get_int("group", 1)
        cout, cin_g = shape[0], shape[1]
        if norm.size != groups * cin_g:
            raise _Refused("input channels do not match the weight")
        per_out = norm.reshape(groups, cin_g)[np.arange(cout) // (cout // groups)]
        return np.broadcast_to(per_out.reshape(cout, cin_g, *[1] * (rank - 2)), shape)
    reduction_axis = _reduction(layer, shape)[0][0]  # MatMul, Gemm, ConvTranspose: one axis
    if norm.size != shape[reduction_axis]:
        raise _Refused("input channels do not match the weight")
    view = [1] * rank
    view[reduction_axis] = norm.size
    return np.broadcast_to(norm.reshape(view), shape)


# -- bias correction ------------------------------------------------------------------------
def _correct_bias(plan: _Plan, delta: np.ndarray, means: dict[str, np.ndarray]) -> str | None:
    """Add ``sum_j delta_ij E[x_j]`` to output channel i's bias; a reason if it cannot.

    For a linear layer ``y = W x + b`` pruned to ``W'``, ``E[y] - E[y'] = (W - W') E[x]``:
    adding it to ``b`` keeps every output's mean on the calibration data (for a Conv, with
    per-channel input means and padding ignored).
    """
    if len(plan.layers) != 1:
        return "weight shared by several layers"
    layer = plan.layers[0]
    if layer.op_type not in ("Conv", "Gemm", "MatMul") or layer.weight_index != 1:
        return f"{layer.op_type} with its weight as input {layer.weight_index} is not corrected"
    try:
        mean = _broadcast_norm(layer, means, delta.shape)
    except _Refused as e:
        return str(e)
    axes, _ = _reduction(layer, delta.shape)
    shift = np.sum(delta * mean, axis=tuple(axes))  # one value per output channel
    node = layer.node
    if layer.op_type == "MatMul":
        uses = list(node.outputs[0].uses())
        add = uses[0].node if len(uses) == 1 else None
        if add is None or add.op_type != "Add" or node.outputs[0].is_graph_output():
            return "a MatMul without a following bias Add"
        bias_value = add.inputs[1 - uses[0].idx]
        scale = 1.0
    else:
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        scale = node.attributes.get_float("beta", 1.0) if layer.op_type == "Gemm" else 1.0
    bias = ir.convenience.get_const_tensor(bias_value) if bias_value is not None else None
    if bias_value is None:
        if layer.op_type == "Gemm" and scale == 0.0:
            return "Gemm with beta=0"
        bias_value = ir.Value(name=f"{plan.value.name}.bias_corrected")
        node.resize_inputs(3)
        node.replace_input_with(2, bias_value)
        old = np.zeros(shift.shape, dtype=np.float32)
    else:
        if (
            bias is None
            or list(bias.shape) != list(shift.shape)
            or len(list(bias_value.uses())) != 1
        ):
            return "the bias is not a constant of one value per output channel used only here"
        if bias_value.is_graph_input():
            return "the bias is a graph input"
        old = bias.numpy()
    new = (old.astype(np.float64) + shift / scale).astype(old.dtype)
    tensor = ir.tensor(new, name=bias_value.name)
    producer = bias_value.producer()
    if producer is not None and producer.op_type == "Constant":
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
    bias_value.const_value = tensor
    if bias is None and producer is None:
        layer.node.graph.register_initializer(bias_value)
    return None


# -- small helpers ----------------------------------------------------------------------------
def _lowest(score: np.ndarray, k: int) -> np.ndarray:
    """True at the ``k`` lowest entries of a flat array, ties going to the lower index: the
    order of a stable sort, in O(n) (argpartition finds the k-th value; a full sort of a
    transformer's weights takes seconds)."""
    out = np.zeros(score.size, dtype=bool)
    if k <= 0:
        return out
    if k >= score.size:
        return ~out
    kth = np.partition(score, k - 1)[k - 1]
    below = score < kth
    out |= below
    ties = np.flatnonzero(score == kth)[: k - int(below.sum())]
    out[ties] = True
    return out


def _write_weight(value: ir.Value, array: np.ndarray) -> None:
    tensor = ir.tensor(array, name=value.name)
    producer = value.producer()
    if producer is not None:  # a Constant node (checked by _refusal)
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
        if value.const_value is not None:
            value.const_value = tensor
    else:
        value.const_value = tensor


def _dump(opts: Any) -> str:
    return json.dumps(opts.model_dump(exclude={"overrides"}), sort_keys=True)


def _nodes(model: ir.Model) -> list[ir.Node]:
    return list(ir.traversal.RecursiveGraphIterator(model.graph))

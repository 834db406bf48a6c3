"""Transformer fusions for onnxruntime on the CPU: ``fuse-attention``, ``unfuse-skip-layernorm``.

``fuse-attention`` wraps onnxruntime's own offline transformer optimizer
(``onnxruntime.transformers.optimizer``, the fusions it ships for BERT-like encoders): each
self-attention block (Q/K/V MatMuls, reshapes, transposes, scaled QK^T, mask, softmax,
times V) becomes one com.microsoft ``Attention`` node over the concatenated Q/K/V weight, and
MatMul + bias + Gelu becomes MatMul + ``BiasGelu``. The fused ``Attention`` is a layer (its
weight is input 1) that ``quantize-dynamic`` turns into ``QAttention``: one int8 GEMM for
Q, K and V, and the attention itself without 24 Reshape/Transpose nodes per model.

``unfuse-skip-layernorm`` keeps onnxruntime from building ``SkipLayerNormalization``: its
session optimizer fuses every residual ``Add`` feeding a ``LayerNormalization`` into that
com.microsoft kernel, which on the CPU runs 4-8x slower than the two ops it replaces
(measured with onnxruntime 1.31 on an AVX-512 x86 CPU: [1, 41, 384] 69 us vs 12 us, [1, 128,
768] 420 us vs 52 us, 1 thread; on MiniLM the 13 fused nodes are a quarter of the int8
model's time). Writing the residual addition as the variadic ``Sum`` (the same elementwise
addition, with the same broadcasting) is exact and the fusion no longer matches.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.layers import LAYER_ID_KEY, find_layers
from graphsurgeon.options import PassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register

MS_DOMAIN = "com.microsoft"


class FuseAttentionOptions(PassOptions):
    model_type: Literal["bert"] = option(
        "bert",
        "onnxruntime.transformers model type whose fusions run (BERT-like encoders: BERT, "
        "MiniLM, RoBERTa exports).",
    )
    num_heads: int = option(0, "Attention heads; 0 reads them from the graph's reshapes.", ge=0)
    hidden_size: int = option(0, "Hidden size; 0 reads it from the graph.", ge=0)
    mask: Literal["raw", "index"] = option(
        "raw",
        "How Attention gets the attention mask: raw (the [batch, seq] mask itself: exact for "
        "any mask) or index (the number of ones per row: exact only for right-padded masks).",
    )
    bias_gelu: bool = option(True, "Also fuse bias Add + Gelu into com.microsoft BiasGelu.")


@register
class FuseAttention(GSPass):
    """Fuse transformer self-attention into com.microsoft ``Attention`` (onnxruntime's fuser).

    Runs ``onnxruntime.transformers.optimizer.optimize_model`` with ``opt_level=0`` (pattern
    fusions only: no session optimizations baked into the file, so the result stays a
    portable ONNX graph plus com.microsoft contrib ops that stock onnxruntime runs). Fusions
    enabled: Attention, Gelu and BiasGelu, LayerNormalization from its decomposed form. Left
    out on purpose: SkipLayerNormalization (slower than what it replaces on the CPU, see
    ``unfuse-skip-layernorm``), EmbedLayerNormalization (it rewires the graph inputs) and
    the tanh Gelu approximation (not exact).

    Layer ids: each ``Attention`` inherits the id of the query MatMul whose weight is the
    first third of its Q/K/V weight (compared value by value); the key and value layers end
    in it (``merged_layers`` note). Other layers keep their ids.

    Refused (model left as it was, with the reason): no attention block the fuser
    recognizes, a model with subgraphs, or targets (the fuser works on the whole graph).
    """

    name = "fuse-attention"
    kind = "exact"
    Options = FuseAttentionOptions
    supports_targets = False

    def call(self, model: ir.Model) -> PassResult:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        o: FuseAttentionOptions = self.options  # type: ignore[assignment]
        if any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for node in model.graph
            for attr in node.attributes.values()
        ):
            self.skip(model.graph, "the model has subgraphs (If/Loop); the fuser does not")
            return PassResult(model, False)
        fusion = FusionOptions(o.model_type)
        fusion.enable_skip_layer_norm = False
        fusion.enable_bias_skip_layer_norm = False
        fusion.enable_embed_layer_norm = False
        fusion.enable_gelu_approximation = False
        fusion.enable_bias_gelu = o.bias_gelu
        fusion.use_raw_attention_mask(o.mask == "raw")
        # analysis and layer ids on a copy (reading a Constant's tensor renames it): a
        # refusal leaves the model exactly as it was
        work = ir.serde.deserialize_model(ir.to_proto(model))
        heads, hidden = o.num_heads, o.hidden_size
        if not (heads and hidden):
            found = heads_and_hidden(work)
            if found is None:
                self.skip(
                    model.graph,
                    "no constant [batch, seq, heads, head_size] reshape to read the heads from: "
                    "set num_heads and hidden_size, or fix the input shapes (--shape)",
                )
                return PassResult(model, False)
            heads, hidden = heads or found[0], hidden or found[1]
        before = {layer.id: layer for layer in find_layers(work)}
        proto = ir.to_proto(work)
        del proto.graph.value_info[:]  # the fuser re-infers; stale entries mislead it
        try:
            with _quiet():
                fused = optimize_model(
                    proto,
                    model_type=o.model_type,
                    num_heads=heads,
                    hidden_size=hidden,
                    optimization_options=fusion,
                    opt_level=0,
                )
        except Exception as e:
            raise GraphSurgeonError(f"fuse-attention: onnxruntime's fuser failed: {e}") from None
        stats = fused.get_fused_operator_statistics()
        n_attention = stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0)
        if not n_attention:
            self.skip(model.graph, "no attention block onnxruntime's fuser recognizes")
            return PassResult(model, False)
        result = ir.serde.deserialize_model(fused.model)
        merged = _inherit_attention_ids(result, before)
        model.graph = result.graph
        model.opset_imports.update(result.opset_imports)
        model.opset_imports.setdefault(MS_DOMAIN, 1)  # the fuser does not always declare it
        self.note("attention", n_attention)
        self.note("heads", heads)
        self.note("bias_gelu", stats.get("BiasGelu", 0))
        self.note("merged_layers", merged)
        return PassResult(model, True)


def heads_and_hidden(model: ir.Model) -> tuple[int, int] | None:
    """(heads, hidden size) as the graph spells them (onnxruntime's own detection reads
    only some export styles): hidden is the most common LayerNormalization width, heads the
    most common split of it by a 4-d Reshape ``[batch, seq, heads, head_size]`` (either of
    the last two may be -1)."""
    widths = Counter(
        int(t.shape[0])
        for n in model.graph
        if n.op_type == "LayerNormalization"
        and len(n.inputs) > 1
        and (t := ir.convenience.get_const_tensor(n.inputs[1])) is not None
        and len(t.shape) == 1
    )
    if not widths:
        return None
    hidden = widths.most_common(1)[0][0]
    splits: Counter[int] = Counter()
    for n in model.graph:
        if n.op_type != "Reshape" or len(n.inputs) < 2:
            continue
        t = ir.convenience.get_const_tensor(n.inputs[1])
        if t is None or t.shape != (4,):
            continue
        heads, size = (int(d) for d in t.numpy()[2:])
        if heads == -1 and size > 0 and hidden % size == 0:
            heads = hidden // size
        if heads > 0 and (size == -1 or heads * size == hidden) and hidden % heads == 0:
            splits[heads] += 1
    return (splits.most_common(1)[0][0], hidden) if splits else None


def _inherit_attention_ids(model: ir.Model, before: dict[str, object]) -> dict[str, list[str]]:
    """Give each Attention the id of the query layer whose weight starts its Q/K/V weight;
    returns attention id -> the ids of the layers it absorbed (query, key, value)."""
    gone = {
        lid: layer
        for lid, layer in before.items()
        if lid not in {n.metadata_props.get(LAYER_ID_KEY) for n in model.graph}
    }
    weights = {lid: layer.weight.numpy() for lid, layer in gone.items()}  # type: ignore[attr-defined]
    merged: dict[str, list[str]] = {}
    for node in model.graph:
        if node.op_type != "Attention" or node.domain != MS_DOMAIN:
            continue
        qkv = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
        if qkv is None:
            continue
        w = qkv.numpy()
        width = w.shape[1] // 3
        parts = [w[:, i * width : (i + 1) * width] for i in range(3)]
        ids = [
            next(
                (lid for lid, a in weights.items() if a.shape == p.shape and np.array_equal(a, p)),
                None,
            )
            for p in parts
        ]
        if ids[0] is not None:
            node.metadata_props[LAYER_ID_KEY] = ids[0]
            merged[ids[0]] = [i for i in ids if i is not None]
            for i in ids:
                weights.pop(i, None)
    find_layers(model)  # ids for anything left without one
    return merged


class UnfuseSkipLayerNormOptions(PassOptions):
    pass


@register
class UnfuseSkipLayerNorm(GSPass):
    """Keep onnxruntime from running residual LayerNorms as its slow SkipLayerNormalization.

    Residual additions before a LayerNormalization are written as ``Sum``; existing
    com.microsoft ``SkipLayerNormalization`` nodes are split into ``Sum`` +
    ``LayerNormalization``.

    Why: onnxruntime's session optimizer fuses ``Add`` -> ``LayerNormalization`` into its
    ``SkipLayerNormalization`` CPU kernel, measured 4-8x slower than the pair (see the module
    docstring); ``Sum`` computes the same elementwise sum and the fusion does not match it.

    Cases: an ``Add`` (default domain) whose output is input 0 of a ``LayerNormalization``
    and whose inputs are both computed (an Add of a constant is a bias: left to the
    MatMul/Gemm fusions); a ``SkipLayerNormalization`` (input, skip, gamma[, beta[, bias]])
    becomes ``Sum(input, skip[, bias])`` + ``LayerNormalization(axis=-1, epsilon)``, its
    optional outputs mapped to LayerNormalization's mean / inverse std and the Sum.

    Refused, with the reason: ``SkipSimplifiedLayerNormalization`` (RMS norm: no standard op
    before opset 23), a model below opset 17 (no LayerNormalization) for a split, unselected
    nodes.
    """

    name = "unfuse-skip-layernorm"
    kind = "exact"
    Options = UnfuseSkipLayerNormOptions

    def call(self, model: ir.Model) -> PassResult:
        opset = model.opset_imports.get("", 0)
        rewritten = split = 0
        for node in list(model.graph):
            if not self.selects(node):
                continue
            if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
                if _residual_add(node):
                    node.op_type = "Sum"
                    rewritten += 1
            elif node.op_type == "SkipLayerNormalization" and node.domain == MS_DOMAIN:
                if opset < 17:
                    self.skip(node, f"opset {opset} has no LayerNormalization (needs 17)")
                    continue
                _split(model.graph, node)
                split += 1
            elif node.op_type == "SkipSimplifiedLayerNormalization" and node.domain == MS_DOMAIN:
                self.skip(node, "RMS normalization has no standard op before opset 23")
        self.note("residual_sums", rewritten)
        self.note("split_skip_layernorms", split)
        return PassResult(model, bool(rewritten or split))


def _residual_add(node: ir.Node) -> bool:
    out = node.outputs[0]
    if len(node.inputs) != 2 or any(v is None or _constant(v) for v in node.inputs):
        return False
    return any(
        use.node.op_type == "LayerNormalization"
        and use.node.domain in ("", "ai.onnx")
        and use.idx == 0
        for use in out.uses()
    )


def _constant(value: ir.Value) -> bool:
    """An initializer or a Constant's output (checked without get_const_tensor, which
    renames a Constant's tensor as a side effect)."""
    producer = value.producer()
    return value.const_value is not None or (
        producer is not None and producer.op_type == "Constant" and producer.domain == ""
    )


def _split(graph: ir.Graph, node: ir.Node) -> None:
    x, skip, gamma = node.inputs[:3]
    beta = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    outs = list(node.outputs) + [None] * (4 - len(node.outputs))
    total = (
        outs[3] if outs[3] is not None and (outs[3].uses() or outs[3].is_graph_output()) else None
    )
    summed = ir.node(
        "Sum",
        [x, skip, *([bias] if bias is not None else [])],
        name=f"{node.name}_sum" if node.name else None,
    )
    ln_inputs = [summed.outputs[0], gamma, *([beta] if beta is not None else [])]
    used = [
        i for i, o in enumerate(outs[:3]) if o is not None and (o.uses() or o.is_graph_output())
    ]
    norm = ir.node(
        "LayerNormalization",
        ln_inputs,
        attributes={"axis": -1, "epsilon": node.attributes.get_float("epsilon", 1e-12)},
        num_outputs=max(used, default=0) + 1,  # Y[, Mean[, InvStdDev]]
        name=node.name or None,
    )
    graph.insert_before(node, [summed, norm])
    for old, new in zip(outs, norm.outputs, strict=False):
        if old is not None:
            _replace(graph, old, new)
    if total is not None:
        _replace(graph, total, summed.outputs[0])
    graph.remove(node, safe=True)


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """``new`` takes over ``old``'s readers, graph-output slot, name, type and shape."""
    name = old.name
    old.name = f"{name}_unfused"
    new.name, new.type, new.shape = name, old.type, old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


@contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.transformers logs every fusion attempt at WARNING/INFO (and prints)."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    loggers = [lg for lg in loggers if lg.name.startswith(("onnxruntime", "fusion", "onnx_model"))]
    loggers.append(logging.getLogger())
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


__all__ = ["FuseAttention", "UnfuseSkipLayerNorm", "heads_and_hidden"]

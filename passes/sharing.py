"""``share-weights``: k-means weight sharing, stored as a codebook plus packed indices.

Each layer's weights are clustered into ``2^bits`` values (1-D k-means, see
:mod:`graphsurgeon.passes._kmeans`), so that every weight is replaced by its nearest centroid.
The file keeps only the ``2^bits`` float32 centroids and one ``bits``-bit index per weight,
packed ``8/bits`` per byte; a default-domain decode subgraph (integer ``Div``/``Mod``
unpacking, ``Gather`` from the codebook, ``Reshape``) rebuilds the weight at run time, and ORT's
constant folding does that once when the session loads. Unlike a uniform grid, the centroids
follow the weight distribution: dense near zero, sparse in the tails.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import onnx_ir as ir
from graphsurgeon.passes._kmeans import kmeans_1d
from graphsurgeon.passes._lowbit import DECODE_OVERHEAD_BYTES, emit_codebook_decode

from graphsurgeon.layers import find_layers
from graphsurgeon.options import Choice, IntRange, LayerPassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register


class ShareWeightsOptions(LayerPassOptions):
    bits: Literal[1, 2, 4, 8] = option(
        4, "Index width: a codebook of 2^bits shared values per layer.", Choice([2, 4, 8])
    )
    iterations: int = option(
        30,
        "Lloyd iterations at most (stops earlier when centroids settle).",
        IntRange(5, 100),
        ge=1,
    )


@register
class ShareWeights(GSPass):
    """Replace each selected layer's float32 weight by a ``2^bits`` codebook and packed indices.

    Cases: any layer whose weight is a float32 initializer read by that node alone: Conv,
    ConvTranspose, Gemm, MatMul, recurrent layers and embeddings (Gather tables). Per-layer
    overrides give each layer its own codebook size. Refused: weights already packed or
    shared, graph inputs, layers whose packed form would not be smaller (tiny weights), a
    default opset below 13.
    """

    strength_option: ClassVar[str] = "bits"  # sensitivity: a smaller codebook compresses more

    name = "share-weights"
    kind = "lossy"
    Options = ShareWeightsOptions

    def call(self, model: ir.Model) -> PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        modified = False
        summary: dict[str, str] = {}
        for layer in find_layers(model):
            if not self.selects(layer.node):
                continue
            opts = self.options_for(layer.id)
            assert isinstance(opts, ShareWeightsOptions)
            value = layer.weight_value
            reason = None
            if opset < 13:
                reason = f"the decode subgraph needs opset >= 13 (model has {opset})"
            elif value.const_value is None or not value.is_initializer():
                reason = "weight is not a plain initializer (already packed?)"
            elif value.is_graph_input() or value.is_graph_output():
                reason = "weight is a graph input or output"
            elif len(value.uses()) != 1:
                reason = "weight is shared by several nodes"
            elif value.dtype != ir.DataType.FLOAT:
                reason = f"weight dtype {value.dtype} (float32 only)"
            elif _packed_bytes(layer.weight.size, opts.bits) >= layer.weight.nbytes:
                reason = "the packed form would not be smaller than the weight"
            if reason is not None:
                self.skip(layer.node, reason)
                continue
            w = value.const_value.numpy()
            centroids, labels = kmeans_1d(w, 1 << opts.bits, iterations=opts.iterations)
            graph = layer.node.graph
            assert graph is not None
            decoded = emit_codebook_decode(
                graph,
                layer.node,
                value.name or f"{layer.id}_weight",
                labels.reshape(1, 1, -1),
                opts.bits,
                centroids,
                tuple(w.shape),
            )
            layer.node.replace_input_with(layer.weight_index, decoded)
            del graph.initializers[value.name]
            summary[layer.id] = f"{1 << opts.bits} centroids"
            modified = True
        self.note("shared", summary)
        return PassResult(model, modified)


def _packed_bytes(size: int, bits: int) -> int:
    """Indices, the float32 codebook and the decode subgraph."""
    return -(-size * bits // 8) + 4 * (1 << bits) + DECODE_OVERHEAD_BYTES

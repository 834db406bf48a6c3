"""An example pass plugin: clip each layer's weights to a percentile of their magnitude.

Outlier weights stretch a quantizer's range, so every other weight gets fewer levels; clipping
the top ``1 - percentile`` of ``|w|`` before ``quantize-int8`` or ``quantize-weights`` trades a
small error on a few weights for resolution on all the others.

Install it (``pip install -e examples/plugin``) and ``graphsurgeon passes`` lists
``clip-weights``; pipelines use it by name.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphsurgeon.layers import find_layers
from graphsurgeon.options import FloatRange, LayerPassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult


class ClipWeightsOptions(LayerPassOptions):
    percentile: float = option(
        99.9,
        "Clip |w| at this percentile of the layer's |w|.",
        ge=50.0,
        le=100.0,
        space=FloatRange(low=99.0, high=100.0),
    )


class ClipWeights(GSPass):
    """Clip each selected layer's weights to a percentile of their magnitude.

    Handles every layer ``find_layers`` reports with a float initializer weight (Conv,
    ConvTranspose, Gemm, MatMul); layers whose weight is computed, packed or not float are
    skipped with a reason.
    """

    name = "clip-weights"
    kind = "lossy"
    Options = ClipWeightsOptions

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        clipped = 0
        for layer in find_layers(model):
            if not self.selects(layer.node):
                continue
            value = layer.node.inputs[layer.weight_index]
            tensor = None if value is None else value.const_value
            if value is None or tensor is None or not value.is_initializer():
                self.skip(layer.node, "weight is not an initializer")
                continue
            w = tensor.numpy()
            if w.dtype.kind != "f":
                self.skip(layer.node, "weight is not float")
                continue
            limit = np.percentile(np.abs(w), self.options_for(layer.id).percentile)
            out = np.clip(w, -limit, limit)
            n = int(np.count_nonzero(out != w))
            if n:
                value.const_value = ir.tensor(out.astype(w.dtype), name=value.name)
                clipped += n
                modified = True
        self.note("weights_clipped", clipped)
        return PassResult(model, modified)

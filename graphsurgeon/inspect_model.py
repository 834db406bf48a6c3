"""``graphsurgeon inspect``: what a model is made of, as data (rendered by the CLI)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from graphsurgeon.layers import find_layers
from graphsurgeon.shapes import ShapeInferencePass, format_shape
from graphsurgeon.stats import model_stats, op_histogram


def inspect_model(model: ir.Model) -> dict[str, Any]:
    """Op histogram, inputs/outputs (dynamic dims by name), per-layer table and totals."""
    ShapeInferencePass()(model)
    layers = find_layers(model)
    stats = model_stats(model, layers)

    def io(values: list[ir.Value]) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "dtype": v.dtype.name if v.dtype is not None else None,
                "shape": format_shape(v.shape),
                "dynamic_dims": [d.value or "?" for d in (v.shape or []) if not isinstance(d, int)],
            }
            for v in values
            if not v.is_initializer()
        ]

    opsets = {domain or "ai.onnx": version for domain, version in model.opset_imports.items()}
    return {
        "ir_version": model.ir_version,
        "opsets": opsets,
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "inputs": io(list(model.graph.inputs)),
        "outputs": io(list(model.graph.outputs)),
        "ops": op_histogram(model),
        "layers": [
            {
                "id": s.id,
                "op": s.op,
                "weight_shape": s.weight_shape,
                "output_shape": s.output_shape,
                "params": s.params,
                "bytes": s.bytes,
                "macs": s.macs,
                "flops": s.flops,
            }
            for s in stats.layers.values()
        ],
        "totals": {
            "nodes": stats.nodes,
            "layers": len(layers),
            "params": stats.params,
            "bytes": stats.bytes,
            "macs": None
            if stats.flops is None
            else sum(s.macs or 0 for s in stats.layers.values()),
            "flops": stats.flops,
        },
    }

"""Compare two models tensor by tensor: where does B start to differ from A?

Intermediate values are matched by name first, then by the layer id of their producers
(``graphsurgeon.layer_id`` metadata survives rewrites that rename values), then by producer
op type and topological position among the still unmatched nodes (the k-th unmatched Relu of
A with the k-th unmatched Relu of B). Both models run on the same calibration inputs
(:func:`graphsurgeon.calibration.collect_activations`) and each pair gets cosine similarity
and SQNR ``10 log10(|ref|^2 / |ref - x|^2)`` in dB with A as the reference; rows come worst
first (lowest SQNR), identical tensors (SQNR inf) last.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from graphsurgeon.calibration import calibration_feeds, collect_activations
from graphsurgeon.data import Dataset, load_npz
from graphsurgeon.layers import find_layers, layer_id
from graphsurgeon.model_io import load
from graphsurgeon.shapes import ShapeInferencePass

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


@dataclass
class TensorDiff:
    a: str  # value name in A (the reference)
    b: str  # value name in B
    op: str  # producer op type in A
    matched_by: str  # "name", "layer" or "position"
    shape: list[int]
    cosine: float
    sqnr_db: float
    max_abs: float

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def sqnr_db(reference: np.ndarray, x: np.ndarray) -> float:
    """``10 log10(|ref|^2 / |ref - x|^2)``; inf when equal, -inf for a zero reference."""
    r = reference.astype(np.float64).ravel()
    noise = float(np.sum((r - x.astype(np.float64).ravel()) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(reference: np.ndarray, x: np.ndarray) -> float:
    r, g = reference.astype(np.float64).ravel(), x.astype(np.float64).ravel()
    denom = float(np.linalg.norm(r) * np.linalg.norm(g))
    return float(r @ g / denom) if denom > 0 else float(np.array_equal(r, g))


def _candidates(model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
    """Float node outputs of the main graph with a known type, in topological order."""
    out = []
    for node in model.graph:
        if node.op_type == "Constant" and node.domain == "":
            continue
        for value in node.outputs:
            if value.name and value.type is not None and value.dtype in _FLOATS:
                out.append((node, value))
    return out


def match_values(a: ir.Model, b: ir.Model) -> list[tuple[ir.Value, ir.Value, str]]:
    """Pairs ``(value in A, value in B, how)``, in A's topological order."""
    ca, cb = _candidates(a), _candidates(b)
    b_by_name = {v.name: v for _, v in cb}
    pairs: dict[ir.Value, tuple[ir.Value, str]] = {}
    used_b: set[ir.Value] = set()
    for _, value in ca:
        other = b_by_name.get(value.name)
        if other is not None and other.dtype == value.dtype:
            pairs[value] = (other, "name")
            used_b.add(other)
    b_layers = {layer_id(n): n for n, _ in cb if layer_id(n)}
    for node, value in ca:
        lid = layer_id(node)
        other_node = b_layers.get(lid) if lid else None
        if value in pairs or other_node is None or value is not node.outputs[0]:
            continue
        other = other_node.outputs[0]
        if other not in used_b and other.dtype == value.dtype:
            pairs[value] = (other, "layer")
            used_b.add(other)
    left: dict[str, list[ir.Value]] = defaultdict(list)
    right: dict[str, list[ir.Value]] = defaultdict(list)
    for node, value in ca:
        if value not in pairs:
            left[f"{node.op_type}#{list(node.outputs).index(value)}"].append(value)
    for node, value in cb:
        if value not in used_b:
            right[f"{node.op_type}#{list(node.outputs).index(value)}"].append(value)
    for key, values in left.items():
        for value, other in zip(values, right.get(key, []), strict=False):
            if other.dtype == value.dtype:
                pairs[value] = (other, "position")
    order = {v: i for i, (_, v) in enumerate(ca)}
    return sorted(((va, vb, how) for va, (vb, how) in pairs.items()), key=lambda p: order[p[0]])


def compare_models(
    a: ir.Model | str | os.PathLike,
    b: ir.Model | str | os.PathLike,
    calib: Dataset | str | os.PathLike | None = None,
    *,
    max_samples: int = 16,
) -> list[TensorDiff]:
    """Every matched intermediate tensor, worst first. ``calib`` must fit A's inputs (None:
    generated inputs)."""
    a = a if isinstance(a, ir.Model) else load(a)
    b = b if isinstance(b, ir.Model) else load(b)
    for model in (a, b):
        ShapeInferencePass()(model)
        find_layers(model)
    if calib is not None and not isinstance(calib, Dataset):
        calib = load_npz(calib, a)
    feeds = calibration_feeds(a, calib, max_samples=max_samples)
    pairs = match_values(a, b)
    producers = {v: n for n, v in _candidates(a)}
    acts_a = collect_activations(a, feeds, [va.name for va, _, _ in pairs])
    acts_b = collect_activations(b, feeds, [vb.name for _, vb, _ in pairs])
    diffs = []
    for va, vb, how in pairs:
        ra, rb = acts_a[va.name], acts_b[vb.name]
        if ra.shape != rb.shape:
            continue  # matched by position but not the same tensor
        diffs.append(
            TensorDiff(
                a=va.name,
                b=vb.name,
                op=producers[va].op_type,
                matched_by=how,
                shape=list(ra.shape),
                cosine=cosine(ra, rb),
                sqnr_db=sqnr_db(ra, rb),
                max_abs=float(np.max(np.abs(ra.astype(np.float64) - rb), initial=0.0)),
            )
        )
    diffs.sort(key=lambda d: (d.sqnr_db if not math.isnan(d.sqnr_db) else -math.inf, d.cosine))
    return diffs

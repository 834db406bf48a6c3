"""Plasticity: connections created divided by connections pruned, per pass and per model.

A connection is one element of a layer's weight (the tensor :func:`graphsurgeon.layers.find_layers`
reports: Conv/Gemm/MatMul/embedding weights, also behind a DequantizeLinear or a packed
decode; biases and norms are not connections). Between two snapshots of a model, matched by
stable layer id:

- same shape: element by element, *pruned* = nonzero -> zero, *created* = zero -> nonzero
  (a regrowth step that drops k weights and revives k others counts k and k, not 0);
- shape changed with the same dtype (channels physically removed or added): the change in
  nonzero count, as pruned or created;
- shape changed with another dtype (re-encoded, e.g. packed int4): nothing, a change of
  representation is not a change of connectivity;
- a layer that disappears: all its nonzeros pruned; a new layer (a skip projection): all its
  nonzeros created.

Memory stays bounded: a mask keeps one bit per weight element (``np.packbits``), 1/32 of a
float32 weight, and weights are read one tensor at a time, only those a pass replaced.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from graphsurgeon.instruments import Instrument, PassRecord
from graphsurgeon.layers import find_layers
from graphsurgeon.pass_base import GSPass

__all__ = [
    "Plasticity",
    "WeightMask",
    "connection_changes",
    "layer_weights",
    "plasticity",
    "snapshot",
    "summarize",
    "weight_mask",
]


@dataclass(frozen=True)
class WeightMask:
    shape: tuple[int, ...]
    dtype: str
    nonzero: int
    bits: np.ndarray  # packbits of the flattened nonzero mask


Snapshot = dict[str, WeightMask]


def layer_weights(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """Layer id -> weight tensor object (nothing is read; a shared weight counts once)."""
    out: dict[str, ir.TensorProtocol] = {}
    seen: set[int] = set()
    for layer in find_layers(model):
        if id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            out[layer.id] = layer.weight
    return out


def weight_mask(tensor: ir.TensorProtocol) -> WeightMask | None:
    """The nonzero mask of one weight (None if it cannot be read as an array)."""
    try:
        array = tensor.numpy()
    except Exception:
        return None
    mask = np.asarray(array != 0).reshape(-1)
    shape = tuple(int(d) for d in array.shape)
    return WeightMask(shape, str(array.dtype), int(mask.sum()), np.packbits(mask))


def snapshot(model: ir.Model) -> Snapshot:
    """Nonzero mask of every layer weight, keyed by layer id (reads every weight)."""
    masks = {lid: weight_mask(t) for lid, t in layer_weights(model).items()}
    return {lid: m for lid, m in masks.items() if m is not None}


def connection_changes(before: Snapshot, after: Snapshot) -> tuple[int, int]:
    """(created, pruned) connections between two snapshots (rules in the module docstring)."""
    created = pruned = 0
    for lid, old in before.items():
        new = after.get(lid)
        if new is None:
            pruned += old.nonzero
        elif new.shape == old.shape:
            a, b = old.bits, new.bits
            pruned += _popcount(a & ~b)
            created += _popcount(~a & b)
        elif new.dtype == old.dtype:
            delta = new.nonzero - old.nonzero
            created, pruned = created + max(delta, 0), pruned + max(-delta, 0)
    for lid, new in after.items():
        if lid not in before:
            created += new.nonzero
    return created, pruned


def _popcount(packed: np.ndarray) -> int:
    # the padding bits of the last byte are 0 in both masks, so a & ~b keeps them at 0
    return int(np.unpackbits(packed).sum()) if packed.size else 0


def plasticity(created: int, pruned: int) -> float | None:
    """created / pruned; None when nothing was pruned (the counts then say what happened)."""
    return created / pruned if pruned else None


def _entry(created: int, pruned: int) -> dict[str, Any]:
    ratio = plasticity(created, pruned)
    return {
        "created": created,
        "pruned": pruned,
        "plasticity": None if ratio is None else round(ratio, 6),
    }


class Plasticity(Instrument):
    """Connections created and pruned by each pass, and cumulated over the pipeline.

    Writes ``record.plasticity = {created, pruned, plasticity, model: {created, pruned,
    plasticity}}`` where ``model`` sums every pass so far. Passes never edit a weight tensor in
    place (they give the value a new tensor), so a layer whose tensor object is the same after
    the pass is unchanged and is not read at all: a pipeline that rewrites no weight (cleanup
    on a memory-mapped 2 GB model) costs nothing. Only replaced weights are compared, the old
    tensor being held until the pass ends.
    """

    def __init__(self) -> None:
        self.created = 0
        self.pruned = 0
        self._masks: dict[int, WeightMask | None] = {}  # id(tensor) -> mask, for live tensors
        self._last: tuple[ir.Model, dict[str, ir.TensorProtocol]] | None = None

    def before(self, step: str, pass_: GSPass, model: ir.Model) -> None:
        if self._last is not None and self._last[0] is model:
            self._before = self._last[1]
        else:
            self._before = layer_weights(model)

    def _mask(self, tensor: ir.TensorProtocol) -> WeightMask | None:
        key = id(tensor)
        if key not in self._masks:
            self._masks[key] = weight_mask(tensor)
        return self._masks[key]

    def after(self, step: str, pass_: GSPass, model: ir.Model, record: PassRecord) -> None:
        after = layer_weights(model) if record.modified else self._before
        old: Snapshot = {}
        new: Snapshot = {}
        for lid in set(self._before) | set(after):
            b, a = self._before.get(lid), after.get(lid)
            if a is b:
                continue  # the same tensor object: untouched
            for tensor, side in ((b, old), (a, new)):
                mask = None if tensor is None else self._mask(tensor)
                if mask is not None:
                    side[lid] = mask
        created, pruned = connection_changes(old, new)
        self.created += created
        self.pruned += pruned
        record.plasticity = {**_entry(created, pruned), "model": _entry(self.created, self.pruned)}
        live = {id(t) for t in after.values()}
        self._masks = {k: m for k, m in self._masks.items() if k in live}
        self._last = (model, after)


def summarize(records: Iterable[PassRecord]) -> dict[str, Any]:
    """The model's plasticity over ``records`` (summed per pass)."""
    created = pruned = 0
    for r in records:
        if r.plasticity:
            created += r.plasticity["created"]
            pruned += r.plasticity["pruned"]
    return _entry(created, pruned)

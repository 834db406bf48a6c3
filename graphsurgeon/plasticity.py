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

Memory stays bounded: a snapshot keeps one bit per weight element (``np.packbits`` of the
nonzero mask), so 1/32 of a float32 model, and weights are read one tensor at a time.
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

__all__ = ["Plasticity", "WeightMask", "connection_changes", "plasticity", "snapshot", "summarize"]


@dataclass(frozen=True)
class WeightMask:
    shape: tuple[int, ...]
    dtype: str
    nonzero: int
    bits: np.ndarray  # packbits of the flattened nonzero mask


Snapshot = dict[str, WeightMask]


def snapshot(model: ir.Model) -> Snapshot:
    """Nonzero mask of every layer weight, keyed by layer id (a shared weight counts once)."""
    out: Snapshot = {}
    seen: set[int] = set()
    for layer in find_layers(model):
        key = id(layer.weight)
        if key in seen:
            continue
        seen.add(key)
        try:
            array = layer.weight.numpy()
        except Exception:  # a weight that cannot be read as an array is not counted
            continue
        mask = np.asarray(array != 0).reshape(-1)
        out[layer.id] = WeightMask(
            tuple(int(d) for d in array.shape), str(array.dtype), int(mask.sum()), np.packbits(mask)
        )
    return out


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
    plasticity}}`` where ``model`` sums every pass so far. A pass reporting ``modified=False``
    changed nothing; its snapshot is reused, as is the last pass's "after" as the next
    "before".
    """

    def __init__(self) -> None:
        self.created = 0
        self.pruned = 0
        self._last: tuple[ir.Model, Snapshot] | None = None

    def before(self, step: str, pass_: GSPass, model: ir.Model) -> None:
        if self._last is not None and self._last[0] is model:
            self._before = self._last[1]
        else:
            self._before = snapshot(model)

    def after(self, step: str, pass_: GSPass, model: ir.Model, record: PassRecord) -> None:
        if record.modified:
            after = snapshot(model)
            created, pruned = connection_changes(self._before, after)
        else:
            after, created, pruned = self._before, 0, 0
        self.created += created
        self.pruned += pruned
        record.plasticity = {**_entry(created, pruned), "model": _entry(self.created, self.pruned)}
        self._last = (model, after)


def summarize(records: Iterable[PassRecord]) -> dict[str, Any]:
    """The model's plasticity over ``records`` (summed per pass)."""
    created = pruned = 0
    for r in records:
        if r.plasticity:
            created += r.plasticity["created"]
            pruned += r.plasticity["pruned"]
    return _entry(created, pruned)

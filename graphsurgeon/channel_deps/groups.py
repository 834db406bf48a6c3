"""Channel groups and the traversal that builds them: from a layer's output channels, across
every op that ties channels of one tensor to another (the op handlers live in ``handlers``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphsurgeon.channel_deps.values import (
    Unsafe,
    _const,
    _dims,
    _name,
    _operand_const,
    _rank,
    _refined_dims,
)

Key = tuple[ir.Value, int]


Removal = dict[Key, np.ndarray]  # (value, axis) -> sorted positions removed on that axis


class _Coarsen(Exception):
    """The group must be rebuilt with units ``factor`` times larger (e.g. whole heads)."""

    def __init__(self, factor: int) -> None:
        super().__init__(factor)
        self.factor = factor


@dataclass
class Occurrence:
    value: ir.Value
    axis: int
    units: np.ndarray  # [n] group units present on this axis
    positions: np.ndarray  # [n, k] their positions on the axis

    def same(self, other: Occurrence) -> bool:
        return np.array_equal(self.units, other.units) and np.array_equal(
            self.positions, other.positions
        )


@dataclass
class ChannelGroup:
    leader: ir.Node  # the layer whose output channels seeded the group
    units: int
    occurrences: list[Occurrence] = field(default_factory=list)
    producers: list[tuple[ir.Node, Occurrence]] = field(default_factory=list)
    consumers: list[tuple[ir.Node, Occurrence]] = field(default_factory=list)
    batchnorms: list[tuple[ir.Node, Occurrence]] = field(default_factory=list)
    #: Removing a unit leaves the kept channels' values unchanged (False after a LayerNorm
    #: over the channels: its mean and variance then run over fewer channels).
    values_kept: bool = True
    unsafe: str | None = None

    @property
    def channels(self) -> int:
        """Channels of the leader's output (units times their width there)."""
        for node, occ in self.producers:
            if node is self.leader:
                return int(occ.positions.size)
        return self.units

    def removal(self, units: Iterable[int]) -> Removal:
        """Positions to delete on every occurrence when ``units`` are removed."""
        chosen = np.asarray(sorted(set(int(u) for u in units)), dtype=np.int64)
        out: Removal = {}
        for occ in self.occurrences:
            rows = np.isin(occ.units, chosen)
            if rows.any():
                out[(occ.value, occ.axis)] = np.unique(occ.positions[rows].ravel())
        return out


def _seed(node: ir.Node) -> tuple[ir.Value, int, np.ndarray] | None:
    """Output value, channel axis and base positions [units, k] of a prunable layer."""
    if node.domain not in ("", "ai.onnx") or not node.outputs:
        return None
    op, out = node.op_type, node.outputs[0]
    weight = _operand_const(node.inputs[1]) if len(node.inputs) > 1 else None
    if (
        weight is None
        or out.shape is None
        or (node.inputs[0] is not None and _const(node.inputs[0]) is not None)
    ):
        return None
    if op == "Conv" and weight.ndim >= 3:
        c, g = weight.shape[0], node.attributes.get_int("group", 1)
        if g > 1 and weight.shape[1] > 1:  # grouped: one unit = the same index in every group
            return out, 1, np.arange(c).reshape(g, c // g).T
        return out, 1, np.arange(c)[:, None]
    if op == "ConvTranspose" and weight.ndim >= 3 and node.attributes.get_int("group", 1) == 1:
        return out, 1, np.arange(weight.shape[1])[:, None]
    if op == "Gemm" and weight.ndim == 2:
        n = weight.shape[0] if node.attributes.get_int("transB", 0) else weight.shape[1]
        return out, 1, np.arange(n)[:, None]
    if op == "MatMul" and weight.ndim >= 2:
        return out, len(out.shape) - 1, np.arange(weight.shape[-1])[:, None]
    return None


# -- building groups ----------------------------------------------------------------------
def build_groups(model: ir.Model) -> list[ChannelGroup]:
    """One group per set of coupled layer output channels, in graph order.

    Unsafe groups are returned too, with ``unsafe`` set to the reason and the occurrences found
    before the problem showed up.
    """
    groups: list[ChannelGroup] = []
    covered: set[Key] = set()
    for node in model.graph:
        seed = _seed(node)
        if seed is None or (seed[0], seed[1]) in covered or seed[2].size <= 1:
            continue
        group = _build(model, node, seed)
        covered.update((o.value, o.axis) for o in group.occurrences)
        covered.add((seed[0], seed[1]))
        groups.append(group)
    _check_disjoint(groups)
    return groups


def _build(
    model: ir.Model, leader: ir.Node, seed: tuple[ir.Value, int, np.ndarray]
) -> ChannelGroup:
    value, axis, base = seed
    factor = 1
    while True:
        units = base.shape[0] // factor
        builder = _Builder(model, ChannelGroup(leader, units))
        try:
            builder.link(value, axis, np.arange(units), base.reshape(units, -1))
            builder.run()
        except _Coarsen as c:
            if base.shape[0] % (factor * c.factor):
                builder.group.unsafe = "no channel block size fits every reshape"
                return builder.group
            factor *= c.factor
            continue
        except Unsafe as e:
            builder.group.unsafe = str(e)
        return builder.group


def _check_disjoint(groups: list[ChannelGroup]) -> None:
    """Safety net: two groups sharing a position would be pruned inconsistently."""
    seen: dict[Key, tuple[ChannelGroup, set[int]]] = {}
    for group in groups:
        for occ in group.occurrences:
            key = (occ.value, occ.axis)
            mine = set(occ.positions.ravel().tolist())
            if key in seen and seen[key][0] is not group and seen[key][1] & mine:
                reason = f"shares channels of {occ.value.name!r} with another group"
                group.unsafe = group.unsafe or reason
                seen[key][0].unsafe = seen[key][0].unsafe or reason
            elif key in seen:
                seen[key][1].update(mine)
            else:
                seen[key] = (group, mine)


class _Builder:
    def __init__(self, model: ir.Model, group: ChannelGroup) -> None:
        self.model = model
        self.group = group
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.visited: dict[Key, Occurrence] = {}
        self.axis_of: dict[ir.Value, int] = {}
        self.queue: list[Occurrence] = []
        self.done: set[tuple[ir.Node, str, int, int]] = set()

    # -- traversal --------------------------------------------------------------------
    def link(self, value: ir.Value, axis: int, units: np.ndarray, positions: np.ndarray) -> None:
        """``value``'s axis carries these units at these positions."""
        if len(units) == 0:
            return
        rank = _rank(value)
        axis = axis % rank
        units = np.asarray(units, dtype=np.int64)
        order = np.argsort(units, kind="stable")
        positions = np.asarray(positions, dtype=np.int64).reshape(len(units), -1)
        occ = Occurrence(value, axis, units[order], np.sort(positions[order], axis=1))
        key = (value, axis)
        if key in self.visited:
            old = self.visited[key]
            merged = _merge(old, occ)
            if merged is None:
                raise Unsafe(f"channels reach {value.name!r} through two different mappings")
            if merged is old:
                return
            # more units of the group on this tensor (seen partly through a Split or Concat)
            self.group.occurrences[self.group.occurrences.index(old)] = merged
            self.visited[key] = merged
            self.queue.append(merged)
            return
        if value in self.axis_of:
            raise Unsafe(f"channels land on two axes of {value.name!r}")
        if value.is_graph_output():
            raise Unsafe(f"channels reach graph output {value.name!r}")
        if value.is_graph_input() or value.is_initializer() or value.producer() is None:
            raise Unsafe(f"channels come from graph input {value.name!r}")
        size = _dims(value)[axis]
        if size is None:
            raise Unsafe(f"channel axis {axis} of {value.name!r} has no static size")
        if occ.positions.size and (occ.positions.min() < 0 or occ.positions.max() >= size):
            raise Unsafe(f"channel mapping out of range at {value.name!r}")
        self.visited[key] = occ
        self.axis_of[value] = axis
        self.group.occurrences.append(occ)
        self.queue.append(occ)

    def run(self) -> None:
        while self.queue:
            occ = self.queue.pop(0)
            producer = occ.value.producer()
            if producer is not None:
                self._handle(producer, "out", list(producer.outputs).index(occ.value), occ)
            for use in occ.value.uses():
                self._handle(use.node, "in", use.idx, occ)
        group = self.group
        for roles in (group.producers, group.consumers, group.batchnorms):
            latest = {n: self.visited[(o.value, o.axis)] for n, o in roles}
            roles[:] = list(latest.items())

    def _handle(self, node: ir.Node, side: str, index: int, occ: Occurrence) -> None:
        marker = (node, side, index, occ.axis, len(occ.units))
        if marker in self.done:
            return
        self.done.add(marker)
        if node.graph is not self.model.graph:
            raise Unsafe(f"channels of {occ.value.name!r} are read inside a subgraph")
        if node.domain not in ("", "ai.onnx"):
            raise Unsafe(
                f"custom op {node.domain}::{node.op_type} ({_name(node)}) reads the channels"
            )
        handler = _HANDLERS.get(node.op_type)
        if handler is None:
            raise Unsafe(f"{node.op_type} ({_name(node)}) reads the channels; not understood")
        handler(self, node, side, index, occ)

    # -- shared mappings --------------------------------------------------------------
    def passthrough(self, node: ir.Node, occ: Occurrence) -> None:
        """Input 0 and output 0 have the same channels on the same axis."""
        extra = [o for o in node.outputs[1:] if o.uses() or o.is_graph_output()]
        if extra:
            raise Unsafe(f"{node.op_type} ({_name(node)}) has a used second output")
        self.link(node.inputs[0], occ.axis, occ.units, occ.positions)
        self.link(node.outputs[0], occ.axis, occ.units, occ.positions)

    def broadcast(
        self, node: ir.Node, side: str, index: int, occ: Occurrence, inputs: list[int]
    ) -> None:
        """Elementwise with numpy broadcasting over ``inputs``: every full-size operand couples;
        constants of full size are sliced; size-1 and missing axes broadcast."""
        out = node.outputs[0]
        out_rank = _rank(out)
        out_axis = occ.axis + (out_rank - _rank(occ.value)) if side == "in" else occ.axis
        size = _dims(out)[out_axis]
        for i in inputs:
            value = node.inputs[i]
            if value is None:
                continue
            rank = _rank(value)
            axis = out_axis - (out_rank - rank)
            if axis < 0:
                continue
            dim = _refined_dims(value)[axis]
            if dim == 1:
                continue
            if dim != size:
                raise Unsafe(
                    f"{node.op_type} ({_name(node)}): operand {value.name!r} size unknown on the channel axis"
                )
            if _operand_const(value) is None:
                self.link(value, axis, occ.units, occ.positions)
        self.link(out, out_axis, occ.units, occ.positions)

    def coarse_map(
        self, src: list[int | None], axis: int, dst: list[int | None], occ: Occurrence, what: str
    ) -> tuple[int, np.ndarray]:
        """Map positions on ``src[axis]`` through a row-major reshape to one axis of ``dst``.

        A unit maps only if its elements fill whole slabs of a single ``dst`` axis; otherwise
        the group is rebuilt with coarser units (``_Coarsen``) if some block size works.
        """
        found = _reshape_map(src, axis, dst, occ.positions)
        if found is not None:
            return found
        total = self.group.units
        for f in range(2, total + 1):
            if total % f:
                continue
            coarse = _coarsen(occ, f)
            if coarse is not None and _reshape_map(src, axis, dst, coarse) is not None:
                raise _Coarsen(f)
        raise Unsafe(f"{what}: channels cannot be followed through the reshape {src} -> {dst}")


def _merge(old: Occurrence, new: Occurrence) -> Occurrence | None:
    """``old`` extended by ``new``'s units; ``old`` itself if nothing is new; None if the two
    place a unit differently."""
    if old.positions.shape[1] != new.positions.shape[1]:
        return None
    where = {int(u): i for i, u in enumerate(old.units)}
    for u, row in zip(new.units.tolist(), new.positions, strict=True):
        if u in where and not np.array_equal(old.positions[where[u]], row):
            return None
    extra = ~np.isin(new.units, old.units)
    if not extra.any():
        return old
    units = np.concatenate([old.units, new.units[extra]])
    positions = np.concatenate([old.positions, new.positions[extra]])
    order = np.argsort(units, kind="stable")
    merged = Occurrence(old.value, old.axis, units[order], positions[order])
    if len(np.unique(merged.positions)) != merged.positions.size:
        return None
    return merged


def _coarsen(occ: Occurrence, f: int) -> np.ndarray | None:
    order = np.argsort(occ.units, kind="stable")
    units, positions = occ.units[order], occ.positions[order]
    if len(units) % f or not np.array_equal(
        units.reshape(-1, f) // f, np.repeat((units[::f] // f)[:, None], f, 1)
    ):
        return None
    return positions.reshape(len(units) // f, -1)


def _reshape_map(
    src: list[int | None], axis: int, dst: list[int | None], positions: np.ndarray
) -> tuple[int, np.ndarray] | None:
    tail = src[axis:]
    if any(d is None for d in tail):
        raise Unsafe(f"reshape {src} -> {dst}: dims after the channel axis are not static")
    inner = math.prod(src[axis + 1 :])
    total = math.prod(tail)
    start = None
    for j in range(len(dst) - 1, -1, -1):
        if any(d is None for d in dst[j:]):
            break
        if math.prod(dst[j:]) == total:
            start = j  # keep the smallest j: leading 1s still belong to the tail
        elif math.prod(dst[j:]) > total:
            break
    if start is None:
        return None
    tail_dst = [int(d) for d in dst[start:]]
    n = positions.shape[0]
    flat = (positions[:, :, None] * inner + np.arange(inner)).reshape(n, -1)
    coords = np.unravel_index(flat, tail_dst)
    for m, size in enumerate(tail_dst):
        rest = total // size
        ordered = np.sort(coords[m], axis=1)
        new = np.ones(ordered.shape, dtype=bool)
        new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        counts = new.sum(axis=1)
        if (counts * rest == flat.shape[1]).all() and (counts == counts[0]).all():
            return start + m, ordered[new].reshape(n, int(counts[0]))
    return None


# -- op handlers: (builder, node, side "in"/"out", port index, occurrence) ----------------
Handler = Callable[[_Builder, ir.Node, str, int, Occurrence], None]


_HANDLERS: dict[str, Handler] = {}


def _handles(*ops: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return register

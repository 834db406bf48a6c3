"""Layer removal: bypass residual branches, drop transformer blocks and identity-like layers.

Removing a unit means every reader of its output reads the unit's input instead; the nodes
that then feed nothing are deleted. That is legal only where the output has the input's shape
and dtype and the removed nodes feed nothing else, which :func:`find_units` proves from the
graph (reachability in :class:`~graphsurgeon.graph_view.GraphView`) and the ops' shape rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir
from graphsurgeon.passes.folding import DeadBefore

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.graph_view import SOURCE, GraphView
from graphsurgeon.layers import find_layers, layer_id
from graphsurgeon.options import Choice, FloatRange, IntRange, LayerPassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register
from graphsurgeon.shapes import ShapeInferencePass

UnitKind = Literal["residual", "block", "identity"]


class RemoveLayersOptions(LayerPassOptions):
    layers: list[str] = option(
        [],
        "Units to remove: unit ids (residual Add names, block ids like "
        "bert/encoder/layer.3, layer ids of identity-like layers) or regexes over them.",
    )
    count: int = option(
        0, "Remove this many units of `kind`, picked `by` (0: use fraction).", IntRange(0, 6), ge=0
    )
    fraction: float = option(
        0.0,
        "Remove this fraction of the candidate units of `kind` (rounded), picked `by`.",
        FloatRange(0.0, 0.5),
        ge=0.0,
        le=1.0,
    )
    by: Literal["sensitivity", "depth"] = option(
        "sensitivity",
        "How count/fraction pick: least output drift on the calibration data when removed "
        "alone (graphsurgeon.sensitivity), or deepest first.",
        Choice(["sensitivity", "depth"]),
    )
    kind: Literal["auto", "block", "residual", "identity"] = option(
        "auto",
        "Candidates for count/fraction: transformer blocks, single residual branches, or "
        "identity-like layers; auto takes blocks if the model has any, else residual branches, "
        "else identity-like layers.",
        Choice(["auto", "block", "residual", "identity"]),
    )
    identity_tol: float = option(
        1e-3,
        "A layer is identity-like when ||W - I||_F / ||I||_F and ||b|| / sqrt(n) are at most "
        "this (per layer through overrides).",
        FloatRange(1e-4, 0.1, log=True),
        gt=0.0,
    )


@dataclass
class Unit:
    """A removable piece of the graph: readers of ``output`` will read ``keep`` instead."""

    id: str
    kind: UnitKind
    anchor: ir.Node  # the node producing ``output``
    output: ir.Value
    keep: ir.Value
    removed: set[ir.Node] = field(default_factory=set)
    layers: list[str] = field(default_factory=list)  # layer ids inside ``removed``
    problem: str | None = None  # why it may not be removed; None when legal
    depth: int = 0  # position of the anchor in topological order


def find_units(model: ir.Model, identity_tol: float | Callable[[str], float] = 1e-3) -> list[Unit]:
    """Every residual Add (legal or not, with the reason), the blocks built from legal ones,
    and the identity-like layers (``identity_tol``: a number or layer id -> tolerance), in
    topological order of their anchors."""
    tol_for = identity_tol if callable(identity_tol) else (lambda _lid: identity_tol)
    if any(v.shape is None for n in model.graph if n.op_type == "Add" for v in n.inputs if v):
        ShapeInferencePass()(model)
    layers = {layer.node: layer for layer in find_layers(model)}
    view = GraphView(model)
    order = {node: i for i, node in enumerate(model.graph)}
    residuals = [
        _residual(node, view, order)
        for node in model.graph
        if node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2
    ]
    units = [u for u in residuals if u is not None]
    units.extend(_blocks([u for u in units if u.problem is None]))
    for layer in layers.values():
        if layer.node.graph is model.graph:
            unit = _identity(layer.node, layer.id, tol_for(layer.id), order)
            if unit is not None and unit.problem is None:
                units.append(unit)
    for unit in units:
        unit.layers = sorted(
            lid for n in unit.removed if (lid := layer_id(n)) is not None and n in layers
        )
    units.sort(key=lambda u: (u.depth, u.kind))
    return units


# -- residual branches --------------------------------------------------------------------
def _residual(add: ir.Node, view: GraphView, order: dict[ir.Node, int]) -> Unit | None:
    """``x + f(x)``: which operand is the skip path, the private branch, and the proof.

    The branch is every node whose outputs reach nothing but the Add's other operand (found
    backwards from that operand over GraphView's predecessors, in reverse topological order);
    a node of it must read ``x`` itself, and ``f(x)`` must broadcast into ``x`` so that the
    sum has ``x``'s shape.
    """
    uid = _node_id(add)
    a, b = add.inputs
    if a is None or b is None:
        return None
    if ir.convenience.get_const_tensor(a) is not None or (
        ir.convenience.get_const_tensor(b) is not None
    ):
        return None  # a bias add, not a residual candidate
    out = add.outputs[0]
    problem = "neither operand is a skip path feeding a private branch (not x + f(x))"
    for skip, branch_value in ((a, b), (b, a)):
        producer = branch_value.producer()
        if producer is None or producer.graph is not add.graph or skip is branch_value:
            continue
        branch = _private(producer, add, branch_value, view, order)
        if not branch:
            problem = "the branch output is also read elsewhere"
            continue
        if not any(skip in n.inputs for n in branch):
            continue  # f must read x itself; x merely upstream of the branch is not x + f(x)
        unit = Unit(uid, "residual", add, out, skip, branch | {add}, depth=order[add])
        unit.problem = _same_value_shape(branch_value, skip, out)
        return unit
    return Unit(uid, "residual", add, out, a, set(), problem=problem, depth=order[add])


def _private(
    start: ir.Node, sink: ir.Node, value: ir.Value, view: GraphView, order: dict[ir.Node, int]
) -> set[ir.Node]:
    """Nodes (``start`` and its ancestors) whose outputs are read only by each other and by
    ``sink`` through ``value``: what dies if ``sink`` stops reading ``value``."""
    ancestors = [n for n in view.nx.predecessors(start) if n is not SOURCE]
    seen = {start}
    stack = list(ancestors)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(p for p in view.nx.predecessors(n) if p is not SOURCE)
    private: set[ir.Node] = set()
    for node in sorted(seen, key=order.__getitem__, reverse=True):
        if _reads_only(node, private, sink, value):
            private.add(node)
        elif node is start:
            return set()
    return private


def _reads_only(node: ir.Node, inside: set[ir.Node], sink: ir.Node, value: ir.Value) -> bool:
    for out in node.outputs:
        if out.is_graph_output():
            return False
        for use in out.uses():
            if use.node is sink and out is value:
                continue
            if use.node not in inside:
                return False
    return True


def _same_value_shape(branch: ir.Value, skip: ir.Value, out: ir.Value) -> str | None:
    """None if ``skip + branch`` provably has ``skip``'s shape and dtype, else the reason."""
    if out.dtype != skip.dtype:
        return "the sum's dtype differs from the skip path's"
    if branch.shape is None or skip.shape is None:
        return "shapes unknown: cannot prove the sum has the skip path's shape"
    bs, xs = list(branch.shape), list(skip.shape)
    if len(bs) > len(xs):
        return "the branch has a higher rank than the skip path (the sum broadcasts x)"
    for bd, xd in zip(reversed(bs), reversed(xs), strict=False):
        if bd != 1 and bd != xd:
            return f"cannot prove the branch dims {bs} broadcast into the skip path's {xs}"
    return None


# -- transformer blocks -------------------------------------------------------------------
def _blocks(residuals: list[Unit]) -> list[Unit]:
    """Two consecutive residual sublayers, each optionally followed by its LayerNormalization
    (post-LN BERT: ``h = LN1(x + attn(x)); y = LN2(h + ffn(h))``; pre-LN: no LNs between),
    where the first's branch has a Softmax (attention), the second's has none (FFN), and
    the second's skip path is the first's output. The block becomes ``y = x``: both branches and both LNs go, so
    no LayerNorm of the bypassed input remains (bypassing only the branches would leave
    ``LN2(LN1(x))``, which is not the identity)."""
    by_skip = {u.keep: u for u in residuals}

    def end_of(unit: Unit) -> tuple[ir.Value, set[ir.Node]]:
        uses = unit.output.uses()
        if len(uses) == 1 and not unit.output.is_graph_output():
            ln = uses[0].node
            if (
                ln.op_type == "LayerNormalization"
                and ln.domain == ""
                and ln.inputs[0] is unit.output
            ):
                return ln.outputs[0], {ln}
        return unit.output, set()

    blocks = []
    for unit in residuals:
        if not any(n.op_type == "Softmax" for n in unit.removed):
            continue  # a block starts with its attention sublayer
        end1, ln1 = end_of(unit)
        second = by_skip.get(end1)
        if second is None or any(n.op_type == "Softmax" for n in second.removed):
            continue
        end2, ln2 = end_of(second)
        removed = unit.removed | ln1 | second.removed | ln2
        anchor = end2.producer()
        assert anchor is not None
        block = Unit("", "block", anchor, end2, unit.keep, removed, depth=second.depth)
        if any(use.node not in removed for use in end1.uses()):
            block.problem = "the block's middle value is read outside the block"
        blocks.append(block)
    taken = {u.id for u in residuals}
    for block in blocks:
        ids = [lid for n in block.removed if (lid := layer_id(n))]
        block.id = _common_prefix(ids)
        if not block.id or block.id in taken:
            block.id = f"{_node_id(block.anchor)}/block"
        taken.add(block.id)
    return [b for b in blocks if b.problem is None]


def _common_prefix(ids: list[str]) -> str:
    if not ids:
        return ""
    parts = [i.split("/") for i in ids]
    prefix = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return "/".join(prefix)


# -- identity-like layers -----------------------------------------------------------------
def _identity(node: ir.Node, lid: str, tol: float, order: dict[ir.Node, int]) -> Unit | None:
    """A square Gemm/MatMul/1x1-Conv whose weight is within ``tol`` of I and bias of 0:
    its output has its input's shape, so ``y ~ x``."""
    if not node.inputs or node.inputs[0] is None or not node.outputs:
        return None
    problem = _identity_problem(node, tol)
    removed = {node} if problem is None else set()
    x, y = node.inputs[0], node.outputs[0]
    return Unit(lid, "identity", node, y, x, removed, problem=problem, depth=order[node])


def _identity_problem(node: ir.Node, tol: float) -> str | None:
    op = node.op_type
    if op not in ("Gemm", "MatMul", "Conv") or len(node.inputs) < 2 or node.inputs[0] is None:
        return f"{op} layers are never identity-like"
    weight = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] else None
    if weight is None:
        return "its weight is not the second operand or not a plain constant"
    w = weight.numpy().astype(np.float64)
    if op == "Conv":
        attrs = node.attributes
        if (
            w.ndim < 3
            or any(k != 1 for k in w.shape[2:])
            or attrs.get_int("group", 1) != 1
            or any(s != 1 for s in attrs.get_ints("strides", []))
            or any(p != 0 for p in attrs.get_ints("pads", []))
            or attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
        ):
            return "only a 1x1, stride-1, unpadded, ungrouped Conv can be the identity"
        w = w.reshape(w.shape[0], w.shape[1])
    if op == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA changes the shape"
        w = w * node.attributes.get_float("alpha", 1.0)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        return f"its weight {list(w.shape)} is not square"
    n = w.shape[0]
    error = float(np.linalg.norm(w - np.eye(n)) / math.sqrt(n))
    if error > tol:
        return f"not identity-like (||W - I|| / ||I|| = {error:.3g} > {tol:g})"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = ir.convenience.get_const_tensor(node.inputs[2])
        if bias is None:
            return "its bias is not a constant"
        b = bias.numpy().astype(np.float64)
        if op == "Gemm":
            b = b * node.attributes.get_float("beta", 1.0)
        if float(np.linalg.norm(b) / math.sqrt(max(b.size, 1))) > tol:
            return "its bias is not ~0"
    return None


def _node_id(node: ir.Node) -> str:
    name = (node.name or "").strip("/")
    return re.sub(r"\s+", "_", name) or f"{node.op_type}@{id(node):x}"


# -- the pass -----------------------------------------------------------------------------
@register
class RemoveLayers(GSPass):
    """Remove residual branches (``x + f(x) -> x``), whole transformer blocks, or
    identity-like layers; then delete the nodes and weights that fed only them.

    Units and their legality proofs (see :func:`find_units`):

    - residual: an Add of a skip path ``x`` and a branch ``f(x)`` whose nodes feed nothing
      but this Add and that reads ``x``; ``f(x)`` must broadcast into ``x`` (so ``x + f(x)``
      has ``x``'s shape). In post-LN models (BERT) the LayerNorm after the Add stays: the
      sublayer becomes ``LN(x)``, exactly what zeroing that branch computes.
    - block: two chained residual sublayers with their LayerNorms (a BERT layer
      ``LN2(h + FFN(h))``, ``h = LN1(x + attn(x))``) become ``y = x``; the LayerNorms go too,
      since dropping the layer means its output is its input, not a renormalized input.
    - identity: a square Gemm/MatMul/1x1-Conv with ``W ~ I`` and ``b ~ 0``.

    Picks: ``layers`` (ids or regexes; an illegal pick is refused with the reason), or
    ``count``/``fraction`` of the candidate units of ``kind`` ordered ``by`` sensitivity
    (least drift first, measured alone on the calibration data) or depth. A unit is selected
    by the targets when every layer it removes is. If a removed unit's output is a graph
    output, its input value takes the output's name.
    """

    name = "remove-layers"
    kind = "surgery"
    Options = RemoveLayersOptions
    strength_option: ClassVar[str | None] = None

    def call(self, model: ir.Model) -> PassResult:
        options: RemoveLayersOptions = self.options  # type: ignore[assignment]
        units = find_units(model, lambda lid: self.options_for(lid).identity_tol)
        chosen = self._explicit(model, units, options) + self._counted(model, units, options)
        dead = DeadBefore(model)
        replaced: dict[ir.Value, ir.Value] = {}
        gone: set[ir.Node] = set()
        removed_ids = []
        for unit in chosen:
            if unit.removed & gone or unit.anchor in gone:
                self.skip(unit.anchor, f"{unit.id}: overlaps a unit already removed")
                continue
            keep = unit.keep
            while keep in replaced:
                keep = replaced[keep]
            if not self._bypass(unit, keep, model):
                continue
            replaced[unit.output] = keep
            gone |= unit.removed
            removed_ids.append(unit.id)
        if not removed_ids:
            return PassResult(model, False)
        dead.sweep(model)
        self.note("removed", removed_ids)
        self.note("candidates", [u.id for u in units if u.problem is None])
        return PassResult(model, True)

    def _bypass(self, unit: Unit, keep: ir.Value, model: ir.Model) -> bool:
        out = unit.output
        if out.is_graph_output():
            if keep.is_graph_input() or keep.is_graph_output() or keep.is_initializer():
                self.skip(unit.anchor, f"{unit.id}: its input is already a graph input/output")
                return False
            name = out.name
            ir.convenience.replace_all_uses_with(out, keep, replace_graph_outputs=True)
            out.name = f"{name}.removed"
            keep.name = name
        else:
            ir.convenience.replace_all_uses_with(out, keep)
        return True

    def _selected(self, unit: Unit) -> bool:
        nodes = [n for n in unit.removed if layer_id(n)] or [unit.anchor]
        return all(self.selects(n) for n in nodes)

    def _explicit(
        self, model: ir.Model, units: list[Unit], options: RemoveLayersOptions
    ) -> list[Unit]:
        chosen: list[Unit] = []
        by_layer = {layer.id: layer for layer in find_layers(model)}
        order = {node: i for i, node in enumerate(model.graph)}
        for pattern in options.layers:
            matches = [u for u in units if _matches(pattern, u.id)]
            if not matches:
                lids = [lid for lid in by_layer if _matches(pattern, lid)]
                for lid in lids:  # a layer that is not identity-like: say why
                    node = by_layer[lid].node
                    tol = self.options_for(lid).identity_tol
                    unit = _identity(node, lid, tol, order) if node.graph is model.graph else None
                    if unit is None:
                        self.skip(node, f"{lid}: inside a subgraph or without an input")
                    else:
                        matches.append(unit)
            if not matches and not any(_matches(pattern, lid) for lid in by_layer):
                legal = [u.id for u in units if u.problem is None]
                raise GraphSurgeonError(
                    f"remove-layers: {pattern!r} matches no removable unit or layer "
                    f"(candidates: {', '.join(legal[:8]) or 'none'}"
                    f"{', ...' if len(legal) > 8 else ''})"
                )
            for unit in matches:
                if unit.kind == "identity":
                    tol = self.options_for(unit.id).identity_tol
                    unit.problem = _identity_problem(unit.anchor, tol)
                if unit.problem is not None:
                    self.skip(unit.anchor, f"{unit.id}: {unit.problem}")
                elif not self._selected(unit):
                    self.skip(unit.anchor, f"{unit.id}: not selected by the targets")
                elif unit not in chosen:
                    chosen.append(unit)
        return chosen

    def _counted(
        self, model: ir.Model, units: list[Unit], options: RemoveLayersOptions
    ) -> list[Unit]:
        candidates = [
            u
            for u in self.candidates(units, options.kind)
            if self._selected(u) and u.problem is None
        ]
        n = options.count or round(options.fraction * len(candidates))
        if n <= 0 or not candidates:
            return []
        if options.by == "depth":
            return sorted(candidates, key=lambda u: -u.depth)[:n]
        from graphsurgeon.sensitivity import layer_sensitivity

        rows = layer_sensitivity(
            model.clone(),
            self.name,
            options={"kind": options.kind, "identity_tol": options.identity_tol},
            units=[u.id for u in candidates],
            calib=self.calib,
        )
        drift = {row.layer: row.drift for row in rows if row.status == "ok"}
        self.note("sensitivity", drift)
        ranked = sorted(
            (u for u in candidates if u.id in drift), key=lambda u: (drift[u.id], -u.depth)
        )
        return ranked[:n]

    @staticmethod
    def candidates(units: list[Unit], kind: str) -> list[Unit]:
        legal = [u for u in units if u.problem is None]
        if kind != "auto":
            return [u for u in legal if u.kind == kind]
        for k in ("block", "residual", "identity"):
            picked = [u for u in legal if u.kind == k]
            if picked:
                return picked
        return []

    @classmethod
    def sensitivity_trials(
        cls, model: ir.Model, options: dict[str, Any]
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """For ``graphsurgeon sensitivity``: remove each candidate unit alone."""
        parsed = cls.Options(**options)
        units = find_units(model, parsed.identity_tol)
        base = {**options, "count": 0, "fraction": 0.0}
        return [
            (u.id, u.kind, {**base, "layers": [u.id]}) for u in cls.candidates(units, parsed.kind)
        ]


def _matches(pattern: str, text: str) -> bool:
    if pattern == text:
        return True
    try:
        return re.fullmatch(pattern, text) is not None
    except re.error:
        return False

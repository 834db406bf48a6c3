"""Elimination passes: dead code, common subexpressions, identities.

All three reuse ``onnx_ir``'s passes, which handle subgraphs and keep graph outputs intact;
these classes give them registry names, kinds and the statistics contract.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from graphsurgeon.options import PassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def _trimmable(
    model: ir.Model,
) -> list[tuple[ir.Node, int, tuple[str | None, ...], tuple[str, ...]]]:
    """Each node with its input count, output names and attribute names."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return [
        (n, len(n.inputs), tuple(v.name for v in n.outputs), tuple(n.attributes)) for n in nodes
    ]


@register
class EliminateDeadCode(GSPass):
    """Remove nodes whose outputs reach no graph output, then unused initializers and functions.

    Cases: chains of dead nodes, dead nodes inside If/Loop bodies, initializers left without a
    user by earlier rewrites, local functions no node calls. Graph outputs and graph inputs
    are never removed, even if unused.
    """

    name = "eliminate-dead-code"
    kind = "exact"
    supports_targets = False

    def call(self, model: ir.Model) -> PassResult:
        before = _count_nodes(model)
        trimmable = _trimmable(model)
        modified = ir_passes.RemoveUnusedNodesPass()(model).modified
        # It also trims live nodes (unused optional outputs, trailing empty inputs, a
        # BatchNormalization's training_mode=0) but counts only the nodes it removes.
        modified |= _trimmable(model) != trimmable
        modified |= ir_passes.RemoveUnusedFunctionsPass()(model).modified
        self.note("nodes_removed", before - _count_nodes(model))
        return PassResult(model, modified)


class CSEOptions(PassOptions):
    deduplicate_initializers: bool = option(
        False,
        "Also merge initializers with identical bytes. Off by default: two layers that merely "
        "start out equal (zero biases, say) would then share one weight and a later compression "
        "pass would change both.",
    )


@register
class EliminateCommonSubexpressions(GSPass):
    """Merge nodes that compute the same op with the same inputs and attributes.

    Cases: duplicated Shape/Gather/Unsqueeze chains from exporters, repeated identical
    subgraphs; nodes with subgraph attributes and non-deterministic ops (RandomNormal...) are
    left alone by onnx_ir's pass.
    """

    name = "eliminate-common-subexpressions"
    kind = "exact"
    Options = CSEOptions
    supports_targets = False

    def call(self, model: ir.Model) -> PassResult:
        before = _count_nodes(model)
        declared = [(v.type, v.shape) for v in model.graph.outputs]
        modified = False
        if self.options.deduplicate_initializers:
            modified |= ir_passes.DeduplicateInitializersPass()(model).modified
        modified |= ir_passes.CommonSubexpressionEliminationPass()(model).modified
        # onnx_ir's pass hands a graph output over to the node it keeps, whose value may never
        # have been annotated: the output keeps the type and shape it declared.
        for value, (type_, shape) in zip(model.graph.outputs, declared, strict=True):
            if value.type is None:
                value.type = type_
            if value.shape is None:
                value.shape = shape
        self.note("nodes_merged", before - _count_nodes(model))
        return PassResult(model, modified)


@register
class EliminateIdentities(GSPass):
    """Remove Identity nodes, rewiring their consumers to the Identity's input.

    Cases: Identity between two nodes; Identity feeding a graph output (the input value takes
    the output's name when that is safe, else the Identity stays); Identity inside subgraphs.
    """

    name = "eliminate-identities"
    kind = "exact"
    supports_targets = False

    def call(self, model: ir.Model) -> PassResult:
        before = _count_nodes(model)
        modified = _IdentityElimination()(model).modified
        self.note("identities_removed", before - _count_nodes(model))
        return PassResult(model, modified)


class _IdentityElimination(ir_passes.IdentityEliminationPass):
    """onnx_ir's pass, except where ``y = Identity(x)`` feeds a graph output and removing it
    would make ``x`` that output under ``y``'s name. It keeps the Identity where ``x`` is a graph
    input (as onnx_ir does) and also where ``x`` is another graph output (output ``x`` would be
    lost) or comes from an outer scope (a subgraph may not return an outer value directly, and
    the outer value would be renamed)."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and len(node.inputs) == 1 and len(node.outputs) == 1:
            x, y = node.inputs[0], node.outputs[0]
            if x is not None and y.is_graph_output():
                producer = x.producer()
                owner = producer.graph if producer is not None else x.graph
                if x.is_graph_output() or owner is not node.graph:
                    return False
        return super()._try_eliminate_identity_node(node)

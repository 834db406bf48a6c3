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
        modified = ir_passes.RemoveUnusedNodesPass()(model).modified
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
        modified = False
        if self.options.deduplicate_initializers:
            modified |= ir_passes.DeduplicateInitializersPass()(model).modified
        modified |= ir_passes.CommonSubexpressionEliminationPass()(model).modified
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
        modified = ir_passes.IdentityEliminationPass()(model).modified
        self.note("identities_removed", before - _count_nodes(model))
        return PassResult(model, modified)

"""Built-in rewrite passes, one module per pass family (imported as ``graphsurgeon.passes``)."""

from graphsurgeon.passes.elimination import (
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    EliminateIdentities,
)
from graphsurgeon.passes.folding import FoldBatchNorm, FoldConstants, FuseMatMulAdd
from graphsurgeon.passes.shapes import FixShapes

BUILTIN_PASSES = [
    FoldConstants,
    EliminateDeadCode,
    EliminateCommonSubexpressions,
    EliminateIdentities,
    FoldBatchNorm,
    FuseMatMulAdd,
    FixShapes,
]

__all__ = ["BUILTIN_PASSES", *(p.__name__ for p in BUILTIN_PASSES)]

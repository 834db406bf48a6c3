"""Folding passes: constants, BatchNorm into the preceding layer, MatMul+Add into Gemm.

They reuse onnxscript's constant folder and rewrite rules. Our subclasses add the target
selector and the legality checks the rules leave out, each refusing with a reason.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from onnx_ir.passes import common as ir_passes
from onnxscript.optimizer import fold_constants
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.rules.common import _fuse_batchnorm, _matmul_add_to_gemm

from graphsurgeon.options import IntRange, PassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register

Selector = Callable[[ir.Node], bool]


class FoldConstantsOptions(PassOptions):
    input_size_limit: int = option(
        8192,
        "Nodes with an input larger than this many elements are not folded (Shape/Size are "
        "always folded); keeps folding from inflating the model with computed tensors.",
        IntRange(1024, 1 << 20, log=True),
        ge=0,
    )
    output_size_limit: int = option(
        1 << 20,
        "A folded result larger than this many elements is not stored.",
        IntRange(1024, 1 << 24, log=True),
        ge=0,
    )


@register
class FoldConstants(GSPass):
    """Evaluate nodes whose inputs are all constant and replace them by their values.

    Cases: Constant chains, arithmetic on initializers, Cast/Reshape/Transpose of weights,
    Shape/Gather/Concat shape subgraphs once input shapes are static (``--shape`` or
    ``fix-shapes``), If with a constant condition. The onnxscript folder runs the reference
    evaluator, so results are exact. Folded nodes and dead inputs are removed.
    """

    name = "fold-constants"
    kind = "exact"
    Options = FoldConstantsOptions

    def call(self, model: ir.Model) -> PassResult:
        targets = self.targets

        def should_fold(node: ir.Node) -> bool | None:
            return None if targets.selects(node) else False

        result = fold_constants(
            model,
            onnx_shape_inference=True,
            input_size_limit=self.options.input_size_limit,
            output_size_limit=self.options.output_size_limit,
            should_fold=should_fold,
        )
        modified = result.modified
        if modified:
            # The folder replaces uses; the producers it made dead go now.
            ir_passes.RemoveUnusedNodesPass()(model)
        self.note("values_folded", len(getattr(result, "symbolic_value_map", {}) or {}))
        return PassResult(model, modified)


def _selected_batchnorm(base: type, op_type: str) -> type:
    class Selected(base):  # type: ignore[misc, valid-type]
        def __init__(self, selects: Selector) -> None:
            super().__init__(name=f"fold-batchnorm-{op_type.lower()}")
            self._selects = selects

        def check(self, context, x, inbound_out, batchnorm_out) -> MatchResult:  # type: ignore[override]
            result = super().check(context, x, inbound_out, batchnorm_out)
            if not result:
                return result
            bn = batchnorm_out.producer()
            if len(bn.outputs) != 1 or bn.attributes.get_int("training_mode", 0):
                return result.fail("BatchNormalization in training mode")
            if not self._selects(inbound_out.producer()):
                return result.fail("not selected by the targets")
            return result

    return Selected


_BN_RULES = [
    _selected_batchnorm(_fuse_batchnorm.FuseBatchNormIntoConv, "Conv"),
    _selected_batchnorm(_fuse_batchnorm.FuseBatchNormIntoConvTranspose, "ConvTranspose"),
    _selected_batchnorm(_fuse_batchnorm.FuseBatchNormIntoGemm, "Gemm"),
]


@register
class FoldBatchNorm(GSPass):
    """Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

    With ``s = gamma / sqrt(var + eps)`` per output channel, ``BN(W*x + b)`` equals
    ``(W*s)*x + (b - mean)*s + beta``: scale the weight along its output-channel axis (axis 0
    for Conv, axis 1 of each group for ConvTranspose, the N axis for Gemm) and fold the bias.

    Refused: BN in training mode, non-constant weights or BN parameters, weights shared with
    another node, a layer output read by anyone but the BN, unselected layers.
    """

    name = "fold-batchnorm"
    kind = "exact"

    def call(self, model: ir.Model) -> PassResult:
        rules = [cls.rule(self.selects) for cls in _BN_RULES]
        result = RewritePass(rules)(model)
        if result.modified:
            ir_passes.RemoveUnusedNodesPass()(model)
        return PassResult(model, result.modified)


_GEMM_DTYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)


def _selected_matmul_add(base: type) -> type:
    class Selected(base):  # type: ignore[misc, valid-type]
        def __init__(self, selects: Selector) -> None:
            super().__init__(name=f"fuse-matmul-add-{base.__name__}")
            self._selects = selects

        def check(self, context, input_a, input_b, input_c, **kw) -> MatchResult:  # type: ignore[override]
            result = super().check(context, input_a, input_b, **kw)
            if not result:
                return result
            if input_a.dtype not in _GEMM_DTYPES:
                return result.fail(f"Gemm does not take {input_a.dtype}")
            a, b, c = input_a.shape, input_b.shape, input_c.shape
            if c is None:
                return result.fail("bias shape unknown")
            if len(c) > 2:
                return result.fail("bias of rank > 2 would change the output rank")
            m = a[1] if self.trans_a else a[0]
            n = b[0] if self.trans_b else b[1]
            # Gemm broadcasts C to (M, N) one way only: each bias dim must be 1 or equal.
            for cdim, target in zip(reversed(list(c)), (n, m)):
                if cdim != 1 and cdim != target:
                    return result.fail(f"bias shape {c} does not broadcast one-way to ({m}, {n})")
            matmul = context.root.inputs[0].producer() if context.root.inputs[0] else None
            if matmul is not None and matmul.op_type != "MatMul":
                matmul = context.root.inputs[1].producer()
            if matmul is not None and not self._selects(matmul):
                return result.fail("not selected by the targets")
            return result

    return Selected


_GEMM_RULES = [
    _selected_matmul_add(_matmul_add_to_gemm.MatMulAddToGemm),
    _selected_matmul_add(_matmul_add_to_gemm.TransAMatMulAddToGemm),
    _selected_matmul_add(_matmul_add_to_gemm.TransBMatMulAddToGemm),
    _selected_matmul_add(_matmul_add_to_gemm.TransABMatMulAddToGemm),
]


@register
class FuseMatMulAdd(GSPass):
    """Fuse ``Add(MatMul(A, B), C)`` (and transposed A/B) into ``Gemm(A, B, C)``.

    Legal only where Gemm means the same thing: A and B of rank 2, a float dtype, and C of
    rank <= 2 whose dims are 1 or equal to (M, N), so that broadcasting never grows the
    output. MatMuls on 3-D activations (transformer Linear layers) are left as they are.
    """

    name = "fuse-matmul-add"
    kind = "exact"

    def call(self, model: ir.Model) -> PassResult:
        if any(
            v is not None and v.shape is None
            for node in model.graph
            if node.op_type == "MatMul"
            for v in node.inputs
        ):
            ir_passes.ShapeInferencePass()(model)  # the legality check needs ranks
        rules = [cls.rule(self.selects) for cls in _GEMM_RULES]
        result = RewritePass(rules)(model)
        if result.modified:
            ir_passes.RemoveUnusedNodesPass()(model)
        return PassResult(model, result.modified)

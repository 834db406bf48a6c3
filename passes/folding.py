"""Folding passes: constants, BatchNorm into the preceding layer, MatMul+Add into Gemm.

They reuse onnxscript's constant folder and rewrite rules. Our subclasses add the target
selector and the legality checks the rules leave out, each refusing with a reason.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.rules.common import _fuse_batchnorm, _matmul_add_to_gemm

from graphsurgeon.options import IntRange, PassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register
from graphsurgeon.shapes import ShapeInferencePass

Selector = Callable[[ir.Node], bool]
Skipper = Callable[[ir.Node, str], None]  # GSPass.skip: records why a node was left alone


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

        dead = DeadBefore(model)
        result = _OpsetAwareFolder(
            shape_inference=True,
            input_size_limit=self.options.input_size_limit,
            output_size_limit=self.options.output_size_limit,
            should_fold=should_fold,
        )(model)
        modified = result.modified
        if modified:
            # The folder replaces uses; the producers it made dead go now.
            dead.sweep(model)
        self.note("values_folded", len(getattr(result, "symbolic_value_map", {}) or {}))
        return PassResult(model, modified)


class DeadBefore:
    """What nothing read before a rewrite, so that afterwards only what the rewrite made dead
    is removed. onnx_ir's RemoveUnusedNodesPass would also remove dead code the pass never
    touched (unselected nodes, under targets) and trim live nodes (unused optional outputs,
    BatchNormalization's training_mode=0); that is eliminate-dead-code's job."""

    def __init__(self, model: ir.Model) -> None:
        self.nodes = {n for g in model.graphs() for n in g if _unread(n.outputs)}
        self.initializers = {
            v for g in model.graphs() for v in g.initializers.values() if _unread([v])
        }

    def sweep(self, model: ir.Model) -> None:
        removed = True
        while removed:
            removed = False
            for graph in list(model.graphs()):
                for node in reversed(list(graph)):
                    if node not in self.nodes and _unread(node.outputs):
                        graph.remove(node, safe=True)
                        removed = True
        for graph in list(model.graphs()):
            for value in list(graph.initializers.values()):
                if value not in self.initializers and _unread([value]):
                    del graph.initializers[value.name]


def _unread(values) -> bool:
    return not any(v.uses() or v.is_graph_output() or v.is_graph_input() for v in values)


# Constant's typed attributes arrived in opset 12; before that only ``value`` (a tensor) exists.
_CONSTANT_ATTR_DTYPES = {
    "value_int": np.int64,
    "value_ints": np.int64,
    "value_float": np.float32,
    "value_floats": np.float32,
}


class _OpsetAwareFolder(_constant_folding.FoldConstantsPass):
    """onnxscript's folder, keeping every node it emits valid for the model's opset.

    Its partial evaluators build replacements in the newest signatures whatever the model
    imports: ``Constant(value_ints=...)`` (opset 12+) for a folded Shape, ``Unsqueeze``,
    ``Squeeze`` and ``Split`` with axes/split as inputs (13+) or ``num_outputs`` (18+) for
    sequence ops. On an older model a ``Constant`` is rewritten to its ``value`` tensor form;
    any other replacement node that its opset's schema does not accept is refused, so the
    original node stays.
    """

    def call(self, model: ir.Model) -> _constant_folding.FoldConstantsResult:
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        return super().call(model)

    def process_node(
        self, node: ir.Node, is_function: bool
    ) -> _constant_folding.Replacement | None:
        if self.should_fold(node) is False:
            return self._leave_alone(node)
        replacement = super().process_node(node, is_function)
        if replacement is None or self._opset is None:
            return replacement
        for new in replacement.new_nodes:
            if new.domain not in ("", "ai.onnx"):
                continue
            if new.op_type == "Constant" and self._opset < 12:
                _constant_to_value_form(new)
            if not _accepted_by_schema(new, self._opset):
                return None
        return replacement

    def _leave_alone(self, node: ir.Node) -> None:
        """An unselected node: never replaced, not even by the op-specific evaluators
        (Identity, Shape, Gather...) that onnxscript runs before consulting ``should_fold``.
        It still reads what its selected producers folded to, and its shapes are inferred."""
        for i, value in enumerate(node.inputs):
            sym_value = self._state.get_sym_value(value)
            if isinstance(sym_value, ir.Value):
                node.replace_input_with(i, sym_value)
                self._modified = True
        if _constant_folding._is_onnx_op(node, "Constant"):
            _constant_folding._process_constant_node(node)
        elif self.shape_inference and not _constant_folding._is_control_flow_op(node):
            self._do_inference(node)
        return None


def _constant_to_value_form(node: ir.Node) -> None:
    for name, dtype in _CONSTANT_ATTR_DTYPES.items():
        attr = node.attributes.pop(name, None)
        if attr is not None:
            tensor = ir.tensor(np.asarray(attr.value, dtype=dtype), name=node.outputs[0].name)
            node.attributes["value"] = ir.AttrTensor("value", tensor)


def _accepted_by_schema(node: ir.Node, opset: int) -> bool:
    """Whether the default-domain schema at ``opset`` takes this node's inputs and attributes."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return False  # the op does not exist yet at this opset
    n_inputs = len(node.inputs)
    while n_inputs and node.inputs[n_inputs - 1] is None:
        n_inputs -= 1
    if not schema.min_input <= n_inputs <= schema.max_input:
        return False
    return set(node.attributes) <= set(schema.attributes)


def _selected_batchnorm(base: type, op_type: str) -> type:
    class Selected(base):  # type: ignore[misc, valid-type]
        def __init__(self, selects: Selector, skip: Skipper) -> None:
            super().__init__(name=f"fold-batchnorm-{op_type.lower()}")
            self._selects = selects
            self._skip = skip

        def check(self, context, x, inbound_out, batchnorm_out) -> MatchResult:  # type: ignore[override]
            result = self._check(context, x, inbound_out, batchnorm_out)
            if not result:
                self._skip(batchnorm_out.producer(), result.reason)
            return result

        def _check(self, context, x, inbound_out, batchnorm_out) -> MatchResult:
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
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            # The rules match single-output BNs only; one that also outputs running statistics
            # is in training mode. Say so rather than skip it silently.
            producer = node.inputs[0].producer() if node.inputs and node.inputs[0] else None
            if (
                node.op_type == "BatchNormalization"
                and len(node.outputs) > 1
                and producer is not None
                and producer.op_type in ("Conv", "ConvTranspose", "Gemm")
            ):
                self.skip(node, "BatchNormalization in training mode")
        rules = [cls.rule(self.selects, self.skip) for cls in _BN_RULES]
        dead = DeadBefore(model)
        result = RewritePass(rules)(model)
        if result.modified:
            dead.sweep(model)
        return PassResult(model, result.modified)


_GEMM_DTYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)


def _selected_matmul_add(base: type) -> type:
    class Selected(base):  # type: ignore[misc, valid-type]
        def __init__(self, selects: Selector, skip: Skipper) -> None:
            super().__init__(name=f"fuse-matmul-add-{base.__name__}")
            self._selects = selects
            self._skip = skip

        def check(self, context, input_a, input_b, input_c, **kw) -> MatchResult:  # type: ignore[override]
            result = self._check(context, input_a, input_b, input_c, **kw)
            if not result:
                self._skip(context.root, result.reason)
            return result

        def _check(self, context, input_a, input_b, input_c, **kw) -> MatchResult:
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
            for cdim, target in zip(reversed(list(c)), (n, m), strict=False):
                if cdim != 1 and cdim != target:
                    return result.fail(f"bias shape {c} does not broadcast one-way to ({m}, {n})")
            matmul = context.root.inputs[0].producer() if context.root.inputs[0] else None
            if matmul is not None and matmul.op_type != "MatMul":
                matmul = context.root.inputs[1].producer()
            if matmul is not None:
                fused = [matmul]  # the nodes this rewrite removes
                if self.trans_a:
                    fused.append(matmul.inputs[0].producer())
                if self.trans_b:
                    fused.append(matmul.inputs[1].producer())
                if input_c.producer() in fused:  # Add(MatMul(a, b), MatMul(a, b))
                    return result.fail("the bias is computed by the nodes being fused")
            if matmul is not None and not self._selects(matmul):
                return result.fail("not selected by the targets")
            return result

    return Selected


# Most specific first: the plain rule also matches a MatMul of a Transpose, and the first rule
# that matches wins, so listed first it would leave every Transpose in front of the Gemm.
_GEMM_RULES = [
    _selected_matmul_add(_matmul_add_to_gemm.TransABMatMulAddToGemm),
    _selected_matmul_add(_matmul_add_to_gemm.TransAMatMulAddToGemm),
    _selected_matmul_add(_matmul_add_to_gemm.TransBMatMulAddToGemm),
    _selected_matmul_add(_matmul_add_to_gemm.MatMulAddToGemm),
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
            if node.op_type in ("MatMul", "Add")
            for v in node.inputs
        ):
            ShapeInferencePass()(model)  # the legality check needs the shapes of A, B and C
        rules = [cls.rule(self.selects, self.skip) for cls in _GEMM_RULES]
        dead = DeadBefore(model)
        result = RewritePass(rules)(model)
        if result.modified:
            dead.sweep(model)
        return PassResult(model, result.modified)

"""ONNX IR -> TVM Relax: static shapes, folded shape plumbing, then ``from_onnx``.

TVM's Relax importer wants static shapes and trips over exporter plumbing: ``Shape`` ->
``Gather`` -> ``Concat`` -> ``ConstantOfShape`` chains (a BERT export fails in
``ConstantOfShape`` with a 0-d shape). So the model is first given fixed input shapes
(``fix-shapes``), cleaned up (the ``cleanup`` pipeline: constant folding to a fixed point) and
folded once more with ``ConstantOfShape`` allowed (onnxscript keeps it by default to keep
files small; for a compiler the materialized constant is what we want).

Ops the importer lacks get converters here (see :mod:`.lowbit`): ``com.microsoft::MatMulNBits``
becomes one TIR kernel that dequantizes inside the matmul's reduction, ``GatherBlockQuantized``
(int4 embedding tables) a lookup that decodes only the rows it reads; our
``graphsurgeon.tvm::BlockSparseMatMul`` (block-sparse layers, see :mod:`.sparse`) a BSR kernel. Import failures name
the op and node.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import onnx_ir as ir
from graphsurgeon.passes.folding import DeadBefore, _constant_to_value_form, _OpsetAwareFolder

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import load
from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.shapes import format_shape, static_dims

# ConstantOfShape results up to this many elements are materialized before import.
CONSTANT_OF_SHAPE_LIMIT = 1 << 22
_PATCH_LOCK = threading.Lock()


def prepare(
    model: ir.Model | str | os.PathLike,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> ir.Model:
    """A copy of ``model`` with static input shapes and its shape subgraphs folded.

    Raises a one-line error naming the input when a dim is still symbolic.
    """
    where = None
    if isinstance(model, ir.Model):
        model = ir.from_proto(ir.to_proto(model))  # never change the caller's model
    else:
        where = os.fspath(model)
        model = load(Path(model))
    fixed = {k: [int(d) for d in v] for k, v in (shapes or {}).items()}
    # fix-shapes checks names and dims, clears the stale symbolic dims inside the graph and
    # re-infers them
    run_pipeline(model, [{"name": "fix-shapes", "options": {"shapes": fixed}}], verify="off")
    _infer_contrib_shapes(model)
    for value in model.graph.inputs:
        if static_dims(value.shape) is None:
            raise GraphSurgeonError(
                f"input {value.name!r} has dynamic shape {format_shape(value.shape)}: TVM "
                f"compiles static shapes only; give it fixed dims with --shape "
                f"{value.name}=DIMS",
                where=where,
            )
    run_pipeline(model, "cleanup", verify="off")
    while _infer_contrib_shapes(model):  # folding gave more contrib inputs a static shape
        run_pipeline(model, "cleanup", verify="off")
    _fold_constant_of_shape(model)
    for node in model.graph:  # the importer reads only Constant's ``value`` tensor form
        if node.op_type == "Constant" and node.domain == "":
            _constant_to_value_form(node)
    return model


def _contrib_output_shape(node: ir.Node) -> list[int] | None:
    """Static output shape of the ``com.microsoft`` ops ``quantize-weights`` writes."""
    if node.domain != "com.microsoft" or not node.outputs:
        return None
    if node.op_type == "MatMulNBits":
        a = static_dims(node.inputs[0].shape) if node.inputs[0] is not None else None
        return None if a is None else [*a[:-1], node.attributes.get_int("N", 0)]
    if node.op_type == "GatherBlockQuantized" and len(node.inputs) > 1:
        table = static_dims(node.inputs[0].shape) if node.inputs[0] is not None else None
        ids = static_dims(node.inputs[1].shape) if node.inputs[1] is not None else None
        if table is None or ids is None or len(table) != 2:
            return None
        bits = node.attributes.get_int("bits", 4)
        return [*ids, table[1] * (8 // bits)]
    return None


def _infer_contrib_shapes(model: ir.Model) -> bool:
    """ONNX shape inference knows no ``com.microsoft`` op, so everything after one (an int4
    embedding lookup: the whole network) would keep unknown dims, and the shape arithmetic
    downstream (attention-mask ``Expand``s) would not fold. Their output shapes are set here
    and inference rerun, sweep by sweep, until every such op has one (a few dozen ms each).
    Returns whether any shape was set."""
    from graphsurgeon.shapes import ShapeInferencePass

    any_set = False
    for _ in range(len(model.graph)):
        changed = False
        for node in model.graph:
            shape = _contrib_output_shape(node)
            out = node.outputs[0] if node.outputs else None
            if shape is None or out is None or static_dims(out.shape) == shape:
                continue
            out.shape = ir.Shape(shape)
            if out.type is None:
                out.type = ir.TensorType(ir.DataType.FLOAT)
            changed = any_set = True
        if not changed:
            break
        ShapeInferencePass()(model)
    return any_set


def _fold_constant_of_shape(model: ir.Model) -> None:
    def should_fold(node: ir.Node) -> bool | None:
        return True if node.op_type == "ConstantOfShape" and node.domain == "" else None

    dead = DeadBefore(model)
    result = _OpsetAwareFolder(
        shape_inference=True,
        input_size_limit=8192,
        output_size_limit=CONSTANT_OF_SHAPE_LIMIT,
        should_fold=should_fold,
    )(model)
    if result.modified:
        dead.sweep(model)


def to_relax(model: ir.Model, *, where: str | None = None):
    """Import a prepared model into a Relax ``IRModule`` (weights bound as constants)."""
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.to_proto(model)
    with _extra_converters():
        try:
            return from_onnx(proto, keep_params_in_input=False, sanitize_input_names=False)
        except _ConversionError as e:
            raise GraphSurgeonError(str(e), where=where) from None
        except Exception as e:  # the importer checks for unknown ops before converting any
            text = " ".join(str(e).split())[:300]
            if type(e).__name__ == "OpNotImplemented":
                ops = text.rpartition(":")[2].strip()
                raise GraphSurgeonError(
                    f"TVM's ONNX importer has no converter for op(s) {ops}", where=where
                ) from None
            raise GraphSurgeonError(f"TVM's ONNX importer failed: {text}", where=where) from None


class _ConversionError(Exception):
    pass


@contextlib.contextmanager
def _extra_converters() -> Iterator[None]:
    """Our converters added to the importer's op table, and failures tagged with the op.

    The importer looks its table up through a module-level function on every node and has no
    registration hook, so both are swapped in for the duration of one import (under a lock).
    """
    from graphsurgeon.kernels.tvm.lowbit import GatherBlockQuantized, MatMulNBits
    from graphsurgeon.kernels.tvm.sparse import BlockSparseMatMul
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    extra = {
        "MatMulNBits": MatMulNBits,
        "GatherBlockQuantized": GatherBlockQuantized,
        "BlockSparseMatMul": BlockSparseMatMul,
    }
    original_map = fe._get_convert_map
    original_importer = fe.ONNXGraphImporter

    class Importer(original_importer):  # type: ignore[misc, valid-type]
        def _convert_operator(self, op_name, inputs, attrs, opset):
            try:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            except _ConversionError:
                raise
            except Exception as e:
                text = " ".join(str(e).split())[:300]
                raise _ConversionError(
                    f"TVM's ONNX importer failed on op {op_name!r}: {text}"
                ) from None

    with _PATCH_LOCK:
        fe._get_convert_map = lambda: {**original_map(), **extra}
        fe.ONNXGraphImporter = Importer
        try:
            yield
        finally:
            fe._get_convert_map = original_map
            fe.ONNXGraphImporter = original_importer

"""``--shape NAME=DIMS`` parsing, applying fixed dims to graph inputs, and shape inference."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx
import onnx_ir as ir

from graphsurgeon import onnx_api
from graphsurgeon.errors import GraphSurgeonError


def parse_shape_arg(text: str) -> tuple[str, list[int]]:
    """Parse ``input=1x3x48x320`` (``,`` also separates dims) into ``("input", [1, 3, 48, 320])``."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name or not dims:
        raise GraphSurgeonError(f"--shape {text!r}: expected NAME=DIMS, e.g. input=1x3x224x224")
    try:
        values = [int(d) for d in dims.replace(",", "x").split("x")]
    except ValueError:
        raise GraphSurgeonError(
            f"--shape {text!r}: dims must be integers like 1x3x224x224"
        ) from None
    if any(v < 0 for v in values):
        raise GraphSurgeonError(f"--shape {text!r}: dims must be >= 0")
    return name, values


def parse_shape_args(texts: Iterable[str] | None) -> dict[str, list[int]]:
    return dict(parse_shape_arg(t) for t in texts or ())


def apply_input_shapes(
    model: ir.Model, shapes: Mapping[str, Iterable[int]], *, where: str | None = None
) -> bool:
    """Give graph inputs fixed shapes. Returns whether anything changed.

    A fixed dim that disagrees with the model, a rank mismatch or an unknown input name is an
    error: silently feeding a model a shape it was not built for gives wrong answers later.
    """
    inputs = {v.name: v for v in model.graph.inputs}
    planned: list[tuple[ir.Value, list[int]]] = []
    for name, dims in shapes.items():  # check everything before changing anything
        dims = [int(d) for d in dims]
        if any(d < 0 for d in dims):
            raise GraphSurgeonError(f"--shape {name}: dims must be >= 0, not {dims}", where=where)
        value = inputs.get(name)
        if value is None:
            known = ", ".join(inputs) or "none"
            raise GraphSurgeonError(
                f"--shape names input {name!r}, which the model does not have (inputs: {known})",
                where=where,
            )
        old = value.shape
        if old is not None:
            if len(old) != len(dims):
                raise GraphSurgeonError(
                    f"--shape {name}: rank {len(dims)} but the input has rank {len(old)} ({format_shape(old)})",
                    where=where,
                )
            for i, (o, n) in enumerate(zip(old, dims, strict=False)):
                if isinstance(o, int) and o != n:
                    raise GraphSurgeonError(
                        f"--shape {name}: dim {i} is fixed to {o} in the model, not {n}",
                        where=where,
                    )
        planned.append((value, dims))
    changed = False
    for value, dims in planned:
        if value.shape is None or list(value.shape) != dims:
            value.shape = ir.Shape(dims)
            changed = True
    return changed


def format_shape(shape: ir.Shape | None) -> str:
    """``[batch, 3, 224, 224]`` style, with symbolic dims shown by name (``?`` if unnamed)."""
    if shape is None:
        return "?"
    dims = [str(d) if isinstance(d, int) else (d.value or "?") for d in shape]
    return "[" + ", ".join(dims) + "]"


def static_dims(shape: ir.Shape | None) -> list[int] | None:
    """The dims as ints, or None if any is symbolic or the shape is unknown."""
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


class ShapeInferencePass(ir.passes.InPlacePass):
    """ONNX shape inference merged into the IR, keeping sequence, optional and map types.

    onnx_ir's pass of the same name copies back only each value's dtype and shape, which turns
    a value of type ``seq(tensor(float))`` into ``tensor(float)``: onnxruntime then refuses the
    saved model. This one copies the whole inferred type. If inference fails, the model is left
    unchanged.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:  # non-strict: annotate what can be inferred; strictness is the checker's job
            inferred = onnx_api.infer_shapes(model)
        except Exception:  # onnx raises assorted errors on models it cannot infer
            return ir.passes.PassResult(model, False)
        return ir.passes.PassResult(model, merge_inferred(model, inferred))


def merge_inferred(model: ir.Model, proto: onnx.ModelProto) -> bool:
    """Copy the types and shapes of ``proto`` (``model`` after ONNX shape inference) onto
    ``model``'s values; returns whether any changed."""
    inferred = ir.serde.deserialize_model(proto)
    modified = False
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs(), strict=True):
        inferred_values = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            new = inferred_values.get(name)
            if new is None:
                continue
            if new.type is not None and new.type != value.type:
                value.type = new.type
                modified = True
            if new.shape is not None and new.shape != value.shape:
                value.shape = new.shape
                modified = True
    return modified

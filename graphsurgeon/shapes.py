"""``--shape NAME=DIMS`` parsing and applying fixed dims to graph inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx_ir as ir

from graphsurgeon.errors import GraphSurgeonError


def parse_shape_arg(text: str) -> tuple[str, list[int]]:
    """Parse ``input=1x3x48x320`` (``,`` also separates dims) into ``("input", [1, 3, 48, 320])``."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name or not dims:
        raise GraphSurgeonError(f"--shape {text!r}: expected NAME=DIMS, e.g. input=1x3x224x224")
    try:
        values = [int(d) for d in dims.replace(",", "x").split("x")]
    except ValueError:
        raise GraphSurgeonError(f"--shape {text!r}: dims must be integers like 1x3x224x224") from None
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
    changed = False
    for name, dims in shapes.items():
        dims = [int(d) for d in dims]
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
                    f"--shape {name}: rank {len(dims)} but the input has rank {len(old)} ({_fmt(old)})",
                    where=where,
                )
            for i, (o, n) in enumerate(zip(old, dims)):
                if isinstance(o, int) and o != n:
                    raise GraphSurgeonError(
                        f"--shape {name}: dim {i} is fixed to {o} in the model, not {n}", where=where
                    )
        new = ir.Shape(dims)
        if old is None or list(old) != dims:
            value.shape = new
            changed = True
    return changed


def _fmt(shape: ir.Shape | None) -> str:
    return format_shape(shape)


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

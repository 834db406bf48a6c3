"""``fix-shapes``: give dynamic dims fixed values.

Static shapes let ``fold-constants`` fold the Shape/Gather/Concat subgraphs exporters emit
and let kernels and compilers specialise. Outputs are unchanged for inputs of the chosen shape.
"""

from __future__ import annotations

import onnx_ir as ir
from pydantic import NonNegativeInt

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.options import PassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register
from graphsurgeon.shapes import ShapeInferencePass, apply_input_shapes


class FixShapesOptions(PassOptions):
    shapes: dict[str, list[NonNegativeInt]] = option(
        {}, "Full shapes per graph input, e.g. {input: [1, 3, 224, 224]}."
    )
    dims: dict[str, NonNegativeInt] = option(
        {}, "Values for named symbolic dims, e.g. {batch: 1, sequence: 128}."
    )
    default: int | None = option(
        None, "Value for any symbolic dim of a graph input still left; None leaves them.", ge=1
    )


@register
class FixShapes(GSPass):
    """Replace symbolic dims of graph inputs with fixed values and re-infer all shapes.

    Cases: whole input shapes (``shapes``), named dims shared by several inputs (``dims``:
    ``batch`` in input_ids and attention_mask alike), anything left (``default``). A value that
    contradicts a fixed dim, or a name that is not an input, is an error.
    """

    name = "fix-shapes"
    kind = "exact"
    Options = FixShapesOptions
    supports_targets = False

    def call(self, model: ir.Model) -> PassResult:
        inputs = {v.name: v for v in model.graph.inputs}
        wanted: dict[str, list[int]] = {}
        for name, dims in self.options.shapes.items():
            wanted[name] = list(dims)
        for value in model.graph.inputs:
            if value.name in wanted or value.shape is None:
                continue
            dims, complete = [], True
            for d in value.shape:
                if isinstance(d, int):
                    dims.append(d)
                elif d.value in self.options.dims:
                    dims.append(self.options.dims[d.value])
                elif self.options.default is not None:
                    dims.append(self.options.default)
                else:
                    complete = False
                    break
            if complete and any(not isinstance(d, int) for d in value.shape):
                wanted[value.name] = dims
        unknown = [n for n in self.options.dims if not _dim_used(inputs.values(), n)]
        if unknown:
            raise GraphSurgeonError(f"fix-shapes: no graph input has a dim named {unknown[0]!r}")
        modified = apply_input_shapes(model, wanted)
        if modified:
            for node in ir.traversal.RecursiveGraphIterator(model.graph):
                for out in node.outputs:
                    if not out.is_graph_output():
                        out.shape = None  # stale symbolic dims; re-inferred below
            ShapeInferencePass()(model)
        self.note("inputs_fixed", sorted(wanted))
        return PassResult(model, modified)


def _dim_used(values, name: str) -> bool:
    return any(
        v.shape is not None and any(not isinstance(d, int) and d.value == name for d in v.shape)
        for v in values
    )

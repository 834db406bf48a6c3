"""The pass contract.

A graphsurgeon pass is an ``onnx_ir`` in-place pass with a registry name, a kind, an options
schema (see :mod:`graphsurgeon.options`) and a target selector. ``call`` returns
``PassResult(model, modified)`` where ``modified`` is exact: True if and only if the graph
changed. A pass that reports False leaves the serialized model byte-identical: shapes and
types its analyses annotated on the way are rolled back. Statistics (nodes, params, bytes,
FLOPs per layer, before and after) and timing are gathered by instruments around the pass, not
inside it; a pass adds only what it alone knows, through :meth:`GSPass.note` and
:meth:`GSPass.skip` (why a node was left alone).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from pydantic import ValidationError

from graphsurgeon.data import Dataset
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.options import NoOptions, PassOptions
from graphsurgeon.targets import Targets

PassKind = Literal["exact", "lossy", "surgery"]

__all__ = ["GSPass", "PassKind", "PassResult"]


class GSPass(InPlacePass):
    """Base class of every registered pass."""

    name: ClassVar[str]
    kind: ClassVar[PassKind] = "exact"
    Options: ClassVar[type[PassOptions]] = NoOptions
    #: Whole-graph passes (dead code, CSE...) cannot honour a node selector; they refuse one.
    supports_targets: ClassVar[bool] = True
    #: Passes that need the model as it was when the pipeline started (a distillation
    #: teacher) set this; the runner then keeps a serialized copy and sets ``self.original``.
    needs_original: ClassVar[bool] = False

    def __init__(
        self, options: PassOptions | dict[str, Any] | None = None, targets: Targets | None = None
    ) -> None:
        super().__init__()
        if isinstance(options, PassOptions):
            self.options = options
        else:
            try:
                self.options = self.Options(**(options or {}))
            except ValidationError as e:
                raise GraphSurgeonError(f"pass {self.name}: {format_validation_error(e)}") from None
        self._layer_options: dict[str, PassOptions] = {}
        overrides = getattr(self.options, "overrides", None) or {}
        for key, values in overrides.items():
            try:
                re.compile(key)
                merged = {**self.options.model_dump(exclude={"overrides"}), **values}
                self._layer_options[key] = self.Options(**merged)
            except re.error as e:
                raise GraphSurgeonError(
                    f"pass {self.name}: overrides[{key}]: bad regex: {e}"
                ) from None
            except ValidationError as e:
                raise GraphSurgeonError(
                    f"pass {self.name}: overrides[{key}].{format_validation_error(e)}"
                ) from None
        self.targets = targets or Targets()
        if not self.supports_targets and not self.targets.empty:
            raise GraphSurgeonError(
                f"pass {self.name} works on the whole graph and does not take targets"
            )
        #: Calibration data (``--calib``), set by the pipeline runner; None means passes that
        #: need activations use generated inputs (see graphsurgeon.calibration).
        self.calib: Dataset | None = None
        #: For ``needs_original`` passes in a pipeline: a fresh copy of the pipeline's input
        #: model on each call (None outside a pipeline).
        self.original: Callable[[], ir.Model] | None = None
        self.notes: dict[str, Any] = {}
        self.skipped: Counter[str] = Counter()

    def __call__(self, model_or_result: ir.Model | PassResult, /) -> PassResult:
        model = (
            model_or_result.model if isinstance(model_or_result, PassResult) else model_or_result
        )
        annotations = _annotations(model)
        result = super().__call__(model)
        if not result.modified:
            # Analyses annotate values as they go (the constant folder and the rewriter infer
            # shapes node by node). A pass that rewrote nothing leaves the model as it found it.
            for value, (type_, shape) in annotations.items():
                value.type, value.shape = type_, shape
        return result

    # -- helpers for subclasses -------------------------------------------------------
    def selects(self, node: ir.Node) -> bool:
        return self.targets.selects(node)

    def options_for(self, layer_id: str | None) -> PassOptions:
        """The options for one layer: an exact ``overrides`` key wins, then the first regex
        that matches the whole id, else the pass-wide options."""
        if layer_id is not None and self._layer_options:
            if layer_id in self._layer_options:
                return self._layer_options[layer_id]
            for key, options in self._layer_options.items():
                if re.fullmatch(key, layer_id):
                    return options
        return self.options

    def skip(self, node: ir.Node, reason: str) -> None:
        """Record that ``node`` was left alone, and why (shown in the pass statistics)."""
        self.skipped[reason] += 1

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value

    def report(self) -> dict[str, Any]:
        out = dict(self.notes)
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


def _annotations(
    model: ir.Model,
) -> dict[ir.Value, tuple[ir.TypeProtocol | None, ir.Shape | None]]:
    """Type and shape of every value in every graph and function of ``model``."""
    values: list[ir.Value] = []
    for graph in (*model.graphs(), *model.functions.values()):
        values.extend(graph.inputs)
        if isinstance(graph, ir.Graph):
            values.extend(graph.initializers.values())
        for node in graph:
            values.extend(node.outputs)
    return {v: (v.type, None if v.shape is None else v.shape.copy()) for v in values}


def format_validation_error(error: ValidationError) -> str:
    """``options.sparsity: Input should be less than 1 (got 1.5)`` - one line per pydantic error."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "value"
        got = err.get("input")
        got_text = "" if err["type"] == "missing" else f" (got {got!r})"
        parts.append(f"{loc}: {err['msg']}{got_text}")
    return "; ".join(parts)

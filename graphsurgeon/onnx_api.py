"""onnx's C++ checker and shape inference on an IR model, without serializing its weights.

onnx_ir's ``call_onnx_api`` takes initializers over 1 KB out of the model while the C++ API
runs (they are not needed to check or infer shapes) and puts them back at the end of the
initializer list. We put them back in their original order, so that checking a model never
changes what it serializes to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

R = TypeVar("R")


def call_onnx_api(func: Callable[[onnx.ModelProto], R], model: ir.Model) -> R:
    order = list(model.graph.initializers.values())
    try:
        return _c_api_utils.call_onnx_api(func, model)
    finally:
        if list(model.graph.initializers.values()) != order:
            for value in order:
                model.graph.initializers.pop(value.name)
            for value in order:
                model.graph.initializers.add(value)


def check(model: ir.Model, *, full_check: bool = False) -> None:
    """Raise if the ONNX checker (and, with ``full_check``, strict shape inference) fails."""
    call_onnx_api(lambda proto: onnx.checker.check_model(proto, full_check=full_check), model)


def infer_shapes(model: ir.Model, *, strict: bool = False) -> onnx.ModelProto:
    """The model as a (weightless) proto with inferred types and shapes."""
    return call_onnx_api(
        lambda proto: onnx.shape_inference.infer_shapes(
            proto, check_type=True, strict_mode=strict, data_prop=True
        ),
        model,
    )


def check_and_infer(model: ir.Model, *, strict: bool = False) -> onnx.ModelProto | None:
    """The checker, then shape inference, on one serialization of the model: the (weightless)
    inferred proto, or None where inference fails and ``strict`` is off. Raises what the
    checker raises; with ``strict``, inference failures raise too (the checker's full check:
    strict inference with type checks)."""

    def run(proto: onnx.ModelProto) -> onnx.ModelProto | None:
        onnx.checker.check_model(proto)
        try:
            return onnx.shape_inference.infer_shapes(
                proto, check_type=True, strict_mode=strict, data_prop=True
            )
        except Exception:
            if not strict:
                return None
            # the full check's own inference (no data propagation) decides, as before
            onnx.checker.check_model(proto, full_check=True)
            try:
                return onnx.shape_inference.infer_shapes(proto, check_type=True, data_prop=True)
            except Exception:
                return None

    return call_onnx_api(run, model)

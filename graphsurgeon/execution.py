"""Running IR models in onnxruntime (the reference for every numeric check)."""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphsurgeon.data import Feed
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import EXTERNAL_DATA_THRESHOLD, has_external_data, save, weight_bytes

ort.set_default_logger_severity(4)  # errors reach the user once, as our one-line message
_RUN_OPTIONS = ort.RunOptions()
_RUN_OPTIONS.log_severity_level = 4


def make_session(
    model: ir.Model,
    *,
    optimize: bool = False,
    threads: int | None = None,
    options: ort.SessionOptions | None = None,
    providers: list[str] | None = None,
) -> ort.InferenceSession:
    """A session for ``model`` (CPU unless ``providers`` says otherwise). Graph optimizations
    are off by default so that what runs is our graph, not ORT's rewrite of it; pass
    ``options`` to control everything yourself."""
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
    providers = providers or ["CPUExecutionProvider"]
    if any(node.domain == CUSTOM_DOMAIN for node in model.graph.all_nodes()):
        return _ReferenceSession(model)  # type: ignore[return-value]
    if has_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        tmp = Path(tempfile.mkdtemp(prefix="gs-ort-"))
        try:
            save(model, tmp / "model.onnx", external_data=True)
            return _session(str(tmp / "model.onnx"), options, providers)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    data = ir.to_proto(model).SerializeToString()
    return _session(data, options, providers)


CUSTOM_DOMAIN = "graphsurgeon"


class _ReferenceSession:
    """The session interface over onnx's reference evaluator with our kernels' numpy
    references: models lowered to ``graphsurgeon`` custom ops (``lower-kernels``) do not load
    in onnxruntime, but verification and metrics still need their numbers (slowly)."""

    @dataclass
    class _Arg:
        name: str

    def __init__(self, model: ir.Model) -> None:
        from graphsurgeon.kernels.reference import evaluator

        proto = ir.to_proto(model)
        try:
            self._evaluator = evaluator(proto)
        except Exception as e:
            raise GraphSurgeonError(f"the reference evaluator cannot load the model: {e}") from None
        self._inputs = [
            self._Arg(v.name) for v in model.graph.inputs if not v.is_initializer() and v.name
        ]
        self._outputs = [self._Arg(v.name) for v in model.graph.outputs if v.name]

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def run(self, names, feed, _options=None) -> list[np.ndarray]:
        wanted = names or [o.name for o in self._outputs]
        return list(self._evaluator.run(wanted, feed))


def _session(
    model: str | bytes, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as e:  # a model ORT cannot run: newer IR version, custom op, ...
        raise GraphSurgeonError(f"onnxruntime cannot load the model: {_ort_text(e)}") from None


def run(session: ort.InferenceSession, feed: Feed) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    try:
        outputs = session.run(names, {k: v for k, v in feed.items() if k in wanted}, _RUN_OPTIONS)
    except Exception as e:  # e.g. generated ints that are not valid shapes or indices
        raise GraphSurgeonError(f"onnxruntime failed to run the model: {_ort_text(e)}") from None
    return dict(zip(names, outputs, strict=True))


def _ort_text(error: Exception) -> str:
    """ORT's message without its error-code prefix and C++ source location."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(error).strip())
    text = re.sub(r"^\S+\.(?:cc|h):\d+ [\w:~<>]+\([^()]*\) ", "", text)
    return text.splitlines()[0][:500] if text else type(error).__name__

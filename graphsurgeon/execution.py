"""Running IR models in onnxruntime (the reference for every numeric check)."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphsurgeon.data import Feed
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import EXTERNAL_DATA_THRESHOLD, has_external_data, save, weight_bytes


def make_session(
    model: ir.Model, *, optimize: bool = False, threads: int | None = None
) -> ort.InferenceSession:
    """A CPU session for ``model``. Graph optimizations are off by default so that what runs
    is our graph, not ORT's rewrite of it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if has_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        tmp = Path(tempfile.mkdtemp(prefix="gs-ort-"))
        try:
            save(model, tmp / "model.onnx", external_data=True)
            return _session(str(tmp / "model.onnx"), options, providers)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    data = ir.to_proto(model).SerializeToString()
    return _session(data, options, providers)


def _session(
    model: str | bytes, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as e:  # a model ORT cannot run: newer IR version, custom op, ...
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e).strip())
        text = re.sub(r"^\S+\.(?:cc|h):\d+ [\w:~<>]+\([^()]*\) ", "", text)  # source location
        raise GraphSurgeonError(f"onnxruntime cannot run the model: {text[:500]}") from None


def run(session: ort.InferenceSession, feed: Feed) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    outputs = session.run(names, {k: v for k, v in feed.items() if k in wanted})
    return dict(zip(names, outputs, strict=False))

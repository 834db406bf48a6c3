"""Calibration activations: intermediate tensors of a model on calibration inputs.

Passes that need data (activation-weighted pruning, int8 calibration, least-squares
reconstruction, channel merging, ``compare``) ask for values by name; the model is run once in
onnxruntime with those values exposed as extra graph outputs. With no calibration file,
generated inputs are used, so "activation statistics" then describe random data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from graphsurgeon import execution
from graphsurgeon.data import Dataset, Feed, generate_inputs
from graphsurgeon.errors import GraphSurgeonError


def calibration_feeds(
    model: ir.Model, calib: Dataset | None, *, max_samples: int = 64, batch_size: int = 16
) -> list[Feed]:
    """Feeds from ``calib`` (up to ``max_samples`` samples), else one generated feed."""
    if calib is not None:
        return calib.feeds(max_samples, batch_size=batch_size)
    return [generate_inputs(model, seed=0)]


def collect_activations(
    model: ir.Model, feeds: Iterable[Feed], values: Sequence[str]
) -> dict[str, np.ndarray]:
    """The named values on every feed, concatenated along axis 0 (the batch axis).

    The model is left as it was: the values are graph outputs only while the session is built. Values must be
    tensors in the main graph with a known dtype (run shape inference first).
    """
    names = list(dict.fromkeys(values))
    if not names:
        return {}
    lookup = {v.name: v for v in _main_graph_values(model)}
    missing = [n for n in names if n not in lookup]
    if missing:
        raise GraphSurgeonError(f"no value named {missing[0]!r} in the main graph")
    extra = [lookup[n] for n in names if not lookup[n].is_graph_output()]
    untyped = [v.name for v in extra if v.type is None]
    if untyped:
        raise GraphSurgeonError(
            f"value {untyped[0]!r} has no known type; run shape inference first"
        )
    # Expose the values as graph outputs just while the session is built (it serializes once).
    model.graph.outputs.extend(extra)
    try:
        session = execution.make_session(model)
    finally:
        for _ in extra:
            model.graph.outputs.pop()
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        outputs = execution.run(session, feed)
        for n in names:
            chunks[n].append(outputs[n])
    return {n: np.concatenate(c, axis=0) if c[0].ndim else np.stack(c) for n, c in chunks.items()}


def _main_graph_values(model: ir.Model) -> Iterable[ir.Value]:
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in model.graph:
        yield from node.outputs

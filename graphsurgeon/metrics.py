"""Evaluation metrics: how good a (compressed) model's outputs are.

A metric is a callable ``fn(outputs, reference, labels) -> dict[str, float] | float`` where
``outputs`` and ``reference`` map output names to arrays (all evaluation samples, stacked on
the batch axis; ``reference`` is None when there is no reference model) and ``labels`` is the
data file's ``labels`` array or None. Scores are higher-is-better and the first key is the
headline (sensitivity ranks by its drop); return ``-loss`` for a loss. On the command line a
metric is ``module:function`` (``--metric``) or a built-in name: ``fidelity``, ``top1``,
``accuracy``, ``default``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from graphsurgeon import execution
from graphsurgeon.data import Dataset, load_npz
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.verify import drift

Outputs = Mapping[str, np.ndarray]
Metric = Callable[[Outputs, Outputs | None, np.ndarray | None], Mapping[str, float] | float]


def _need_reference(reference: Outputs | None, name: str) -> Outputs:
    if reference is None:
        raise GraphSurgeonError(f"metric {name} compares with a reference model; none was given")
    return reference


def fidelity(outputs: Outputs, reference: Outputs | None, labels: np.ndarray | None = None):
    """Worst cosine similarity and largest absolute error over all outputs."""
    ref = _need_reference(reference, "fidelity")
    per_output = drift(dict(ref), dict(outputs))
    return {
        "cosine": min(d["cosine"] for d in per_output.values()),
        "max_abs": max(d["max_abs"] for d in per_output.values()),
    }


def top1(outputs: Outputs, reference: Outputs | None, labels: np.ndarray | None = None):
    """Share of rows whose argmax over the last axis agrees with the reference (first output)."""
    ref = _need_reference(reference, "top1")
    name = next(iter(ref))
    return {"top1_agreement": float(np.mean(_argmax(outputs[name]) == _argmax(ref[name])))}


def accuracy(outputs: Outputs, reference: Outputs | None = None, labels: np.ndarray | None = None):
    """Labelled top-1 accuracy of the first output (argmax over its last axis)."""
    if labels is None:
        raise GraphSurgeonError("metric accuracy needs a data file with 'labels'")
    predicted = _argmax(next(iter(outputs.values())))
    if predicted.shape != np.shape(labels):
        raise GraphSurgeonError(
            f"accuracy: {predicted.size} predictions for {np.size(labels)} labels"
        )
    return {"accuracy": float(np.mean(predicted == np.asarray(labels)))}


def default(outputs: Outputs, reference: Outputs | None, labels: np.ndarray | None = None):
    """Accuracy first when there are labels, then fidelity to the reference if there is one."""
    result: dict[str, float] = {}
    if labels is not None:
        result.update(accuracy(outputs, reference, labels))
    if reference is not None:
        result.update(fidelity(outputs, reference))
    if not result:
        raise GraphSurgeonError("nothing to measure: give a reference model or labelled data")
    return result


BUILTIN: dict[str, Metric] = {
    "default": default,
    "fidelity": fidelity,
    "top1": top1,
    "accuracy": accuracy,
}


def load_metric(spec: str | Metric | None) -> Metric:
    """A built-in name, ``module:function``, or a callable (returned as is)."""
    if spec is None:
        return default
    if callable(spec):
        return spec
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise GraphSurgeonError(
            f"--metric {spec!r}: expected module:function or one of {', '.join(BUILTIN)}"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failing on import
        raise GraphSurgeonError(
            f"--metric {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise GraphSurgeonError(f"--metric {spec!r}: {module_name} has no function {attr!r}")
    return fn


def model_outputs(model: ir.Model, dataset: Dataset, max_samples: int | None = None) -> Outputs:
    """Every output of ``model`` on ``dataset``, stacked on the batch axis."""
    session = execution.make_session(model)
    chunks: dict[str, list[np.ndarray]] = {}
    for feed in dataset.feeds(max_samples, batch_size=64):
        for name, array in execution.run(session, feed).items():
            chunks.setdefault(name, []).append(array)
    return {name: _stack(parts) for name, parts in chunks.items()}


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    if all(p.ndim and p.shape[1:] == parts[0].shape[1:] for p in parts):
        return np.concatenate(parts, axis=0)
    # Whole-tensor samples of different sizes: rows of the last axis keep argmax and cosine.
    return np.concatenate([p.reshape(-1, p.shape[-1] if p.ndim else 1) for p in parts], axis=0)


def _argmax(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return np.argmax(array, axis=-1) if array.ndim > 1 else array


def evaluate(
    model: ir.Model,
    dataset: Dataset | str | os.PathLike,
    metric: str | Metric | None = None,
    reference: ir.Model | Outputs | None = None,
    *,
    max_samples: int | None = None,
) -> dict[str, float]:
    """Score ``model`` on ``dataset`` with ``metric`` (default: accuracy if labelled, fidelity
    to ``reference`` if given). ``reference`` is a model or its precomputed outputs."""
    fn = load_metric(metric)
    if not isinstance(dataset, Dataset):
        dataset = load_npz(dataset, model)
    outputs = model_outputs(model, dataset, max_samples)
    ref = (
        model_outputs(reference, dataset, max_samples)
        if isinstance(reference, ir.Model)
        else reference
    )
    labels = dataset.labels
    if labels is not None and max_samples is not None:
        labels = labels[: len(next(iter(outputs.values())))]
    return score(fn, outputs, ref, labels)


def score(
    fn: Metric, outputs: Outputs, reference: Outputs | None, labels: np.ndarray | None
) -> dict[str, float]:
    """Call a metric and normalize its result to ``{name: float}``."""
    try:
        value: Any = fn(outputs, reference, labels)
    except GraphSurgeonError:
        raise
    except Exception as e:  # a user metric that fails is the user's problem: one line
        name = getattr(fn, "__name__", repr(fn))
        raise GraphSurgeonError(f"metric {name} failed: {type(e).__name__}: {e}") from None
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {getattr(fn, "__name__", "score"): float(value)}

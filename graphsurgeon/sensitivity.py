"""Per-layer sensitivity: compress one layer at a time and measure what the outputs lose.

For each layer (``targets: layers=[id]``) and each strength of the pass's strength option
(3 points of its search space by default, mildest first) the pass runs on a copy of the
model; the copy is scored on the evaluation data with a metric (:mod:`graphsurgeon.metrics`)
against the original. ``drift`` is the drop of the metric's headline score from the
original's (``1 - cosine`` for the default fidelity metric, the accuracy lost with labels).
Search and ``remove-layers`` rank layers by it.

A pass chooses its strength option with the class attributes ``strength_option`` (name) and
``strength_descending`` (True when lower values compress more, like an energy ratio);
otherwise the first numeric option with a search space is used, ascending. A pass whose
units are not layers (``remove-layers``) provides ``sensitivity_trials(model, options)``
returning ``(unit id, kind, options)`` for each unit.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphsurgeon.data import Dataset, generate_inputs, load_npz
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.layers import find_layers
from graphsurgeon.metrics import Metric, load_metric, model_outputs, score
from graphsurgeon.model_io import load
from graphsurgeon.options import Choice, FloatRange, IntRange, search_spaces
from graphsurgeon.pass_base import GSPass
from graphsurgeon.registry import get_pass
from graphsurgeon.targets import Targets


@dataclass
class Row:
    layer: str  # layer id (or unit id for passes with their own units)
    op: str
    option: str | None  # the option varied, None for a single-setting pass
    value: Any  # its value in this trial
    strength: int  # 0 = mildest
    status: str  # "ok", "unchanged: <why>" or "error: <why>"
    metrics: dict[str, float] = field(default_factory=dict)
    drift: float | None = None  # baseline headline score minus this trial's
    params: int | None = None  # params of the whole model after the pass

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in asdict(self).items()}


def strength_values(
    pass_cls: type,
    option: str | None = None,
    strengths: Sequence[Any] | None = None,
    points: int = 3,
) -> tuple[str | None, list[Any]]:
    """The option to vary and its values, mildest first."""
    spaces = search_spaces(pass_cls.Options)
    name = option or getattr(pass_cls, "strength_option", None)
    if name is None and option is None and not hasattr(pass_cls, "strength_option"):
        name = next((k for k, s in spaces.items() if not isinstance(s, Choice)), None)
    if name is None:
        if strengths:
            raise GraphSurgeonError(f"pass {pass_cls.name} has no strength option to set")
        return None, [None]
    if name not in pass_cls.Options.model_fields:
        raise GraphSurgeonError(f"pass {pass_cls.name} has no option {name!r}")
    if strengths:
        return name, list(strengths)
    space = spaces.get(name)
    if space is None:
        raise GraphSurgeonError(
            f"option {name!r} of {pass_cls.name} has no search space; give --strengths"
        )
    if isinstance(space, Choice):
        values = list(space.values)
    else:
        spread = np.geomspace if space.log and space.low > 0 else np.linspace
        grid = spread(space.low, space.high, points)
        if isinstance(space, IntRange):
            values = sorted({round(float(v)) for v in grid})
        else:
            assert isinstance(space, FloatRange)
            values = [round(float(v), 6) for v in grid]
    descending = name == getattr(pass_cls, "strength_option", None) and getattr(
        pass_cls, "strength_descending", False
    )
    return name, sorted(values, reverse=descending) if not isinstance(space, Choice) else values


def _dataset(model: ir.Model, data: Dataset | str | os.PathLike | None) -> Dataset | None:
    if data is None or isinstance(data, Dataset):
        return data
    return load_npz(data, model)


def _generated(model: ir.Model) -> Dataset:
    feed = generate_inputs(model, seed=0, batch=8)
    return Dataset(feed, None, dict.fromkeys(feed, True))


def layer_sensitivity(model: ir.Model | str | os.PathLike, pass_name: str, **kw: Any) -> list[Row]:
    """One row per (layer, strength); keywords as :func:`sensitivity_report`."""
    rows, _ = _run(model, pass_name, **kw)
    return rows


def sensitivity_report(
    model: ir.Model | str | os.PathLike, pass_name: str | type[GSPass], **kw: Any
) -> dict[str, Any]:
    """The rows plus their context, in the JSON schema of ``graphsurgeon sensitivity --json``:
    ``{pass, option, values, metric, baseline, params, rows: [Row...]}``."""
    rows, context = _run(model, pass_name, **kw)
    return {**context, "rows": [r.to_dict() for r in rows]}


def _run(
    model: ir.Model | str | os.PathLike,
    pass_name: str | type[GSPass],
    *,
    options: dict[str, Any] | None = None,
    calib: Dataset | str | os.PathLike | None = None,
    eval_data: Dataset | str | os.PathLike | None = None,
    metric: str | Metric | None = None,
    option: str | None = None,
    strengths: Sequence[Any] | None = None,
    units: Sequence[str] | None = None,
    points: int = 3,
    max_samples: int | None = 256,
) -> tuple[list[Row], dict[str, Any]]:
    """``options``: the pass's base options; ``calib`` goes to the pass (``self.calib``);
    ``eval_data`` (default: ``calib``, else generated inputs) is what the metric sees;
    ``option``/``strengths`` override the strength option and its values (mildest first);
    ``units`` restricts the layers (ids or regexes)."""
    cls = get_pass(pass_name) if isinstance(pass_name, str) else pass_name
    pass_name = cls.name
    if cls.kind == "exact":
        raise GraphSurgeonError(f"pass {pass_name} is exact: it has no sensitivity to measure")
    if not isinstance(model, ir.Model):
        model = load(model)
    options = dict(options or {})
    cls(options)  # validates them: a one-line error naming the option
    fn = load_metric(metric)
    calib_ds = _dataset(model, calib)
    eval_ds = _dataset(model, eval_data) or calib_ds or _generated(model)
    layers = find_layers(model)
    hook = getattr(cls, "sensitivity_trials", None)
    if hook is not None:
        name, values = None, [None]
        plan = [(uid, kind, opts, Targets()) for uid, kind, opts in hook(model.clone(), options)]
    else:
        if not cls.supports_targets:
            raise GraphSurgeonError(f"pass {pass_name} does not take targets: no per-layer view")
        name, values = strength_values(cls, option, strengths, points)
        plan = [
            (layer.id, layer.op_type, options, Targets(layers=[re.escape(layer.id)]))
            for layer in layers
        ]
    if units:
        plan = [p for p in plan if any(u == p[0] or re.fullmatch(u, p[0]) for u in units)]
    reference = model_outputs(model, eval_ds, max_samples)
    labels = eval_ds.labels
    if labels is not None:
        labels = labels[: len(next(iter(reference.values())))]
    baseline = score(fn, reference, reference, labels)
    head = next(iter(baseline))
    rows: list[Row] = []
    for uid, op, opts, targets in plan:
        for strength, value in enumerate(values):
            trial_options = dict(opts) if name is None else {**opts, name: value}
            row = Row(uid, op, name, value, strength, "ok")
            rows.append(row)
            trial = model.clone()
            try:
                pass_ = cls(trial_options, targets)
                pass_.calib = calib_ds
                result = pass_(trial)
                if not result.modified:
                    why = "; ".join(pass_.report().get("skipped", {})) or "nothing to change"
                    row.status = f"unchanged: {why}"
                    continue
                outputs = model_outputs(trial, eval_ds, max_samples)
                row.metrics = score(fn, outputs, reference, labels)
            except GraphSurgeonError as e:
                row.status = f"error: {e.problem}"
                continue
            row.drift = baseline[head] - row.metrics[head]
            row.params = _params(trial)
    context = {
        "pass": pass_name,
        "option": name,
        "values": values,
        "metric": head,
        "baseline": baseline,
        "params": _params(model),
    }
    return rows, context


def _params(model: ir.Model) -> int:
    return int(
        sum(
            v.const_value.size
            for g in model.graphs()
            for v in g.initializers.values()
            if v.const_value is not None
        )
    )


def _json_number(value: Any) -> Any:
    """inf/nan as strings: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    return value

"""Pipelines: a list of steps read from YAML/JSON (or Python), compiled, then run verified.

A step is a pass name, a ``{name, options, targets}`` mapping, the name of a named pipeline
(``cleanup``), or ``{repeat: [steps...], max_iterations: N}`` which reruns its steps until none
of them modifies the model. Everything is validated before the first pass runs, and every
error names its step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import yaml
from pydantic import ValidationError

from graphsurgeon import execution
from graphsurgeon.data import Dataset, Feed, generate_inputs, load_npz
from graphsurgeon.errors import GraphSurgeonError, PipelineError, VerificationError
from graphsurgeon.instruments import Instrument, PassRecord, default_instruments
from graphsurgeon.layers import find_layers, weight_ids
from graphsurgeon.model_io import load
from graphsurgeon.pass_base import GSPass, format_validation_error
from graphsurgeon.registry import get_pass
from graphsurgeon.shapes import ShapeInferencePass, apply_input_shapes, static_dims
from graphsurgeon.targets import Targets
from graphsurgeon.verify import (
    Signature,
    check_structure,
    compare_exact,
    drift,
    strict_shape_inference_ok,
)

VERIFY_MODES = ("structural", "numeric", "off")


# -- compiled plan ------------------------------------------------------------------------
@dataclass
class PassStep:
    label: str
    cls: type[GSPass]
    options: dict[str, Any]
    targets: Targets

    def instantiate(self) -> GSPass:
        return self.cls(self.options, self.targets)


@dataclass
class RepeatStep:
    label: str
    steps: list[PassStep | RepeatStep]
    max_iterations: int


Step = PassStep | RepeatStep


def named_pipelines() -> dict[str, Path]:
    folder = resources.files("graphsurgeon") / "pipelines"
    return {
        p.name.removesuffix(".yaml"): Path(str(p))
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    }


def _read_spec_file(path: Path) -> Any:
    if not path.is_file():
        raise PipelineError("no such pipeline file", where=path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read the pipeline file as text: {e}", where=path) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise PipelineError(
            f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}", where=path
        ) from None
    if isinstance(data, str):  # else compile_pipeline would take it for a path or pass name
        raise PipelineError(
            "a pipeline is a non-empty list of steps (or a mapping with 'steps'), not a string",
            where=path,
        )
    return data


def compile_pipeline(spec: Any, *, source: str = "pipeline") -> list[Step]:
    """Validate ``spec`` (path, pipeline name, pass name, list or mapping) into steps."""
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        named = named_pipelines()
        if text in named:
            return compile_pipeline(_read_spec_file(named[text]), source=text)
        path = Path(text)
        if path.suffix in (".yaml", ".yml", ".json") or path.exists():
            return compile_pipeline(_read_spec_file(path), source=text)
        return [_compile_step(text, "1", source, ())]
    raw = spec
    if isinstance(raw, dict):
        unknown = set(raw) - {"steps", "name", "description"}
        if unknown:
            raise PipelineError(
                f"unknown top-level key(s) {sorted(unknown)}; expected 'steps'", where=source
            )
        raw = raw.get("steps")
    if not isinstance(raw, list) or not raw:
        raise PipelineError(
            "a pipeline is a non-empty list of steps (or a mapping with 'steps')", where=source
        )
    return [_compile_step(s, str(i), source, ()) for i, s in enumerate(raw, 1)]


def _compile_step(raw: Any, path: str, source: str, stack: tuple[str, ...]) -> Step:
    where = f"{source}: step {path}"
    if isinstance(raw, str):
        named = named_pipelines()
        if raw in named:
            if raw in stack:
                raise PipelineError(f"named pipeline {raw!r} includes itself", where=where)
            inner = _read_spec_file(named[raw])
            steps = inner["steps"] if isinstance(inner, dict) else inner
            children = [
                _compile_step(s, f"{path}.{i}", raw, (*stack, raw)) for i, s in enumerate(steps, 1)
            ]
            return RepeatStep(f"{path} ({raw})", children, 1)
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise PipelineError(
            f"expected a pass name or a mapping, got {type(raw).__name__}", where=where
        )
    if "repeat" in raw:
        unknown = set(raw) - {"repeat", "max_iterations"}
        if unknown:
            raise PipelineError(f"unknown key(s) {sorted(unknown)} in a repeat step", where=where)
        body = raw["repeat"]
        if not isinstance(body, list) or not body:
            raise PipelineError("'repeat' needs a non-empty list of steps", where=where)
        n = raw.get("max_iterations", 10)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1000:
            raise PipelineError(
                f"max_iterations must be an integer in 1..1000 (got {n!r})", where=where
            )
        children = [_compile_step(s, f"{path}.{i}", source, stack) for i, s in enumerate(body, 1)]
        return RepeatStep(f"{path} (repeat)", children, n)
    unknown = set(raw) - {"name", "options", "targets"}
    if unknown:
        raise PipelineError(
            f"unknown key(s) {sorted(unknown)}; a step has name, options, targets", where=where
        )
    name = raw.get("name")
    if not isinstance(name, str):
        raise PipelineError("step has no pass 'name'", where=where)
    where = f"{where} ({name})"
    try:
        cls = get_pass(name)
    except GraphSurgeonError as e:
        raise PipelineError(e.problem, where=where) from None
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise PipelineError("'options' must be a mapping", where=where)
    try:
        targets = Targets(**(raw.get("targets") or {}))
    except ValidationError as e:
        raise PipelineError(f"targets: {format_validation_error(e)}", where=where) from None
    except TypeError:
        raise PipelineError("'targets' must be a mapping", where=where) from None
    try:
        cls.Options(**options)
    except ValidationError as e:
        raise PipelineError(f"options.{format_validation_error(e)}", where=where) from None
    step = PassStep(f"{path} ({name})", cls, options, targets)
    try:
        step.instantiate()
    except GraphSurgeonError as e:
        raise PipelineError(e.problem, where=where) from None
    return step


def iter_pass_steps(steps: Sequence[Step]) -> Iterator[PassStep]:
    for s in steps:
        if isinstance(s, PassStep):
            yield s
        else:
            yield from iter_pass_steps(s.steps)


# -- running ------------------------------------------------------------------------------
@dataclass
class PipelineResult:
    model: ir.Model
    modified: bool
    records: list[PassRecord] = field(default_factory=list)
    drift_vs_original: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "modified": self.modified,
            "passes": [r.to_dict() for r in self.records],
            "drift_vs_original": self.drift_vs_original,
        }


class _NumericReference:
    """Outputs of the current model on fixed inputs, kept across passes for numeric checks."""

    def __init__(self, model: ir.Model, calib: Dataset | None, max_samples: int = 8) -> None:
        self.calib = calib
        self.max_samples = max_samples
        self.feeds = self._make_feeds(model)
        self.session = execution.make_session(model)
        try:
            self.outputs = [execution.run(self.session, f) for f in self.feeds]
        except GraphSurgeonError as e:
            inputs = "calibration" if calib is not None else "generated"
            hint = "" if calib is not None else "; pass --calib with real inputs"
            raise GraphSurgeonError(
                f"numeric verification on {inputs} inputs: {e.problem}{hint}"
            ) from None
        self.original = self.outputs

    def _make_feeds(self, model: ir.Model) -> list[Feed]:
        if self.calib is not None:
            return self.calib.feeds(self.max_samples, batch_size=self.max_samples)
        return [generate_inputs(model, seed=0)]

    def _feeds_fit(self, model: ir.Model) -> bool:
        for value in model.graph.inputs:
            dims = static_dims(value.shape)
            for feed in self.feeds:
                if value.name in feed and dims is not None and list(feed[value.name].shape) != dims:
                    return False
        return True

    def check(self, model: ir.Model, pass_: GSPass, step: str) -> dict[str, Any] | None:
        try:
            after_session = execution.make_session(model)
        except GraphSurgeonError as e:  # it ran before the pass: the pass broke it
            raise VerificationError(f"after {pass_.name}: {e.problem}", where=step) from None
        if not self._feeds_fit(model):  # e.g. fix-shapes chose other dims than we generated
            self.feeds = self._make_feeds(model)
            self.outputs = [execution.run(self.session, f) for f in self.feeds]
            self.original = None
        try:
            after = [execution.run(after_session, f) for f in self.feeds]
        except GraphSurgeonError as e:  # it ran before the pass: the pass broke it
            raise VerificationError(f"after {pass_.name}: {e.problem}", where=step) from None
        result = None
        if pass_.kind == "exact":
            for before_out, after_out in zip(self.outputs, after, strict=False):
                bad = compare_exact(before_out, after_out)
                if bad is not None:
                    name, err = bad
                    raise VerificationError(
                        f"exact pass {pass_.name} changed output {name!r} (max abs error {err:.3g})",
                        where=step,
                    )
        else:
            result = _merge_drift([drift(b, a) for b, a in zip(self.outputs, after, strict=False)])
        self.session, self.outputs = after_session, after
        return result

    def drift_vs_original(self) -> dict[str, Any] | None:
        if self.original is None:
            return None
        return _merge_drift(
            [drift(b, a) for b, a in zip(self.original, self.outputs, strict=False)]
        )


def _merge_drift(parts: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    merged: dict[str, dict[str, float]] = {}
    for name in parts[0] if parts else {}:
        rows = [p[name] for p in parts]
        merged[name] = {
            "max_abs": max(r["max_abs"] for r in rows),
            "cosine": min(r["cosine"] for r in rows),
        }
        if all("top1_agreement" in r for r in rows):
            merged[name]["top1_agreement"] = float(np.mean([r["top1_agreement"] for r in rows]))
    return merged


def run_pipeline(
    model: ir.Model | str | os.PathLike,
    spec: Any,
    *,
    calib: Dataset | str | os.PathLike | None = None,
    verify: str = "structural",
    shapes: dict[str, list[int]] | None = None,
    instruments: Sequence[Instrument] | None = None,
    on_record: Callable[[PassRecord], None] | None = None,
) -> PipelineResult:
    """Run ``spec`` on ``model`` in place and return the model with one record per pass run.

    ``verify``: ``structural`` (default) checks the graph after every pass; ``numeric`` also
    compares outputs in onnxruntime on ``calib`` (or generated) inputs; ``off`` skips both.
    """
    if verify not in VERIFY_MODES:
        raise GraphSurgeonError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    steps = (
        spec
        if isinstance(spec, list) and all(isinstance(s, (PassStep, RepeatStep)) for s in spec)
        else compile_pipeline(spec)
    )
    if not isinstance(model, ir.Model):
        model = load(model, shapes=shapes)
    elif shapes:
        apply_input_shapes(model, shapes)
    if calib is not None and not isinstance(calib, Dataset):
        calib = load_npz(calib, model)
    ShapeInferencePass()(model)
    find_layers(model)
    signature = Signature.of(model)
    strict = verify != "off" and strict_shape_inference_ok(model)
    numeric = _NumericReference(model, calib) if verify == "numeric" else None
    instruments = list(default_instruments() if instruments is None else instruments)
    runner = _Runner(model, signature, strict, verify, numeric, instruments, on_record, calib)
    if any(step.cls.needs_original for step in iter_pass_steps(steps)):
        runner.original = _Original(model)
    modified = runner.run_steps(steps)
    return PipelineResult(
        model, modified, runner.records, numeric.drift_vs_original() if numeric else None
    )


class _Original:
    """The pipeline's input model, for passes that distill from it: kept serialized (one
    protobuf, no second IR) and only when a pass in the pipeline asks for it."""

    def __init__(self, model: ir.Model) -> None:
        self._proto = ir.to_proto(model)
        # memory-mapped external tensors are immutable: share them rather than lose their
        # folder in the protobuf round trip
        self._external = {
            name: value.const_value
            for name, value in model.graph.initializers.items()
            if isinstance(value.const_value, ir.ExternalTensor)
        }

    def __call__(self) -> ir.Model:
        model = ir.from_proto(self._proto)
        for name, tensor in self._external.items():
            model.graph.initializers[name].const_value = tensor
        return model


@dataclass
class _Runner:
    model: ir.Model
    signature: Signature
    strict: bool
    verify: str
    numeric: _NumericReference | None
    instruments: list[Instrument]
    on_record: Callable[[PassRecord], None] | None
    calib: Dataset | None = None
    records: list[PassRecord] = field(default_factory=list)
    original: _Original | None = None

    def run_steps(self, steps: Sequence[Step]) -> bool:
        modified = False
        for step in steps:
            if isinstance(step, PassStep):
                modified |= self.run_pass(step)
                continue
            for _ in range(step.max_iterations):
                changed = self.run_steps(step.steps)
                modified |= changed
                if not changed:
                    break
        return modified

    def run_pass(self, step: PassStep) -> bool:
        pass_ = step.instantiate()
        pass_.calib = self.calib
        if pass_.needs_original and self.original is not None:
            pass_.original = self.original
        label = f"step {step.label}"
        record = PassRecord(step=step.label, name=pass_.name, kind=pass_.kind)
        inherit = weight_ids(find_layers(self.model))
        for inst in self.instruments:
            inst.before(label, pass_, self.model)
        try:
            result = pass_(self.model)
        except GraphSurgeonError as e:
            raise type(e)(e.problem, where=f"{label}") from None
        record.modified = result.modified
        find_layers(self.model, inherit=inherit)
        for inst in reversed(self.instruments):
            inst.after(label, pass_, self.model, record)
        record.notes = pass_.report()
        if result.modified and self.verify != "off":
            check_structure(self.model, self.signature, step=label, strict_shapes=self.strict)
            record.verified = "structural"
            if self.numeric is not None:
                record.drift = self.numeric.check(self.model, pass_, label)
                record.verified = "numeric"
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)
        return result.modified

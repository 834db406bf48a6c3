"""Scoring a policy: apply it, verify the result, and measure what the objectives ask for.

Every objective is minimized:

- ``accuracy_drop``: the metric's headline score on the evaluation set of the original minus
  the compressed model's (labelled accuracy when the data has labels, else ``1 - cosine``
  against the original's outputs: see :mod:`graphsurgeon.metrics`);
- ``size_bytes``: the serialized model;
- ``latency_ms``: the latency model (:mod:`graphsurgeon.latency_model`: per-node table, nodes
  it lacks timed on the spot, roofline only where a node cannot run alone) during search;
  :meth:`Evaluator.measure` times the whole model with :func:`graphsurgeon.measure.measure_model`
  for the Pareto front and the final pick;
- ``energy_mj``: the profile's energy model for the predicted latency (``estimated``), or what
  ``measure`` reports (RAPL where readable, labelled);
- ``robustness_drop`` (optional): the headline score lost on perturbed inputs of size
  ``noise`` times each float input's standard deviation: FGSM examples (the sign of the
  loss gradient, computed once on the original model through the torch training bridge, a
  transfer attack every candidate faces alike) for classifiers the bridge can run, Gaussian
  noise otherwise (``robustness`` picks).

A worker process evaluates many policies with one :class:`Evaluator` (model, datasets and
reference outputs loaded once): :class:`EvalTask` is the small picklable handle executors ship,
and each process keeps the evaluator it builds from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphsurgeon.data import Dataset, load_npz
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session
from graphsurgeon.execution import run as run_session
from graphsurgeon.layers import find_layers
from graphsurgeon.metrics import _stack as stack_outputs
from graphsurgeon.metrics import load_metric, model_outputs, score
from graphsurgeon.model_io import load
from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.profiles import HardwareProfile, load_profile
from graphsurgeon.search.policy import Policy
from graphsurgeon.stats import model_stats

#: User-facing objective names -> score keys.
OBJECTIVE_KEYS = {
    "accuracy": "accuracy_drop",
    "latency": "latency_ms",
    "size": "size_bytes",
    "energy": "energy_mj",
    "robustness": "robustness_drop",
}


def objective_keys(names: list[str] | str) -> list[str]:
    items = names.split(",") if isinstance(names, str) else list(names)
    out = []
    for item in (i.strip() for i in items):
        key = OBJECTIVE_KEYS.get(item, item if item in OBJECTIVE_KEYS.values() else None)
        if key is None:
            raise GraphSurgeonError(
                f"--objectives: unknown objective {item!r} (choose from {', '.join(OBJECTIVE_KEYS)})"
            )
        out.append(key)
    if not out:
        raise GraphSurgeonError("--objectives: give at least one objective")
    return list(dict.fromkeys(out))


@dataclass(frozen=True, eq=False)
class EvalConfig:
    """Everything an evaluator needs, as paths and plain values (picklable, hashable)."""

    model: str
    profile: str
    calib: str | None = None
    eval: str | None = None
    metric: str | None = None
    shapes: dict[str, list[int]] | None = None
    prelude: tuple[Any, ...] = ("cleanup",)
    max_samples: int | None = 256
    noise: float | None = None  # robustness: perturbation size, relative to each input's std
    robustness: str = "auto"  # auto (fgsm where possible) | fgsm | gaussian
    time_missing_nodes: bool = True  # latency model: time nodes the table lacks

    def context_hash(self) -> str:
        """Model file, data files and everything that changes a score: the cache key's
        "model hash" (two studies on the same model and data share evaluations)."""
        h = hashlib.sha256()
        for path in (self.model, self.calib, self.eval):
            h.update(_file_digest(path).encode() if path else b"-")
        rest = {k: v for k, v in asdict(self).items() if k not in ("model", "calib", "eval")}
        rest.pop("profile")
        h.update(json.dumps(rest, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def profile_key(self) -> str:
        profile = load_profile(self.profile)
        digest = hashlib.sha256(profile.model_dump_json().encode()).hexdigest()[:12]
        return f"{profile.name}-{digest}"


def _file_digest(path: str) -> str:
    from graphsurgeon.bundle import sha256_file

    return sha256_file(Path(path))


@dataclass
class EvalResult:
    key: str
    status: str  # ok | failed
    objectives: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # objective -> predicted|measured|...
    error: str | None = None
    eval_s: float = 0.0
    #: node timings this evaluation added: ``sig -> [seconds, family, flops, bytes]``
    latency_entries: dict[str, list] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Evaluator:
    """Applies and scores policies against one prepared model."""

    def __init__(self, config: EvalConfig) -> None:
        from graphsurgeon.latency_model import LatencyTable

        self.config = config
        self.profile: HardwareProfile = load_profile(config.profile)
        self.table = LatencyTable.load(self.profile)
        self._untimeable: set[str] = set()
        model = load(config.model, shapes=config.shapes)
        self.calib: Dataset | None = load_npz(config.calib, model) if config.calib else None
        if config.prelude:
            run_pipeline(model, list(config.prelude), calib=self.calib)
        self.base = model
        self._proto = ir.to_proto(model).SerializeToString()
        data = load_npz(config.eval, model) if config.eval else self.calib
        if data is None:
            raise GraphSurgeonError("search needs evaluation data: give --calib or --eval")
        self.eval_data = data
        self.metric = load_metric(config.metric)
        self.reference = model_outputs(model, data, config.max_samples)
        self.labels = _labels(data, self.reference)
        self.n_eval = len(next(iter(self.reference.values())))
        self.baseline = score(self.metric, self.reference, self.reference, self.labels)
        self.head = next(iter(self.baseline))
        self.noisy: Dataset | None = None
        self.noise_kind = ""
        if config.noise:
            self.noisy, self.noise_kind = _perturbed(model, data, config, self.labels)
        self.noisy_baseline = (
            score(
                self.metric,
                model_outputs(model, self.noisy, config.max_samples),
                self.reference,
                self.labels,
            )
            if self.noisy is not None
            else None
        )

    def base_model(self) -> ir.Model:
        """A fresh copy of the prepared (prelude-applied) model."""
        import onnx

        return ir.serde.deserialize_model(onnx.load_from_string(self._proto))

    def apply(self, policy: Policy | list[Any]) -> ir.Model:
        """The compressed model (``policy``: a policy or pipeline steps after the prelude),
        structurally verified after every pass."""
        model = self.base_model()
        steps = policy.to_pipeline(prelude=False)["steps"] if isinstance(policy, Policy) else policy
        run_pipeline(model, list(steps), calib=self.calib, verify="structural")
        return model

    def evaluate(self, policy: Policy | list[Any], *, measure: bool = False) -> EvalResult:
        r"""Score ``policy`` (latency predicted, or ``measure``\ d on this device). A failure is
        a result with its error, never a raise."""
        key = policy.key() if isinstance(policy, Policy) else _steps_key(policy)
        return self._run(key, lambda: self.apply(policy), measure)

    def evaluate_model(self, model: ir.Model, key: str, *, measure: bool = True) -> EvalResult:
        """Score a model made elsewhere (an outside baseline) exactly like a policy's."""
        return self._run(key, lambda: model, measure)

    def _run(self, key: str, make: Any, measure: bool) -> EvalResult:
        start = time.perf_counter()
        result = EvalResult(key, "ok")
        try:
            model = make()
            self._score(model, result)
            if measure:
                self._measured(model, result)
            else:
                result.objectives.update(self._predicted(model, result))
        except Exception as e:
            result.status = "failed"
            result.error = _error_text(e)
        result.eval_s = time.perf_counter() - start
        return result

    def measure(self, policy: Policy | list[Any]) -> EvalResult:
        return self.evaluate(policy, measure=True)

    def _measured(self, model: ir.Model, result: EvalResult) -> None:
        from graphsurgeon.measure import measure_model

        m = measure_model(model, self.profile)
        result.objectives["latency_ms"] = m.median_ms
        result.objectives["energy_mj"] = m.energy_mj
        result.kinds["latency_ms"] = "measured"
        result.kinds["energy_mj"] = m.energy_source
        result.metrics["latency_p90_ms"] = m.p90_ms
        result.metrics["latency_cv"] = m.cv

    def _outputs(self, model: ir.Model, data: Dataset) -> dict[str, np.ndarray]:
        """:func:`~graphsurgeon.metrics.model_outputs`, on one intra-op thread in a pool
        worker: a worker runs one evaluation at a time, and onnxruntime's default (a spinning
        thread per core) in every worker oversubscribes the cores the pool already shares."""
        if not os.environ.get("GRAPHSURGEON_WORKER"):
            return model_outputs(model, data, self.config.max_samples)
        session = make_session(model, threads=1)
        chunks: dict[str, list[np.ndarray]] = {}
        for feed in data.feeds(self.config.max_samples, batch_size=64):
            for name, array in run_session(session, feed).items():
                chunks.setdefault(name, []).append(array)
        return {name: stack_outputs(parts) for name, parts in chunks.items()}

    def _score(self, model: ir.Model, result: EvalResult) -> None:
        outputs = self._outputs(model, self.eval_data)
        metrics = score(self.metric, outputs, self.reference, self.labels)
        result.metrics.update(metrics)
        result.objectives["accuracy_drop"] = self.baseline[self.head] - metrics[self.head]
        result.objectives["size_bytes"] = float(ir.to_proto(model).ByteSize())
        result.kinds["accuracy_drop"] = f"{self.head} on {self.n_eval} samples"
        result.kinds["size_bytes"] = "serialized"
        if self.noisy is not None:
            noisy = self._outputs(model, self.noisy)
            value = score(self.metric, noisy, self.reference, self.labels)[self.head]
            result.objectives["robustness_drop"] = self.baseline[self.head] - value
            result.kinds["robustness_drop"] = f"{self.noise_kind} {self.config.noise} x std"

    def _predicted(self, model: ir.Model, result: EvalResult) -> dict[str, float]:
        """Latency from the table, energy from the profile's model for that latency.

        Nodes the table lacks are charged by their kernel family's cost law where it is
        trusted (a timing would be replaced by the law anyway); the others are timed alone
        first, once (a node that cannot run alone is remembered and left to the roofline).
        """
        from graphsurgeon import latency_model
        from graphsurgeon.energy import estimate_energy
        from graphsurgeon.measure import available_cpus

        # the graph onnxruntime runs, optimized once for predicting, timing and listing
        runtime = latency_model.runtime_graph(model, min(self.profile.threads(), available_cpus()))
        prediction = latency_model.predict(runtime, self.profile, self.table)
        if self.config.time_missing_nodes and prediction.uncovered:
            missing = set(prediction.uncovered) - self._untimeable
            if missing:
                before = set(self.table.entries)
                latency_model.calibrate(
                    runtime, self.profile, self.table, repeats=10, min_round_s=0.0, only=missing
                )
                added = self.table.timings(set(self.table.entries) - before)
                result.latency_entries = added
                self._untimeable |= missing - set(added)
                prediction = latency_model.predict(runtime, self.profile, self.table)
        stats = model_stats(model)
        ops: dict[str, float] = {}
        for layer in find_layers(model):
            flops = stats.layers[layer.id].flops or 0
            dtype = _DTYPES.get(layer.weight.dtype.name, "fp32")
            ops[dtype] = ops.get(dtype, 0.0) + flops
        threads = min(self.profile.threads(), available_cpus())
        energy = estimate_energy(
            self.profile, prediction.seconds, ops, stats.bytes, cores_used=threads
        )
        result.kinds["latency_ms"] = "predicted"
        result.kinds["energy_mj"] = "estimated (profile model)"
        result.metrics["latency_nodes_roofline"] = float(prediction.from_roofline)
        return {"latency_ms": prediction.seconds * 1e3, "energy_mj": energy.joules * 1e3}


_DTYPES = {"INT8": "int8", "UINT8": "int8", "INT4": "int4", "UINT4": "int4", "FLOAT16": "fp16"}


def mean_cosine(
    outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None, labels: Any = None
) -> dict[str, float]:
    """Mean (and worst) per-row cosine of the first output against the reference: for
    sentence embeddings, the mean sentence cosine (``--metric
    graphsurgeon.search.evaluate:mean_cosine``)."""
    if reference is None:
        raise GraphSurgeonError("metric mean_cosine compares with a reference model; none given")
    name = next(iter(reference))
    a = np.asarray(outputs[name], dtype=np.float64).reshape(len(outputs[name]), -1)
    b = np.asarray(reference[name], dtype=np.float64).reshape(len(reference[name]), -1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def _steps_key(steps: list[Any]) -> str:
    text = json.dumps(list(steps), sort_keys=True, default=str)
    return "steps-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _labels(data: Dataset, reference: dict[str, np.ndarray]) -> np.ndarray | None:
    if data.labels is None:
        return None
    return data.labels[: len(next(iter(reference.values())))]


def _perturbed(
    model: ir.Model, data: Dataset, config: EvalConfig, labels: np.ndarray | None
) -> tuple[Dataset, str]:
    if config.robustness not in ("auto", "fgsm", "gaussian"):
        raise GraphSurgeonError(
            f"robustness must be auto, fgsm or gaussian, not {config.robustness!r}"
        )
    if config.robustness != "gaussian":
        try:
            return _fgsm(model, data, config.noise or 0.0, labels, config.max_samples), "fgsm"
        except Exception as e:
            if config.robustness == "fgsm":
                raise GraphSurgeonError(f"robustness fgsm: {_error_text(e)}") from None
    return _noisy(data, config.noise or 0.0), "gaussian noise"


def _fgsm(
    model: ir.Model, data: Dataset, eps: float, labels: np.ndarray | None, max_samples: int | None
) -> Dataset:
    """x + eps * std(x) * sign(grad_x CE(logits, y)), y the labels (else the model's own
    predictions), per batch through :func:`graphsurgeon.training.to_torch`."""
    import torch

    from graphsurgeon.training import to_torch

    module = to_torch(model, trainable=False)
    floats = [k for k, a in data.arrays.items() if np.issubdtype(a.dtype, np.floating)]
    if not floats:
        raise GraphSurgeonError("the model has no float inputs to perturb")
    std = {k: float(data.arrays[k].std() or 1.0) for k in floats}
    out: dict[str, list[np.ndarray]] = {k: [] for k in data.arrays}
    seen = 0
    for feed in data.feeds(max_samples, batch_size=64):
        tensors = {k: torch.tensor(v, requires_grad=k in floats) for k, v in feed.items()}
        logits = next(iter(module(**tensors).values()))
        if logits.ndim != 2:
            raise GraphSurgeonError("FGSM needs 2-D logits (a classifier)")
        n = logits.shape[0]
        target = (
            torch.as_tensor(labels[seen : seen + n], dtype=torch.long)
            if labels is not None
            else logits.argmax(-1).detach()
        )
        seen += n
        torch.nn.functional.cross_entropy(logits, target).backward()
        for k, t in tensors.items():
            if k in floats:
                grad = t.grad if t.grad is not None else torch.zeros_like(t)
                step = eps * std[k] * grad.sign()
                out[k].append((t.detach() + step).numpy().astype(data.arrays[k].dtype))
            else:
                out[k].append(feed[k])
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    kept = None if data.labels is None else data.labels[:seen]
    return Dataset(arrays, kept, data.batched, data.fixed_batch)


def _noisy(data: Dataset, sigma: float) -> Dataset:
    rng = np.random.default_rng(0)
    arrays = {}
    for name, a in data.arrays.items():
        if np.issubdtype(a.dtype, np.floating):
            noise = rng.normal(0.0, sigma * float(a.std() or 1.0), a.shape)
            arrays[name] = (a + noise).astype(a.dtype)
        else:
            arrays[name] = a
    if all(a is data.arrays[k] for k, a in arrays.items()):
        raise GraphSurgeonError("robustness: the model has no float inputs to perturb")
    return Dataset(arrays, data.labels, data.batched, data.fixed_batch)


def _error_text(e: BaseException) -> str:
    if isinstance(e, GraphSurgeonError):
        return str(e)
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}"[:1000]


# -- worker side --------------------------------------------------------------------------
_EVALUATORS: dict[str, Evaluator] = {}


def evaluator_for(config: EvalConfig) -> Evaluator:
    """This process's evaluator for ``config`` (built on first use)."""
    key = json.dumps(asdict(config), sort_keys=True, default=str)
    found = _EVALUATORS.get(key)
    if found is None:
        found = _EVALUATORS[key] = Evaluator(config)
    return found


@dataclass(frozen=True)
class EvalTask:
    """The picklable function executors run: ``task(policy_dict) -> result dict``."""

    config: EvalConfig
    measure: bool = False
    #: Latency-table entries other workers timed lately: a worker adopts them rather than
    #: timing the same new node signatures again (same device, same profile).
    latency: tuple[tuple[str, list], ...] = ()

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """``item``: a policy dict, or ``{"steps": [...]}`` for a baseline pipeline; either
        may carry ``latency``, timings as in :attr:`latency` (an asynchronous search ships
        them with each policy, as it has no batch to ship them with)."""
        evaluator = evaluator_for(self.config)
        for latency in (self.latency, item.get("latency")):
            if latency:  # with features: the laws cover them
                evaluator.table.adopt(dict(latency))
        if "steps" in item:
            target: Policy | list[Any] = list(item["steps"])
        else:
            target = Policy.from_dict({k: v for k, v in item.items() if k != "latency"})
        return evaluator.evaluate(target, measure=self.measure).to_dict()

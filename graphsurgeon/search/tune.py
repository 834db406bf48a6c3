"""``graphsurgeon tune``: the search loop, from a model to a measured Pareto front.

1. Prepare: apply the prelude (``cleanup``), build the space, evaluate the baselines
   (original, onnxruntime's dynamic and static int8 through our passes, uniform pruning).
2. Search: the strategy asks for a batch, the executor evaluates it (latency model), every
   result is committed to the policy database as it arrives, the strategy is told, and its
   state is committed. Policies already evaluated on the same model, data and profile (this
   study or any other) come from the database instead.
3. Measure: up to ``measure_front`` points of the predicted front, and the baselines, are timed
   on the device; the final front and the pick (best reward within the constraints) use the
   measured numbers.
4. Write ``pareto.json``, ``best.onnx``, ``policy.yaml`` (replayable by ``graphsurgeon run``)
   and ``report.html``.

   Strategies that allow it (random, bo: :attr:`Strategy.asynchronous`) run without batch
   barriers: a worker that frees up gets the next ``ask(1)`` at once, and results are told
   as they arrive.

Resume: the strategy's state is committed after each batch (every ``batch`` results when
asynchronous); on ``--resume`` it is restored, so it asks for the same policies again, and
every one that finished before the kill is read back from the database instead of being
evaluated again.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import atomic_write, load, save
from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.search.db import PolicyDB, PolicyRow, Study, default_url, result_of
from graphsurgeon.search.evaluate import EvalConfig, EvalTask, evaluator_for, objective_keys
from graphsurgeon.search.executors import Executor, make_executor
from graphsurgeon.search.pareto import crowding_distance, hypervolume, pareto_mask
from graphsurgeon.search.policy import Policy
from graphsurgeon.search.seeds import seed_policies
from graphsurgeon.search.space import SearchSpace
from graphsurgeon.search.strategies.base import Score, Strategy, get_strategy

COST_KEYS = ("latency_ms", "size_bytes", "energy_mj")
_SHARED_LATENCY = 1024  # newest node timings shipped to the workers with each batch


def baseline_pipelines() -> dict[str, list[Any]]:
    """The comparisons every front is checked against (steps after the prelude)."""
    return {
        "original": [],
        "ort-quantize-dynamic": ["quantize-dynamic"],
        "ort-quantize-static": ["quantize-int8"],
        "uniform-prune-50%": [{"name": "prune-magnitude", "options": {"sparsity": 0.5}}],
        "uniform-prune-channels-25%": [{"name": "prune-channels", "options": {"ratio": 0.25}}],
    }


def parse_budget(budget: int | float | str) -> tuple[int | None, float | None]:
    """``200`` evaluations, or a duration: ``90s``, ``20m``, ``1h30m``."""
    if isinstance(budget, int) or (isinstance(budget, str) and budget.strip().isdigit()):
        n = int(budget)
        if n < 1:
            raise GraphSurgeonError(f"--budget: at least 1 evaluation, not {budget}")
        return n, None
    if isinstance(budget, float):
        return None, float(budget)
    text = str(budget).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(f"{a}{b}" for a, b in parts) != re.sub(r"\s+", "", text):
        raise GraphSurgeonError(
            f"--budget: {budget!r} is neither a number of evaluations nor a duration (90s, 20m, 1h)"
        )
    seconds = sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)
    if seconds <= 0:
        raise GraphSurgeonError(f"--budget: {budget!r} is no time at all")
    return None, seconds


@dataclass
class Constraints:
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    max_size_bytes: float | None = None

    def violation(self, objectives: dict[str, float]) -> float:
        """Sum of relative excesses over the limits (0 when feasible)."""
        total = 0.0
        for key, limit in (
            ("accuracy_drop", self.max_accuracy_drop),
            ("latency_ms", self.max_latency_ms),
            ("size_bytes", self.max_size_bytes),
        ):
            if limit is not None and key in objectives and objectives[key] > limit:
                total += (objectives[key] - limit) / max(abs(limit), 1e-3)
        return total


@dataclass
class TuneResult:
    study: str
    out_dir: Path
    storage: str
    objectives: list[str]
    evaluations: int  # policies asked (the budget's unit)
    evaluated: int  # of them actually run (not from the cache)
    failed: int
    elapsed_s: float
    front: list[dict[str, Any]]
    baselines: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_policy: Policy | None
    hypervolume: float
    search_s: float = 0.0  # the search loop alone (no baselines, no measuring)
    notes: list[str] = field(default_factory=list)

    @property
    def best_model(self) -> Path | None:
        path = self.out_dir / "best.onnx"
        return path if path.exists() else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "objectives": self.objectives,
            "evaluations": self.evaluations,
            "evaluated": self.evaluated,
            "failed": self.failed,
            "elapsed_s": self.elapsed_s,
            "search_s": self.search_s,
            "evaluations_per_s": self.evaluations / self.search_s if self.search_s else None,
            "hypervolume": self.hypervolume,
            "front": self.front,
            "baselines": self.baselines,
            "best": self.best,
            "notes": self.notes,
        }


def tune(
    model: str | Path,
    *,
    profile: str,
    out_dir: str | Path,
    calib: str | Path | None = None,
    eval_data: str | Path | None = None,
    metric: str | None = None,
    strategy: str = "ga",
    budget: int | float | str = 100,
    objectives: Sequence[str] | str = ("accuracy", "latency", "size"),
    storage: str | None = None,
    resume: bool = False,
    study: str | None = None,
    workers: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    max_accuracy_drop: float | None = None,
    max_latency: float | None = None,
    max_size: float | None = None,
    lam: float = 1.0,
    search_lam: float | None = None,
    seed: int = 0,
    methods: Sequence[str] | str | None = None,
    shapes: dict[str, list[int]] | None = None,
    prelude: Sequence[Any] = ("cleanup",),
    noise: float | None = None,
    robustness: str = "auto",
    max_samples: int | None = 256,
    measure_front: int = 8,
    batch_size: int | None = None,
    strategy_options: dict[str, Any] | None = None,
    sensitivity: dict[str, float] | None = None,
    progress: bool = True,
    write_outputs: bool = True,
) -> TuneResult:
    """Search per-layer compression policies for ``model`` on ``profile``; see the module doc.

    ``budget``: evaluations (int or digits) or seconds (float, or ``"20m"``). ``lam`` weighs
    the normalized costs against the accuracy drop in the reward (and the final pick);
    ``search_lam``, when given, is the lambda of the reward the strategy learns from instead
    (``--tune-search`` tunes it), while the final pick keeps ``lam``: the user's trade-off.
    """
    started = time.perf_counter()
    n_budget, s_budget = parse_budget(budget)
    keys = objective_keys(objectives)
    if "accuracy_drop" not in keys:
        keys = ["accuracy_drop", *keys]  # the search never goes blind on accuracy
    constraints = Constraints(max_accuracy_drop, max_latency, max_size)
    from graphsurgeon.profiles import load_profile

    load_profile(profile)  # a bad profile fails before anything is written
    get_strategy(strategy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = EvalConfig(
        model=str(Path(model).resolve()),
        profile=str(profile),
        calib=str(Path(calib).resolve()) if calib else None,
        eval=str(Path(eval_data).resolve()) if eval_data else None,
        metric=metric,
        shapes=shapes,
        prelude=tuple(prelude),
        max_samples=max_samples,
        noise=noise,
        robustness=robustness,
    )
    if "robustness_drop" in keys and noise is None:
        config = EvalConfig(**{**config.__dict__, "noise": 0.1})
    evaluator = evaluator_for(config)
    space = SearchSpace.build(
        evaluator.base_model(),
        methods=methods,
        sensitivity=sensitivity,
        prelude=config.prelude,
        calib=evaluator.calib,
    )
    if not space.slots:
        raise GraphSurgeonError(f"{model}: no layer the search can compress")
    url = storage or default_url(out)
    db = PolicyDB(url)
    name = study or out.resolve().name
    context, profile_key = config.context_hash(), config.profile_key()
    record = db.study(name)
    if record is not None and not resume:
        raise GraphSurgeonError(
            f"study {name!r} already exists in {url}: pass --resume to continue it, or another "
            "-o / --study"
        )
    if record is None and resume:
        raise GraphSurgeonError(f"--resume: no study {name!r} in {url}")
    if record is not None and (record.context_hash, record.profile_key) != (context, profile_key):
        raise GraphSurgeonError(
            f"--resume: study {name!r} was run on another model, data or profile "
            f"(context {record.context_hash}, profile {record.profile_key})"
        )
    if record is not None and record.strategy != strategy:
        raise GraphSurgeonError(
            f"--resume: study {name!r} used strategy {record.strategy}, not {strategy}"
        )
    if record is None:
        record = db.create_study(
            name=name,
            model_path=config.model,
            context_hash=context,
            profile_key=profile_key,
            strategy=strategy,
            objectives=keys,
            config={
                "eval": {k: v for k, v in config.__dict__.items()},
                "budget": str(budget),
                "lambda": lam,
                "search_lambda": lam if search_lam is None else search_lam,
                "seed": seed,
                "constraints": constraints.__dict__,
                "methods": list(methods) if isinstance(methods, (list, tuple)) else methods,
                "space": {"dim": space.dim, "slots": len(space.slots)},
            },
        )
    loop = _Loop(
        db=db,
        study=record,
        space=space,
        config=config,
        keys=keys,
        constraints=constraints,
        lam=lam,
        search_lam=search_lam,
        progress=progress,
    )
    ex = make_executor(executor, workers, ray_address)
    try:
        loop.baselines(ex)
        initial = [space.encode(p) for p in seed_policies(space)]  # see search/seeds.py
        cls = get_strategy(strategy)
        options = dict(strategy_options or {})
        if n_budget and "budget" in cls.extra_options:  # e.g. ga sizes its population by it
            options.setdefault("budget", n_budget)
        strat = cls(space, keys, seed=seed, initial=initial, **options)
        if record.strategy_state:
            strat.load_state_dict(record.strategy_state)
        batch = batch_size or int(getattr(strat, "pop_size", 0) or max(8, 2 * workers))
        search_start = time.perf_counter()
        loop.search(strat, ex, batch, n_budget, s_budget, started)
        loop.search_s = time.perf_counter() - search_start
        loop.measure(ex, measure_front)
    finally:
        ex.close()
    result = loop.result(out, url, started)
    if write_outputs:
        _write_outputs(result, loop, config, out)
    db.finish(record)
    db.close()
    return result


@dataclass
class _Point:
    row: PolicyRow
    objectives: dict[str, float]
    violation: float


class _Loop:
    def __init__(
        self,
        *,
        db: PolicyDB,
        study: Study,
        space: SearchSpace,
        config: EvalConfig,
        keys: list[str],
        constraints: Constraints,
        lam: float,
        progress: bool,
        search_lam: float | None = None,
    ) -> None:
        self.db, self.study, self.space, self.config = db, study, space, config
        self.keys, self.constraints, self.lam = keys, constraints, lam
        self.search_lam = lam if search_lam is None else search_lam
        self.show_progress = progress
        self.rows: dict[str, PolicyRow] = {r.key: r for r in db.rows(study, "search")}
        self.base_rows: dict[str, PolicyRow] = {
            r.name or r.key: r for r in db.rows(study, "baseline")
        }
        self.measured: dict[str, PolicyRow] = {r.key: r for r in db.rows(study, "measured")}
        self.asked = len(self.rows)
        self.evaluated = 0
        self.base_costs: dict[str, float] = {}
        self.search_s = 0.0
        self.new_latency: dict[str, list] = {}  # sig -> [seconds, family, flops, bytes]

    # -- scores ---------------------------------------------------------------------------
    def score(self, row: PolicyRow) -> Score | None:
        if row.status == "failed":
            return None
        values = row.values()
        if any(k not in values for k in self.keys):
            return None
        objectives = {k: values[k] for k in self.keys}
        violation = self.constraints.violation(values)
        return {
            **objectives,
            "violation": violation,
            "reward": self.reward(values, self.search_lam) - 10.0 * violation,
        }

    def reward(self, values: dict[str, float], lam: float | None = None) -> float:
        """``-(accuracy_drop + lambda * mean normalized cost)``; costs are relative to the
        original model, so lambda is unitless (lambda = 1: halving latency is worth 0.5 of
        accuracy drop... scaled by how many costs are objectives). ``lam``: the search's
        lambda for the strategy's scores; the pick's (``--lambda``) by default."""
        costs = [
            values[k] / self.base_costs[k]
            for k in self.keys
            if k in COST_KEYS and self.base_costs.get(k)
        ]
        penalty = float(np.mean(costs)) if costs else 0.0
        lam = self.lam if lam is None else lam
        return -(values.get("accuracy_drop", 0.0) + lam * penalty)

    # -- stages ---------------------------------------------------------------------------
    def _record(
        self, key: str, item: dict[str, Any], result: dict[str, Any], **kw: Any
    ) -> PolicyRow:
        for sig, timing in (result.get("latency_entries") or {}).items():
            self.new_latency[sig] = timing
        status = result["status"]
        if status == "ok" and self.constraints.violation(result.get("objectives", {})) > 0:
            status = "infeasible"
        return self.db.add(self.study, key=key, policy=item, result=result, status=status, **kw)

    def baselines(self, ex: Executor) -> None:
        wanted = {
            name: steps
            for name, steps in baseline_pipelines().items()
            if name not in self.base_rows
        }
        task = EvalTask(self.config)
        items = [{"steps": steps or ["eliminate-dead-code"]} for steps in wanted.values()]
        names = list(wanted)
        for i, result in ex.map_unordered(task, items):
            if isinstance(result, BaseException):
                result = {"status": "failed", "error": f"{type(result).__name__}: {result}"}
            self.base_rows[names[i]] = self._record(
                f"baseline:{names[i]}", items[i], result, stage="baseline", name=names[i]
            )
        original = self.base_rows.get("original")
        if original is None or original.status == "failed":
            raise GraphSurgeonError(
                f"the original model could not be evaluated: {original.error if original else '?'}"
            )
        values = original.values()
        self.base_costs = {k: values[k] for k in COST_KEYS if values.get(k)}

    def search(
        self,
        strategy: Strategy,
        ex: Executor,
        batch: int,
        n_budget: int | None,
        s_budget: float | None,
        started: float,
    ) -> None:
        if strategy.asynchronous:
            self.search_async(strategy, ex, batch, n_budget, s_budget, started)
            return
        with _Progress(self, n_budget, s_budget, started) as bar:
            while True:
                # the node timings workers took so far travel with the batch's tasks
                shared = tuple(list(self.new_latency.items())[-_SHARED_LATENCY:])
                task = EvalTask(self.config, latency=shared)
                elapsed = time.perf_counter() - started
                left = None if n_budget is None else n_budget - self.asked
                if (left is not None and left <= 0) or (
                    s_budget is not None and elapsed >= s_budget
                ):
                    break
                n = batch if left is None else min(batch, left)
                xs = strategy.ask(n)
                policies = [self.space.decode(x) for x in xs]
                keys = [p.key() for p in policies]
                lineage = self.parent_ids(strategy, xs)
                todo: dict[str, tuple[Policy, np.ndarray, list[int]]] = {}
                for x, p, k, parents in zip(xs, policies, keys, lineage, strict=True):
                    if k in self.rows or k in todo:
                        continue
                    hit = self.db.cached(self.study.context_hash, k, self.study.profile_key)
                    if hit is not None:
                        self.rows[k] = self._record(
                            k,
                            p.to_dict(),
                            result_of(hit),
                            vector=x.tolist(),
                            cached=True,
                            parents=parents,
                            generation=getattr(strategy, "generation", 0),
                        )
                        continue
                    todo[k] = (p, x, parents)
                order = list(todo)
                items = [todo[k][0].to_dict() for k in order]
                for i, result in ex.map_unordered(task, items):
                    k = order[i]
                    if isinstance(result, BaseException):
                        result = {
                            "key": k,
                            "status": "failed",
                            "error": f"{type(result).__name__}: {result}",
                        }
                    self.rows[k] = self._record(
                        k,
                        items[i],
                        result,
                        vector=todo[k][1].tolist(),
                        parents=todo[k][2],
                        generation=getattr(strategy, "generation", 0),
                    )
                    self.evaluated += 1
                    bar.update()
                self.asked += n
                strategy.tell(xs, [self.score(self.rows[k]) for k in keys])
                self.db.save_state(self.study, strategy.state_dict())
                bar.update(force=True)

    def search_async(
        self,
        strategy: Strategy,
        ex: Executor,
        batch: int,
        n_budget: int | None,
        s_budget: float | None,
        started: float,
    ) -> None:
        """The search without batch barriers, for strategies that allow it: the executor
        pulls the next policy (``ask(1)``) whenever a worker frees up, and each result is
        told as it arrives, so no worker waits for a batch's slowest policy or for the
        strategy's own ask. The strategy's state is committed every ``batch`` results (a
        resumed search asks again what came after, and finds those in the database)."""
        waiting: dict[str, list[np.ndarray]] = {}  # in flight: key -> vectors asked for it
        told = 0

        def tell(key: str, xs: list[np.ndarray]) -> None:
            nonlocal told
            strategy.tell(xs, [self.score(self.rows[key])] * len(xs))
            told += len(xs)
            if told >= batch:
                self.db.save_state(self.study, strategy.state_dict())
                told = 0

        def items() -> Any:
            while True:
                elapsed = time.perf_counter() - started
                if (n_budget is not None and self.asked >= n_budget) or (
                    s_budget is not None and elapsed >= s_budget
                ):
                    return
                (x,) = strategy.ask(1)
                policy = self.space.decode(x)
                key = policy.key()
                (parents,) = self.parent_ids(strategy, [x])
                self.asked += 1
                if key in waiting:  # asked again while in flight: told with the first
                    waiting[key].append(x)
                    continue
                if key not in self.rows:
                    hit = self.db.cached(self.study.context_hash, key, self.study.profile_key)
                    if hit is None:
                        waiting[key] = [x]
                        shared = tuple(list(self.new_latency.items())[-_SHARED_LATENCY:])
                        yield key, {**policy.to_dict(), "latency": shared}, x, parents
                        continue
                    self.rows[key] = self._record(
                        key, policy.to_dict(), result_of(hit), vector=x.tolist(), cached=True,
                        parents=parents, generation=getattr(strategy, "generation", 0),
                    )  # fmt: skip
                tell(key, [x])

        pulled: list[tuple[str, dict[str, Any], np.ndarray, list[int]]] = []

        def payloads() -> Any:  # the executor numbers what it pulls: pulled[i] is item i
            for item in items():
                pulled.append(item)
                yield item[1]

        with _Progress(self, n_budget, s_budget, started) as bar:
            for i, result in ex.map_unordered(EvalTask(self.config), payloads()):
                key, item, x, parents = pulled[i]
                if isinstance(result, BaseException):
                    result = {
                        "key": key,
                        "status": "failed",
                        "error": f"{type(result).__name__}: {result}",
                    }
                item = {k: v for k, v in item.items() if k != "latency"}
                self.rows[key] = self._record(
                    key, item, result, vector=x.tolist(), parents=parents,
                    generation=getattr(strategy, "generation", 0),
                )  # fmt: skip
                self.evaluated += 1
                tell(key, waiting.pop(key))
                bar.update()
            self.db.save_state(self.study, strategy.state_dict())
            bar.update(force=True)

    def parent_ids(self, strategy: Strategy, xs: list[np.ndarray]) -> list[list[int]]:
        """Database ids of the policies each vector was bred from (``strategy.last_parents``;
        a parent vector is found by its policy's key, so any vector decoding to an evaluated
        policy names that policy's row)."""
        found = getattr(strategy, "last_parents", None) or []
        if len(found) != len(xs):
            return [[] for _ in xs]
        out = []
        for vectors in found:
            ids: list[int] = []
            for v in vectors:
                row = self.rows.get(self.space.decode(np.asarray(v)).key())
                if row is not None and row.id not in ids:
                    ids.append(row.id)
            out.append(ids)
        return out

    def points(self, rows: Sequence[PolicyRow]) -> list[_Point]:
        out = []
        for row in rows:
            if row.status == "failed":
                continue
            values = row.values()
            if all(k in values for k in self.keys):
                out.append(
                    _Point(
                        row, {k: values[k] for k in self.keys}, self.constraints.violation(values)
                    )
                )
        return out

    def predicted_front(self) -> list[_Point]:
        points = [p for p in self.points(list(self.rows.values())) if p.violation <= 0]
        if not points:
            return []
        f = np.array([[p.objectives[k] for k in self.keys] for p in points])
        mask = pareto_mask(f)
        self.db.set_pareto([p.row for p in points], mask.tolist())
        return [p for p, m in zip(points, mask, strict=True) if m]

    def measure(self, ex: Executor, limit: int) -> None:
        """Time the front (up to ``limit`` points spread along it) and the baselines."""
        front = self.predicted_front()
        if len(front) > limit > 0:
            f = np.array([[p.objectives[k] for k in self.keys] for p in front])
            crowd = crowding_distance(f)
            front = [front[i] for i in np.argsort(-crowd, kind="stable")[:limit]]
        elif limit <= 0:
            front = []
        todo = [(p.row.key, p.row.policy) for p in front if p.row.key not in self.measured]
        todo += [
            (f"baseline:{name}", row.policy)
            for name, row in self.base_rows.items()
            if row.status != "failed" and f"baseline:{name}" not in self.measured
        ]
        # timings are taken one at a time in this process, never beside other evaluations
        task = EvalTask(self.config, measure=True)
        for key, item in todo:
            try:
                result = task(item)
            except Exception as e:
                result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            name = key.removeprefix("baseline:") if key.startswith("baseline:") else None
            self.measured[key] = self._record(key, item, result, stage="measured", name=name)
        rows = [r for k, r in self.measured.items() if not k.startswith("baseline:")]
        points = [p for p in self.points(rows) if p.violation <= 0]
        if points:
            f = np.array([[p.objectives[k] for k in self.keys] for p in points])
            self.db.set_pareto([p.row for p in points], pareto_mask(f).tolist())

    # -- the result -------------------------------------------------------------------------
    def result(self, out: Path, url: str, started: float) -> TuneResult:
        rows = [r for k, r in self.measured.items() if not k.startswith("baseline:")]
        points = self.points(rows)
        front = [p for p in points if p.row.pareto and p.violation <= 0]
        notes = []
        if not front:  # nothing measured: fall back on the predicted front
            front = self.predicted_front()
            if front:
                notes.append("no point could be measured: the front below is predicted")
        best = max(front, key=lambda p: self.reward(p.row.values()), default=None)
        search_points = self.points(list(self.rows.values()))
        hv = self.hypervolume(search_points)
        failed = sum(r.status == "failed" for r in self.rows.values())
        if failed:
            notes.append(f"{failed} of {len(self.rows)} policies failed (errors in the database)")
        return TuneResult(
            study=self.study.name,
            out_dir=out,
            storage=url,
            objectives=self.keys,
            evaluations=self.asked,
            evaluated=self.evaluated,
            failed=failed,
            elapsed_s=time.perf_counter() - started,
            front=[self.describe(p.row) for p in front],
            baselines=[self.describe(r, name=n) for n, r in self._baseline_rows().items()],
            best=self.describe(best.row) if best else None,
            best_policy=Policy.from_dict(best.row.policy) if best else None,
            hypervolume=hv,
            search_s=self.search_s,
            notes=notes,
        )

    def _baseline_rows(self) -> dict[str, PolicyRow]:
        out = {}
        for name, row in self.base_rows.items():
            out[name] = self.measured.get(f"baseline:{name}", row)
        return out

    def hypervolume(self, points: list[_Point]) -> float:
        """Of the feasible predicted points, objectives normalized by the original model's
        (accuracy drop in absolute terms), reference point 1.1 x the original's costs and an
        accuracy drop of 1 (or the limit)."""
        feasible = [p for p in points if p.violation <= 0]
        if not feasible:
            return 0.0
        f = np.array([[self._norm(k, p.objectives[k]) for k in self.keys] for p in feasible])
        ref = np.array([self._ref(k) for k in self.keys])
        return hypervolume(f, ref)

    def _norm(self, key: str, value: float) -> float:
        base = self.base_costs.get(key)
        return value / base if key in COST_KEYS and base else value

    def _ref(self, key: str) -> float:
        if key in COST_KEYS:
            return 1.1
        if key == "accuracy_drop" and self.constraints.max_accuracy_drop is not None:
            return self.constraints.max_accuracy_drop + 1e-9
        return 1.0

    def describe(self, row: PolicyRow, name: str | None = None) -> dict[str, Any]:
        values = row.values()
        out: dict[str, Any] = {"id": row.id, "key": row.key, "status": row.status}
        if name:
            out["name"] = name
        out["objectives"] = {k: values[k] for k in (*self.keys, *COST_KEYS) if k in values}
        out["kinds"] = {k: v for k, v in row.kinds().items() if k in out["objectives"]}
        out["metrics"] = {k: v for k, v in values.items() if k not in out["objectives"]}
        if "decisions" in row.policy:
            out["policy"] = Policy.from_dict(row.policy).summary(limit=100)
        else:
            out["policy"] = str(row.policy.get("steps"))
        out["reward"] = self.reward(values) if row.status != "failed" else None
        if row.error:
            out["error"] = row.error
        return out


class _Progress:
    """Rich progress: evaluations, failures, front size, best reward, ETA."""

    def __init__(
        self, loop: _Loop, n_budget: int | None, s_budget: float | None, started: float
    ) -> None:
        self.loop, self.n_budget, self.s_budget, self.started = loop, n_budget, s_budget, started
        self.progress = None
        self.last = 0.0

    def __enter__(self) -> _Progress:
        if not self.loop.show_progress:
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]tune"),
            BarColumn(),
            MofNCompleteColumn() if self.n_budget else TextColumn("{task.completed:.0f}s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            transient=False,
        )
        self.progress.start()
        total = self.n_budget or self.s_budget
        self.task = self.progress.add_task("", total=total)
        return self

    def update(self, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        loop = self.loop
        done = len(loop.rows) if self.n_budget else now - self.started
        failed = sum(r.status == "failed" for r in loop.rows.values())
        feasible = [p for p in loop.points(list(loop.rows.values())) if p.violation <= 0]
        front = 0
        best = -math.inf
        if feasible:
            f = np.array([[p.objectives[k] for k in loop.keys] for p in feasible])
            front = int(pareto_mask(f).sum())
            best = max(loop.reward(p.row.values()) for p in feasible)
        text = f"evals {len(loop.rows)} failed {failed} front {front} best reward {best:.4g}"
        self.progress.update(
            self.task, completed=min(done, self.n_budget or self.s_budget), description=text
        )

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.update(force=True)
            self.progress.stop()


# -- outputs --------------------------------------------------------------------------------
def _write_outputs(result: TuneResult, loop: _Loop, config: EvalConfig, out: Path) -> None:
    import json

    from graphsurgeon.latency_model import LatencyTable

    if loop.new_latency:  # node timings taken during the search: keep them for next time
        table = LatencyTable.load(loop_profile(loop))
        table.adopt(loop.new_latency)
        table.save(loop_profile(loop))
    with atomic_write(out / "pareto.json") as f:
        json.dump(result.to_dict(), f, indent=2, default=str)
    for stale in ("best.onnx", "policy.yaml"):
        (out / stale).unlink(missing_ok=True)
    if result.best_policy is not None:
        spec = result.best_policy.to_pipeline()
        with atomic_write(out / "policy.yaml") as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        model = load(config.model, shapes=config.shapes)
        calib = config.calib
        run_pipeline(model, spec, calib=calib, verify="structural")
        save(model, out / "best.onnx")
    try:
        from graphsurgeon.report import write_report
    except ImportError:
        write_report = None
    data = report_data(result, loop, config)
    if write_report is not None:
        write_report(out / "report.html", data)
    else:
        with atomic_write(out / "report.json") as f:
            json.dump(data, f, indent=2, default=str)


def loop_profile(loop: _Loop) -> Any:
    from graphsurgeon.profiles import load_profile

    return load_profile(loop.config.profile)


def report_data(result: TuneResult, loop: _Loop, config: EvalConfig) -> dict[str, Any]:
    """The data dict of :func:`graphsurgeon.report.write_report`."""
    evaluator = evaluator_for(config)
    base_head = evaluator.baseline[evaluator.head]

    def point(d: dict[str, Any], pareto: bool, measured: bool) -> dict[str, Any]:
        o, k = d["objectives"], d["kinds"]
        return {
            "id": d["id"],
            "accuracy": base_head - o["accuracy_drop"] if "accuracy_drop" in o else None,
            "latency_ms": o.get("latency_ms"),
            "size_bytes": o.get("size_bytes"),
            "energy_mj": o.get("energy_mj"),
            "energy_kind": k.get("energy_mj"),
            "pareto": pareto,
            "policy": d["policy"],
            "status": d["status"],
            "measured": measured,
        }

    front_ids = {d["id"] for d in result.front}
    points = [point(d, True, d["kinds"].get("latency_ms") == "measured") for d in result.front]
    for row in loop.rows.values():
        if row.id in front_ids or row.status == "failed":
            continue
        points.append(point(loop.describe(row), row.pareto, False))
    baselines = []
    for d in result.baselines:
        p = point(d, False, d["kinds"].get("latency_ms") == "measured")
        baselines.append(
            {
                "name": d["name"],
                **{
                    k: p[k]
                    for k in ("accuracy", "latency_ms", "size_bytes", "energy_mj", "energy_kind")
                },
            }
        )
    layers = []
    decisions = {}
    if result.best_policy is not None:
        decisions = {d.slot: d for d in result.best_policy.decisions}
    for slot in loop.space.slots:
        d = decisions.get(slot.id)
        layers.append(
            {
                "layer": slot.id,
                "op": slot.op,
                "decision": d.summary() if d else "none",
                "sensitivity": slot.stats.get("sensitivity"),
            }
        )
    model = evaluator.base
    from graphsurgeon.stats import model_stats

    stats = model_stats(model)
    notes = list(result.notes)
    notes.append(
        f"{result.evaluations} policies in {result.elapsed_s:.1f} s "
        f"({result.evaluations / max(result.elapsed_s, 1e-9):.2f}/s incl. measuring), "
        f"{result.failed} failed; latency predicted during search, measured for the front"
    )
    return {
        "title": f"graphsurgeon tune: {Path(config.model).name}",
        "model": {
            "path": config.model,
            "nodes": stats.nodes,
            "params": stats.params,
            "bytes": stats.bytes,
        },
        "profile": loop.study.profile_key,
        "objectives": result.objectives,
        "summary": [
            ["study", result.study],
            ["strategy", loop.study.strategy],
            ["evaluations", result.evaluations],
            ["hypervolume (normalized)", round(result.hypervolume, 6)],
            ["best", result.best["policy"] if result.best else "none within the constraints"],
        ],
        "points": points,
        "baselines": baselines,
        "layers": layers,
        "notes": notes,
    }

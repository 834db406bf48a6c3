"""``bo``: Bayesian optimization (TPE) through Optuna, and ``--tune-search``.

Each slot is a categorical Optuna parameter (its method), and each parameter of the chosen
method a conditional one with the pass's own declared space (a Choice stays categorical, an
int stays an int, log ranges stay log), so no trial spends samples on genes its policy never
reads. Multivariate TPE models the method choices of all slots jointly (they are in every
trial) and the conditional parameters one by one; ``group=true`` would model each conditional
subspace jointly too, at several times the sampling cost (measured 5x on a toy space of 8
slots). With several objectives the study is multi-objective (TPE splits good from bad by
non-dominated rank, or NSGA-II with ``sampler=nsga2``); with one, it maximizes the search's
scalar ``reward``. Constraint violation (``--max-*``) goes to Optuna as a constraint, so
infeasible trials inform the model without counting as good. TPE's cost per trial grows
with the trials so far (about 80 ms per trial after 600 on the digits CNN's space, on a
loaded 2-core machine): ``bo`` suits searches whose evaluations cost far more than that.

Storage: the study lives in memory and its finished trials are the strategy's state
(:meth:`BOStrategy.state_dict`), which the search saves in its own policy database. We do not
point Optuna's RDB storage at the ``--storage`` URL, because (1) Optuna would add its own
tables and alembic version to the user's database, and an Optuna upgrade would then refuse to
resume; (2) after ``kill -9`` its in-flight trials stay RUNNING forever and would bias TPE's
constant liar; (3) the policy database already holds every finished evaluation atomically, so a
second copy can only disagree with it. Rebuilding a study from a few thousand trials takes
well under a second.

Ask/tell: :meth:`ask` maps each Optuna trial to a vector through :meth:`SearchSpace.encode`;
:meth:`tell` matches vectors back to their trials by policy key. Vectors that no trial asked
for (baselines, seeds, another strategy's results) are added as finished trials, so they
inform the sampler too.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.options import Choice, FloatRange, IntRange
from graphsurgeon.search.policy import Decision, Policy
from graphsurgeon.search.space import SearchSpace
from graphsurgeon.search.strategies.base import Score, Strategy, get_strategy

optuna.logging.set_verbosity(optuna.logging.WARNING)


def distribution(space: FloatRange | IntRange | Choice) -> BaseDistribution:
    """The Optuna distribution of a declared option space."""
    if isinstance(space, Choice):
        return CategoricalDistribution(list(space.values))
    if isinstance(space, IntRange):
        return IntDistribution(
            space.low, space.high, log=space.log, step=1 if space.log else space.step
        )
    return FloatDistribution(space.low, space.high, log=space.log, step=space.step)


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _count(key: str, value: Any) -> int:
    """A positive integer strategy option, or a one-line error naming it."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if v < 1 or v != value:
        raise GraphSurgeonError(
            f"strategy bo: --strategy-option {key}: expected a positive integer, got {value!r}"
        )
    return v


def _sampler(kind: str, seed: int, hyper: dict[str, Any]) -> optuna.samplers.BaseSampler:
    if kind == "nsga2":
        size = _count("population_size", hyper["population_size"])
        return optuna.samplers.NSGAIISampler(population_size=max(2, size), seed=seed)
    if kind == "tpe":
        with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                n_startup_trials=_count("n_startup_trials", hyper["n_startup_trials"]),
                n_ei_candidates=_count("n_ei_candidates", hyper["n_ei_candidates"]),
                multivariate=bool(hyper.get("multivariate", True)),
                group=bool(hyper.get("group", False)),
                constant_liar=True,  # batches are asked before they are told
                seed=seed,
            )
    raise GraphSurgeonError(f"strategy bo: --strategy-option sampler: tpe or nsga2, not {kind!r}")


class BOStrategy(Strategy):
    """Optuna TPE (or NSGA-II) over per-slot methods and their conditional parameters."""

    name: ClassVar[str] = "bo"
    asynchronous: ClassVar[bool] = True  # Optuna's running trials are not evidence yet
    hyperparameters: ClassVar[dict[str, FloatRange | IntRange | Choice]] = {
        "sampler": Choice(["tpe", "nsga2"]),
        "n_startup_trials": IntRange(4, 64, log=True),
        "n_ei_candidates": IntRange(8, 128, log=True),
        "population_size": IntRange(8, 256, log=True),
    }
    defaults: ClassVar[dict[str, Any]] = {
        "sampler": "tpe",
        "n_startup_trials": 10,
        "n_ei_candidates": 24,
        "population_size": 32,
    }
    extra_options: ClassVar[tuple[str, ...]] = ("initial", "scalarize", "multivariate", "group")

    def __init__(
        self, space: SearchSpace, objectives: list[str], *, seed: int = 0, **hyper: Any
    ) -> None:
        super().__init__(space, objectives, seed=seed, **hyper)
        self.h = {**self.defaults, **{k: v for k, v in hyper.items() if v is not None}}
        self.scalar = bool(self.h.get("scalarize")) or len(self.objectives) <= 1
        self.method_dists: list[CategoricalDistribution] = []
        self.param_dists: list[list[dict[str, BaseDistribution]]] = []
        for slot in space.slots:
            self.method_dists.append(CategoricalDistribution([m.name for m in slot.methods]))
            self.param_dists.append(
                [{p: distribution(s) for p, s in spaces.items()} for spaces in slot.spaces]
            )
        self.told = 0
        self.generation = 0  # told batches (the database's lineage)
        self.finished: list[dict[str, Any]] = []  # every told trial: the resumable state
        self.pending: dict[str, list[optuna.Trial]] = {}  # policy key -> trials asked
        self.study = self._new_study(seed)
        for x in hyper.get("initial") or []:  # baselines first, as trials the sampler sees
            self.study.enqueue_trial(self._params(np.asarray(x, dtype=np.float64)))

    def _new_study(self, seed: int) -> optuna.Study:
        multi = not self.scalar
        directions = ["minimize"] * len(self.objectives) if multi else ["maximize"]
        sampler = _sampler(str(self.h["sampler"]), seed, self.h)
        return optuna.create_study(directions=directions, sampler=sampler)

    # -- vectors <-> Optuna params -------------------------------------------------------
    def _names(self, s: int) -> tuple[str, list[dict[str, str]]]:
        slot = self.space.slots[s]
        return f"{slot.id}|method", [
            {p: f"{slot.id}|{m.name}.{p}" for p in spaces}
            for m, spaces in zip(slot.methods, slot.spaces, strict=True)
        ]

    def _sample(self, trial: optuna.Trial) -> np.ndarray:
        decisions = []
        for s, slot in enumerate(self.space.slots):
            method_name, param_names = self._names(s)
            method = _suggest(trial, method_name, self.method_dists[s])
            j = [m.name for m in slot.methods].index(method)
            params = {
                p: _suggest(trial, param_names[j][p], dist)
                for p, dist in self.param_dists[s][j].items()
            }
            decisions.append(
                Decision(slot.id, tuple(slot.layers), method, tuple(sorted(params.items())))
            )
        return self.space.encode(Policy(tuple(decisions), self.space.prelude))

    def _params(self, x: np.ndarray) -> dict[str, Any]:
        """Optuna params of the policy ``x`` decodes to."""
        out: dict[str, Any] = {}
        policy = self.space.decode(x)
        for s, (slot, d) in enumerate(zip(self.space.slots, policy.decisions, strict=True)):
            method_name, param_names = self._names(s)
            j = [m.name for m in slot.methods].index(d.method)
            out[method_name] = d.method
            for p, value in d.options.items():
                if p in param_names[j]:  # a method's fixed options have no parameter
                    out[param_names[j][p]] = value
        return out

    def _distributions(self, params: dict[str, Any]) -> dict[str, BaseDistribution]:
        dists: dict[str, BaseDistribution] = {}
        for s, slot in enumerate(self.space.slots):
            method_name, param_names = self._names(s)
            dists[method_name] = self.method_dists[s]
            if method_name not in params:
                continue
            j = [m.name for m in slot.methods].index(params[method_name])
            for p, dist in self.param_dists[s][j].items():
                dists[param_names[j][p]] = dist
        return {k: v for k, v in dists.items() if k in params}

    # -- ask / tell ------------------------------------------------------------------------
    def ask(self, n: int) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            trial = self.study.ask()
            x = self._sample(trial)
            self.pending.setdefault(self.space.decode(x).key(), []).append(trial)
            out.append(x)
        return out

    @property
    def reads_reward(self) -> bool:
        return self.scalar  # a multi-objective study ranks the objectives themselves

    def _values(self, score: Score) -> list[float]:
        if self.scalar:
            if "reward" in score:
                return [float(score["reward"])]
            return [-float(score[self.objectives[0]])]
        return [float(score[o]) for o in self.objectives]

    def tell(self, xs: list[np.ndarray], scores: list[Score | None]) -> None:
        if len(xs) != len(scores):
            raise ValueError("tell: xs and scores differ in length")
        for x, score in zip(xs, scores, strict=True):
            x = np.asarray(x, dtype=np.float64)
            key = self.space.decode(x).key()
            values = None if score is None else self._values(score)
            if values is not None and not all(math.isfinite(v) for v in values):
                values = None
            violation = 0.0 if score is None else float(score.get("violation", 0.0))
            trials = self.pending.get(key)
            if trials:
                trial = trials.pop(0)
                if not trials:
                    del self.pending[key]
                params = dict(trial.params)
                if values is None:
                    self.study.tell(trial, state=TrialState.FAIL)
                else:
                    trial.set_constraint("violation", violation)
                    self.study.tell(trial, values)
            else:
                params = self._params(x)
                self._add(params, values, violation)
            self.finished.append({"params": params, "values": values, "violation": violation})
            self.told += 1
        self.generation += 1

    def _add(self, params: dict[str, Any], values: list[float] | None, violation: float) -> None:
        try:
            trial = optuna.trial.create_trial(
                state=TrialState.COMPLETE if values is not None else TrialState.FAIL,
                values=values,
                params=params,
                distributions=self._distributions(params),
                constraints={"violation": violation} if values is not None else None,
            )
        except ValueError:  # a parameter value outside today's space: not evidence for it
            return
        self.study.add_trial(trial)

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "told": self.told,
            "generation": self.generation,
            "trials": list(self.finished),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the study from the finished trials (pending ones were never scored)."""
        super().load_state_dict(state)
        self.told = int(state.get("told", 0))
        self.generation = int(state.get("generation", 0))
        self.finished = list(state.get("trials", []))
        # a fresh sampler seed: the resumed run must not replay the first run's proposals
        self.study = self._new_study(self.seed + 1 + self.told)
        self.pending = {}
        for t in self.finished:
            self._add(t["params"], t["values"], float(t.get("violation", 0.0)))


# -- --tune-search -------------------------------------------------------------------------
def tune_search(
    strategy_name: str,
    space: SearchSpace,
    objective_fn: Callable[[Strategy, dict[str, Any]], float],
    budget: int,
    *,
    objectives: list[str],
    seed: int = 0,
    fixed: dict[str, Any] | None = None,
    tune: list[str] | None = None,
    timeout: float | None = None,
    extra: dict[str, FloatRange | IntRange | Choice] | None = None,
) -> dict[str, Any]:
    """Tune a strategy's own hyperparameters with an outer TPE study.

    Each of ``budget`` outer trials builds ``strategy_name`` with hyperparameters drawn from
    its ``hyperparameters`` declaration (``tune`` restricts which; ``fixed`` pins others) and
    hands it to ``objective_fn(strategy, knobs)``, which runs a short inner search and returns
    how good it was (higher is better, e.g. the hypervolume of its front). ``extra`` declares
    knobs of the search around the strategy (the reward's lambda): drawn by the same study,
    passed as ``knobs``, and part of ``best``. An inner search that raises
    a :class:`GraphSurgeonError` is recorded as a failed trial. Returns the best
    hyperparameters, their value, and every trial.
    """
    cls = get_strategy(strategy_name)
    declared = dict(cls.hyperparameters)
    if tune is not None:
        unknown = sorted(set(tune) - set(declared))
        if unknown:
            raise GraphSurgeonError(
                f"--tune-search: strategy {strategy_name} has no hyperparameter "
                f"{', '.join(unknown)} (it has: {', '.join(sorted(declared))})"
            )
        declared = {k: v for k, v in declared.items() if k in tune}
    fixed = dict(fixed or {})
    declared = {k: v for k, v in declared.items() if k not in fixed}
    extra = {k: v for k, v in (extra or {}).items() if k not in fixed}
    if not declared and not extra:
        raise GraphSurgeonError(f"--tune-search: strategy {strategy_name} has nothing to tune")
    if budget < 1:
        raise GraphSurgeonError(f"--tune-search: the budget must be at least 1 (got {budget})")
    dists = {k: distribution(v) for k, v in declared.items()}
    knob_dists = {k: distribution(v) for k, v in extra.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=min(5, budget), multivariate=True, seed=seed
        )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i in range(budget):
        trial = study.ask()
        hyper = {k: _suggest(trial, k, d) for k, d in dists.items()}
        knobs = {k: _suggest(trial, k, d) for k, d in knob_dists.items()}
        try:
            strategy = cls(space, objectives, seed=seed + i, **fixed, **hyper)
            value = float(objective_fn(strategy, knobs))
        except GraphSurgeonError as e:
            study.tell(trial, state=TrialState.FAIL)
            rows.append({"hyper": hyper, "knobs": knobs, "value": None, "error": str(e)})
            continue
        if math.isfinite(value):
            study.tell(trial, value)
            rows.append({"hyper": hyper, "knobs": knobs, "value": value})
        else:
            study.tell(trial, state=TrialState.FAIL)
            rows.append(
                {"hyper": hyper, "knobs": knobs, "value": None, "error": "non-finite objective"}
            )
        if timeout is not None and time.perf_counter() - start > timeout:
            break
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        raise GraphSurgeonError(f"--tune-search: every trial of {strategy_name} failed")
    best = study.best_trial
    return {
        "strategy": strategy_name,
        "best": {**fixed, **best.params},
        "value": best.value,
        "trials": rows,
    }

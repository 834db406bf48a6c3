"""The strategy contract: ask for policy vectors, tell their scores, save and resume state.

A strategy sees only vectors in ``[0, 1]^dim`` (:class:`~graphsurgeon.search.space.SearchSpace`
decodes them) and scores: ``{objective: value}`` with every objective minimized
(``accuracy_drop``, ``latency_ms``, ``size_bytes``, ``energy_mj``) plus ``reward``, the
scalarization ``-(accuracy_drop + lambda * sum of normalized costs)`` for single-objective
learners. ``None`` marks a policy that failed to apply or evaluate.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.options import Choice, FloatRange, IntRange
from graphsurgeon.search.space import SearchSpace

Score = dict[str, float]
OBJECTIVES = ("accuracy_drop", "latency_ms", "size_bytes", "energy_mj", "robustness_drop")


class Strategy(ABC):
    """Ask/tell search over the policy encoding (batch parallel: ``ask(n)`` may run at once)."""

    name: ClassVar[str]
    #: The strategy's own knobs, searchable by ``bo --tune-search``.
    hyperparameters: ClassVar[dict[str, FloatRange | IntRange | Choice]] = {}

    def __init__(
        self, space: SearchSpace, objectives: list[str], *, seed: int = 0, **hyper: Any
    ) -> None:
        unknown = sorted(set(hyper) - set(self.hyperparameters) - set(self.extra_options))
        if unknown:
            raise GraphSurgeonError(
                f"strategy {self.name}: unknown option(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted({*self.hyperparameters, *self.extra_options}))})"
            )
        self.space = space
        self.objectives = list(objectives)
        self.seed = seed
        self.hyper = hyper
        self.rng = np.random.default_rng(seed)
        #: Lineage of the vectors the last :meth:`ask` returned, in order: the evaluated
        #: vectors each was bred from (GA: both parents of a crossover, the one parent of a
        #: mutation). Empty, or an empty tuple per vector, where no single policy is a parent
        #: (random samples, TPE, the PPO controller's draws).
        self.last_parents: list[tuple[np.ndarray, ...]] = []

    @property
    def reads_reward(self) -> bool:
        """Whether the search steers by ``score["reward"]`` (so the reward's lambda changes
        what it explores); Pareto and random strategies do not."""
        return False

    #: Options accepted besides the searchable hyperparameters (e.g. initial policies).
    extra_options: ClassVar[tuple[str, ...]] = ("initial",)
    #: Whether ``ask(1)`` may be called while earlier asks are still being evaluated, and
    #: each result told as it arrives (random samples; TPE, whose running trials are simply
    #: not evidence yet). Generations (GA) and on-policy updates (PPO) need whole batches.
    asynchronous: ClassVar[bool] = False

    @abstractmethod
    def ask(self, n: int) -> list[np.ndarray]:
        """``n`` vectors to evaluate next (they may all run in parallel)."""

    @abstractmethod
    def tell(self, xs: list[np.ndarray], scores: list[Score | None]) -> None:
        """Results of vectors from :meth:`ask` (in any grouping); None = failed policy."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state; ``load_state_dict`` on a fresh instance resumes."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]

    def objective_matrix(self, scores: list[Score]) -> np.ndarray:
        return np.array([[s[o] for o in self.objectives] for s in scores], dtype=np.float64)


STRATEGIES: dict[str, str] = {
    "random": "graphsurgeon.search.strategies.random_search:RandomSearch",
    "ga": "graphsurgeon.search.strategies.ga:NSGA2",
    "ppo": "graphsurgeon.search.strategies.ppo:PPOStrategy",
    "bo": "graphsurgeon.search.strategies.bo:BOStrategy",
}


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as ``name`` (modules are imported on first use)."""
    target = STRATEGIES.get(name)
    if target is None:
        raise GraphSurgeonError(
            f"unknown strategy {name!r} (choose from {', '.join(sorted(STRATEGIES))})"
        )
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise GraphSurgeonError(f"strategy {name!r} is not available in this build") from None
        raise GraphSurgeonError(
            f"strategy {name!r} needs {e.name} (pip install {e.name})"
        ) from None
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise GraphSurgeonError(f"strategy {name!r}: {target} is not a Strategy")
    return cls

"""``random``: uniform samples of the encoding, the baseline every strategy is compared with."""

from __future__ import annotations

from typing import Any

import numpy as np

from graphsurgeon.search.strategies.base import Score, Strategy


class RandomSearch(Strategy):
    """Uniform vectors in ``[0, 1]^dim``; ``initial`` vectors (e.g. baselines) come first."""

    name = "random"
    asynchronous = True

    def __init__(self, space, objectives, *, seed: int = 0, **hyper: Any) -> None:  # type: ignore[no-untyped-def]
        super().__init__(space, objectives, seed=seed, **hyper)
        self.pending = [np.asarray(x, dtype=np.float64) for x in hyper.get("initial") or []]
        self.told = 0

    def ask(self, n: int) -> list[np.ndarray]:
        out = self.pending[:n]
        self.pending = self.pending[n:]
        out += [self.rng.random(self.space.dim) for _ in range(n - len(out))]
        return out

    def tell(self, xs: list[np.ndarray], scores: list[Score | None]) -> None:
        self.told += len(xs)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "pending": [x.tolist() for x in self.pending],
            "told": self.told,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pending = [np.asarray(x) for x in state.get("pending", [])]
        self.told = int(state.get("told", 0))

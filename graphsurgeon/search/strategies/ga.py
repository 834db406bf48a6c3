"""``ga``: NSGA-II with a novelty archive and dynamic sharding of the encoding space.

- **Population**: ``pop_size`` (by default a sixth of the search's budget, within [8, 32]:
  selection needs several generations to act); the first generation, after the seed policies,
  is sparse random policies, each compressing a random share of the slots.
- **Selection** (Deb et al. 2002): parents and offspring are ranked by constrained
  non-dominated sorting, ties broken by crowding distance; parents are picked by binary
  tournaments on (rank, -crowding).
- **Variation**: slot-wise uniform crossover (a child takes each slot's whole gene block from
  one parent, so a layer's method and its parameters travel together), then per-gene
  mutation: a method gene is redrawn, a parameter gene gets Gaussian noise (reflected at 0/1).
- **Novelty archive**: ``archive_size`` policies chosen by farthest-point sampling over the
  per-slot method choices of everything evaluated (radically different policies, not just
  good ones). Each generation ``inject_rate`` of the children have an archive parent, so
  distinct lineages keep mixing into the population and it does not collapse early.
- **Dynamic sharding**: ``log2(shards)`` random hyperplanes cut ``[0, 1]^dim`` into regions.
  Each region tracks how many of its children survived selection; ``immigrant_rate`` of the
  children are fresh samples from a region drawn by Thompson sampling on those rates, so
  sampling shifts from regions that keep losing to regions that keep winning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from graphsurgeon.options import FloatRange, IntRange
from graphsurgeon.search.pareto import crowding_distance, non_dominated_sort
from graphsurgeon.search.strategies.base import Score, Strategy


class NSGA2(Strategy):
    name = "ga"
    hyperparameters = {
        "pop_size": IntRange(8, 10000, log=True),
        "crossover_rate": FloatRange(0.3, 1.0),
        "mutation_rate": FloatRange(0.005, 0.3, log=True),
        "mutation_sigma": FloatRange(0.02, 0.4, log=True),
        "archive_size": IntRange(0, 64),
        "inject_rate": FloatRange(0.0, 0.5),
        "immigrant_rate": FloatRange(0.0, 0.5),
        "shards": IntRange(1, 64, log=True),
    }
    defaults = {
        "pop_size": None,  # budget / 6 within [8, 32] when the search's budget is known, else 32
        "crossover_rate": 0.9,
        "mutation_rate": None,  # 2 / dim
        "mutation_sigma": 0.15,
        "archive_size": 8,
        "inject_rate": 0.15,
        "immigrant_rate": 0.1,
        "shards": 8,
    }
    extra_options = ("initial", "budget")

    def __init__(self, space, objectives, *, seed: int = 0, **hyper: Any) -> None:  # type: ignore[no-untyped-def]
        super().__init__(space, objectives, seed=seed, **hyper)
        h = {**self.defaults, **{k: v for k, v in hyper.items() if v is not None}}
        self.pop_size = int(h["pop_size"] or _auto_pop_size(hyper.get("budget")))
        self.crossover_rate = float(h["crossover_rate"])
        self.mutation_rate = float(h["mutation_rate"] or min(0.5, 2.0 / max(space.dim, 1)))
        self.mutation_sigma = float(h["mutation_sigma"])
        self.archive_size = int(h["archive_size"])
        self.inject_rate = float(h["inject_rate"])
        self.immigrant_rate = float(h["immigrant_rate"])
        bits = max(0, round(math.log2(max(1, int(h["shards"])))))
        self.planes = self.rng.normal(size=(bits, space.dim))
        self.n_regions = 2**bits
        self.region_n = np.zeros(self.n_regions)
        self.region_win = np.zeros(self.n_regions)
        self.pending = [np.asarray(x, dtype=np.float64) for x in hyper.get("initial") or []]
        self.population: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.archive: list[np.ndarray] = []
        self.incoming: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.generation = 0
        self.seen: set[str] = set()  # policy keys asked for or told (children avoid them)
        self.method_genes = np.asarray(space.method_genes(), dtype=np.int64)
        self.is_method = np.zeros(space.dim, dtype=bool)
        self.is_method[self.method_genes] = True

    # -- ask ----------------------------------------------------------------------------
    def ask(self, n: int) -> list[np.ndarray]:
        out = self.pending[:n]
        self.pending = self.pending[n:]
        parents: list[tuple[np.ndarray, ...]] = [() for _ in out]
        while len(out) < n:
            if not self.population:
                out.append(self._immigrant() if self.generation else self._sparse())
                parents.append(())
                continue
            r = self.rng.random()
            if r < self.immigrant_rate:
                out.append(self._immigrant())
                parents.append(())
                continue
            a = self._tournament()
            b = (
                self.archive[self.rng.integers(len(self.archive))]
                if self.archive and r < self.immigrant_rate + self.inject_rate
                else self._tournament()
            )
            for _ in range(_RETRIES):  # a child that decodes to a known policy wastes budget
                child, crossed = self._crossover(a, b)
                child = self._mutate(child)
                if self._new(child):
                    break
            out.append(child)
            parents.append((a, b) if crossed else (a,))
        self.last_parents = parents
        return out

    def _new(self, x: np.ndarray) -> bool:
        """Whether ``x`` decodes to a policy not asked for before (and remember it): genes
        are binned, so most small mutations of a parameter gene decode to the parent."""
        key = self.space.decode(x).key()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def _sparse(self) -> np.ndarray:  # the first generation
        """A random policy touching a random share of the slots (uniform in [0, 1]): uniform
        vectors compress nearly every layer at once (``none`` is one method of many), which on
        a deep model is almost never within an accuracy constraint."""
        x = self.rng.random(self.space.dim)
        density = self.rng.random()
        for gene, slot in zip(self.method_genes, self.space.slots, strict=True):
            if self.rng.random() > density:
                x[gene] = self.rng.random() / len(slot.methods)  # method 0: none
        return x

    def _region(self, x: np.ndarray) -> int:
        if not len(self.planes):
            return 0
        bits = (self.planes @ (x - 0.5)) > 0
        return int(np.dot(bits, 1 << np.arange(len(bits))))

    def _immigrant(self) -> np.ndarray:
        """A fresh sample from a region drawn by Thompson sampling on its survival rate."""
        theta = self.rng.beta(1 + self.region_win, 1 + self.region_n - self.region_win)
        target = int(np.argmax(theta))
        x = self.rng.random(self.space.dim)
        for _ in range(64 * self.n_regions):  # rejection sampling; regions are ~equal volume
            if self._region(x) == target:
                break
            x = self.rng.random(self.space.dim)
        return x

    def _ranks(self) -> tuple[np.ndarray, np.ndarray]:
        f = np.array([p[1] for p in self.population])
        v = np.array([p[2] for p in self.population])
        rank = np.zeros(len(f), dtype=np.int64)
        crowd = np.zeros(len(f))
        for i, front in enumerate(non_dominated_sort(f, v)):
            rank[front] = i
            crowd[front] = crowding_distance(f[front])
        return rank, crowd

    def _tournament(self) -> np.ndarray:
        if self._rank_cache is None:
            self._rank_cache = self._ranks()
        rank, crowd = self._rank_cache
        i, j = self.rng.integers(len(self.population), size=2)
        better = i if (rank[i], -crowd[i]) <= (rank[j], -crowd[j]) else j
        return self.population[better][0]

    _rank_cache: tuple[np.ndarray, np.ndarray] | None = None

    def _crossover(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, bool]:
        """The child, and whether it took any slot from ``b`` (a crossover, two parents)."""
        child = a.copy()
        crossed = False
        if self.rng.random() < self.crossover_rate:
            for start, stop in self.space.slot_dims:
                if self.rng.random() < 0.5:
                    child[start:stop] = b[start:stop]
                    crossed = True
        return child, crossed and not np.array_equal(a, b)

    def _mutate(self, x: np.ndarray) -> np.ndarray:
        x = x.copy()
        hit = self.rng.random(x.size) < self.mutation_rate
        if not hit.any():  # always change something: an unchanged child is a wasted evaluation
            hit[self.rng.integers(x.size)] = True
        redraw = hit & self.is_method
        x[redraw] = self.rng.random(int(redraw.sum()))
        jitter = hit & ~self.is_method
        x[jitter] += self.rng.normal(0, self.mutation_sigma, int(jitter.sum()))
        x = np.abs(x)  # reflect at 0 and 1
        return np.where(x > 1, 2 - x, x).clip(0, 1)

    # -- tell ---------------------------------------------------------------------------
    def tell(self, xs: list[np.ndarray], scores: list[Score | None]) -> None:
        for x, s in zip(xs, scores, strict=True):
            x = np.asarray(x, dtype=np.float64)
            self.seen.add(self.space.decode(x).key())
            region = self._region(x)
            self.region_n[region] += 1
            if s is None:
                continue
            f = np.array([s[o] for o in self.objectives], dtype=np.float64)
            if not np.all(np.isfinite(f)):
                continue
            self.incoming.append((x, f, float(s.get("violation", 0.0))))
        if len(self.incoming) >= self.pop_size or (not self.population and self.incoming):
            self._select()

    def _select(self) -> None:
        """Environmental selection: the best ``pop_size`` of parents and offspring."""
        combined = self.population + self.incoming
        f = np.array([p[1] for p in combined])
        v = np.array([p[2] for p in combined])
        keep: list[int] = []
        for front in non_dominated_sort(f, v):
            if len(keep) + len(front) <= self.pop_size:
                keep.extend(front.tolist())
                continue
            crowd = crowding_distance(f[front])
            order = np.argsort(-crowd, kind="stable")
            keep.extend(front[order[: self.pop_size - len(keep)]].tolist())
            break
        survivors = set(keep)
        n_old = len(self.population)
        for i in range(n_old, len(combined)):
            if i in survivors:
                self.region_win[self._region(combined[i][0])] += 1
        self._update_archive(combined)
        self.population = [combined[i] for i in sorted(keep)]
        self.incoming = []
        self._rank_cache = None
        self.generation += 1

    def _descriptor(self, x: np.ndarray) -> np.ndarray:
        """Per-slot method one-hots: two policies differ by how many layers changed method."""
        parts = []
        for slot, (start, _) in zip(self.space.slots, self.space.slot_dims, strict=True):
            k = len(slot.methods)
            one = np.zeros(k)
            one[min(int(x[start] * k), k - 1)] = 1.0
            parts.append(one)
        return np.concatenate(parts) if parts else np.zeros(0)

    def _update_archive(self, combined: list[tuple[np.ndarray, np.ndarray, float]]) -> None:
        if self.archive_size <= 0:
            return
        pool = [p[0] for p in combined if p[2] <= 0] + self.archive
        if not pool:
            return
        d = np.array([self._descriptor(x) for x in pool])
        chosen = [0]  # start from the first feasible point, then farthest-first
        dist = np.linalg.norm(d - d[0], axis=1)
        while len(chosen) < min(self.archive_size, len(pool)):
            nxt = int(np.argmax(dist))
            if dist[nxt] <= 0:
                break
            chosen.append(nxt)
            dist = np.minimum(dist, np.linalg.norm(d - d[nxt], axis=1))
        self.archive = [pool[i] for i in chosen]

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def rows(items: list[tuple[np.ndarray, np.ndarray, float]]) -> list[list[Any]]:
            return [[x.tolist(), f.tolist(), v] for x, f, v in items]

        return {
            **super().state_dict(),
            "planes": self.planes.tolist(),
            "region_n": self.region_n.tolist(),
            "region_win": self.region_win.tolist(),
            "pending": [x.tolist() for x in self.pending],
            "population": rows(self.population),
            "incoming": rows(self.incoming),
            "archive": [x.tolist() for x in self.archive],
            "generation": self.generation,
            "seen": sorted(self.seen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)

        def rows(items: list[list[Any]]) -> list[tuple[np.ndarray, np.ndarray, float]]:
            return [(np.asarray(x), np.asarray(f), float(v)) for x, f, v in items]

        self.planes = np.asarray(state["planes"]).reshape(-1, self.space.dim)
        self.region_n = np.asarray(state["region_n"], dtype=np.float64)
        self.region_win = np.asarray(state["region_win"], dtype=np.float64)
        self.n_regions = len(self.region_n)
        self.pending = [np.asarray(x) for x in state["pending"]]
        self.population = rows(state["population"])
        self.incoming = rows(state["incoming"])
        self.archive = [np.asarray(x) for x in state["archive"]]
        self.generation = int(state["generation"])
        self.seen = set(state.get("seen", []))
        self._rank_cache = None


_RETRIES = 8  # children drawn at most per slot before a duplicate is accepted


def _auto_pop_size(budget: int | None) -> int:
    """Selection needs generations to act: a population of 32 on a budget of 100 is three
    generations, barely more than random sampling. Aim for about six generations, and keep
    at least 8 members for crossover to have material."""
    if not budget:
        return 32
    return int(min(32, max(8, int(budget) // 6)))

"""Multi-objective bookkeeping: non-dominated sorting, crowding distance, hypervolume.

All objectives are minimized. Constraint violations use Deb's constrained domination: a
feasible point beats an infeasible one, and of two infeasible points the smaller total
violation wins.
"""

from __future__ import annotations

import numpy as np


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_sort(f: np.ndarray, violation: np.ndarray | None = None) -> list[np.ndarray]:
    """Fronts (arrays of row indices), best first: the fast non-dominated sort of NSGA-II
    (Deb et al. 2002), O(M N^2), vectorized over the pairs."""
    f = np.asarray(f, dtype=np.float64)
    n = len(f)
    if n == 0:
        return []
    le = np.all(f[:, None, :] <= f[None, :, :], axis=2)
    lt = np.any(f[:, None, :] < f[None, :, :], axis=2)
    dom = le & lt  # dom[i, j]: i dominates j
    if violation is not None:
        v = np.asarray(violation, dtype=np.float64)
        feas = v <= 0
        dom = np.where(
            feas[:, None] & feas[None, :],
            dom,
            (feas[:, None] & ~feas[None, :])
            | (~feas[:, None] & ~feas[None, :] & (v[:, None] < v[None, :])),
        )
    count = dom.sum(axis=0)
    fronts = []
    current = np.flatnonzero(count == 0)
    while current.size:
        fronts.append(current)
        count = count - dom[current].sum(axis=0)
        count[current] = -1
        current = np.flatnonzero(count == 0)
    return fronts


def pareto_mask(f: np.ndarray) -> np.ndarray:
    """True for the rows no other row dominates."""
    f = np.asarray(f, dtype=np.float64)
    mask = np.zeros(len(f), dtype=bool)
    if len(f):
        mask[non_dominated_sort(f)[0]] = True
    return mask


def crowding_distance(f: np.ndarray) -> np.ndarray:
    """Per row: the perimeter of the box spanned by its neighbours on the front, each objective
    normalized by its range; the extremes get infinity so they always survive."""
    f = np.asarray(f, dtype=np.float64)
    n, m = f.shape
    d = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(f[:, k], kind="stable")
        span = f[order[-1], k] - f[order[0], k]
        d[order[0]] = d[order[-1]] = np.inf
        if span > 0:
            d[order[1:-1]] += (f[order[2:], k] - f[order[:-2], k]) / span
    return d


def hypervolume(f: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by the rows of ``f`` and bounded by ``reference`` (exact: a sweep in
    2-D, recursive slicing over the first objective above that)."""
    f = np.asarray(f, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if f.size == 0:
        return 0.0
    f = f[np.all(f < ref, axis=1)]
    if not len(f):
        return 0.0
    f = f[pareto_mask(f)]
    return _hv(f, ref)


def _hv(f: np.ndarray, ref: np.ndarray) -> float:
    if f.shape[1] == 1:
        return float(ref[0] - f[:, 0].min())
    if f.shape[1] == 2:
        order = np.argsort(f[:, 0])
        volume, best_y = 0.0, ref[1]
        for x, y in f[order]:
            if y < best_y:
                volume += (ref[0] - x) * (best_y - y)
                best_y = y
        return float(volume)
    order = np.argsort(f[:, 0])
    f = f[order]
    volume = 0.0
    for i in range(len(f)):
        upper = f[i + 1, 0] if i + 1 < len(f) else ref[0]
        width = upper - f[i, 0]
        if width <= 0:
            continue
        rest = f[: i + 1, 1:]
        rest = rest[pareto_mask(rest)]
        volume += width * _hv(rest, ref[1:])
    return float(volume)

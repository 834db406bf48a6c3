"""Deterministic 1-D k-means (Lloyd's algorithm) for weight sharing, in numpy.

Weights are scalars, so each Lloyd step is exact and cheap: on sorted values each cluster is
the run between two midpoints of neighbouring centroids, and its mean is a difference of
prefix sums. Lloyd's only finds a local optimum of ``sum (w - c[label(w)])^2``, so
it starts from greedy k-means++ seeds (each next seed is the best of a few draws with
probability proportional to the squared distance to the nearest seed so far), a few times with
fixed random seeds, and keeps the best.
Quantile starts looked natural but stall on peaked weight distributions (many centroids in the
dense centre, none in the tails): 15% worse than scikit-learn at k=16, 100x at k=256.
"""

from __future__ import annotations

import numpy as np

from graphsurgeon.memo import Memo, digest

_FIT_SAMPLE = 1 << 18  # values used to fit the centroids of a big table
_SEED_SAMPLE = 1 << 14  # values the k-means++ seeding draws from


def kmeans_1d(
    x: np.ndarray, k: int, *, iterations: int = 100, restarts: int = 4, tol: float = 1e-9
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted centroids ``[k]`` (float64) and labels (uint8 for ``k <= 256``) of ``x``.

    Big tables (embeddings) are fitted on an evenly strided sample of 2^18 values: the
    centroids of a scalar distribution are pinned down long before that. All values are
    assigned at the end.
    """
    values = np.asarray(x, dtype=np.float64).ravel()
    key = digest(values, k, iterations, restarts, tol)  # deterministic: a pure function
    return _FITS.get(key, lambda: _fit(values, k, iterations, restarts, tol))


_FITS = Memo("kmeans_1d")


def _fit(
    values: np.ndarray, k: int, iterations: int, restarts: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    data = np.sort(values[:: max(1, values.size // _FIT_SAMPLE)])
    prefix = np.concatenate([[0.0], np.cumsum(data)])
    best, best_cost = None, np.inf
    for seed in range(restarts):
        centroids = _lloyd(data, prefix, _kmeanspp(data, k, seed), iterations, tol)
        cost = float(np.sum((data - centroids[_assign(data, centroids)]) ** 2))
        if cost < best_cost:
            best, best_cost = centroids, cost
    assert best is not None
    labels = _assign(values, best)
    return best, labels.astype(np.uint8 if k <= 256 else np.int64)


def _assign(data: np.ndarray, sorted_centroids: np.ndarray) -> np.ndarray:
    return np.searchsorted((sorted_centroids[1:] + sorted_centroids[:-1]) / 2, data)


def _kmeanspp(data: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pool = data[:: max(1, data.size // _SEED_SAMPLE)]
    centroids = [pool[rng.integers(pool.size)]]
    dist = (pool - centroids[0]) ** 2
    trials = 2 + int(np.log(k))  # greedy k-means++, as scikit-learn does it
    for _ in range(k - 1):
        total = dist.sum()
        if total <= 0:
            picks = rng.integers(pool.size, size=trials)
        else:
            picks = rng.choice(pool.size, size=trials, p=dist / total)
        candidates = np.minimum(dist, (pool[None, :] - pool[picks, None]) ** 2)
        best = int(np.argmin(candidates.sum(axis=1)))
        centroids.append(pool[picks[best]])
        dist = candidates[best]
    return np.sort(np.asarray(centroids))


def _lloyd(
    data: np.ndarray, prefix: np.ndarray, centroids: np.ndarray, iterations: int, tol: float
) -> np.ndarray:
    """Lloyd's steps on sorted ``data`` (``prefix``: its cumulative sums from 0). The values
    nearest each centroid form a contiguous run between consecutive midpoints, so a step is
    ``k`` binary searches and prefix-sum differences, O(k log n) rather than O(n log k); the
    runs are exactly the clusters ``searchsorted`` over the midpoints assigns (ties go left).
    """
    scale = max(1.0, float(np.max(np.abs(data), initial=0.0)))
    for _ in range(iterations):
        cuts = np.searchsorted(data, (centroids[1:] + centroids[:-1]) / 2, side="right")
        bounds = np.concatenate([[0], cuts, [data.size]])
        counts = np.diff(bounds)
        sums = np.diff(prefix[bounds])
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))
        moved = float(np.max(np.abs(new - centroids)))
        centroids = new
        if moved <= tol * scale:
            break
    return centroids

"""Content-keyed memoization: hits return what the computation returns, never a shared array."""

from __future__ import annotations

import numpy as np
from graphsurgeon.passes._kmeans import kmeans_1d
from graphsurgeon.passes.factorize import svd_factors

from graphsurgeon.memo import Memo, digest


def test_digest_keys_on_content_dtype_and_shape() -> None:
    a = np.arange(6, dtype=np.float32)
    assert digest(a) == digest(a.copy())
    assert digest(a) != digest(a.astype(np.float64))
    assert digest(a) != digest(a.reshape(2, 3))
    b = a.copy()
    b[3] += 1e-6
    assert digest(a) != digest(b)
    assert digest(a, 1) != digest(a, 2)


def test_memo_hits_copy_and_evict(monkeypatch) -> None:
    memo = Memo("t", max_bytes=3 * 4 * 8)  # three arrays of 4 float64
    calls = []

    def compute(v: float) -> np.ndarray:
        calls.append(v)
        return np.full(4, v)

    first = memo.get("a", lambda: compute(1.0))
    first[:] = 7  # a caller changing its result must not change the memo
    assert np.array_equal(memo.get("a", lambda: compute(1.0)), np.full(4, 1.0))
    assert calls == [1.0] and memo.hits == 1
    for i in range(5):
        memo.get(f"k{i}", lambda i=i: compute(float(i)))
    memo.get("a", lambda: compute(1.0))  # evicted (least recently used): computed again
    assert calls[-1] == 1.0 and len(calls) == 7
    monkeypatch.setenv("GRAPHSURGEON_MEMO", "0")
    memo.get("a", lambda: compute(2.0))
    assert calls[-1] == 2.0


def test_memoized_svd_and_kmeans_equal_fresh(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 16)).astype(np.float32)
    hot = svd_factors(w, 4, 0.99)
    again = svd_factors(w.copy(), 4, 0.99)  # same bytes: a hit
    c_hot, _ = kmeans_1d(w, 8)
    c_again, l_again = kmeans_1d(w.copy(), 8)
    monkeypatch.setenv("GRAPHSURGEON_MEMO", "0")
    cold = svd_factors(w, 4, 0.99)
    c_cold, l_cold = kmeans_1d(w, 8)
    for x, y in zip((*hot[:2], *again[:2]), (*cold[:2], *cold[:2]), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(c_hot, c_cold)
    np.testing.assert_array_equal(c_again, c_cold)
    np.testing.assert_array_equal(l_again, l_cold)
    other = svd_factors(w * 2, 4, 0.99)  # different weights: not the cached factors
    np.testing.assert_allclose(other[0] @ other[1], 2 * (cold[0] @ cold[1]), rtol=1e-5, atol=1e-5)

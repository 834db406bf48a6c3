"""Memoized pure functions of arrays, keyed on the arrays' content.

A compression search applies hundreds of policies to one model, and most layers reach a pass
with the very weights (or the very float model) another policy already gave it: the SVD of a
weight, its k-means codebook, or the activation ranges of an unchanged float model would be
recomputed from identical inputs. The key is a digest of the actual bytes (with dtype and
shape) and the options, never a layer name, so a weight an earlier pass changed is a miss and
a hit returns exactly what the computation would. ``GRAPHSURGEON_MEMO=0`` turns memoization
off (for measuring what it saves).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("GRAPHSURGEON_MEMO", "1") != "0"


def digest(*parts: Any) -> str:
    """A content digest of arrays, bytes and plain values (their ``repr``)."""
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        if isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            h.update(f"nd{a.dtype.str}{a.shape}".encode())
            h.update(a.view(np.uint8).reshape(-1) if a.dtype != object else repr(a).encode())
        elif isinstance(part, (bytes, bytearray, memoryview)):
            h.update(b"b%d:" % len(part))
            h.update(part)
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return h.hexdigest()


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value) + 64
    if isinstance(value, dict):
        return sum(_nbytes(v) + 64 for v in value.values())
    return 64


def _copy(value: Any) -> Any:
    """A caller may change what it gets in place: a hit hands out copies of the arrays."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


class Memo:
    """A least-recently-used table of results, bounded in bytes (per process)."""

    def __init__(self, name: str, max_bytes: int = 256 << 20) -> None:
        self.name, self.max_bytes = name, max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()``, or a copy of what it returned for the same ``key`` before."""
        if not enabled():
            return compute()
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return _copy(found[0])
        value = compute()
        size = _nbytes(value)
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes and key not in self._items:
                self._items[key] = (_copy(value), size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, dropped) = self._items.popitem(last=False)
                    self._bytes -= dropped
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self.hits = self.misses = 0

"""Tuned launch configs, cached on disk per hardware profile, kernel and shape bucket.

The cache is one JSON file per profile, ``<cache dir>/<profile>.json``::

    {"profile": "h100-sxm", "device": "NVIDIA H100 80GB HBM3",
     "configs": {"w4a16_gemv|m1|n4096|k4096|b4|g32": {"config": {...}, "ms": 0.012}, ...}}

The directory is the one given to :func:`use_cache_dir` (a bundle's ``triton/tuned``), else
``$GRAPHSURGEON_TRITON_CACHE``, else ``~/.cache/graphsurgeon/triton``; the
profile is the one given to :func:`use_profile` (``graphsurgeon compile --profile``), else
``$GRAPHSURGEON_PROFILE``, else ``default``. M is bucketed to the next power of two (the
config that suits 48 rows suits 64), N and K are kept exact (they are the weight's).

Tuning times every candidate with ``triton.testing.do_bench`` and needs a CUDA GPU; it runs
when :func:`enable_tuning` was called or ``GRAPHSURGEON_TRITON_TUNE=1``. Otherwise a cached
config is used if there is one, else the kernel's default (its first candidate): the
interpreter on the CPU never tunes.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from graphsurgeon.kernels.triton._runtime import interpreting

_state: dict[str, Any] = {"profile": None, "tune": None, "dir": None}
_lock = threading.Lock()
_loaded: dict[Path, dict[str, Any]] = {}


def cache_dir() -> Path:
    if _state["dir"] is not None:
        return Path(_state["dir"])
    env = os.environ.get("GRAPHSURGEON_TRITON_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "graphsurgeon" / "triton"


def use_cache_dir(path: str | os.PathLike | None) -> None:
    """Read (and write) tuned configs in ``path``, e.g. a bundle's ``triton/tuned`` folder
    (None: back to the environment/default)."""
    _state["dir"] = None if path is None else Path(path)


def use_profile(name: str | None) -> None:
    """Key the cache by this hardware profile name (None: back to the environment/default)."""
    _state["profile"] = name


def enable_tuning(on: bool = True) -> None:
    _state["tune"] = on


def profile_name() -> str:
    return _state["profile"] or os.environ.get("GRAPHSURGEON_PROFILE") or "default"


def cache_path(profile: str | None = None) -> Path:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (profile or profile_name()))
    return cache_dir() / f"{name}.json"


def bucket_key(kernel: str, m: int, **dims: int) -> str:
    """``kernel|m<pow2>|n..|k..``: M rounded up to a power of two, other dims exact."""
    m_bucket = 1 << max(0, (max(m, 1) - 1).bit_length())
    return "|".join([kernel, f"m{m_bucket}", *(f"{k}{v}" for k, v in dims.items())])


def load_cache(profile: str | None = None) -> dict[str, Any]:
    path = cache_path(profile)
    with _lock:
        if path not in _loaded:
            data: dict[str, Any] = {"profile": profile or profile_name(), "configs": {}}
            if path.exists():
                with contextlib.suppress(OSError, ValueError):  # corrupt: costs a re-tune
                    data = json.loads(path.read_text())
            _loaded[path] = data
        return _loaded[path]


def _save(profile: str | None, data: dict[str, Any]) -> None:
    path = cache_path(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def tuning_enabled() -> bool:
    if interpreting():
        return False
    if _state["tune"] is not None:
        return bool(_state["tune"])
    return os.environ.get("GRAPHSURGEON_TRITON_TUNE", "0") == "1"


def choose(
    key: str,
    candidates: Sequence[dict[str, Any]],
    run: Callable[[dict[str, Any]], None] | None = None,
    valid: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """The config for ``key``: cached, else tuned (when enabled, by timing ``run(config)``),
    else the first valid candidate."""
    pool = [c for c in candidates if valid is None or valid(c)] or list(candidates[:1])
    data = load_cache()
    hit = data.get("configs", {}).get(key)
    if hit is not None:
        return dict(hit["config"])
    if run is None or not tuning_enabled():
        return dict(pool[0])
    import torch
    from triton.testing import do_bench

    timings = []
    for config in pool:
        try:
            timings.append((do_bench(lambda c=config: run(c), warmup=5, rep=25), config))
        except Exception:  # a config that does not fit (shared memory, registers) is skipped
            continue
    if not timings:
        return dict(pool[0])
    ms, best = min(timings, key=lambda t: t[0])
    with _lock:
        data.setdefault("configs", {})[key] = {"config": best, "ms": round(float(ms), 5)}
        data["device"] = torch.cuda.get_device_name()
        data["profile"] = profile_name()
        _save(None, data)
    return dict(best)

"""TVM Relax compilation of graphsurgeon models: import, schedule, tune, export, load.

```python
from graphsurgeon.kernels.tvm import compile_model, load, tvm_available

build = compile_model("model.onnx", profile, "out/", shapes={"input": [1, 3, 224, 224]})
fn = load(build.lib_path, build.meta_path)  # fn({"input": x}) -> {"logits": y}
```

Steps: :mod:`.importer` (static shapes, folded shape subgraphs, Relax import with our
``MatMulNBits`` converter from :mod:`.lowbit`), :mod:`.build` (target from the profile,
:mod:`.schedules` for the CPU, ``export_library``), :mod:`.sparse` (block-sparse layers as BSR
kernels), :mod:`.tune` (per-kernel search with an
on-disk database per profile), :mod:`.runtime` (Relax VM).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import onnx_ir as ir

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.profiles import HardwareProfile

__all__ = ["TvmBuild", "compile_model", "load", "tvm_available"]


def tvm_available() -> bool:
    """Whether ``import tvm`` (apache-tvm) would work, without importing it."""
    return importlib.util.find_spec("tvm") is not None


def _require_tvm() -> None:
    if not tvm_available():
        raise GraphSurgeonError("the TVM backend needs apache-tvm: pip install 'graphsurgeon[tvm]'")


def compile_model(
    model: ir.Model | str | os.PathLike,
    profile: HardwareProfile,
    out_dir: str | os.PathLike,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    tune_seconds: float = 0,
    target: Literal["cpu", "cuda"] = "cpu",
    threads: int | None = None,
    database: str | os.PathLike | None = None,
    mcpu: str | None = None,
    block_sparse: bool = True,
):
    """Compile ``model`` for ``profile`` into ``out_dir/model.so`` + ``model.json``.

    ``shapes`` fixes dynamic input dims (required if any is symbolic). ``tune_seconds > 0``
    searches kernel schedules for that long first (CPU), recording them in the profile's
    database (``database``, default ``~/.cache/graphsurgeon/tvm/<profile>.json``); records
    already there are used either way. ``threads`` defaults to the profile's thread count;
    ``mcpu`` overrides the LLVM CPU the profile implies (``"host"``: this machine's).
    ``block_sparse``: MatMul/Gemm layers whose weight is block-sparse (``prune-blocks``, at
    least :data:`.sparse.MIN_BLOCK_SPARSITY` of the blocks zero) run a BSR kernel that skips the
    zero blocks (CPU); the layers lowered are listed in ``model.json`` (``block_sparse``).
    """
    _require_tvm()
    from graphsurgeon.kernels.tvm import build as _build
    from graphsurgeon.kernels.tvm import importer, sparse, tune

    if target not in ("cpu", "cuda"):
        raise GraphSurgeonError(f"target must be 'cpu' or 'cuda', not {target!r}")
    if tune_seconds < 0:
        raise GraphSurgeonError(f"tune_seconds must be >= 0, not {tune_seconds}")
    start = time.perf_counter()
    where = None if isinstance(model, ir.Model) else os.fspath(model)
    prepared = importer.prepare(model, shapes)
    lowered = []
    if block_sparse and target == "cpu":
        lowered = sparse.lower_block_sparse(prepared)
    relax_mod = importer.to_relax(prepared, where=where)
    threads = int(threads or profile.threads())
    if target == "cuda":
        tvm_target = _build.cuda_target(profile)
        result = _build.build(
            prepared,
            relax_mod,
            Path(out_dir),
            target=tvm_target,
            profile=profile,
            threads=threads,
        )
    else:
        tvm_target = _build.cpu_target(profile, threads=threads, mcpu=mcpu)
        db = tune.Database(database or tune.default_database(profile))
        summary = {}
        if tune_seconds > 0:
            summary = tune.tune(relax_mod, tvm_target, db, seconds=tune_seconds, threads=threads)
        result = _build.build(
            prepared,
            relax_mod,
            Path(out_dir),
            target=tvm_target,
            profile=profile,
            threads=threads,
            choose=db.chooser(tvm_target),
            tuned=summary,
            block_sparse=lowered,
        )
    return _build.TvmBuild(
        result.lib_path, result.meta_path, time.perf_counter() - start, result.target
    )


def load(lib_path: str | os.PathLike, meta_path: str | os.PathLike, *, threads: int | None = None):
    """``callable(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]`` for a build."""
    _require_tvm()
    from graphsurgeon.kernels.tvm.runtime import load as _load

    return _load(lib_path, meta_path, threads=threads)


def __getattr__(name: str):
    if name == "TvmBuild":
        from graphsurgeon.kernels.tvm.build import TvmBuild

        return TvmBuild
    raise AttributeError(name)

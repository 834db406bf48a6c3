"""Schedule tuning for the CPU, with a database on disk per hardware profile.

Why not MetaSchedule: with apache-tvm 0.27.0.post1 (and apache-tvm-ffi 0.1.15.post2, the
version pip resolves for it) ``meta_schedule.tune_tir`` cannot run here. Reproduced on a
64x64 matmul, three separate problems:

1. It needs ``psutil`` (``TuneContext`` counts physical cores with it) and the wheel does not
   depend on it: ``RuntimeError: psutil is required``. Passing ``num_tuning_cores=1`` avoids it.
2. The segfault: MetaSchedule serializes IR to JSON (workloads in ``JSONDatabase``, modules
   sent to the ``LocalBuilder``'s popen workers, task setup), and ``tvm_ffi.ToJSONGraph``
   crashes on *any* object with a ``DataType`` field. ``tvm.ir.save_json(tvm.ir.PrimType(
   "int32"))`` alone segfaults (gdb: frame 3 ``tvm::ffi::ToJSONGraph`` in ``libtvm_ffi.so``);
   ``IntImm``, ``Var``, ``Range`` too, while a ``TupleType`` or an ``Op`` serialize fine. Every
   TIR function holds such objects, so ``tune_tir`` dies at start even with an in-process
   builder and a ``MemoryDatabase``. It is a bug of the FFI's JSON graph writer for POD
   ``DataType`` fields (not threads, forking, the RPC runner or a cost model: none of those
   have started when it crashes). Fixing it needs a new tvm-ffi/TVM build; not ours to patch.
3. ``import tvm.s_tir.tensor_intrin`` (done by every ``TuneContext``) takes 55 s of CPU
   (2 minutes on a shared 2-core machine) parsing TVMScript intrinsics for all targets.

The workaround: hand schedules (:mod:`.schedules`) with a few knobs, and this tuner, which
times each candidate in-process (``time_evaluator`` on random inputs, the TIR kernel built
alone) and keeps the fastest per kernel. Kernels are tuned largest first until the time budget
is spent. Records are keyed by the kernel's structural hash and the target, so a model that
shares kernels with one tuned before (same shapes) reuses them, and they persist in one JSON
file per profile (``~/.cache/graphsurgeon/tvm/<profile>.json``, written atomically).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from graphsurgeon.kernels.tvm.schedules import Knobs, schedule_func, simd_lanes

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.profiles import HardwareProfile

DB_FORMAT = "graphsurgeon-tvm-tuning/1"


def default_database(profile: HardwareProfile) -> Path:
    root = Path(os.environ.get("GRAPHSURGEON_CACHE", Path.home() / ".cache" / "graphsurgeon"))
    return root / "tvm" / f"{profile.name}.json"


class Database:
    """Best knobs per (target, kernel structural hash), in a JSON file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise GraphSurgeonError(
                    f"not a valid tuning database: {e}", where=self.path
                ) from None
            if not isinstance(data, dict) or data.get("format") != DB_FORMAT:
                raise GraphSurgeonError(f"not a {DB_FORMAT} database", where=self.path)
            self.records = data["records"]

    @staticmethod
    def key(func, target) -> str:
        import tvm_ffi

        return f"{target}|{tvm_ffi.structural_hash(func) & (2**64 - 1):016x}"

    def get(self, func, target) -> Knobs | None:
        record = self.records.get(self.key(func, target))
        return Knobs(**record["knobs"]) if record else None

    def put(self, func, target, knobs: Knobs, **info) -> None:
        self.records[self.key(func, target)] = {"knobs": asdict(knobs), **info}

    def chooser(self, target):
        return lambda func: self.get(func, target) or Knobs()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": DB_FORMAT, "records": dict(sorted(self.records.items()))}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)


def candidates(target) -> list[Knobs]:
    """The search space, the default first: vector lanes x rows per step x parallel."""
    lanes = simd_lanes(target)
    space = [Knobs()]
    for parallel in (True, False):
        for vector in (lanes, 2 * lanes, lanes // 2, 4 * lanes):
            for rows in (8, 4, 16, 1):
                knobs = Knobs(vector=vector, rows=rows, parallel=parallel)
                if knobs != Knobs(vector=lanes) and knobs not in space:  # == the default
                    space.append(knobs)
    return space


def kernel_work(func) -> int:
    """Iterations of the kernel's loop nests (buffer sizes as a proxy): tune big ones first."""
    return sum(math.prod(int(d) for d in param.shape) for param in func.params)


def tune(relax_mod, target, db: Database, *, seconds: float, threads: int) -> dict:
    """Search knobs for the model's kernels for about ``seconds``; returns a summary."""
    from graphsurgeon.kernels.tvm.build import fused_kernels
    from graphsurgeon.kernels.tvm.runtime import set_threads
    from tvm import tirx

    deadline = time.perf_counter() + seconds
    set_threads(threads)
    fused = fused_kernels(relax_mod, target)
    kernels = [
        (gv.name_hint, f) for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)
    ]
    kernels.sort(key=lambda item: -kernel_work(item[1]))
    tuned, reused, speedups = 0, 0, []
    for name, func in kernels:
        if time.perf_counter() > deadline:
            break
        if db.get(func, target) is not None:
            reused += 1
            continue
        best = _search(func, target, deadline)
        if best is None:
            continue
        knobs, sec, default_sec = best
        db.put(func, target, knobs, kernel=name, seconds=sec, default_seconds=default_sec)
        tuned += 1
        speedups.append(default_sec / sec if sec > 0 else 1.0)
        db.save()
    return {
        "kernels": len(kernels),
        "tuned": tuned,
        "reused": reused,
        "database": str(db.path),
        "geomean_kernel_speedup": float(np.exp(np.mean(np.log(speedups)))) if speedups else 1.0,
    }


def _search(func, target, deadline: float) -> tuple[Knobs, float, float] | None:
    import tvm

    args = None
    results: list[tuple[float, Knobs]] = []
    for knobs in candidates(target):
        if results and time.perf_counter() > deadline:
            break
        sch = schedule_func(func, target, knobs)
        if sch is None:
            if not results:
                return None  # no rule applies: nothing to tune
            continue
        try:
            lib = build_kernel(sch.mod["main"], target)
        except Exception:
            continue
        if args is None:
            args = _random_args(func)
        timer = lib.time_evaluator("main", tvm.cpu(0), number=3, repeat=3, min_repeat_ms=5)
        results.append((float(np.median(timer(*args).results)), knobs))
    if not results:
        return None
    best_sec, best = min(results, key=lambda r: r[0])
    return best, best_sec, results[0][0]


def build_kernel(func, target):
    """One TIR kernel alone, callable as ``main`` (Relax's fused kernels carry no symbol)."""
    import tvm

    func = func.with_attr("global_symbol", "main")
    return tvm.tirx.build(tvm.IRModule({"main": func}), target=target)


def _random_args(func):
    import tvm

    rng = np.random.default_rng(0)
    args = []
    for param in func.params:  # TIR params are typed buffers in TVM 0.27
        shape = [int(d) for d in param.shape]
        dtype = str(param.dtype)
        if dtype.startswith(("int", "uint")):
            array = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype == "bool":
            array = rng.integers(0, 2, size=shape).astype(bool)
        else:
            array = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(array, tvm.cpu(0)))
    return args

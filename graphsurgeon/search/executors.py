"""Where evaluations run: in this process, in a local process pool, or as Ray tasks.

``map_unordered(fn, items)`` yields ``(index, result)`` as each item finishes, or
``(index, exception)`` if ``fn`` raised: one failed evaluation never stops the others. ``fn``
must be picklable (a module-level function or a small picklable object) for the pool and Ray;
heavy state (the model, datasets) should be loaded once per worker, not shipped per item (see
:class:`graphsurgeon.search.evaluate.EvalTask`).
"""

from __future__ import annotations

import multiprocessing
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from graphsurgeon.errors import GraphSurgeonError


class Executor(ABC):
    workers: int = 1

    @abstractmethod
    def map_unordered(
        self, fn: Callable[[Any], Any], items: Iterable[Any]
    ) -> Iterator[tuple[int, Any | BaseException]]:
        """``(index, fn(item) or the exception it raised)`` in completion order."""

    def close(self) -> None:  # noqa: B027  (optional)
        """Release workers."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialExecutor(Executor):
    """Evaluations in this process, one at a time (``--workers 1``; no start-up cost)."""

    def map_unordered(
        self, fn: Callable[[Any], Any], items: Iterable[Any]
    ) -> Iterator[tuple[int, Any | BaseException]]:
        for i, item in enumerate(items):
            try:
                yield i, fn(item)
            except Exception as e:
                yield i, e


def _worker_init() -> None:
    # each worker is one evaluation at a time: keep onnxruntime and BLAS to one thread each,
    # unless the latency is being measured (measure.py pins threads itself)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("GRAPHSURGEON_WORKER", "1")


class LocalExecutor(Executor):
    """A pool of ``workers`` spawned processes (spawned, not forked: onnxruntime's thread pools
    do not survive a fork). At most ``2 * workers`` items are in flight, so a population of
    10,000 is submitted lazily."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
        )

    def map_unordered(
        self, fn: Callable[[Any], Any], items: Iterable[Any]
    ) -> Iterator[tuple[int, Any | BaseException]]:
        pending: dict[Future, int] = {}
        source = enumerate(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * self.workers:
                try:
                    i, item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending[self._pool.submit(fn, item)] = i
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                error = future.exception()
                yield (i, error) if error is not None else (i, future.result())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_executor(kind: str = "local", workers: int = 1, address: str | None = None) -> Executor:
    """``local`` (a process pool, or this process for one worker) or ``ray`` (tasks on the
    cluster at ``address``, else ``RAY_ADDRESS``, else a local Ray)."""
    if kind == "local":
        if address:
            raise GraphSurgeonError("--ray-address needs --executor ray")
        return SerialExecutor() if workers <= 1 else LocalExecutor(workers)
    if kind == "ray":
        try:
            from graphsurgeon.search.ray_executor import RayExecutor
        except ModuleNotFoundError as e:
            raise GraphSurgeonError(
                f"--executor ray needs {e.name} (pip install 'ray>=2.9')"
            ) from None
        return RayExecutor(workers, address)
    raise GraphSurgeonError(f"--executor must be local or ray, not {kind!r}")

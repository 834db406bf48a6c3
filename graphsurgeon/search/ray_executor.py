"""Run search evaluations as Ray tasks, on a local head or across a cluster.

Why Ray: a search may evaluate thousands of policies, each an independent apply-verify-score
job. Ray tasks spread them over every core of every machine of a cluster. The evaluation
function is put into the object store once per map and deserialized once per worker process,
so whatever it loads lazily onto itself stays loaded for the next items. (The search's
evaluation task reads the model and data files by path: on a multi-machine cluster they must
exist at the same path on every node.)

A failing item never stops the map: an exception raised by ``fn`` comes back as that item's
result (with the remote traceback attached as a note), and so does a task Ray itself could not
finish (a worker killed by the OOM killer or a segfault in a kernel).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.search.executors import Executor

#: Per worker process: the evaluation function of each map, deserialized once, so state it
#: loads lazily on itself (the model, the datasets) is loaded once per worker, not per item.
_FUNCTIONS: dict[str, Callable[[Any], Any]] = {}


def _call(boxed_fn: list[Any], item: Any) -> tuple[bool, Any]:
    """Run one item inside a Ray worker; exceptions become values so Ray does not wrap them."""
    import ray

    try:
        (ref,) = boxed_fn  # boxed: Ray resolves top-level refs only, this one is resolved here
        key = ref.hex()
        fn = _FUNCTIONS.get(key)
        if fn is None:
            _FUNCTIONS.clear()  # a new map: drop the previous map's function and its state
            fn = _FUNCTIONS[key] = ray.get(ref)
        return True, fn(item)
    except Exception as exc:  # every failure is a result of its own item
        exc.add_note("remote traceback:\n" + traceback.format_exc())
        return False, exc


def _driver_path() -> str:
    paths = [p or os.getcwd() for p in sys.path]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(dict.fromkeys(paths))


class RayExecutor(Executor):
    """An executor whose workers are Ray tasks.

    ``address`` (or ``RAY_ADDRESS``) names a running cluster; without one a private head is
    started on loopback with ``workers`` CPUs and shut down again by :meth:`close`. Each task
    asks Ray for ``cpus_per_task`` CPUs, so at most ``workers`` evaluations run at once on a
    local head; at most ``max_in_flight`` (default ``2 * workers``) items are submitted ahead so
    that a 10,000-policy map does not queue 10,000 tasks at once.
    """

    def __init__(
        self,
        workers: int = 1,
        address: str | None = None,
        *,
        cpus_per_task: float = 1.0,
        max_in_flight: int | None = None,
        max_retries: int = 1,
    ) -> None:
        try:
            import ray
        except ImportError as exc:  # ray is an optional extra
            raise GraphSurgeonError(
                "--executor ray needs the 'ray' package: pip install 'graphsurgeon[ray]'"
            ) from exc
        if workers < 1:
            raise GraphSurgeonError(f"--workers must be at least 1 (got {workers})")
        self._ray = ray
        self.workers = workers
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.max_in_flight = max_in_flight or 2 * workers
        self._owns_ray = False
        self._shared: tuple[Callable[[Any], Any], Any] | None = None
        if not ray.is_initialized():
            self._owns_ray = True
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False, configure_logging=False)
                else:
                    self._start_local_head(workers)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                self._owns_ray = False
                if self.address:
                    problem = (
                        f"--ray-address/RAY_ADDRESS {self.address}: cannot connect to the Ray "
                        f"cluster ({exc}); a cluster with token authentication also needs "
                        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
                    )
                else:
                    problem = f"--executor ray: cannot start a local Ray head ({exc})"
                raise GraphSurgeonError(problem) from exc
        self._task = ray.remote(num_cpus=cpus_per_task, max_retries=max_retries)(_call)

    def _start_local_head(self, workers: int) -> None:
        """A private head on loopback. Its workers get this process's ``sys.path`` (as a
        spawned process pool does), so what imports here imports there: a ``--metric``
        module next to the model, a script's own functions. It is set in the environment the
        head inherits rather than as a ``runtime_env``, which would have Ray's runtime-env
        agent set up every worker."""
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = _driver_path()
        try:
            self._ray.init(
                address="local",
                num_cpus=workers,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                _node_ip_address="127.0.0.1",
            )
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved

    def map_unordered(
        self, fn: Callable[[Any], Any], items: Iterable[Any]
    ) -> Iterator[tuple[int, Any | BaseException]]:
        """Yield ``(index, result or exception)`` for each item as its task finishes."""
        ray = self._ray
        if self._shared is None or self._shared[0] is not fn:  # same fn each generation: reuse
            self._shared = (fn, ray.put(fn))  # serialized once, deserialized once per worker
        fn_ref = self._shared[1]
        pending: dict[Any, int] = {}
        source = iter(enumerate(items))
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.max_in_flight:
                    try:
                        index, item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    pending[self._task.remote([fn_ref], item)] = index
                if not pending:
                    return
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    index = pending.pop(ref)
                    try:
                        _ok, value = ray.get(ref)
                    except Exception as exc:  # the task died: worker crash, OOM, lost node
                        value = exc
                    yield index, value
        finally:  # the caller stopped early (budget reached, Ctrl-C): drop the queued tasks
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        """Shut down the head this executor started; a cluster someone else runs is left alone."""
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False
        self._shared = None

"""Load an exported TVM library and call it like a model: ``feed dict -> output dict``.

The library holds a Relax VM executable whose ``main`` takes the inputs positionally; the
JSON file written next to it by :mod:`.build` gives their names, shapes and dtypes, so a feed
is checked (one clear error naming the input) before anything runs. A runner is not
thread-safe (neither is the VM): give each thread its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from graphsurgeon.kernels.tvm.build import META_FORMAT

from graphsurgeon.errors import GraphSurgeonError

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def read_meta(meta_path: str | os.PathLike) -> dict:
    path = Path(meta_path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise GraphSurgeonError("no such file", where=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphSurgeonError(f"not valid JSON: {e}", where=path) from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise GraphSurgeonError(f"not a {META_FORMAT} metadata file", where=path)
    return meta


def set_threads(threads: int) -> None:
    """Size TVM's CPU thread pool (affinity mode 0: no pinning, other jobs share the cores)."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(0, int(threads))


def load(
    lib_path: str | os.PathLike, meta_path: str | os.PathLike, *, threads: int | None = None
) -> Runner:
    """A callable running the library on the CPU (or the GPU it was built for)."""
    import tvm
    from tvm import relax

    meta = read_meta(meta_path)
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise GraphSurgeonError("no such file", where=lib_path)
    if meta["device"] == "cuda":
        device = tvm.cuda(0)
        if not device.exist:
            raise GraphSurgeonError("built for CUDA, but no CUDA GPU is visible", where=lib_path)
    else:
        device = tvm.cpu(0)
        set_threads(threads or meta.get("threads") or os.cpu_count() or 1)
    try:
        lib = tvm.runtime.load_module(str(lib_path))
    except Exception as e:
        raise GraphSurgeonError(f"not a loadable TVM library: {e}", where=lib_path) from None
    vm = relax.VirtualMachine(lib, device)
    main = vm["main"]
    inputs, outputs = meta["inputs"], meta["outputs"]
    on_cpu = meta["device"] != "cuda"
    # On the CPU a small model's call is mostly overhead (the digits CNN's kernels take ~7 us):
    # building a TVM tensor from a numpy array costs ~10 us, ``.numpy()`` another ~5 us. So each
    # input gets one TVM tensor, allocated once (64-byte aligned, as the kernels assume), and a
    # numpy view of it that every feed is copied into; outputs come back as numpy views of the
    # VM's fresh output tensors (DLPack, no copy).
    staged = {}
    if on_cpu:
        for spec in inputs:
            if spec["shape"] is not None and spec["dtype"]:
                tensor = tvm.runtime.empty(spec["shape"], spec["dtype"], device)
                staged[spec["name"]] = (tensor, np.from_dlpack(tensor))

    def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = []
        for spec in inputs:
            name = spec["name"]
            if name not in feed:
                raise GraphSurgeonError(
                    f"feed has no input {name!r} (inputs: {', '.join(s['name'] for s in inputs)})"
                )
            array = np.asarray(feed[name])
            if spec["shape"] is not None and list(array.shape) != spec["shape"]:
                raise GraphSurgeonError(
                    f"input {name!r} has shape {list(array.shape)}, but the library was "
                    f"compiled for {spec['shape']}"
                )
            if spec["dtype"] and array.dtype != np.dtype(spec["dtype"]):
                raise GraphSurgeonError(
                    f"input {name!r} is {array.dtype}, the library wants {spec['dtype']}"
                )
            if name in staged:
                tensor, view = staged[name]
                np.copyto(view, array)
                args.append(tensor)
            else:
                args.append(tvm.runtime.tensor(np.ascontiguousarray(array), device))
        result = main(*args)
        values = [result] if hasattr(result, "numpy") else list(result)
        if not on_cpu:
            return {spec["name"]: v.numpy() for spec, v in zip(outputs, values, strict=True)}
        out = {}
        for spec, value in zip(outputs, values, strict=True):
            array = np.from_dlpack(value)
            if any(np.shares_memory(array, view) for _, view in staged.values()):
                array = array.copy()  # an output that is an input: not our staging buffer
            out[spec["name"]] = array
        return out

    run.meta = meta  # type: ignore[attr-defined]
    return run

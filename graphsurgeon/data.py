"""Model inputs: ``.npz`` data files and generated inputs.

A data file is keyed by input name, with a leading sample axis. An array of the input's rank
is batched along its first (batch) axis: ``(N, 1, 8, 8)`` for an input ``[batch, 1, 8, 8]``.
An array of one more dim holds whole input tensors, fed one at a time. An optional
``labels`` array holds one label per sample.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphsurgeon.errors import DataError

Feed = dict[str, np.ndarray]
DEFAULT_DIM = 32  # generated value for a symbolic non-batch dim (sequence, height...)


@dataclass
class Dataset:
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    batched: dict[str, bool]  # True: the sample axis is the input's batch dim
    fixed_batch: int | None = None  # the batch dim's value when the model fixes it

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def feeds(self, max_samples: int | None = None, batch_size: int = 16) -> list[Feed]:
        """Input dicts covering up to ``max_samples`` samples (whole batches only when the
        model's batch dim is fixed)."""
        n = len(self) if max_samples is None else min(len(self), max_samples)
        if all(self.batched.values()):
            step = self.fixed_batch or batch_size
            if self.fixed_batch:
                n = max(step, n - n % step)
            end = n if not self.fixed_batch else len(self)  # a fixed batch is never cut short
            return [
                {k: a[i : min(i + step, end)] for k, a in self.arrays.items()}
                for i in range(0, n, step)
                if i + step <= len(self) or not self.fixed_batch
            ]
        return [
            {k: (a[i : i + 1] if self.batched[k] else a[i]) for k, a in self.arrays.items()}
            for i in range(n)
        ]


def _np_dtype(dtype: ir.DataType | None) -> np.dtype | None:
    try:
        return None if dtype is None else dtype.numpy()
    except Exception:
        return None


def load_npz(path: str | os.PathLike, model: ir.Model) -> Dataset:
    """Load and validate a data file against the model's inputs."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", where=path)
    if not zipfile.is_zipfile(path):  # np.load would take other bytes for .npy or a pickle
        raise DataError("not a .npz file (an .npz is a zip of arrays; see numpy.savez)", where=path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(f"not a valid .npz file ({e})", where=path) from None
    labels = arrays.pop("labels", None)
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    missing = [v.name for v in inputs if v.name not in arrays]
    if missing:
        raise DataError(
            f"missing input(s) {', '.join(missing)} (file has: {', '.join(sorted(arrays)) or 'nothing'})",
            where=path,
        )
    data, batched = {}, {}
    fixed: set[int] = set()
    counts = set()
    for value in inputs:
        array = arrays[value.name]
        want = _np_dtype(value.dtype)
        if want is not None and array.dtype != want:
            raise DataError(
                f"input {value.name!r} has dtype {array.dtype}, the model wants {want}", where=path
            )
        batched[value.name] = _check_shape(value, array, path)
        data[value.name] = array
        if batched[value.name] and value.shape is not None and isinstance(value.shape[0], int):
            fixed.add(int(value.shape[0]))
        counts.add(len(array))
    if len(counts) > 1:
        raise DataError(f"inputs have different sample counts {sorted(counts)}", where=path)
    if counts == {0}:
        raise DataError("has no samples", where=path)
    if labels is not None and len(labels) != counts.pop():
        raise DataError("labels has a different sample count than the inputs", where=path)
    if len(fixed) > 1:
        raise DataError(f"inputs fix different batch sizes {sorted(fixed)}", where=path)
    return Dataset(data, labels, batched, fixed.pop() if fixed else None)


def _check_shape(value: ir.Value, array: np.ndarray, path: Path) -> bool:
    shape = value.shape
    if shape is None:
        return True
    dims = list(shape)
    if array.ndim == len(dims) and dims:
        # The sample axis is the batch axis; a fixed batch b takes samples b at a time.
        per_sample, batched = dims[1:], True
        if isinstance(dims[0], int) and array.shape[0] < dims[0]:
            raise DataError(
                f"input {value.name!r} has {array.shape[0]} samples; the model's batch is {dims[0]}",
                where=path,
            )
    elif array.ndim == len(dims) + 1:
        per_sample, batched = dims, False
    else:
        raise DataError(
            f"input {value.name!r} has shape {list(array.shape)}; the model wants "
            f"(samples, {', '.join(map(_dim_text, dims))})",
            where=path,
        )
    got = array.shape[1:]
    for i, (d, g) in enumerate(zip(per_sample, got, strict=False)):
        if isinstance(d, int) and d != g:
            raise DataError(
                f"input {value.name!r} has shape {list(array.shape)}; dim {i + (1 if batched else 0)} "
                f"must be {d}",
                where=path,
            )
    return batched


def _dim_text(d: object) -> str:
    return str(d) if isinstance(d, int) else (getattr(d, "value", None) or "?")


def generate_inputs(
    model: ir.Model, *, seed: int = 0, batch: int = 1, dims: Mapping[str, int] | None = None
) -> Feed:
    """Random inputs of the right dtypes and shapes, with sane values for ints and bools.

    Symbolic dims take ``dims[name]``, else ``batch`` for a leading dim, else
    ``DEFAULT_DIM``. Integer inputs are small non-negative numbers (valid token ids, indices
    and type ids), inputs named like masks are all ones (an all-zero attention mask makes
    softmax undefined), bools are True.
    """
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feed: Feed = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = _np_dtype(value.dtype) or np.dtype(np.float32)
        shape = []
        for i, d in enumerate(value.shape or []):
            if isinstance(d, int):
                shape.append(d)
            elif d.value in dims:
                shape.append(int(dims[d.value]))
            else:
                shape.append(batch if i == 0 else DEFAULT_DIM)
        name = (value.name or "").lower()
        if dtype == np.bool_:
            array = np.ones(shape, dtype=np.bool_)
        elif np.issubdtype(dtype, np.integer):
            if "mask" in name:
                array = np.ones(shape, dtype=dtype)
            elif "type" in name or "segment" in name or "position" in name:
                array = np.zeros(shape, dtype=dtype)
            else:
                array = rng.integers(0, 4, size=shape).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            array = rng.standard_normal(shape).astype(dtype)
        else:
            array = np.zeros(shape, dtype=dtype)
        feed[value.name] = array
    return feed

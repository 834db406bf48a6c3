"""Loading ONNX files into ``onnx_ir`` and saving them back, safely.

Loading never copies weights: embedded tensors stay views on the parsed protobuf and external
tensors are memory-mapped lazily by onnx_ir. Before anything is deserialized, every external
data reference is checked: a location that is absolute or resolves outside the model's folder
(``../../etc/passwd``, a symlink out) is refused, because loading it would read arbitrary files.

Saving is atomic (temp files in the target folder, then ``os.replace``) and deterministic:
the same model gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphsurgeon import onnx_api
from graphsurgeon.errors import GraphSurgeonError, ModelError
from graphsurgeon.shapes import apply_input_shapes
from graphsurgeon.stream_save import save_embedded
from graphsurgeon.verify import dangling_value

# Protobuf cannot serialize messages over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors below this stay inside the .onnx file when saving with external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def load(path: str | os.PathLike, *, shapes: Mapping[str, Sequence[int]] | None = None) -> ir.Model:
    """Load and check an ONNX file. Raises :class:`ModelError` naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise ModelError("no such file", where=path)
    if not path.is_file():
        raise ModelError("not a file", where=path)
    if path.stat().st_size == 0:
        raise ModelError("file is empty", where=path)
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except DecodeError as e:
        raise ModelError(
            f"not a valid ONNX protobuf (truncated or corrupt file: {_first_line(e)})", where=path
        ) from None
    except Exception as e:  # onnx raises assorted errors for unreadable input
        raise ModelError(f"cannot read the file as ONNX: {_first_line(e)}", where=path) from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelError(
            "not an ONNX model (no graph, IR version or opset import; garbage or truncated bytes?)",
            where=path,
        )
    check_external_data(proto, path.parent, where=path)
    try:
        with _quiet_ir_logger():
            model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise ModelError(f"cannot convert to the IR: {_first_line(e)}", where=path) from None
    problem = dangling_value(model)
    if problem:
        raise ModelError(f"invalid graph: {problem}", where=path)
    ir.external_data.set_base_dir(model.graph, os.fspath(path.parent))
    check_model(model, where=path)
    if shapes:
        apply_input_shapes(model, shapes, where=os.fspath(path))
    return model


@contextlib.contextmanager
def _quiet_ir_logger() -> Iterator[None]:
    """onnx_ir logs (rather than raises) when a graph reads values nothing defines; we report
    that ourselves, as one error, so its log lines must not reach stderr."""
    logger = logging.getLogger("onnx_ir")  # its modules' loggers inherit this level
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_model(model: ir.Model, *, where: str | os.PathLike | None = None) -> None:
    """Run the ONNX checker without serializing weights (big initializers are stripped)."""
    try:
        onnx_api.check(model)
    except Exception as e:
        raise ModelError(f"fails the ONNX checker: {_first_line(e)}", where=where) from None


def _iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
            if attr.HasField("g"):
                yield from _iter_tensor_protos(attr.g)
            for g in attr.graphs:
                yield from _iter_tensor_protos(g)


def check_external_data(proto: onnx.ModelProto, base_dir: Path, *, where: Path) -> None:
    """Refuse external data that escapes ``base_dir`` or points at missing/short files."""
    base = base_dir.resolve()
    tensors = list(_iter_tensor_protos(proto.graph))
    for fn in proto.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        name = tensor.name or "<unnamed>"
        if not location:
            raise ModelError(f"tensor {name!r} has external data without a location", where=where)
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location[:2]:
            raise ModelError(
                f"tensor {name!r} has external data at absolute path {location!r}; refused: "
                "external data must live in the model's folder",
                where=where,
            )
        target = (base / location).resolve()
        if target != base and base not in target.parents:
            raise ModelError(
                f"tensor {name!r} has external data {location!r} outside the model's folder; "
                "refused for security",
                where=where,
            )
        if not target.is_file():
            raise ModelError(
                f"tensor {name!r}: external data file {location!r} is missing", where=where
            )
        try:
            offset = int(info.get("offset", 0) or 0)
            length = None if info.get("length") in (None, "") else int(info["length"])
        except ValueError:
            raise ModelError(
                f"tensor {name!r}: external data offset/length are not integers "
                f"(offset {info.get('offset')!r}, length {info.get('length')!r})",
                where=where,
            ) from None
        if offset < 0 or (length is not None and length < 0):
            raise ModelError(
                f"tensor {name!r}: external data has a negative offset or length", where=where
            )
        nbytes = _tensor_nbytes(tensor)
        if length is not None and nbytes is not None and length < nbytes:
            raise ModelError(
                f"tensor {name!r}: external data length {length} is smaller than the "
                f"tensor's {nbytes} bytes",
                where=where,
            )
        needed = offset + (length if length is not None else (nbytes or 0))
        size = target.stat().st_size
        if needed > size:
            raise ModelError(
                f"tensor {name!r}: external data file {location!r} is truncated "
                f"(needs {needed} bytes, has {size})",
                where=where,
            )


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dims and dtype call for, or None if its dtype is unknown."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except Exception:
        return None
    numel = 1
    for d in tensor.dims:
        numel *= d
    return (numel * bits + 7) // 8


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by initializers of the main graph and its subgraphs."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def has_external_data(model: ir.Model) -> bool:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return True
    return False


def save(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None
) -> list[Path]:
    """Save atomically and deterministically. Returns the files written.

    ``external_data=None`` keeps weights external when the source had external data or when
    they would not fit in one protobuf (2 GiB), else embeds them. External weights go to
    ``<name>.data`` beside the model.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise GraphSurgeonError("output folder does not exist", where=parent)
    if external_data is None:
        external_data = has_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    elif not external_data and has_external_data(model):
        ir.external_data.load_to_model(model)  # embedding needs the bytes in memory
    data_name = path.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".gs-tmp-", dir=parent))
    except OSError as e:
        raise GraphSurgeonError(f"cannot write here: {e.strerror}", where=parent) from None
    written: list[Path] = []
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            ir.save(
                model,
                tmp_model,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
            )
        else:
            save_embedded(model, tmp_model)
        # Data first, model last: a reader never sees a model whose data is not there yet.
        tmp_data = tmp_dir / data_name
        if tmp_data.exists():
            os.replace(tmp_data, parent / data_name)
            written.append(parent / data_name)
        os.replace(tmp_model, path)
        written.append(path)
    except OSError as e:
        raise GraphSurgeonError(f"cannot write the model: {e.strerror or e}", where=path) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return written


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temp file beside ``path`` and move it into place only if the block succeeds."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise GraphSurgeonError(f"cannot write here: {e.strerror}", where=parent) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise GraphSurgeonError(f"cannot write: {e.strerror or e}", where=path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("=="):
            return line[:300]
    return text[:300]

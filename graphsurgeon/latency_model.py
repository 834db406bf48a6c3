"""A fast latency estimate for search: a per-layer lookup table measured on the device, with an
estimate fitted to that table (or, with too few entries, the roofline) wherever the table has
no entry.

A layer's latency depends on what it computes, so the table is keyed by a *signature*: op,
input and weight shapes, weight dtype (bits), sparsity and the attributes that change the
work (strides, groups...). ``calibrate`` extracts each layer into a one-node model (its
constant inputs and their DequantizeLinear/Cast chains included, via onnx's Extractor), times
it in onnxruntime with the profile's threads, in turn with the other new nodes over several
rounds, and stores its quietest round's median. Tables are JSON files, one per profile, cached
under ``~/.cache/graphsurgeon/latency`` (``GRAPHSURGEON_CACHE``).

A signature the table lacks (a layer pruned to a width never timed) is charged by its op
type's cost law fitted over the table's entries of that op, ``a * flops + b * bytes + c``
(non-negative least squares): this device's measured throughput, not the datasheet's. With
fewer than three entries of an op, the roofline ``max(flops / peak[dtype], bytes /
bandwidth)`` is used: the time of whichever of compute and memory traffic is the bottleneck.

The nodes are those of the graph onnxruntime actually runs (:func:`runtime_graph`: its
optimizer's output, MatMul+Add as Gemm, Add+LayerNormalization as SkipLayerNormalization,
Conv+Relu fused...), so a fusion is timed as the one kernel it is rather than charged as the
nodes it replaced. What remains between a node timed alone and inside the model (a weight
read cold in a sequence of layers costs more than one read hot in a loop) ``fit_corrections``
learns from whole models measured end to end: the prediction becomes ``offset + sum over op
types of scale[op] x (the table time of that op type's nodes)``, with the scales fitted by
least squares, regularized toward 1 (no correction) so that a few measured models cannot
overfit, and kept non-negative. The scales live in the table's file beside the entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx.utils import Extractor

from graphsurgeon.data import generate_inputs
from graphsurgeon.latency import measure_interleaved, session_for
from graphsurgeon.layers import Layer, find_layers
from graphsurgeon.measure import available_cpus
from graphsurgeon.model_io import atomic_write
from graphsurgeon.profiles import HardwareProfile
from graphsurgeon.shapes import static_dims

_WORK_ATTRS = (
    "strides",
    "dilations",
    "group",
    "pads",
    "kernel_shape",
    "transA",
    "transB",
    "auto_pad",
)
_DTYPE = {
    "INT8": "int8",
    "UINT8": "int8",
    "INT4": "int4",
    "UINT4": "int4",
    "FLOAT16": "fp16",
    "BFLOAT16": "bf16",
}


def cache_dir() -> Path:
    root = os.environ.get("GRAPHSURGEON_CACHE") or Path.home() / ".cache" / "graphsurgeon"
    return Path(root) / "latency"


def node_signature(node: ir.Node, layer: Layer | None = None) -> str | None:
    """Everything that changes a node's work, or None if an input shape is not static.

    Inputs are described by dtype and shape (the values of small constant inputs, like a
    Reshape's target shape, change no work); a layer's weight adds its sparsity.
    """
    inputs = []
    for value in node.inputs:
        if value is None:
            inputs.append(None)
            continue
        dims = static_dims(value.shape)
        if dims is None and value.const_value is not None:
            dims = list(value.const_value.shape)
        if dims is None:
            return None
        inputs.append([value.dtype.name if value.dtype else "?", dims])
    key: dict[str, object] = {
        "op": f"{node.domain}::{node.op_type}" if node.domain else node.op_type,
        "inputs": inputs,
        "attrs": {
            k: _attr_value(a)
            for k, a in sorted(node.attributes.items())
            if k in _WORK_ATTRS or a.type != ir.AttributeType.GRAPH
        },
    }
    if layer is not None:
        weight = layer.weight.numpy() if layer.weight.size <= 1 << 24 else None
        key["weight"] = [layer.weight.dtype.name, list(layer.weight.shape)]
        key["sparsity"] = 0.0 if weight is None else round(float(np.mean(weight == 0)) * 20) / 20
    return json.dumps(key, sort_keys=True, default=str)


def _attr_value(attr: ir.Attr) -> object:
    value = attr.value
    return list(value) if isinstance(value, (list, tuple)) else value


@dataclass
class LatencyTable:
    profile: str
    entries: dict[str, float] = field(default_factory=dict)
    #: per op type multipliers and a constant (seconds), fitted on whole models
    scales: dict[str, float] = field(default_factory=dict)
    offset: float = 0.0
    #: per entry: op type, FLOPs and bytes moved, for the per-op fit of unseen signatures
    features: dict[str, list] = field(default_factory=dict)

    def op_fit(self, key: str) -> tuple[float, float, float, float] | None:
        """``(seconds per FLOP, seconds per byte, seconds per node, RMS relative error)`` of
        the kernel family ``key`` (:func:`fit_key`) on this device: a non-negative
        least-squares fit over its entries; None with fewer than three."""
        if self._fits is None:
            self._fits = _fit_ops(self)
        return self._fits.get(key)

    _fits: dict[str, tuple[float, float, float, float]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def timings(self, sigs: set[str] | list[str]) -> dict[str, list]:
        """``sigs``' entries as ``[seconds, family, flops, bytes]`` (the features when known),
        for handing to another process's table (:meth:`adopt`)."""
        return {s: [self.entries[s], *self.features.get(s, [])] for s in sigs if s in self.entries}

    def adopt(self, timings: dict[str, list]) -> int:
        """Take entries another table timed (:meth:`timings`) that this one lacks, with their
        features, so the family laws cover them too; returns how many."""
        fresh = {s: t for s, t in timings.items() if s not in self.entries}
        for sig, timing in fresh.items():  # a bare number: a timing stored before features
            seconds, *features = timing if isinstance(timing, (list, tuple)) else [timing]
            self.entries[sig] = float(seconds)
            if features:
                self.features[sig] = list(features)
        if fresh:
            self._fits = None
        return len(fresh)

    @classmethod
    def path_for(cls, profile: HardwareProfile) -> Path:
        digest = hashlib.sha256(profile.model_dump_json().encode()).hexdigest()[:12]
        return cache_dir() / f"{profile.name}-{digest}.json"

    @classmethod
    def load(cls, profile: HardwareProfile) -> LatencyTable:
        path = cls.path_for(profile)
        if path.is_file():
            data = json.loads(path.read_text())
            return cls(
                profile.name,
                {k: float(v) for k, v in data["entries"].items()},
                {k: float(v) for k, v in data.get("scales", {}).items()},
                float(data.get("offset", 0.0)),
                dict(data.get("features", {})),
            )
        return cls(profile.name)

    def save(self, profile: HardwareProfile) -> Path:
        path = self.path_for(profile)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            json.dump(
                {
                    "profile": self.profile,
                    "entries": self.entries,
                    "scales": self.scales,
                    "offset": self.offset,
                    "features": self.features,
                },
                f,
                indent=1,
                sort_keys=True,
            )
        return path


def _node_features(node: ir.Node) -> tuple[float, float]:
    """FLOPs and bytes moved by ``node``: the multiply-adds of a convolution or matrix product
    (whatever domain the runtime's fused form lives in: FusedConv, nchwc Conv, FusedGemm,
    FusedMatMul, MatMulNBits...), 0 for other nodes; bytes are every input and output at
    its dtype."""
    nbytes = 0.0
    for value in [*node.inputs, *node.outputs]:
        dims = _dims(value)
        if dims is not None and value.dtype is not None:
            nbytes += float(np.prod(dims)) * max(1.0, value.dtype.itemsize)
    return _node_flops(node), nbytes


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    dims = static_dims(value.shape)
    if dims is None and value.const_value is not None:
        dims = list(value.const_value.shape)
    return dims


def _node_flops(node: ir.Node) -> float:
    out = _dims(node.outputs[0]) if node.outputs else None
    if out is None or len(node.inputs) < 2:
        return 0.0
    if "Conv" in node.op_type:
        weight = _dims(node.inputs[1])
        return 2.0 * float(np.prod(out)) * float(np.prod(weight[1:])) if weight else 0.0
    if "Gemm" in node.op_type or "MatMul" in node.op_type:
        k = node.attributes.get_int("K", 0)
        a = _dims(node.inputs[0])
        if not k and a:
            k = a[-2] if node.attributes.get_int("transA", 0) and len(a) >= 2 else a[-1]
        return 2.0 * float(np.prod(out)) * float(k)
    return 0.0


def fit_key(node: ir.Node) -> str:
    """The kernel family whose entries share one cost law: op and domain, plus what changes
    the work per FLOP (a convolution's kernel and whether it is grouped, a packed weight's
    bits)."""
    attrs = node.attributes
    key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    if "Conv" in node.op_type:
        kernel = attrs.get_ints("kernel_shape", None)
        key += f"|k={list(kernel) if kernel else '?'}|grouped={attrs.get_int('group', 1) > 1}"
    if attrs.get_int("bits", 0):
        key += f"|bits={attrs.get_int('bits', 0)}"
    return key


#: a family's law replaces its own entries only when it explains them this well (RMS relative)
_TRUSTED_FIT = 0.25


def _fit_ops(table: LatencyTable) -> dict[str, tuple[float, float, float, float]]:
    """Per kernel family, ``t = a * flops + b * bytes + c`` with ``a, b, c >= 0`` fitted to the
    table's measured entries: the device's effective throughput for those kernels, which a
    datasheet peak (the roofline) overestimates by as much as the kernels fall short of it.
    The fourth number is the fit's RMS relative error over its entries."""
    from scipy.optimize import nnls

    rows: dict[str, list[tuple[float, float, float]]] = {}
    for sig, (key, flops, nbytes) in table.features.items():
        if sig in table.entries:
            rows.setdefault(key, []).append((flops, nbytes, table.entries[sig]))
    fits = {}
    for key, data in rows.items():
        if len(data) < 3:
            continue
        a = np.array([[f, b, 1.0] for f, b, _ in data])
        y = np.array([t for *_, t in data])
        norm = np.maximum(a.max(axis=0), 1e-30)  # well-conditioned columns
        coef, _ = nnls(a / norm, y)
        coef = coef / norm
        error = float(np.sqrt(np.mean(((a @ coef - y) / np.maximum(y, 1e-9)) ** 2)))
        fits[key] = (float(coef[0]), float(coef[1]), float(coef[2]), error)
    return fits


def _node_model(full: onnx.ModelProto, node: ir.Node, constants: set[str]) -> onnx.ModelProto:
    """The node alone: its non-constant inputs become graph inputs, its constants stay."""
    inputs = [v.name for v in node.inputs if v is not None and v.name not in constants]
    return Extractor(full).extract_model(list(dict.fromkeys(inputs)), [node.outputs[0].name])


def runtime_graph(model: ir.Model, threads: int = 1) -> ir.Model:
    """The graph onnxruntime actually runs for ``model``: its optimizer's output (MatMul+Add as
    Gemm, Add+LayerNormalization as SkipLayerNormalization, Erf-Gelu as Gelu, Conv+Relu, the
    attention scale in FusedMatMul, constants folded), with every value's shape as it saved
    them. Nodes timed on this graph are the kernels that run, so the table sees the fusions
    instead of charging nodes that disappear. A model the optimizer cannot save (e.g. over the
    2 GB protobuf limit) is used as it is. A runtime graph given back is returned as it is, so
    a caller can optimize once and predict, calibrate and list what is missing from it."""
    import tempfile

    if model.metadata_props.get(_RUNTIME_KEY) == "1":
        return model
    from graphsurgeon.latency import session_for

    try:
        with tempfile.TemporaryDirectory(prefix="gs-rt-") as tmp:
            # weights saved beside the graph: the shape probe below copies the graph alone
            path = Path(tmp) / "runtime.onnx"
            session_for(
                ir.to_proto(model).SerializeToString(),
                threads=threads,
                save_optimized=path,
                config={
                    "session.optimized_model_external_initializers_file_name": "weights.bin",
                    "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
                },
            )
            proto = onnx.load(path, load_external_data=False)
            _fill_missing_shapes(proto, generate_inputs(model, seed=0), Path(tmp))
            onnx.load_external_data_for_model(proto, tmp)
    except Exception:
        return model
    runtime = ir.serde.deserialize_model(proto)
    runtime.metadata_props[_RUNTIME_KEY] = "1"
    return runtime


_RUNTIME_KEY = "graphsurgeon.runtime_graph"


def _fill_missing_shapes(proto: onnx.ModelProto, feed: dict, folder: Path) -> None:
    """Values the optimizer saved without a type (its layout transforms' reorder tokens, some
    fused nodes' outputs) get the dtype and shape of one real run of the saved graph, with
    optimizations off, all of them exposed as outputs. ``folder`` holds the external weights."""
    graph = proto.graph
    known = {v.name for v in (*graph.value_info, *graph.output, *graph.input)}
    known |= {t.name for t in graph.initializer}
    missing = [o for n in graph.node for o in n.output if o and o not in known]
    if not missing:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(m) for m in missing)
    path = folder / "probe.onnx"
    path.write_bytes(probe.SerializeToString())
    session = session_for(path, threads=1, optimize=False)
    wanted = {i.name for i in session.get_inputs()}
    arrays = session.run(missing, {k: v for k, v in feed.items() if k in wanted})
    for name, array in zip(missing, arrays, strict=True):
        dtype = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)
        graph.value_info.append(
            onnx.helper.make_tensor_value_info(name, dtype, list(np.shape(array)))
        )


def _constant_names(model: ir.Model) -> set[str]:
    """Values computable without inputs: initializers and what only they feed (DQ chains...)."""
    names = {v.name for v in model.graph.initializers.values()}
    for node in model.graph:
        if all(v is None or v.name in names for v in node.inputs):
            names.update(o.name for o in node.outputs)
    return names


def calibrate(
    model: ir.Model,
    profile: HardwareProfile,
    table: LatencyTable,
    *,
    repeats: int = 30,
    rounds: int = 5,
    min_round_s: float = 0.005,
    only: Collection[str] | None = None,
) -> int:
    """Time every node of ``model``'s :func:`runtime_graph` whose signature the table lacks
    (and ``only`` lists, where given); returns how many.

    Each entry is the node's latency alone minus the session's fixed launch overhead, which
    a whole model pays once, not per node. The new nodes are timed in turn over ``rounds``
    rounds (about ``repeats`` runs each in all, see
    :func:`graphsurgeon.latency.measure_interleaved`; a round lasts at least ``min_round_s``
    per node, 0 for a quick look inside search) and each keeps its quietest round's median:
    the model predicts a device's own latency, and a shared machine's other tenants only ever
    add to it, unevenly across entries.
    """
    threads = min(profile.threads(), available_cpus())
    model = runtime_graph(model, threads)
    full = onnx.shape_inference.infer_shapes(ir.to_proto(model))
    overhead = _launch_overhead(profile)
    constants = _constant_names(model)
    layers = {layer.node: layer for layer in find_layers(model)}
    pending: dict[str, tuple[object, list]] = {}
    features: dict[str, list] = {}
    for node in model.graph:
        if node.outputs and node.outputs[0].name in constants:
            continue  # folded away at session creation
        sig = node_signature(node, layers.get(node))
        if sig is None or sig in table.entries or sig in pending:
            continue
        if only is not None and sig not in only:
            continue
        try:
            sub = _node_model(full, node, constants)
            feed = generate_inputs(ir.serde.deserialize_model(sub), seed=0)
            session = session_for(sub.SerializeToString(), threads=threads)
            session.run(None, _feed_for(session, feed))
        except Exception:
            continue  # a node ORT cannot run alone (sequence types, subgraphs): roofline
        pending[sig] = (session, [feed])
        features[sig] = [fit_key(node), *_node_features(node)]
    if not pending:
        return 0
    rounds = max(1, min(rounds, repeats))
    timed = measure_interleaved(
        list(pending.values()),
        threads=threads,
        rounds=rounds,
        repeats=max(1, round(repeats / rounds)),
        min_round_s=min_round_s,
    )
    for sig, st in zip(pending, timed, strict=True):
        table.entries[sig] = max(0.0, st.quiet_s - overhead)
    table.features.update(features)
    table._fits = None
    return len(pending)


def _feed_for(session, feed: dict) -> dict:
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in wanted}


def _launch_overhead(profile: HardwareProfile) -> float:
    return float(profile.microbenchmarks.get("ort-cpu", {}).get("launch_overhead_us", 2.0)) * 1e-6


@dataclass
class Prediction:
    seconds: float
    from_table: int  # nodes found in the table
    from_roofline: int  # nodes estimated: the op type's fit over the table, else the roofline
    #: signatures of estimated nodes no trusted family law covers (the roofline, or a law that
    #: explains its entries poorly): the ones worth timing
    uncovered: frozenset[str] = frozenset()


def roofline_seconds(
    profile: HardwareProfile, flops: float, nbytes: float, dtype: str = "fp32"
) -> float:
    peak = profile.peak.get(dtype) or profile.peak["fp32"]  # type: ignore[call-overload]
    compute = flops / (peak.dense * 1e12)
    memory = nbytes / (profile.memory.bandwidth_gbs * 1e9)
    return max(compute, memory)


def breakdown(
    model: ir.Model, profile: HardwareProfile, table: LatencyTable
) -> tuple[dict[str, float], int, int]:
    """Uncorrected seconds per op type, nodes from the table, nodes estimated (see
    :func:`_breakdown`)."""
    per_op, hits, misses, _ = _breakdown(model, profile, table)
    return per_op, hits, misses


def _breakdown(
    model: ir.Model, profile: HardwareProfile, table: LatencyTable
) -> tuple[dict[str, float], int, int, frozenset[str]]:
    """Uncorrected seconds per op type, nodes from the table, nodes estimated. A node missing
    from the table is charged by its op type's fit over the table (:meth:`LatencyTable.op_fit`:
    this device's measured cost per FLOP, per byte and per node); an op type the table has
    too few entries of falls back to the roofline over the same FLOPs and bytes. Nodes are
    those of
    :func:`runtime_graph`, the graph onnxruntime runs."""
    model = runtime_graph(model, min(profile.threads(), available_cpus()))
    constants = _constant_names(model)
    layers = {layer.node: layer for layer in find_layers(model)}
    per_op: dict[str, float] = {}
    hits = misses = 0
    uncovered: set[str] = set()
    for node in model.graph:
        if node.outputs and node.outputs[0].name in constants:
            continue
        layer = layers.get(node)
        sig = node_signature(node, layer)
        fit = table.op_fit(fit_key(node))
        flops, nbytes = _node_features(node)
        law = fit[0] * flops + fit[1] * nbytes + fit[2] if fit is not None else None
        # one node timed alone carries its measurement's noise; its family's law pools every
        # entry of that family, so a compute node whose law explains the entries well is
        # charged by the law (other nodes keep their own entries)
        trusted = law is not None and flops > 0 and fit[3] <= _TRUSTED_FIT
        if sig is not None and sig in table.entries:
            hits += 1
            seconds = law if trusted else table.entries[sig]
        else:
            misses += 1
            if sig is not None and (law is None or fit[3] > _TRUSTED_FIT):
                uncovered.add(sig)  # a law that explains its family's entries is charged
            if law is not None:
                seconds = law
            else:
                dtype = _DTYPE.get(layer.weight.dtype.name, "fp32") if layer else "fp32"
                seconds = roofline_seconds(profile, flops, nbytes, dtype)
        per_op[node.op_type] = per_op.get(node.op_type, 0.0) + seconds
    return per_op, hits, misses, frozenset(uncovered)


def _corrected(per_op: dict[str, float], profile: HardwareProfile, table: LatencyTable) -> float:
    total = sum(table.scales.get(op, 1.0) * t for op, t in per_op.items())
    return _launch_overhead(profile) + table.offset + total


def predict(model: ir.Model, profile: HardwareProfile, table: LatencyTable) -> Prediction:
    """Estimated latency of ``model``: the table for known nodes, the roofline for the rest,
    corrected per op type (see :func:`fit_corrections`); the launch overhead is paid once."""
    per_op, hits, misses, uncovered = _breakdown(model, profile, table)
    return Prediction(max(0.0, _corrected(per_op, profile, table)), hits, misses, uncovered)


def fit_corrections(
    samples: list[tuple[dict[str, float], float]],
    profile: HardwareProfile,
    table: LatencyTable,
    *,
    strength: float = 0.1,
) -> float:
    """Fit ``table.scales`` and ``table.offset`` to whole-model measurements.

    ``samples`` are ``(breakdown per op type, measured seconds)``. Minimizes
    ``sum_i (y_i - c - sum_op a_op x_i,op)^2 + strength * n * sum_op s_op^2 (a_op - 1)^2`` with
    ``s_op`` the op type's typical time, so the penalty is in seconds like the residuals and
    an op type the samples do not tell apart stays at 1. Returns the RMS relative error after
    the fit, on the samples.
    """
    if len(samples) < 2:
        raise ValueError("fit_corrections needs at least two measured models")
    ops = sorted({op for per_op, _ in samples for op in per_op})
    x = np.array([[per_op.get(op, 0.0) for op in ops] for per_op, _ in samples])
    y = np.array([t - _launch_overhead(profile) for _, t in samples])
    n, k = x.shape
    typical = np.maximum(np.median(np.abs(x), axis=0), 1e-9)
    weight = np.sqrt(strength * n) * typical
    # unknowns: [c, a_1..a_k]; the penalty rows pull each a_op toward 1 (and leave c free)
    a_rows = np.hstack([np.ones((n, 1)), x])
    p_rows = np.hstack([np.zeros((k, 1)), np.diag(weight)])
    lhs = np.vstack([a_rows, p_rows])
    rhs = np.concatenate([y, weight])
    for _ in range(k + 1):  # non-negative scales: drop negatives to 0 and refit the rest
        coef, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
        negative = [i for i in range(k) if coef[1 + i] < 0]
        if not negative:
            break
        for i in negative:
            lhs[:, 1 + i] = 0.0
            rhs_fix = rhs.copy()
            rhs_fix[n + i] = 0.0
            rhs = rhs_fix
    table.offset = float(coef[0])
    table.scales = {op: float(max(0.0, coef[1 + i])) for i, op in enumerate(ops)}
    predicted = np.array([_corrected(per_op, profile, table) for per_op, _ in samples])
    measured = np.array([t for _, t in samples])
    return float(np.sqrt(np.mean(((predicted - measured) / measured) ** 2)))


__all__ = [
    "LatencyTable",
    "Prediction",
    "breakdown",
    "calibrate",
    "fit_corrections",
    "node_signature",
    "predict",
    "roofline_seconds",
    "runtime_graph",
]

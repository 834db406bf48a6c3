"""``add-skips``: insert skip connections where features diverge, without changing the function.

For a source layer ``s`` and a destination layer ``d`` at most ``radius`` layers downstream, the
destination's output becomes ``y_d + g * P(x_s)``: ``x_s`` is the source's block output (after
the BatchNorm / activation / bias ops that only it feeds), ``P`` aligns it with ``y_d``
(AveragePool by the integer stride ratio when the spatial size shrinks, then a 1x1 Conv, or a
MatMul on the last axis for 2-D/3-D features, when the channel counts differ) and ``g`` is a
gain initializer, one scalar or one per destination channel (``granularity``), that starts at
**zero**: inserting a skip leaves every output bit-identical. ``P`` starts random
(``N(0, 1/C_in)``), so that the gain has a gradient when ``distill`` trains the skips next.

Which pairs: every (source, destination) within the radius whose shapes can be aligned is
scored on calibration activations by how far the destination's features have moved from the
source's, and the ``max_skips`` most divergent pairs (one per destination) get a skip:

- ``kl``: symmetric KL divergence between histograms of the two tensors' values, each divided
  by its RMS (every channel contributes the same number of samples);
- ``wasserstein``: the 1-D Wasserstein-1 distance between the same normalized samples;
- ``correlation``: ``1 - R^2`` of the least-squares prediction of the destination's channels
  from the aligned source channels (how much of ``y_d`` is new information).

``fit: lstsq`` fits ``P`` (with a bias) in closed form so that the skip predicts what the
compressed destination lost: with ``R = y_d(original) - y_d(current)`` on the calibration
inputs and ``X`` the aligned source features, ``P = argmin ||X P + b - R||^2 + lam ||P||^2``
(ridge, centred), and ``g = 1``. Skips are fitted one at a time in graph order, each against
the model with the earlier skips in place. The original comes from the ``reference`` option
(a model file), else from the pipeline (its input model, as for ``distill``'s teacher);
without either there is no residual to fit and the pass says so. To fit by training instead,
run ``distill`` after ``add-skips`` (``fit: none``): the zero gains and random projections
are ordinary parameters to it. Match features there at layers other than the skip
destinations (or ``feature_layers: none``): a destination layer's own output is the value
before its skip is added, and pulling it to the teacher's would fight the skip.

Refused pairs, with the reason in the statistics: ranks differ (a Conv map and a Gemm vector),
the destination is larger than the source (that would need upsampling), non-integer stride
ratios, and dims that are not static (other than the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import networkx as nx
import numpy as np
import onnx_ir as ir

from graphsurgeon.calibration import calibration_feeds, collect_activations
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.graph_view import GraphView
from graphsurgeon.layers import LAYER_ID_KEY, Layer, find_layers
from graphsurgeon.options import Choice, FloatRange, IntRange, PassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register
from graphsurgeon.shapes import ShapeInferencePass

# ops that belong to the layer before them when it is their only reader
_BLOCK_OPS = frozenset(
    {
        "BatchNormalization",
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Sigmoid",
        "Tanh",
        "Gelu",
        "Elu",
        "Selu",
        "Celu",
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Mish",
        "Clip",
        "Dropout",
        "Identity",
    }
)
_AFFINE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})  # with a constant operand: a bias
_MAX_ROWS = 20_000


class AddSkipsOptions(PassOptions):
    radius: int = option(
        2,
        "Largest distance in layers from source to destination (1: adjacent layers).",
        IntRange(1, 4),
        ge=1,
    )
    max_skips: int = option(
        2, "Most skips inserted (the most divergent pairs first).", IntRange(1, 8), ge=1
    )
    criterion: Literal["kl", "wasserstein", "correlation"] = option(
        "kl",
        "How divergence between source and destination features is scored on calibration "
        "data: kl or wasserstein between RMS-normalized value distributions, or correlation "
        "(1 - R^2 of the destination predicted linearly from the source).",
        Choice(["kl", "wasserstein", "correlation"]),
    )
    granularity: Literal["tensor", "channel"] = option(
        "channel",
        "Gain per skip: one scalar (tensor) or one per destination channel.",
        Choice(["tensor", "channel"]),
    )
    fit: Literal["none", "lstsq"] = option(
        "none",
        "none: gain 0, random projection (function unchanged; train with distill after). "
        "lstsq: projection fitted in closed form to the residual the compressed model lost "
        "against the original (needs reference or the pipeline's teacher), gain 1.",
        Choice(["none", "lstsq"]),
    )
    reference: str | None = option(
        None, "Original model file for fit: lstsq (default: the pipeline's input model)."
    )
    min_divergence: float = option(
        0.0,
        "Pairs scoring at or below this get no skip.",
        FloatRange(0.0, 1.0),
        ge=0.0,
    )
    ridge: float = option(
        1e-3,
        "Ridge term of the lstsq fit, relative to the mean diagonal of X^T X.",
        FloatRange(1e-6, 1e-1, log=True),
        gt=0.0,
    )
    calib_samples: int = option(
        64,
        "Calibration samples for the divergence scores and the fit.",
        IntRange(8, 256, log=True),
        ge=1,
    )
    seed: int = option(0, "Seed of the random projections.", ge=0)


@dataclass
class _Pair:
    src: Layer
    dst: Layer
    src_out: ir.Value
    distance: int
    pool: tuple[int, int] | None  # AveragePool kernel = stride, for Conv maps
    rank: int
    c_in: int
    c_out: int
    divergence: float = 0.0


@register
class AddSkips(GSPass):
    """Insert zero-gain skip connections between layers whose features diverge."""

    name = "add-skips"
    kind = "surgery"
    Options = AddSkipsOptions

    #: fit: lstsq reads the pipeline's input model (``self.original``, set by the runner).
    needs_original: ClassVar[bool] = True

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        if self.calib is None:
            raise GraphSurgeonError(
                "add-skips needs calibration data (--calib) to score feature divergence"
            )
        reference = self._reference() if opts.fit == "lstsq" else None
        ShapeInferencePass()(model)
        pairs = self._candidates(model)
        if reference is not None:  # a fit needs the destination's output in the original
            pairs = [p for p in pairs if self._fittable(reference, p)]
        self.note("candidates", len(pairs))
        if not pairs:
            return PassResult(model, False)
        feeds = calibration_feeds(model, self.calib, max_samples=opts.calib_samples)
        names = {p.src_out.name for p in pairs} | {p.dst.node.outputs[0].name for p in pairs}
        acts = collect_activations(model, feeds, sorted(names))
        scorer = _Scorer(acts, opts.criterion)
        for p in pairs:
            p.divergence = scorer(p)
        del acts, scorer
        chosen: list[_Pair] = []
        for p in sorted(pairs, key=lambda p: -p.divergence):
            # (an adjacent pair scores 0 under correlation: y_d is linear in x_s already)
            if len(chosen) == opts.max_skips or p.divergence <= max(opts.min_divergence, 1e-6):
                break
            if any(c.dst.node is p.dst.node for c in chosen):
                continue
            chosen.append(p)
        if not chosen:
            return PassResult(model, False)
        order = {node: i for i, node in enumerate(model.graph)}
        chosen.sort(key=lambda p: order[p.dst.node])
        rng = np.random.default_rng(opts.seed)
        targets = _reference_targets(reference, chosen, feeds) if reference is not None else {}
        report = []
        for i, p in enumerate(chosen):
            entry = {
                "src": p.src.id,
                "dst": p.dst.id,
                "distance": p.distance,
                "divergence": round(float(p.divergence), 6),
            }
            fitted = None
            if reference is not None:
                fitted = self._fit(model, targets.get(p.dst.id), feeds, p, entry)
            entry["params_added"] = _insert(model, p, i, fitted, opts.granularity, rng)
            report.append(entry)
        self.note("skips", report)
        self.note("params_added", sum(e["params_added"] for e in report))
        return PassResult(model, True)

    # -- candidates ---------------------------------------------------------------------
    def _candidates(self, model: ir.Model) -> list[_Pair]:
        layers = [lay for lay in find_layers(model) if _feature_axis(lay) is not None]
        if len(layers) < 2:
            return []
        view = GraphView(model)
        by_node = {lay.node: lay for lay in layers}

        def weight(_u: object, v: object, _d: dict) -> int:
            return 1 if v in view.layer_nodes else 0

        pairs = []
        for src in layers:
            if not self.selects(src.node):
                continue
            src_out = _block_output(src.node)
            reach = nx.single_source_dijkstra_path_length(
                view.nx, src.node, cutoff=self.options.radius, weight=weight
            )
            for node, dist in reach.items():
                dst = by_node.get(node)
                if dst is None or dist < 1 or not self.selects(node):
                    continue
                found = _alignment(src_out, dst.node.outputs[0])
                if isinstance(found, str):
                    self.skip(dst.node, found)
                    continue
                pool, rank, c_in, c_out = found
                pairs.append(_Pair(src, dst, src_out, int(dist), pool, rank, c_in, c_out))
        return pairs

    # -- fitting ------------------------------------------------------------------------
    def _reference(self) -> ir.Model:
        if self.options.reference is not None:
            from graphsurgeon.model_io import load

            reference = load(Path(self.options.reference))
            ShapeInferencePass()(reference)
            return reference
        original = getattr(self, "original", None)  # a fresh copy per call, in a pipeline
        if callable(original):
            reference = original()
            ShapeInferencePass()(reference)
            return reference
        raise GraphSurgeonError(
            "add-skips: options.fit: lstsq fits the skips to what the original model computed; "
            "give options.reference (the original model file), run it in a pipeline, or use "
            "fit: none and run distill"
        )

    def _fittable(self, reference: ir.Model, p: _Pair) -> bool:
        value = _reference_value(reference, p.dst)
        if value is None:
            self.skip(p.dst.node, "fit: no matching layer in the reference")
            return False
        if _dims(value) != _dims(p.dst.node.outputs[0]):
            self.skip(p.dst.node, "fit: its output has another shape in the reference")
            return False
        return True

    def _fit(
        self, model: ir.Model, ref: np.ndarray | None, feeds, p: _Pair, entry: dict
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Ridge least squares of the destination's lost residual on the source features
        (the current model's, with the skips fitted before this one in place)."""
        if ref is None:
            entry["fit"] = "no matching layer in the reference: gain 0"
            return None
        dst_name = p.dst.node.outputs[0].name
        cur = collect_activations(model, feeds, [p.src_out.name, dst_name])
        if ref.shape != cur[dst_name].shape:
            entry["fit"] = f"reference shape {list(ref.shape)} differs: gain 0"
            return None
        x = _aligned(cur[p.src_out.name], p).astype(np.float64)
        r = (_rows(ref, p) - _rows(cur[dst_name], p)).astype(np.float64)
        if len(x) > _MAX_ROWS:
            keep = np.random.default_rng(0).choice(len(x), _MAX_ROWS, replace=False)
            x, r = x[keep], r[keep]
        mu_x, mu_r = x.mean(axis=0), r.mean(axis=0)
        xc, rc = x - mu_x, r - mu_r
        gram = xc.T @ xc
        lam = self.options.ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
        w = np.linalg.solve(gram + lam * np.eye(len(gram)), xc.T @ rc)  # [C_in, C_out]
        b = mu_r - mu_x @ w
        lost = float(np.linalg.norm(r))
        left = float(np.linalg.norm(r - (x @ w + b)))
        entry["fit"] = "lstsq"
        entry["residual_explained"] = round(1 - left / lost, 6) if lost > 0 else 0.0
        return w, b


def _feature_axis(layer: Layer) -> int | None:
    """Channel axis of the layer's output if add-skips handles the layer, else None."""
    node, op = layer.node, layer.op_type
    if node.domain not in ("", "ai.onnx") or not node.outputs or node.outputs[0].shape is None:
        return None
    rank = len(node.outputs[0].shape)
    if op == "Conv" and node.attributes.get_int("group", 1) == 1 and rank == 4:
        return 1
    if op == "Gemm" and rank == 2:
        return 1
    if op == "MatMul" and layer.weight_index == 1 and rank in (2, 3):
        return rank - 1
    return None


def _block_output(node: ir.Node) -> ir.Value:
    """The layer's output followed through the ops only it feeds (BN, activation, bias)."""
    value = node.outputs[0]
    while not value.is_graph_output():
        uses = value.uses()
        if len(uses) != 1:
            break
        nxt = uses[0].node
        if nxt.op_type in _AFFINE_OPS:
            other = nxt.inputs[1 - uses[0].idx]
            if other is None or ir.convenience.get_const_tensor(other) is None:
                break
            shape = nxt.outputs[0].shape
            if shape is None or value.shape is None or list(shape) != list(value.shape):
                break
        elif nxt.op_type not in _BLOCK_OPS or uses[0].idx != 0:
            break
        value = nxt.outputs[0]
    return value


def _dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (str(d) if d is not None else None) for d in value.shape]


def _alignment(src: ir.Value, dst: ir.Value):
    """(pool, rank, c_in, c_out) aligning ``src`` with ``dst``, or the reason it cannot."""
    a, b = _dims(src), _dims(dst)
    if a is None or b is None:
        return "shape unknown"
    if len(a) != len(b):
        return f"ranks differ ({len(a)} vs {len(b)})"
    if not isinstance(a[-1 if len(a) < 4 else 1], int) or not isinstance(
        b[-1 if len(b) < 4 else 1], int
    ):
        return "channel count not static"
    if len(a) == 4:
        if not all(isinstance(d, int) for d in a[2:] + b[2:]):
            return "spatial dims not static"
        (h1, w1), (h2, w2) = a[2:], b[2:]
        if h2 > h1 or w2 > w1:
            return "destination map larger than the source (needs upsampling)"
        if h1 % h2 or w1 % w2:
            return "spatial sizes not an integer multiple"
        pool = (h1 // h2, w1 // w2)
        return (None if pool == (1, 1) else pool), 4, a[1], b[1]
    if a[:-1] != b[:-1] or any(d is None for d in a[1:-1]):
        return "leading dims differ"
    return None, len(a), a[-1], b[-1]


def _rows(x: np.ndarray, p: _Pair) -> np.ndarray:
    """Activations as [samples x positions, channels]."""
    if p.rank == 4:
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _aligned(x: np.ndarray, p: _Pair) -> np.ndarray:
    """Source activations pooled to the destination's positions, as rows."""
    if p.rank == 4 and p.pool is not None:
        kh, kw = p.pool
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // kh, kh, w // kw, kw).mean(axis=(3, 5))
    return _rows(x, p)


class _Scorer:
    """Divergence of each pair; every tensor's rows and normalized sorted sample are computed
    once (a transformer has hundreds of pairs over a few dozen tensors)."""

    def __init__(self, acts: dict[str, np.ndarray], criterion: str) -> None:
        self.acts, self.criterion = acts, criterion
        self._rows: dict[tuple, np.ndarray] = {}
        self._sorted: dict[tuple, np.ndarray] = {}

    def rows(self, p: _Pair, src: bool) -> np.ndarray:
        name = p.src_out.name if src else p.dst.node.outputs[0].name
        key = (name, p.pool if src else None, p.rank)
        if key not in self._rows:
            x = self.acts[name]
            r = _aligned(x, p) if src else _rows(x, p)
            if len(r) > _MAX_ROWS:  # the same rows for both sides: seeded by the row count
                r = r[np.random.default_rng(len(r)).choice(len(r), _MAX_ROWS, replace=False)]
            self._rows[key] = r.astype(np.float64)
        return self._rows[key]

    def sample(self, p: _Pair, src: bool) -> np.ndarray:
        """Equal samples from every channel (the rows), divided by the tensor's RMS, sorted."""
        key = (id(self.rows(p, src)),)
        if key not in self._sorted:
            x = self.rows(p, src)
            picked = x[np.random.default_rng(0).permutation(len(x))[:512]]
            rms = math.sqrt(float((x**2).mean())) or 1.0
            self._sorted[key] = np.sort((picked / rms).ravel())
        return self._sorted[key]

    def __call__(self, p: _Pair) -> float:
        if self.criterion == "correlation":
            return _unexplained(self.rows(p, True), self.rows(p, False))
        sa, sb = self.sample(p, True), self.sample(p, False)
        if self.criterion == "wasserstein":  # W1 = integral over q of |F_a^-1(q) - F_b^-1(q)|
            q = (np.arange(1000) + 0.5) / 1000
            return float(np.abs(_quantile(sa, q) - _quantile(sb, q)).mean())
        ends = np.array([0.005, 0.995])
        lo = min(_quantile(sa, ends)[0], _quantile(sb, ends)[0])
        hi = max(_quantile(sa, ends)[1], _quantile(sb, ends)[1])
        if hi <= lo:
            return 0.0
        bins = np.linspace(lo, hi, 65)
        bins[0], bins[-1] = -np.inf, np.inf  # the tails fall in the end bins
        p_ = np.diff(np.searchsorted(sa, bins)) + 0.5
        q_ = np.diff(np.searchsorted(sb, bins)) + 0.5
        p_, q_ = p_ / p_.sum(), q_ / q_.sum()
        return float(0.5 * ((p_ * np.log(p_ / q_)).sum() + (q_ * np.log(q_ / p_)).sum()))


def _quantile(sorted_values: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.interp(q * (len(sorted_values) - 1), np.arange(len(sorted_values)), sorted_values)


def _unexplained(a: np.ndarray, b: np.ndarray) -> float:
    """1 - R^2 of b predicted linearly (with intercept) from a."""
    ac, bc = a - a.mean(axis=0), b - b.mean(axis=0)
    gram = ac.T @ ac
    lam = 1e-6 * max(float(np.trace(gram)) / len(gram), 1e-12)
    coef = np.linalg.solve(gram + lam * np.eye(len(gram)), ac.T @ bc)
    total = float((bc**2).sum())
    return float(((bc - ac @ coef) ** 2).sum() / total) if total > 0 else 0.0


def _reference_targets(reference: ir.Model, pairs: list[_Pair], feeds) -> dict[str, np.ndarray]:
    """Destination layer id -> its output in the reference model, in one run."""
    values = {p.dst.id: _reference_value(reference, p.dst) for p in pairs}
    found = {lid: v for lid, v in values.items() if v is not None}
    acts = collect_activations(reference, feeds, sorted({v.name for v in found.values()}))
    return {lid: acts[v.name] for lid, v in found.items()}


def _reference_value(reference: ir.Model, dst: Layer) -> ir.Value | None:
    """The destination layer's output in the reference model: same layer id, else same name."""
    for layer in find_layers(reference):
        if layer.id == dst.id:
            return layer.node.outputs[0]
    name = dst.node.outputs[0].name
    for node in reference.graph:
        for out in node.outputs:
            if out.name == name:
                return out
    return None


def _insert(
    model: ir.Model,
    p: _Pair,
    index: int,
    fitted: tuple[np.ndarray, np.ndarray] | None,
    granularity: str,
    rng: np.random.Generator,
) -> int:
    """Wire ``dst_out + gain * P(src_out)`` in after the destination; the params added."""
    graph = model.graph
    dst_node, dst_out = p.dst.node, p.dst.node.outputs[0]
    dtype = dst_out.type.dtype.numpy() if dst_out.type is not None else np.float32
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs if v.name}
    taken |= {v.name for v in graph.inputs}
    base = f"skip{index}.{p.src.id}.to.{p.dst.id}".replace("/", "_")

    def unique(suffix: str) -> str:
        name, n = f"{base}.{suffix}", 2
        while name in taken:
            name, n = f"{base}.{suffix}_{n}", n + 1
        taken.add(name)
        return name

    def const(suffix: str, array: np.ndarray) -> ir.Value:
        name = unique(suffix)
        value = ir.val(
            name, const_value=ir.tensor(np.array(array, dtype=dtype, order="C"), name=name)
        )
        graph.register_initializer(value)
        return value

    nodes: list[ir.Node] = []
    current = p.src_out
    if p.pool is not None:
        pool = ir.node(
            "AveragePool",
            [current],
            attributes={"kernel_shape": list(p.pool), "strides": list(p.pool)},
            name=unique("pool"),
        )
        nodes.append(pool)
        current = pool.outputs[0]
    params = 0
    if fitted is not None or p.c_in != p.c_out:
        if fitted is not None:
            w, b = fitted
            gain_value = 1.0
        else:
            w = rng.normal(0.0, 1.0 / math.sqrt(p.c_in), size=(p.c_in, p.c_out))
            b = None
            gain_value = 0.0
        meta = {LAYER_ID_KEY: f"{p.dst.id}/skip{index}"}
        if p.rank == 4:
            inputs = [current, const("proj.weight", w.T[:, :, None, None])]
            if b is not None:
                inputs.append(const("proj.bias", b))
            proj = ir.node("Conv", inputs, name=unique("proj"), metadata_props=meta)
            nodes.append(proj)
        else:
            proj = ir.node(
                "MatMul",
                [current, const("proj.weight", w)],
                name=unique("proj"),
                metadata_props=meta,
            )
            nodes.append(proj)
            if b is not None:
                add_b = ir.node(
                    "Add", [proj.outputs[0], const("proj.bias", b)], name=unique("bias")
                )
                nodes.append(add_b)
        params += w.size + (0 if b is None else b.size)
        current = nodes[-1].outputs[0]
    else:
        gain_value = 0.0
    shape = [] if granularity == "tensor" else ([p.c_out, 1, 1] if p.rank == 4 else [p.c_out])
    gain = const("gain", np.full(shape, gain_value))
    params += max(1, math.prod(shape))
    scaled = ir.node("Mul", [current, gain], name=unique("scale"))
    add = ir.node("Add", [dst_out, scaled.outputs[0]], name=unique("add"))
    nodes += [scaled, add]
    for node in nodes:
        node.outputs[0].name = unique(node.op_type.lower() + ".out")
    graph.insert_after(dst_node, nodes)
    new_out = add.outputs[0]
    new_out.type, new_out.shape = dst_out.type, dst_out.shape
    if dst_out.is_graph_output():
        name = dst_out.name
        ir.convenience.replace_all_uses_with(dst_out, new_out, replace_graph_outputs=True)
        add.replace_input_with(0, dst_out)  # the Add still reads the old value
        dst_out.name = unique("pre")
        new_out.name = name
    else:
        ir.convenience.replace_all_uses_with(dst_out, new_out)
        add.replace_input_with(0, dst_out)
    return int(params)

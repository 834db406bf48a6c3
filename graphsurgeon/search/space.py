"""The search space: per-slot compression choices built from a model and the pass registry.

A *slot* is one layer, or one coupled channel group of ``prune-channels`` (layers whose output
channels must be pruned together: residual branches, attention heads). Each slot chooses a
*method* (none, a pruning, quantization, factorization or sharing pass, or removal where
``remove-layers`` proves it legal) and that method's parameters. Parameter ranges are the
passes' declared search spaces (:func:`graphsurgeon.options.search_spaces`), never restated
here; a method only names which of its pass's options it searches.

Encoding: a policy is a vector in ``[0, 1]^dim``. Each slot owns a contiguous range of genes
(``slot_dims``): one gene picks the method (``floor(x * n_methods)``), then one gene per
parameter of every method the slot allows (only the chosen method's genes are read). Choices
and ints decode by bins, floats linearly or in log space, rounded to 4 significant digits, so
``decode(encode(p)) == p`` for every decodable ``p``. Several vectors decode to one policy;
strategies may exploit the slack (neutral drift) and caches dedupe by :meth:`Policy.key`.

Embedding tables (``Gather`` layers) are slots as well, for the methods that quantize weights
(dynamic int8 rows, int4/int2 groups): on transformers they hold most of the bytes.

*Granularity* follows from the method: element (prune-magnitude, prune-nm), block
(prune-blocks, group-wise quantize-weights), channel (prune-channels, per-channel int8) or
layer (factorize, share, dynamic int8, remove).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.layers import Layer, find_layers, layer_id
from graphsurgeon.options import Choice, FloatRange, IntRange, search_spaces
from graphsurgeon.registry import get_pass
from graphsurgeon.search.policy import Decision, Policy
from graphsurgeon.shapes import ShapeInferencePass
from graphsurgeon.stats import layer_stats

Space = FloatRange | IntRange | Choice


@dataclass(frozen=True)
class Method:
    """A per-slot compression method: a pass, the options it searches, and where it applies."""

    name: str  # the pass name, or "none" / "remove"
    family: str  # none | prune | quantize | factorize | share | remove
    granularity: str  # element | block | channel | layer
    params: tuple[str, ...] = ()  # searched options of the pass
    ops: frozenset[str] = frozenset()  # layer op types it applies to (empty: any)
    restrict: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # narrow a Choice to these values
    # options every decision of this method carries without a gene: settings that dominate
    # their alternatives (as fast or faster, as accurate), so searching them wastes budget
    fixed: tuple[tuple[str, Any], ...] = ()

    def spaces(self) -> dict[str, Space]:
        if self.name in ("none", "remove"):
            return {}
        declared = search_spaces(get_pass(self.name).Options)
        out: dict[str, Space] = {}
        for p in self.params:
            if p not in declared:
                raise GraphSurgeonError(f"pass {self.name}: option {p!r} declares no search space")
            space = declared[p]
            keep = dict(self.restrict).get(p)
            if keep is not None and isinstance(space, Choice):
                space = Choice([v for v in space.values if v in keep])
            out[p] = space
        return out


_WEIGHT_OPS = frozenset({"Conv", "Gemm", "MatMul"})
#: The method catalogue. ``--methods`` picks by name or family.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", "none", "layer"),
        Method("prune-magnitude", "prune", "element", ("sparsity",), _WEIGHT_OPS),
        Method("prune-nm", "prune", "element", ("pattern",), _WEIGHT_OPS),
        Method("prune-blocks", "prune", "block", ("sparsity", "block"), _WEIGHT_OPS),
        Method("prune-channels", "prune", "channel", ("ratio",), _WEIGHT_OPS),
        Method("quantize-int8", "quantize", "channel", ("calibration",), _WEIGHT_OPS),
        # per_channel is searched per slot: on MiniLM per-channel scales buy mean cosine
        # 0.966 -> 0.994 (nearly all of it on the FFN output layers), and cost ~5% of the
        # time unfused, nothing measurable inside a fused Attention (QAttention)
        Method(
            "quantize-dynamic",
            "quantize",
            "layer",
            ("per_channel",),
            frozenset({"Gemm", "MatMul", "Attention", "Gather"}),
        ),
        # 8-bit goes through the int8 passes (real int8 kernels); weight-only takes 4 and 2.
        # accuracy_level 4: MatMulNBits multiplies an int8-quantized input in integers; on
        # MiniLM (M = 41) int4 runs 1.5x faster than at level 0, mean cosine unchanged (4 digits)
        Method(
            "quantize-weights",
            "quantize",
            "block",
            ("bits", "group_size"),
            frozenset({"MatMul", "Gemm", "Gather"}),
            (("bits", (4, 2)),),
            (("accuracy_level", 4),),
        ),
        Method("factorize-lowrank", "factorize", "layer", ("rank",), _WEIGHT_OPS),
        Method("share-weights", "share", "layer", ("bits",), _WEIGHT_OPS),
        Method("remove", "remove", "layer"),
    )
}
DEFAULT_METHODS = (
    "none",
    "prune-magnitude",
    "prune-nm",
    "prune-channels",
    "quantize-int8",
    "quantize-dynamic",
    "quantize-weights",
    "factorize-lowrank",
    "share-weights",
    "remove",
)
_FEATURE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


@dataclass
class Slot:
    """One searchable unit: its layers, and the methods (with parameter spaces) it allows."""

    id: str
    layers: list[str]
    op: str
    methods: list[Method]
    spaces: list[dict[str, Space]]  # per method, the (possibly per-slot capped) spaces
    shape: list[int] = field(default_factory=list)  # weight shape of the first layer
    units: list[str] = field(default_factory=list)  # removable units this slot owns
    unit_layers: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    distill_gene: bool = False  # one more gene: is this layer a distillation target

    @property
    def width(self) -> int:
        return 1 + sum(len(s) for s in self.spaces) + int(self.distill_gene)


def resolve_methods(methods: Sequence[str] | str | None) -> list[Method]:
    """Method names or families (``prune``, ``quantize``...) -> methods; ``none`` always in.
    ``distill`` is a flag, not a method (see :func:`wants_distill`)."""
    if methods is None:
        names = list(DEFAULT_METHODS)
    else:
        items = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)]
        names = ["none"]
        for item in items:
            if item == "distill":
                continue
            if item in METHODS:
                names.append(item)
                continue
            family = [m.name for m in METHODS.values() if m.family == item]
            if not family:
                known = ", ".join([*METHODS, "prune", "quantize", "factorize", "share"])
                raise GraphSurgeonError(f"--methods: unknown method {item!r} (known: {known})")
            names.extend(family)
    return [METHODS[n] for n in dict.fromkeys(names)]


def wants_distill(methods: Sequence[str] | str | None) -> bool:
    """``distill`` among ``methods``: each slot gets a flag gene marking it a feature-matching
    target of a final ``distill`` step (knowledge distillation through the training bridge)."""
    if methods is None:
        return False
    items = methods.split(",") if isinstance(methods, str) else methods
    return "distill" in [m.strip() for m in items]


class SearchSpace:
    """Slots in graph order, and the vector encoding of the policies over them."""

    def __init__(self, slots: list[Slot], prelude: Sequence[Any] = ()) -> None:
        self.slots = slots
        self.prelude = tuple(prelude)
        self.slot_dims: list[tuple[int, int]] = []
        start = 0
        for slot in slots:
            self.slot_dims.append((start, start + slot.width))
            start += slot.width
        self.dim = start
        n = max(len(slots) - 1, 1)
        self.roles = {
            s.id: (
                ("depth", round(i / n, 4)),
                ("layers", len(s.layers)),
                ("op", s.op),
                ("shape", list(s.shape)),
            )
            for i, s in enumerate(slots)
        }
        self._features: np.ndarray | None = None
        self._activation_stats: dict[str, tuple[float, float, float]] = {}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: ir.Model,
        *,
        methods: Sequence[str] | str | None = None,
        sensitivity: dict[str, float] | None = None,
        prelude: Sequence[Any] = (),
        calib: Any = None,
        min_params: int = 0,
    ) -> SearchSpace:
        """Slots for ``model`` (after ``prelude`` was applied to it: ids must match).

        ``sensitivity`` (layer id -> drift) becomes a slot feature; ``calib`` (a Dataset)
        gives the activation statistics of :meth:`features`; layers with fewer than
        ``min_params`` weights get no slot.
        """
        chosen = resolve_methods(methods)
        distill = wants_distill(methods)
        if distill:
            get_pass("distill")  # a clear error where the training bridge is not installed
        ShapeInferencePass()(model)
        layers = [layer for layer in find_layers(model) if layer.node.graph is model.graph]
        by_id = {layer.id: layer for layer in layers}
        groups = _channel_groups(model, by_id) if METHODS["prune-channels"] in chosen else {}
        units = _removable_units(model) if METHODS["remove"] in chosen else []
        slots: list[Slot] = []
        grouped: set[str] = set()
        for layer in layers:
            if layer.id in grouped:
                continue
            members = groups.get(layer.id, [layer.id])
            grouped.update(members)
            member_layers = [by_id[m] for m in members]
            if sum(m.weight.size for m in member_layers) < min_params:
                continue
            slots.append(_slot(layer, member_layers, chosen, layer.id in groups))
        _assign_units(slots, units)
        for slot in slots:
            slot.stats = _slot_stats([by_id[m] for m in slot.layers], sensitivity)
            slot.distill_gene = distill
        space = cls(slots, prelude)
        space._calib = calib
        space._model = model
        return space

    # -- encoding -----------------------------------------------------------------------
    def decode(self, x: np.ndarray) -> Policy:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,):
            raise GraphSurgeonError(f"policy vector has shape {x.shape}, expected ({self.dim},)")
        x = np.clip(x, 0.0, 1.0)
        decisions = []
        removed: set[str] = set()
        for slot, (start, stop) in zip(self.slots, self.slot_dims, strict=True):
            index = min(int(x[start] * len(slot.methods)), len(slot.methods) - 1)
            method = slot.methods[index]
            offset = start + 1 + sum(len(s) for s in slot.spaces[:index])
            params = dict(method.fixed)
            params.update(
                (name, _decode_gene(space, x[offset + i]))
                for i, (name, space) in enumerate(slot.spaces[index].items())
            )
            if set(slot.layers) & removed:
                method, params = METHODS["none"], {}  # inside a unit already removed
            if method.name == "remove":
                removed.update(slot.unit_layers[params["unit"]])
            distill = bool(slot.distill_gene and x[stop - 1] >= 0.5)
            decisions.append(
                Decision(
                    slot.id,
                    tuple(slot.layers),
                    method.name,
                    tuple(sorted(params.items())),
                    distill=distill and not set(slot.layers) & removed,
                    role=self.roles[slot.id],
                )
            )
        return Policy(tuple(decisions), self.prelude)

    def encode(self, policy: Policy) -> np.ndarray:
        x = np.full(self.dim, 0.5)
        by_slot = {d.slot: d for d in policy.decisions}
        for slot, (start, stop) in zip(self.slots, self.slot_dims, strict=True):
            d = by_slot.get(slot.id)
            method = d.method if d is not None else "none"
            names = [m.name for m in slot.methods]
            if method not in names:
                raise GraphSurgeonError(f"slot {slot.id}: method {method!r} is not in its space")
            index = names.index(method)
            x[start] = (index + 0.5) / len(names)
            offset = start + 1 + sum(len(s) for s in slot.spaces[:index])
            options = d.options if d is not None else {}
            for i, (name, space) in enumerate(slot.spaces[index].items()):
                value = options.get(name, _declared_default(method, name))
                if value is None:
                    raise GraphSurgeonError(f"slot {slot.id}: {method} needs {name!r}")
                x[offset + i] = _encode_gene(space, value)
            if slot.distill_gene:
                x[stop - 1] = 0.75 if d is not None and d.distill else 0.25
        return x

    def identity(self) -> np.ndarray:
        """The vector of the uncompressed policy (every slot: none)."""
        return self.encode(self.decode(np.zeros(self.dim)))

    def uniform(self, method: str, **params: Any) -> Policy:
        """Every slot that allows ``method`` uses it with ``params`` (clipped to its space)."""
        decisions = []
        for slot in self.slots:
            names = [m.name for m in slot.methods]
            if method in names:
                spaces = slot.spaces[names.index(method)]
                chosen = {k: _nearest(spaces[k], params[k]) for k in spaces if k in params}
                if set(chosen) == set(spaces):
                    fixed = dict(slot.methods[names.index(method)].fixed)
                    decisions.append(
                        Decision(
                            slot.id,
                            tuple(slot.layers),
                            method,
                            tuple(sorted({**fixed, **chosen}.items())),
                            role=self.roles[slot.id],
                        )
                    )
                    continue
            decisions.append(Decision(slot.id, tuple(slot.layers), role=self.roles[slot.id]))
        return Policy(tuple(decisions), self.prelude)

    def random(self, rng: np.random.Generator, n: int) -> list[np.ndarray]:
        return [rng.random(self.dim) for _ in range(n)]

    def method_genes(self) -> list[int]:
        """Index of each slot's method gene."""
        return [start for start, _ in self.slot_dims]

    # -- per-slot state for learned controllers ------------------------------------------
    FEATURE_NAMES = (
        *(f"op_{op}" for op in _FEATURE_OPS),
        "op_other",
        "log_params",
        "log_macs",
        "log_out_channels",
        "log_in_channels",
        "log_layers",
        "sensitivity",
        "removable",
        "channel_group",
        "depth",
        "act_mean",
        "act_log_var",
        "act_entropy",
    )

    def features(self) -> np.ndarray:
        """(len(slots), F) per-slot state: op one-hot, log sizes, sensitivity, position, and
        the mean, log variance and histogram entropy (bits, 32 bins) of each slot's output
        activation on the calibration data (generated inputs if none)."""
        if self._features is not None:
            return self._features
        acts = self._activations()
        rows = []
        n = max(len(self.slots) - 1, 1)
        for i, slot in enumerate(self.slots):
            s = slot.stats
            one_hot = [float(slot.op == op) for op in _FEATURE_OPS]
            one_hot.append(float(slot.op not in _FEATURE_OPS))
            mean, var, entropy = acts.get(slot.id, (0.0, 0.0, 0.0))
            rows.append(
                [
                    *one_hot,
                    math.log1p(s["params"]),
                    math.log1p(s["macs"]),
                    math.log1p(s["out_channels"]),
                    math.log1p(s["in_channels"]),
                    math.log(len(slot.layers)),
                    s["sensitivity"],
                    float(bool(slot.units)),
                    float(any(m.name == "prune-channels" for m in slot.methods)),
                    i / n,
                    mean,
                    math.log1p(var),
                    entropy,
                ]
            )
        self._features = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
        return self._features

    def _activations(self) -> dict[str, tuple[float, float, float]]:
        from graphsurgeon.calibration import calibration_feeds, collect_activations

        model = getattr(self, "_model", None)
        if model is None or not self.slots:
            return {}
        nodes = {layer_id(n): n for n in model.graph if layer_id(n)}
        names = {}
        for slot in self.slots:
            node = nodes.get(slot.layers[0])
            if node is not None and node.outputs and node.outputs[0].type is not None:
                names[slot.id] = node.outputs[0].name
        try:
            feeds = calibration_feeds(model, getattr(self, "_calib", None), max_samples=32)
            values = collect_activations(model, feeds, list(names.values()))
        except Exception:  # statistics are optional state: a model ORT cannot run has none
            return {}
        out = {}
        for sid, name in names.items():
            a = np.asarray(values[name], dtype=np.float64).ravel()
            if a.size == 0:
                continue
            hist, _ = np.histogram(a, bins=32)
            p = hist[hist > 0] / a.size
            out[sid] = (float(a.mean()), float(a.var()), float(-(p * np.log2(p)).sum()))
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "slot": s.id,
                "layers": s.layers,
                "op": s.op,
                "methods": [m.name for m in s.methods],
                "genes": stop - start,
            }
            for s, (start, stop) in zip(self.slots, self.slot_dims, strict=True)
        ]


# -- genes ------------------------------------------------------------------------------
def _declared_default(method: str, option: str) -> Any:
    """The pass's default for a searched option a policy does not name (a policy saved
    before the option became a gene, say quantize-dynamic's per_channel); None if none."""
    if method in ("none", "remove"):
        return None
    field = get_pass(method).Options.model_fields.get(option)
    return (
        None
        if field is None or field.is_required()
        else field.get_default(call_default_factory=True)
    )


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _decode_gene(space: Space, g: float) -> Any:
    g = min(max(float(g), 0.0), 1.0)
    if isinstance(space, Choice):
        n = len(space.values)
        return space.values[min(int(g * n), n - 1)]
    if isinstance(space, IntRange):
        if space.log:
            lo, hi = math.log(space.low), math.log(space.high)
            value = round(math.exp(lo + g * (hi - lo)))
        else:
            value = round(space.low + g * (space.high - space.low))
        value = space.low + round((value - space.low) / space.step) * space.step
        return int(min(max(value, space.low), space.high))
    if space.log:
        lo, hi = math.log(space.low), math.log(space.high)
        value = math.exp(lo + g * (hi - lo))
    else:
        value = space.low + g * (space.high - space.low)
    if space.step:
        value = space.low + round((value - space.low) / space.step) * space.step
    return min(max(_round(value), space.low), space.high)


def _encode_gene(space: Space, value: Any) -> float:
    if isinstance(space, Choice):
        if value not in space.values:
            raise GraphSurgeonError(f"{value!r} is not one of {space.values}")
        return (space.values.index(value) + 0.5) / len(space.values)
    lo, hi, v = float(space.low), float(space.high), float(value)
    if not lo <= v <= hi:
        raise GraphSurgeonError(f"{value!r} is outside [{space.low}, {space.high}]")
    if hi == lo:
        return 0.5
    if space.log:
        return (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (v - lo) / (hi - lo)


def _nearest(space: Space, value: Any) -> Any:
    if isinstance(space, Choice):
        return value if value in space.values else space.values[0]
    return _decode_gene(space, _encode_gene(space, min(max(value, space.low), space.high)))


# -- slots ------------------------------------------------------------------------------
def _slot(layer: Layer, members: list[Layer], chosen: list[Method], grouped: bool) -> Slot:
    ops = {m.op_type for m in members}
    methods, spaces = [], []
    for method in chosen:
        if method.name == "remove":
            continue  # added by _assign_units where legal
        if method.ops and not ops <= method.ops:
            continue
        if method.name == "prune-channels" and not grouped:
            continue
        space = method.spaces()
        if "rank" in space and isinstance(space["rank"], IntRange):
            full = min(min(_matrix_dims(m)) for m in members)
            if full < 2:
                continue
            r = space["rank"]
            space["rank"] = IntRange(r.low, max(r.low, min(r.high, full - 1)), log=r.log)
        methods.append(method)
        spaces.append(space)
    return Slot(
        layer.id,
        [m.id for m in members],
        layer.op_type,
        methods,
        spaces,
        shape=[int(d) for d in layer.weight.shape],
    )


def _matrix_dims(layer: Layer) -> tuple[int, int]:
    shape = list(layer.weight.shape)
    if layer.op_type in ("Conv", "ConvTranspose"):
        return shape[0], int(np.prod(shape[1:]))
    return (shape[-2], shape[-1]) if len(shape) >= 2 else (1, 1)


def _channel_groups(model: ir.Model, by_id: dict[str, Layer]) -> dict[str, list[str]]:
    """Layer id -> the ids of every layer coupled with it in a safe prune-channels group."""
    from graphsurgeon.channel_deps import build_groups, refine_shapes

    if refine_shapes(model):
        ShapeInferencePass()(model)
    try:
        groups = build_groups(model)
    except Exception:  # dependency analysis is optional here: no channel method then
        return {}
    out: dict[str, list[str]] = {}
    for group in groups:
        if group.unsafe or group.units < 2:
            continue
        ids = [lid for node, _ in group.producers if (lid := layer_id(node)) in by_id]
        if len(ids) != len(group.producers) or any(i in out for i in ids):
            continue
        for lid in ids:
            out[lid] = ids
    return out


def _removable_units(model: ir.Model) -> list[tuple[str, list[str]]]:
    """(unit id, layer ids) of every unit remove-layers can legally remove."""
    from graphsurgeon.passes.layer_removal import find_units

    try:
        units = find_units(model)
    except Exception:
        return []
    return [(u.id, list(u.layers)) for u in units if u.problem is None and u.layers]


def _assign_units(slots: list[Slot], units: list[tuple[str, list[str]]]) -> None:
    """Each unit belongs to the first slot (graph order) holding one of its layers."""
    order = {lid: i for i, s in enumerate(slots) for lid in s.layers}
    for uid, lids in units:
        owners = [order[lid] for lid in lids if lid in order]
        if not owners:
            continue
        slot = slots[min(owners)]
        slot.units.append(uid)
        slot.unit_layers[uid] = sorted({lid for s in slots for lid in s.layers if lid in lids})
    for slot in slots:
        if slot.units:
            slot.methods.append(METHODS["remove"])
            slot.spaces.append({"unit": Choice(slot.units)})


def _slot_stats(layers: list[Layer], sensitivity: dict[str, float] | None) -> dict[str, float]:
    params = macs = 0
    out_ch = in_ch = 0
    for layer in layers:
        st = layer_stats(layer)
        params += st.params
        macs += st.macs or 0
        rows, cols = _matrix_dims(layer)
        if layer.op_type in ("Gemm", "MatMul"):
            transb = layer.node.attributes.get_int("transB", 0) if layer.op_type == "Gemm" else 0
            rows, cols = (rows, cols) if transb else (cols, rows)
        out_ch += rows
        in_ch = max(in_ch, cols)
    sens = max((sensitivity or {}).get(layer.id, 0.0) for layer in layers)
    return {
        "params": float(params),
        "macs": float(macs),
        "out_channels": float(out_ch),
        "in_channels": float(in_ch),
        "sensitivity": float(sens),
    }

"""``merge-channels``: channel pruning that shifts a removed channel's work onto a survivor.

Plain channel pruning deletes a unit ``r`` and with it the term ``W[:, r] a_r`` from every
consumer layer. If ``r`` is well predicted by a surviving unit ``s`` of the same group,
``a_r ~= alpha a_s + beta`` (least squares on calibration activations of exactly the tensor
the consumer reads: after any Relu, pooling or Flatten between), the term is kept::

    W[:, r] a_r ~= alpha W[:, r] a_s + beta W[:, r]
    =>  W[:, s] += alpha W[:, r]        bias += beta W[:, r]   (then column r is removed)

A unit spanning several positions (a Conv channel seen through Flatten, an attention head)
pairs position ``j`` of ``r`` with position ``j`` of ``s``: one ``alpha`` per pair, one
``beta_j`` per position. For a Conv consumer the bias term is ``beta * sum_taps W[o, r]``;
with zero padding the border taps read zeros, not ``beta``, so each tap is weighted by the
fraction of output positions where it lies inside the input (the least-squares constant).
1x1 Convs without padding, Gemm and MatMul are exact in this step. A consumer with no bias
gets one (Conv, Gemm); a MatMul without a private bias Add gets the fit through the origin
(``beta = 0``).

Which units go, and how many, is prune-channels' choice (same ratio, global budget,
importance, rounding and coupled groups); its physical removal then deletes them. A group is
refused, with the reason in the statistics, when compensation cannot be proven: a LayerNorm
over the channels (the kept channels change value), channels combined without a weight (a
MatMul between activations contracting them), grouped Conv or ConvTranspose consumers, or a
consumer weight shared with another node.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir
from graphsurgeon.passes.channel_pruning import (
    PruneChannels,
    PruneChannelsOptions,
    _bias_slot,
    _write,
)

from graphsurgeon.channel_deps import ChannelGroup, Occurrence
from graphsurgeon.layers import layer_id
from graphsurgeon.options import Choice, FloatRange, IntRange, option
from graphsurgeon.registry import register

_MAX_ROWS = 8192  # samples per unit for the correlations (the fit is 1-D: plenty)


class MergeChannelsOptions(PruneChannelsOptions):
    importance: Literal["l1", "l2", "bn_scale", "activation", "redundancy"] = option(
        "redundancy",
        "Unit ranking: prune-channels' l1/l2/bn_scale/activation, or redundancy: units are "
        "removed one at a time, each time the one whose merge loses least, l1 norm of its "
        "consumer weights x sqrt(1 - corr^2) with its best surviving partner (a duplicate goes, "
        "its twin stays).",
        Choice(["l1", "l2", "bn_scale", "activation", "redundancy"]),
    )
    reconstruct: Literal[False] = option(
        False,
        "prune-channels' refit of the consumers; merge-channels compensates by folding "
        "instead, so it is always off here.",
    )
    ridge: float = option(1e-2, "Unused here (prune-channels' reconstruction).", gt=0.0)
    min_correlation: float = option(
        0.0,
        "Merge into the best survivor only if |corr| reaches this; below it only the removed "
        "unit's mean is kept (alpha = 0, beta = its mean), which is the bias-correction limit.",
        FloatRange(0.0, 0.9),
        ge=0.0,
        le=1.0,
    )
    calib_samples: int = option(
        128,
        "Calibration samples for the correlations and the alpha/beta fits.",
        IntRange(8, 256, log=True),
        ge=1,
    )


@register
class MergeChannels(PruneChannels):
    """Remove channels/neurons/heads like prune-channels, folding each removed unit into its
    most correlated survivor and compensating the consumers' weights and biases."""

    name = "merge-channels"
    kind = "lossy"
    Options = MergeChannelsOptions
    needs_activations = True

    # -- which groups -------------------------------------------------------------------
    def _refusal(self, group: ChannelGroup) -> str | None:
        reason = super()._refusal(group)
        if reason is not None:
            return reason
        if not group.values_kept:
            return "merge: a LayerNorm over the channels changes the kept values"
        occ_values = {o.value for o in group.occurrences}
        consumer_inputs = {(n, o.value) for n, o in group.consumers}
        for occ in group.occurrences:
            for use in occ.value.uses():
                node = use.node
                if (node, occ.value) in consumer_inputs and use.idx == 0:
                    problem = _consumer_problem(node)
                    if problem is not None:
                        return f"merge: {problem}"
                elif not any(out in occ_values for out in node.outputs):
                    return f"merge: {node.op_type} combines the channels without a weight"
        return None

    # -- which units ------------------------------------------------------------------
    def _choose(self, groups: list[ChannelGroup], scores: list[np.ndarray]) -> list[np.ndarray]:
        """prune-channels' counts; with redundancy importance, its own greedy pick of units."""
        chosen = super()._choose(groups, scores)
        out = []
        for group, units in zip(groups, chosen, strict=True):
            kind = self.options_for(self._id(group.leader)).importance
            if kind != "redundancy" or not len(units) or not group.consumers:
                out.append(units)
                continue
            node, occ = group.consumers[0]
            picked = _greedy(self._acts[occ.value.name], occ, group, node, len(units))
            out.append(units if picked is None else picked)
        return out

    def _activations(self, model: ir.Model, groups: list[ChannelGroup]) -> dict[str, np.ndarray]:
        self._acts = super()._activations(model, groups)
        return self._acts

    # -- merging ------------------------------------------------------------------------
    def _before_removal(
        self,
        groups: list[ChannelGroup],
        chosen: list[np.ndarray],
        activations: dict[str, np.ndarray],
    ) -> None:
        merged, mean_only, corrs, report = 0, 0, [], []
        plans: dict[tuple[ir.Value, int], list[_Merge]] = {}
        for group, units in zip(groups, chosen, strict=True):
            if not len(units):
                continue
            kept = np.setdiff1d(np.arange(group.units), units)
            if not group.consumers:
                continue
            for node, occ in group.consumers:
                key = (occ.value, occ.axis)
                if key not in plans:
                    plans[key] = self._plan(activations[occ.value.name], occ, units, kept)
                _fold(node, occ.axis, plans[key])
            first = plans[(group.consumers[0][1].value, group.consumers[0][1].axis)]
            pairs = [m for m in first if m.survivor is not None]
            merged += len(pairs)
            mean_only += len(first) - len(pairs)
            corrs += [abs(m.corr) for m in pairs]
            report.append(
                {
                    "layers": [self._id(n) for n, _ in group.producers],
                    "merged": len(pairs),
                    "mean_only": len(first) - len(pairs),
                    "mean_abs_corr": round(float(np.mean([abs(m.corr) for m in pairs])), 4)
                    if pairs
                    else None,
                }
            )
        self.note("merged_units", merged)
        self.note("mean_only_units", mean_only)
        if corrs:
            self.note("mean_abs_corr", round(float(np.mean(corrs)), 4))
        self.note("merges", report)

    def _plan(
        self, x: np.ndarray, occ: Occurrence, removed: np.ndarray, kept: np.ndarray
    ) -> list[_Merge]:
        """Best survivor, alpha and per-position beta for every removed unit on ``occ``."""
        present = {int(u): i for i, u in enumerate(occ.units)}
        gone = [int(u) for u in removed if int(u) in present]
        stay = [int(u) for u in kept if int(u) in present]
        if not gone:
            return []
        samples = _unit_samples(x, occ)  # [units on occ, k, M]
        mean = samples.mean(axis=2, keepdims=True)  # per position: beta is per position
        centred = samples - mean
        rows_g = np.stack([centred[present[u]].ravel() for u in gone])
        norm_g = np.sqrt((rows_g**2).sum(axis=1))
        out = []
        if stay:
            rows_s = np.stack([centred[present[u]].ravel() for u in stay])
            norm_s = np.sqrt((rows_s**2).sum(axis=1))
            cov = rows_g @ rows_s.T
            corr = cov / np.maximum(np.outer(norm_g, norm_s), 1e-30)
        for i, r in enumerate(gone):
            m_r = mean[present[r], :, 0]
            if stay:
                j = int(np.argmax(np.abs(corr[i])))
                c = float(corr[i, j])
                if abs(c) >= max(self.options.min_correlation, 1e-12) and norm_s[j] > 0:
                    s = stay[j]
                    alpha = float(cov[i, j] / norm_s[j] ** 2)
                    m_s = mean[present[s], :, 0]
                    raw_r, raw_s = samples[present[r]].ravel(), samples[present[s]].ravel()
                    alpha0 = float(raw_r @ raw_s / max(raw_s @ raw_s, 1e-30))
                    out.append(
                        _Merge(
                            occ.positions[present[r]],
                            occ.positions[present[s]],
                            alpha,
                            m_r - alpha * m_s,
                            alpha0,
                            c,
                        )
                    )
                    continue
            out.append(_Merge(occ.positions[present[r]], None, 0.0, m_r, 0.0, 0.0))
        return out


def _unit_samples(x: np.ndarray, occ: Occurrence) -> np.ndarray:
    """[units on occ, k, M] float64 samples of each unit's k positions (M rows, capped)."""
    k = occ.positions.shape[1]
    flat = np.moveaxis(x, occ.axis, 0).reshape(x.shape[occ.axis], -1)
    take = max(1, _MAX_ROWS // k)
    if flat.shape[1] > take:
        flat = flat[:, np.random.default_rng(0).choice(flat.shape[1], take, replace=False)]
    return flat.astype(np.float64)[occ.positions]


def _greedy(
    x: np.ndarray, occ: Occurrence, group: ChannelGroup, node: ir.Node, count: int
) -> np.ndarray | None:
    """Remove ``count`` units one by one, each time the cheapest to merge: its weight norm
    at the consumer times sqrt(1 - corr^2) with its best partner among the units left."""
    if len(occ.units) != group.units or node.op_type not in ("Conv", "Gemm", "MatMul"):
        return None  # the first consumer does not see every unit: keep prune-channels' pick
    samples = _unit_samples(x, occ)
    c = (samples - samples.mean(axis=2, keepdims=True)).reshape(len(samples), -1)
    norm = np.sqrt((c**2).sum(axis=1))
    corr = (c @ c.T) / np.maximum(np.outer(norm, norm), 1e-30)
    np.fill_diagonal(corr, 0.0)
    w = ir.convenience.get_const_tensor(node.inputs[1]).numpy()
    if node.op_type == "Conv":
        w_in = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    elif node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        w_in = w.T
    else:
        w_in = w
    per_position = np.abs(w_in).sum(axis=1)
    weight = np.array([per_position[p].sum() for p in occ.positions])
    scale = np.sqrt((samples**2).mean(axis=(1, 2)))  # RMS activation of each unit
    base = weight * scale
    corr = np.abs(corr)
    alive = np.ones(len(base), dtype=bool)
    best = corr.argmax(axis=1)  # each unit's best partner among the units alive
    removed = []
    for _ in range(count):
        partner = np.maximum(corr[np.arange(len(base)), best], 0.0)
        cost = np.where(alive, base * np.sqrt(np.clip(1 - partner**2, 0.0, 1.0)), np.inf)
        u = int(np.argmin(cost))
        alive[u] = False
        corr[:, u] = -1.0  # no longer a partner
        stale = np.flatnonzero(alive & (best == u))
        best[stale] = corr[stale].argmax(axis=1)
        removed.append(int(occ.units[u]))
    return np.sort(np.asarray(removed, dtype=np.int64))


class _Merge:
    """Fold unit ``removed`` (positions) into ``survivor`` (positions, or None: mean only)."""

    __slots__ = ("alpha", "alpha0", "beta", "corr", "removed", "survivor")

    def __init__(self, removed, survivor, alpha, beta, alpha0, corr) -> None:
        self.removed, self.survivor = np.asarray(removed), survivor
        self.alpha, self.beta = alpha, np.asarray(beta, dtype=np.float64)
        self.alpha0, self.corr = alpha0, corr  # alpha0: the fit through the origin


def _consumer_problem(node: ir.Node) -> str | None:
    """Why the consumer's weights cannot absorb a merge, or None."""
    op = node.op_type
    if op == "Conv" and node.attributes.get_int("group", 1) != 1:
        return "grouped Conv consumer"
    if op == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm consumer with transA"
    if op not in ("Conv", "Gemm", "MatMul"):
        return f"{op} consumer"
    w = node.inputs[1]
    if not w.is_initializer() or len(w.uses()) != 1 or w.is_graph_input():
        return "consumer weight is shared or not an initializer"
    if (op == "MatMul" and len(w.shape) != 2) or (op == "Conv" and len(w.shape) != 4):
        return f"{op} consumer weight of rank {len(w.shape)}"
    return None


def _fold(node: ir.Node, axis: int, merges: list[_Merge]) -> None:
    """Apply the merges to one consumer: survivor columns += alpha * removed columns, and
    the bias += sum_j beta_j * (removed column j, summed over in-bounds kernel taps)."""
    if not merges:
        return
    w0 = ir.convenience.get_const_tensor(node.inputs[1]).numpy()
    w = w0.astype(np.float64)
    op = node.op_type
    # view the weight as [input positions, outputs, ...] (a copy, written back at the end)
    if op == "Conv":
        wv = np.moveaxis(w, 1, 0)  # [C, O, kh, kw]
        taps = _tap_weights(node, w.shape[2:])
    elif op == "Gemm" and node.attributes.get_int("transB", 0):
        wv = w.T  # [K, N]
    else:
        wv = w  # [K, N]
    wv = wv.copy()
    slot = _bias_slot(node)
    if slot is None and op in ("Conv", "Gemm") and (len(node.inputs) < 3 or not node.inputs[2]):
        slot = _add_bias(node, wv.shape[1], w0.dtype)
    shift = np.zeros(wv.shape[1])
    for m in merges:
        cols = wv[m.removed]  # [k, O, ...]
        if m.survivor is not None:
            alpha = m.alpha if slot is not None else m.alpha0
            wv[m.survivor] += alpha * cols
        if slot is not None:
            per = (cols * taps).sum(axis=(2, 3)) if op == "Conv" else cols  # [k, O]
            shift += m.beta @ per
    if op == "Conv":
        new = np.moveaxis(wv, 0, 1)
    elif op == "Gemm" and node.attributes.get_int("transB", 0):
        new = wv.T
    else:
        new = wv
    _write(node, 1, np.ascontiguousarray(new).astype(w0.dtype))
    if slot is not None:
        bias_node, index = slot
        b = ir.convenience.get_const_tensor(bias_node.inputs[index]).numpy()
        _write(bias_node, index, (b + shift.reshape(b.shape)).astype(b.dtype))


def _add_bias(node: ir.Node, n_out: int, dtype: np.dtype) -> tuple[ir.Node, int]:
    """Give a bias-less Conv/Gemm a zero bias input, so that merges can shift it."""
    graph = node.graph
    base = f"{layer_id(node) or node.name or node.op_type}_bias".replace("/", "_")
    name, n = base, 1
    while name in graph.initializers:
        n += 1
        name = f"{base}{n}"
    array = np.zeros(n_out, dtype=dtype)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, value)
    return node, 2


def _tap_weights(node: ir.Node, kernel) -> np.ndarray:
    """[kh, kw]: fraction of output positions where each kernel tap reads inside the input
    (zero padding reads 0, not the removed channel's mean)."""
    x = node.inputs[0]
    h, w = (int(d) if isinstance(d, int) else None for d in list(x.shape)[2:4])
    kh, kw = (int(k) for k in kernel)
    if (
        h is None
        or w is None
        or node.attributes.get_string("auto_pad", "NOTSET")
        not in (
            "NOTSET",
            "",
            "VALID",
        )
    ):
        return np.ones((kh, kw))
    pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    sh, sw = node.attributes.get_ints("strides", [1, 1])
    dh, dw = node.attributes.get_ints("dilations", [1, 1])

    def axis(size: int, k: int, pad0: int, pad1: int, stride: int, dil: int) -> np.ndarray:
        n_out = (size + pad0 + pad1 - (k - 1) * dil - 1) // stride + 1
        start = np.arange(n_out)[:, None] * stride - pad0 + np.arange(k)[None, :] * dil
        return ((start >= 0) & (start < size)).mean(axis=0)

    return np.outer(axis(h, kh, pads[0], pads[2], sh, dh), axis(w, kw, pads[1], pads[3], sw, dw))

"""``prune-channels``: structured pruning that physically removes channels, neurons and heads.

The channel-dependency graph (:mod:`graphsurgeon.channel_deps`) groups every layer's output
channels with all the tensors and parameters they are tied to; this pass ranks each group's
units by importance, removes the weakest, and optionally refits the consumer layers.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from graphsurgeon.calibration import calibration_feeds, collect_activations
from graphsurgeon.channel_deps import (
    ChannelGroup,
    Removal,
    build_groups,
    constant_value,
    output_weight_axis,
    refine_shapes,
    remove_channels,
)
from graphsurgeon.layers import layer_id
from graphsurgeon.options import Choice, FloatRange, IntRange, LayerPassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register
from graphsurgeon.shapes import ShapeInferencePass

Importance = Literal["l1", "l2", "bn_scale", "activation"]


class PruneChannelsOptions(LayerPassOptions):
    ratio: float = option(
        0.25,
        "Fraction of each group's output channels removed (per layer through overrides; a "
        "group of several coupled layers uses the smallest ratio among them).",
        FloatRange(0.05, 0.75),
        ge=0.0,
        lt=1.0,
    )
    global_ratio: float | None = option(
        None,
        "Instead of a per-group ratio: remove this fraction of all prunable channels, ranking "
        "units across groups by importance normalized by their group's mean.",
        FloatRange(0.05, 0.75),
        ge=0.0,
        lt=1.0,
    )
    importance: Importance = option(
        "l1",
        "Unit ranking: l1/l2 norm of the producing weights, bn_scale (|gamma| of the "
        "BatchNormalization on the channels; l1 where there is none), or activation (mean "
        "|x| entering the consumer layers on calibration inputs).",
        Choice(["l1", "l2", "bn_scale", "activation"]),
    )
    round_to: int = option(
        1,
        "Kept channel counts are multiples of this (8 or 16 suit SIMD kernels). Attention "
        "groups are always removed in whole heads.",
        Choice([1, 4, 8, 16]),
        ge=1,
    )
    reconstruct: bool = option(
        False,
        "Refit each consumer layer on calibration activations after pruning: ridge least "
        "squares min ||X_kept W' + b' - (X W + b)||, absorbing the removed channels' mean "
        "contribution into the bias.",
        Choice([False, True]),
    )
    ridge: float = option(
        1e-2,
        "Ridge term of the reconstruction, relative to the mean diagonal of X_kept^T X_kept.",
        FloatRange(1e-6, 1e-1, log=True),
        gt=0.0,
    )
    calib_samples: int = option(
        128,
        "Calibration samples for activation importance and reconstruction (the refit has as "
        "many unknowns per output as kept input channels: too few rows overfit).",
        IntRange(8, 256, log=True),
        ge=1,
    )


@register
class PruneChannels(GSPass):
    """Remove whole output channels (Conv, grouped/depthwise Conv, ConvTranspose), neurons
    (Gemm, MatMul) and attention heads, with the matching input channels of every consumer.

    Cases: residual Add/Sum/Mul couple all producers into one group; Concat places a group at
    its offset; BatchNormalization, LayerNorm, PRelu and broadcast constants are sliced;
    Split/Slice sizes, Reshape shapes (Flatten, head split/merge) are rewritten; the attention
    head reshape forces whole-head units, so Q, K and V lose the same heads and the output
    projection the matching rows. Removing a unit equals zeroing it at the consumers' inputs
    (except after a LayerNorm over the channels, whose statistics then cover fewer channels).

    Refused, with the reason in the statistics: groups reaching a graph input or output, an op
    not understood, a Reshape with a runtime shape (run fix-shapes and fold-constants first), a
    reduction or softmax over the channels, groups with a producer the targets leave out.
    """

    name = "prune-channels"
    kind = "lossy"
    Options = PruneChannelsOptions
    #: Subclasses that read consumer-input activations whatever the options (merge-channels).
    needs_activations: ClassVar[bool] = False

    def call(self, model: ir.Model) -> PassResult:
        ShapeInferencePass()(model)
        if refine_shapes(model):  # e.g. the attention mask's broadcast shape
            ShapeInferencePass()(model)
        groups = build_groups(model)
        eligible: list[ChannelGroup] = []
        unsafe: dict[str, str] = {}
        for group in groups:
            reason = self._refusal(group)
            if reason is not None:
                # node and value names go to unsafe_groups; the counted reason is generic
                self.skip(group.leader, re.sub(r" \([^)]*\)|'[^']*'", "", reason))
                if group.unsafe:
                    unsafe[self._id(group.leader)] = group.unsafe
                continue
            eligible.append(group)
        self.note("groups", len(groups))
        if unsafe:
            self.note("unsafe_groups", unsafe)
        if not eligible:
            return PassResult(model, False)

        activations = self._activations(model, eligible)
        scores = [self._importance(g, activations) for g in eligible]
        chosen = self._choose(eligible, scores)
        removal: Removal = {}
        report, removed_channels = [], 0
        for group, units in zip(eligible, chosen, strict=True):
            if not len(units):
                continue
            for key, positions in group.removal(units).items():  # a Concat holds several groups
                removal[key] = np.union1d(removal.get(key, positions), positions)
            width = group.channels // group.units
            removed_channels += width * len(units)
            report.append(
                {
                    "layers": [self._id(n) for n, _ in group.producers],
                    "channels": f"{group.channels} -> {group.channels - width * len(units)}",
                    "unit": width,
                }
            )
        if not removal:
            return PassResult(model, False)
        saved = self._consumer_weights(eligible, chosen)
        self._before_removal(eligible, chosen, activations)
        remove_channels(model, removal)
        if self.options.reconstruct:
            self._reconstruct(saved, removal, activations)
        self.note("pruned_groups", report)
        self.note("channels_removed", removed_channels)
        return PassResult(model, True)

    # -- which groups -------------------------------------------------------------------
    @staticmethod
    def _id(node: ir.Node) -> str:
        return layer_id(node) or node.name or node.op_type

    def _refusal(self, group: ChannelGroup) -> str | None:
        if group.unsafe:
            return f"unsafe: {group.unsafe}"
        if group.units < 2:
            return "one channel block only"
        if not all(self.selects(n) for n, _ in group.producers):
            return "not selected by the targets"
        return None

    # -- importance ---------------------------------------------------------------------
    def _activations(self, model: ir.Model, groups: list[ChannelGroup]) -> dict[str, np.ndarray]:
        wanted = (
            self.needs_activations
            or self.options.reconstruct
            or self.options.importance == "activation"
            or any(o.importance == "activation" for o in self._layer_options.values())
        )
        if not wanted:
            return {}
        names = [occ.value.name for g in groups for _, occ in g.consumers]
        feeds = calibration_feeds(model, self.calib, max_samples=self.options.calib_samples)
        return collect_activations(model, feeds, names)

    def _importance(self, group: ChannelGroup, activations: dict[str, np.ndarray]) -> np.ndarray:
        kind = self.options_for(self._id(group.leader)).importance
        imp = np.zeros(group.units)
        if kind == "bn_scale" and group.batchnorms:
            for node, occ in group.batchnorms:
                gamma = np.abs(constant_value(node.inputs[1]))
                np.add.at(imp, occ.units, gamma[occ.positions].sum(axis=1))
            return imp
        if kind == "activation" and group.consumers:
            for _, occ in group.consumers:
                x = np.abs(activations[occ.value.name].astype(np.float64))
                per = np.moveaxis(x, occ.axis, 0).reshape(x.shape[occ.axis], -1).mean(axis=1)
                np.add.at(imp, occ.units, per[occ.positions].sum(axis=1))
            return imp
        power = 2 if kind == "l2" else 1
        for node, occ in group.producers:
            axis = output_weight_axis(node)
            if axis is None:
                continue  # an embedding table: ranked by the layers it is tied to
            w = constant_value(node.inputs[1]).astype(np.float64)
            rows = np.moveaxis(w, axis % w.ndim, 0).reshape(w.shape[axis], -1)
            per = (np.abs(rows) ** power).sum(axis=1)
            np.add.at(imp, occ.units, per[occ.positions].sum(axis=1))
        return np.sqrt(imp) if power == 2 else imp

    # -- how many -----------------------------------------------------------------------
    def _step(self, group: ChannelGroup) -> int:
        """Units per rounding step, so that kept channels are multiples of round_to."""
        width = group.channels // group.units
        round_to = self.options_for(self._id(group.leader)).round_to
        return math.lcm(width, round_to) // width

    def _choose(self, groups: list[ChannelGroup], scores: list[np.ndarray]) -> list[np.ndarray]:
        if self.options.global_ratio is not None:
            keeps = self._global_keeps(groups, scores)
        else:
            keeps = []
            for group in groups:
                ratio = min(self.options_for(self._id(n)).ratio for n, _ in group.producers)
                step = self._step(group)
                keep = step * max(1, math.floor(group.units * (1 - ratio) / step + 0.5))
                keeps.append(min(keep, group.units))
        return [
            np.sort(np.argsort(s, kind="stable")[: g.units - k])
            for g, s, k in zip(groups, scores, keeps, strict=True)
        ]

    def _global_keeps(self, groups: list[ChannelGroup], scores: list[np.ndarray]) -> list[int]:
        widths = [g.channels // g.units for g in groups]
        budget = self.options.global_ratio * sum(g.channels for g in groups)
        ranked = sorted(
            (s[u] / (s.mean() + 1e-12), gi, u) for gi, s in enumerate(scores) for u in range(len(s))
        )
        removed = [0] * len(groups)
        done = 0.0
        for _, gi, _u in ranked:
            if done >= budget:
                break
            if groups[gi].units - removed[gi] - 1 >= min(self._step(groups[gi]), groups[gi].units):
                removed[gi] += 1
                done += widths[gi]
        keeps = []
        for group, r in zip(groups, removed, strict=True):
            step = self._step(group)
            keeps.append(min(group.units, step * math.ceil((group.units - r) / step)))
        return keeps

    # -- reconstruction -----------------------------------------------------------------
    def _before_removal(
        self,
        groups: list[ChannelGroup],
        chosen: list[np.ndarray],
        activations: dict[str, np.ndarray],
    ) -> None:
        """Hook run on the full-size model just before the chosen units are removed (the
        units of ``groups[i]`` are ``chosen[i]``): merge-channels folds them into survivors."""

    def _consumer_weights(
        self, groups: list[ChannelGroup], chosen: list[np.ndarray]
    ) -> list[tuple[ir.Node, ir.Value, int, np.ndarray, bool]]:
        """Consumers to refit: node, input value, channel axis, weight before pruning, and
        whether their kept inputs keep their values."""
        out: dict[ir.Node, tuple[ir.Node, ir.Value, int, np.ndarray, bool]] = {}
        for group, units in zip(groups, chosen, strict=True):
            if not len(units):
                continue
            for node, occ in group.consumers:
                if node.op_type == "Conv" and node.attributes.get_int("group", 1) != 1:
                    continue
                w = constant_value(node.inputs[1]).copy()
                ok = group.values_kept and (node not in out or out[node][4])
                out[node] = (node, occ.value, occ.axis, w, ok)
        return list(out.values())

    def _reconstruct(self, saved, removal: Removal, activations: dict[str, np.ndarray]) -> None:
        refit, refused = 0, 0
        for node, x_value, axis, w_old, ok in saved:
            x = activations.get(x_value.name)
            if x is None or not ok or node.op_type not in ("Gemm", "MatMul", "Conv"):
                refused += 1
                self.skip(node, "reconstruction: kept inputs change value (LayerNorm)")
                continue
            if _refit(node, x, axis, w_old, removal, self.options.ridge):
                refit += 1
            else:
                refused += 1
                self.skip(node, "reconstruction: layer layout not supported")
        self.note("reconstructed_layers", refit)


def _refit(node, x, axis, w_old, removal: Removal, ridge: float) -> bool:
    """Ridge least squares for one consumer: fit ``X_kept W' + b'`` to ``X W + b``."""
    y_val = node.outputs[0]
    removed_in = removal.get((node.inputs[0], axis), np.array([], dtype=np.int64))
    op = node.op_type
    if op == "Conv":
        if (
            node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "")
            or w_old.ndim != 4
        ):
            return False
        cols = _im2col(node, x.astype(np.float64), w_old.shape[2:])  # [rows, C*kh*kw]
        c, kh, kw = w_old.shape[1:]
        w2 = w_old.reshape(w_old.shape[0], -1).T  # [C*kh*kw, O]
        keep_cols = ~np.isin(np.arange(c * kh * kw) // (kh * kw), removed_in)
        rem_out = removal.get((y_val, 1))
        w2 = np.delete(w2, rem_out, axis=1) if rem_out is not None else w2
        new = _ridge(cols, keep_cols, w2, ridge, _bias_slot(node))
        if new is None:
            return False
        kept_c = c - len(removed_in)
        weight = new.T.reshape(-1, kept_c, kh, kw)
        _write(node, 1, weight.astype(w_old.dtype))
        return True
    trans_b = op == "Gemm" and node.attributes.get_int("transB", 0)
    if op == "Gemm" and node.attributes.get_int("transA", 0):
        x = x.T
    if w_old.ndim != 2:
        return False
    w2 = w_old.T if trans_b else w_old  # [K, N]
    rem_out = removal.get((y_val, len(y_val.shape) - 1))
    w2 = np.delete(w2, rem_out, axis=1) if rem_out is not None else w2
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    keep_cols = ~np.isin(np.arange(rows.shape[1]), removed_in)
    new = _ridge(rows, keep_cols, w2.astype(np.float64), ridge, _bias_slot(node))
    if new is None:
        return False
    _write(node, 1, (new.T if trans_b else new).astype(w_old.dtype))
    return True


def _ridge(x: np.ndarray, keep: np.ndarray, w: np.ndarray, ridge: float, bias) -> np.ndarray | None:
    """argmin_W' ||Xk W' + d - X W||^2 + lam ||W'||^2 with an intercept d when there is a
    bias to absorb it (written back into the bias)."""
    if len(x) > 50_000:
        x = x[np.random.default_rng(0).choice(len(x), 50_000, replace=False)]
    y = x @ w
    xk = x[:, keep]
    if bias is not None:
        mu_x, mu_y = xk.mean(axis=0), y.mean(axis=0)
        xk, y = xk - mu_x, y - mu_y
    gram = xk.T @ xk
    lam = ridge * max(float(np.trace(gram)) / max(gram.shape[0], 1), 1e-12)
    new = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xk.T @ y)
    if bias is not None:
        node, index = bias
        b = ir.convenience.get_const_tensor(node.inputs[index]).numpy()
        shift = mu_y - mu_x @ new
        _write(node, index, (b + shift.reshape(b.shape)).astype(b.dtype))
    return new


def _bias_slot(node: ir.Node) -> tuple[ir.Node, int] | None:
    """Where this layer's per-output bias lives: its own input, or a lone Add after a MatMul."""
    n_out = node.outputs[0].shape[-1] if node.op_type != "Conv" else node.outputs[0].shape[1]
    if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = ir.convenience.get_const_tensor(node.inputs[2])
        ok = b is not None and math.prod(b.shape) == n_out and _private(node.inputs[2])
        return (node, 2) if ok else None
    uses = node.outputs[0].uses()
    if node.op_type == "MatMul" and len(uses) == 1 and uses[0].node.op_type == "Add":
        add = uses[0].node
        other = 1 - uses[0].idx
        b = ir.convenience.get_const_tensor(add.inputs[other])
        if b is not None and list(b.shape) == [n_out] and _private(add.inputs[other]):
            return (add, other)
    return None


def _private(value: ir.Value) -> bool:
    """An initializer only this node reads, so that rewriting it changes nothing else."""
    return value.is_initializer() and len(value.uses()) == 1 and not value.is_graph_input()


def _write(node: ir.Node, index: int, array: np.ndarray) -> None:
    value = node.inputs[index]
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def _im2col(node: ir.Node, x: np.ndarray, kernel) -> np.ndarray:
    """Conv input patches as rows ``[N*Ho*Wo, C*kh*kw]`` (pads, strides, dilations)."""
    kh, kw = (int(k) for k in kernel)
    pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    sh, sw = node.attributes.get_ints("strides", [1, 1])
    dh, dw = node.attributes.get_ints("dilations", [1, 1])
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(
        x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3)
    )
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)

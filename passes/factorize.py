"""Low-rank factorization: one weight-bearing layer becomes two (or three) thinner ones.

A weight matrix ``W [K, N]`` with singular values ``s_1 >= s_2 >= ...`` is best approximated
at rank ``r`` (Eckart-Young) by ``U_r S_r V_r^T``; storing ``L = U_r sqrt(S_r) [K, r]`` and
``R = sqrt(S_r) V_r^T [r, N]`` costs ``r (K + N)`` instead of ``K N`` numbers, and
``x W ~ (x L) R`` is two smaller layers. The relative squared error is the energy left out,
``sum_{i>r} s_i^2 / sum_i s_i^2``; so the ``energy`` option picks the smallest ``r`` that keeps
that fraction of ``sum s_i^2``. The square root is split evenly between the factors so both
have the same scale (friendlier to later quantization).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from graphsurgeon.layers import LAYER_ID_KEY, Layer, find_layers
from graphsurgeon.memo import Memo, digest
from graphsurgeon.options import Choice, FloatRange, IntRange, LayerPassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}
# An energy ratio this close to the target counts as reaching it: float rounding leaves the
# tail of an exactly rank-r matrix at ~1e-14 of the total, not 0.
_ENERGY_SLACK = 1e-9


class FactorizeOptions(LayerPassOptions):
    rank: int | None = option(
        None,
        "Explicit rank r for every factorized layer (capped at the full rank); wins over energy.",
        IntRange(1, 512, log=True),
        ge=1,
    )
    energy: float = option(
        0.9,
        "Keep the smallest rank r whose singular values carry this fraction of sum(s^2), the "
        "squared Frobenius norm of the weight; 1.0 keeps the numerical rank (exact).",
        FloatRange(0.5, 0.999),
        gt=0.0,
        le=1.0,
    )
    method: Literal["tucker2", "spatial"] = option(
        "tucker2",
        "For k x k convolutions: tucker2 (1x1 in-projection, r x r k x k core, 1x1 "
        "out-projection) or spatial (k x 1 then 1 x k). 1x1 convolutions are plain SVD.",
        Choice(["tucker2", "spatial"]),
    )
    only_if_smaller: bool = option(
        True,
        "Skip a layer whose factors would not have fewer params than its weight (turn off "
        "only to check exactness at full rank).",
    )


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r with ``sum(s[:r]^2) >= energy * sum(s^2)`` (at least 1)."""
    power = np.cumsum(np.asarray(singular_values, dtype=np.float64) ** 2)
    if power.size == 0 or power[-1] <= 0:
        return 1
    r = int(np.searchsorted(power / power[-1], energy - _ENERGY_SLACK)) + 1
    return min(max(r, 1), power.size)


_SVDS = Memo("svd")


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD, memoized on the matrix's bytes: a search factorizes the same weights at
    many ranks, and the truncation is the cheap part."""
    return _SVDS.get(digest(matrix), lambda: np.linalg.svd(matrix, full_matrices=False))


def svd_factors(
    matrix: np.ndarray, rank: int | None, energy: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """``matrix [K, N] ~ left [K, r] @ right [r, N]`` (truncated SVD, sqrt(S) on both sides)."""
    u, s, vt = _svd(np.asarray(matrix, dtype=np.float64))
    r = min(rank, s.size) if rank else energy_rank(s, energy)
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r], r


def _mode_basis(unfolded: np.ndarray, rank: int | None, energy: float) -> np.ndarray:
    """Leading left singular vectors of a mode unfolding (the HOSVD factor of that mode)."""
    u, s, _ = _svd(unfolded)
    r = min(rank, s.size) if rank else energy_rank(s, energy)
    return u[:, :r]


@dataclass
class _Plan:
    """Replacement for one layer: nodes in order (the last one produces the layer's output)."""

    ops: list[tuple[str, list[np.ndarray | None], dict[str, object]]]  # op, weights, attrs
    rank: int | list[int]
    params_before: int
    params_after: int


@register
class FactorizeLowRank(GSPass):
    """Split Gemm, MatMul and Conv layers into low-rank factors.

    Cases and the exact reshapes:

    - Gemm ``alpha A' B' + beta C`` with a constant B: ``W = B'`` (``B^T`` when transB) is
      ``[K, N]``; ``Gemm(A, L, transA)`` then ``Gemm(h, R, C, alpha, beta)``: the bias stays
      on the second half.
    - MatMul with a constant 2-D operand: ``X W = (X L) R``, or ``W X = L (R X)`` when the
      weight is the left operand.
    - Conv 1x1 (group 1): ``W [Cout, Cin, 1, 1]`` as the matrix ``[Cout, Cin] = L R``; the
      first 1x1 conv (weight ``R [r, Cin, 1, 1]``) keeps strides and pads, the second
      (``L [Cout, r, 1, 1]``) takes the bias.
    - Conv k x k, ``method: tucker2`` (any number of spatial dims): HOSVD of ``W`` along its
      two channel modes, ``U_out`` from the unfolding ``[Cout, Cin*k*k]`` and ``U_in`` from
      ``[Cin, Cout*k*k]``; core ``G = W x_0 U_out^T x_1 U_in^T [r_out, r_in, k, k]``. A 1x1
      conv ``U_in^T``, the core conv with the original strides/pads/dilations, and a 1x1 conv
      ``U_out`` with the bias. The error is at most the sum of the two modes' left-out
      energies. No HOOI refinement.
    - Conv k x k, ``method: spatial`` (2-D kernels): ``M = W.transpose(1, 2, 0, 3)
      .reshape(Cin*kh, Cout*kw)``, so ``M[(c,i),(o,j)] = W[o,c,i,j]``; ``M = L R`` gives a
      vertical conv ``L -> [r, Cin, kh, 1]`` (strides/pads/dilations of the height axis)
      then a horizontal conv ``R -> [Cout, r, 1, kw]`` (those of the width axis, and the
      bias). Zero padding commutes with the bias-free first conv, so the result is exact at
      full rank.

    Padding is zero in every case, and the first factor has no bias, so padded borders give
    the same values as the original layer. The output-producing node keeps the layer id; the
    others get ``<id>/lowrank.in`` and ``<id>/lowrank.core``.

    Refused, with the reason: weights that are not plain float constants (quantized ones:
    factorize first), Gemm whose weight is A, batched MatMul weights, grouped convolutions,
    ``auto_pad=SAME_*`` with ``method: spatial``, 1-D/3-D kernels with ``method: spatial``,
    other layer ops, and a factorization that would not reduce params.
    """

    name = "factorize-lowrank"
    kind = "lossy"
    Options = FactorizeOptions
    #: What ``graphsurgeon sensitivity`` varies by default; a lower energy compresses more.
    strength_option: ClassVar[str] = "energy"
    strength_descending: ClassVar[bool] = True

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        ranks: dict[str, int | list[int]] = {}
        saved = 0
        for layer in find_layers(model):
            if not self.selects(layer.node):
                continue
            options = self.options_for(layer.id)
            plan = self._plan(layer, options)
            if plan is None:
                continue
            if options.only_if_smaller and plan.params_after >= plan.params_before:
                self.skip(layer.node, "low rank would not reduce params")
                continue
            _apply(layer, plan)
            ranks[layer.id] = plan.rank
            saved += plan.params_before - plan.params_after
            modified = True
        if ranks:
            self.note("ranks", ranks)
            self.note("params_saved", saved)
        return PassResult(model, modified)

    def _plan(self, layer: Layer, options: FactorizeOptions) -> _Plan | None:
        node = layer.node
        weight = ir.convenience.get_const_tensor(layer.weight_value)
        if weight is None:
            self.skip(node, "weight is quantized (DequantizeLinear): factorize before quantizing")
            return None
        if weight.dtype not in _FLOATS:
            self.skip(node, f"weight dtype {weight.dtype.name} is not float")
            return None
        w = weight.numpy().astype(np.float64)
        rank, energy = options.rank, options.energy
        if node.op_type == "Gemm":
            if layer.weight_index != 1:
                self.skip(node, "Gemm weight is the A operand")
                return None
            if node.attributes.get_int("transB", 0):
                w = w.T
            left, right, r = svd_factors(w, rank, energy)
            first = {"transA": node.attributes.get_int("transA", 0)}
            second = {
                "alpha": node.attributes.get_float("alpha", 1.0),
                "beta": node.attributes.get_float("beta", 1.0),
            }
            return _Plan(
                [("Gemm", [left], first), ("Gemm", [right, _SAME], second)],
                r,
                w.size,
                left.size + right.size,
            )
        if node.op_type == "MatMul":
            if w.ndim != 2:
                self.skip(node, f"MatMul weight of rank {w.ndim} (only 2-D weights)")
                return None
            left, right, r = svd_factors(w, rank, energy)
            if layer.weight_index == 1:  # X W = (X L) R
                ops = [("MatMul", [left], {}), ("MatMul", [right], {})]
            else:  # W X = L (R X)
                ops = [("MatMul", [right], {}), ("MatMul", [left], {})]
            return _Plan(ops, r, w.size, left.size + right.size)
        if node.op_type == "Conv":
            return self._plan_conv(node, w, options)
        self.skip(node, f"{node.op_type} layers are not factorized")
        return None

    def _plan_conv(self, node: ir.Node, w: np.ndarray, options: FactorizeOptions) -> _Plan | None:
        group = node.attributes.get_int("group", 1)
        if group != 1:
            self.skip(node, "grouped convolution")
            return None
        cout, cin, *kernel = w.shape
        rank, energy = options.rank, options.energy
        ones = [1] * len(kernel)
        if all(k == 1 for k in kernel):
            left, right, r = svd_factors(w.reshape(cout, cin), rank, energy)
            attrs = _conv_attrs(node)
            return _Plan(
                [
                    ("Conv", [right.reshape(r, cin, *ones)], attrs),
                    ("Conv", [left.reshape(cout, r, *ones), _SAME], {}),
                ],
                r,
                w.size,
                left.size + right.size,
            )
        if options.method == "tucker2":
            u_out = _mode_basis(w.reshape(cout, -1), rank, energy)
            u_in = _mode_basis(np.moveaxis(w, 1, 0).reshape(cin, -1), rank, energy)
            core = np.einsum("oc...,or,cs->rs...", w, u_out, u_in)
            r_out, r_in = u_out.shape[1], u_in.shape[1]
            return _Plan(
                [
                    ("Conv", [u_in.T.reshape(r_in, cin, *ones)], {}),
                    ("Conv", [core], _conv_attrs(node)),
                    ("Conv", [u_out.reshape(cout, r_out, *ones), _SAME], {}),
                ],
                [r_in, r_out],
                w.size,
                u_in.size + core.size + u_out.size,
            )
        if len(kernel) != 2:
            self.skip(node, "spatial factorization needs a 2-D kernel")
            return None
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            self.skip(node, "spatial factorization needs explicit pads, not auto_pad=SAME_*")
            return None
        kh, kw = kernel
        matrix = w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)
        left, right, r = svd_factors(matrix, rank, energy)
        vertical = left.reshape(cin, kh, r).transpose(2, 0, 1)[..., None]  # [r, Cin, kh, 1]
        horizontal = right.reshape(r, cout, kw).transpose(1, 0, 2)[:, :, None, :]
        strides = list(node.attributes.get_ints("strides", [1, 1]))
        dilations = list(node.attributes.get_ints("dilations", [1, 1]))
        pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
        first = {
            "kernel_shape": [kh, 1],
            "strides": [strides[0], 1],
            "dilations": [dilations[0], 1],
            "pads": [pads[0], 0, pads[2], 0],
        }
        second = {
            "kernel_shape": [1, kw],
            "strides": [1, strides[1]],
            "dilations": [1, dilations[1]],
            "pads": [0, pads[1], 0, pads[3]],
        }
        return _Plan(
            [("Conv", [vertical], first), ("Conv", [horizontal, _SAME], second)],
            r,
            w.size,
            left.size + right.size,
        )


#: Placeholder in a plan's weight list: reuse the original node's bias input here.
_SAME = None


def _conv_attrs(node: ir.Node) -> dict[str, object]:
    """Strides, pads, dilations and auto_pad of ``node`` (kernel_shape comes from the weight)."""
    return {
        name: attr.value
        for name, attr in node.attributes.items()
        if name in ("strides", "pads", "dilations", "auto_pad")
    }


def _apply(layer: Layer, plan: _Plan) -> None:
    """Replace ``layer.node`` by the plan's chain, keeping its output name and layer id."""
    node, graph = layer.node, layer.node.graph
    assert graph is not None
    taken = _names(graph)
    weight_value = layer.weight_value
    base = weight_value.name or layer.id
    x = node.inputs[1 - layer.weight_index] if node.op_type in ("Gemm", "MatMul") else None
    if x is None:
        x = node.inputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    roles = ["in", "core"][: len(plan.ops) - 1]
    new_nodes: list[ir.Node] = []
    current = x
    for i, (op, weights, attrs) in enumerate(plan.ops):
        last = i == len(plan.ops) - 1
        role = "" if last else f"/lowrank.{roles[i]}"
        values: list[ir.Value | None] = []
        for array in weights:
            if array is _SAME:
                values.append(bias)
                continue
            name = _unique(f"{base}.lowrank.{i}", taken)
            tensor = ir.tensor(array.astype(layer.weight.dtype.numpy()), name=name)
            value = ir.val(name, const_value=tensor)
            graph.register_initializer(value)
            values.append(value)
        if op == "MatMul" and layer.weight_index == 0:  # W X: the weight is the left operand
            inputs = [values[0], current]
        else:
            inputs = [current, *values]
        while inputs[-1] is None:  # no bias: leave the optional input out
            inputs.pop()
        new = ir.node(
            op,
            inputs,
            attributes={k: v for k, v in attrs.items() if v is not None},
            name=f"{node.name}{role}" if node.name else None,
            metadata_props={LAYER_ID_KEY: f"{layer.id}{role}"},
        )
        if not last:
            new.outputs[0].name = _unique(f"{node.outputs[0].name}{role}", taken)
        new_nodes.append(new)
        current = new.outputs[0]
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], new_nodes, [node.outputs[0]], [new_nodes[-1].outputs[0]]
    )
    _drop_if_unused(graph, weight_value)


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.is_initializer() and value.name in graph.initializers:
        del graph.initializers[value.name]
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
        graph.remove(producer, safe=True)


def _names(graph: ir.Graph) -> set[str]:
    names = set(graph.initializers)
    names.update(v.name for v in graph.inputs if v.name)
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def _unique(base: str, taken: set[str]) -> str:
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name

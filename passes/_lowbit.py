"""Low-bit weight codes: grid quantizers, bit packing, and the two packed weight forms.

A weight is handled as a matrix ``V`` of shape ``[N, K]``: one row per output channel, ``K``
the reduction dim (a MatMul ``[K, N]`` weight is transposed, a Conv weight is flattened to
``[M, C/g * kh * kw]``). Each row is cut into groups of ``g`` consecutive entries along K, and
every group gets its own grid: ``w_hat = (code - zero) * scale`` with integer codes.

Grids (``b`` stored bits per weight):

- symmetric int-b: ``zero = 2^(b-1)``; the entry of largest magnitude (sign kept) maps to
  code 0, i.e. ``scale = w_max / -2^(b-1)`` (the full two's-complement range, as ORT does);
- asymmetric int-b: the range ``[min(w, 0), max(w, 0)]`` spread over ``2^b - 1`` steps,
  ``zero = round(-min / scale)``;
- ternary (2 stored bits): codes {1, 2, 3} with zero 2, so ``w_hat`` in {-a, 0, +a} with
  ``a`` the mean magnitude of the entries above ``0.7 * mean|w|`` (TWN's threshold);
- binary: codes {1, 3} with zero 2, ``w_hat = sign(w) * mean|w|`` (the L2-optimal scale for
  a sign code). MatMulNBits stores them in 2 bits; the codebook form in 1 bit.

Packed forms:

- ``MatMulNBits`` (com.microsoft, ORT CPU kernel for bits 2, 4, 8): B is ``[N, n_blocks,
  blob]`` uint8, codes packed low bits first; scales ``[N * n_blocks]``; zero points (only for
  asymmetric grids) packed the same way per row, ``[N * ceil(n_blocks * b / 8)]``. Without
  zero points the kernel uses ``2^(b-1)``.
- a codebook decode subgraph in the default domain (opset >= 13, runs anywhere): codes packed
  ``8/b`` per byte, unpacked at run time with integer ``Div``/``Mod`` by powers of two, then
  ``Gather`` from a ``2^b``-entry float codebook, times the group scales (plus the group
  offsets ``-zero * scale``), reshaped to the weight's shape. Its nodes carry
  :data:`graphsurgeon.packed.DECODED_WEIGHT_KEY` so the layer finder sees the packed weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphsurgeon.packed import DECODED_WEIGHT_KEY

Scheme = Literal["int", "ternary", "binary"]
#: File bytes of one decode subgraph besides its codes and scales (nodes, names, small
#: constants), counted when deciding whether packing a weight pays off.
DECODE_OVERHEAD_BYTES = 1024


@dataclass(frozen=True)
class Grid:
    """How a group of weights maps to codes: the scheme, stored bits and symmetry."""

    scheme: Scheme
    bits: int  # stored bits per code in MatMulNBits (binary/ternary: 2)
    symmetric: bool = True

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def default_zero(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def needs_zero_points(self) -> bool:
        return self.scheme == "int" and not self.symmetric

    @property
    def codebook_bits(self) -> int:
        """Bits per code in the codebook form (binary needs only one)."""
        return 1 if self.scheme == "binary" else self.bits

    def fit(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point ``[rows]`` for the groups ``w[rows, g]`` (float64)."""
        rows = w.shape[0]
        if self.scheme == "binary":
            return np.mean(np.abs(w), axis=1), np.full(rows, 2.0)
        if self.scheme == "ternary":
            mag = np.abs(w)
            delta = 0.7 * mag.mean(axis=1, keepdims=True)
            above = mag > delta
            count = above.sum(axis=1)
            a = np.where(count > 0, (mag * above).sum(axis=1) / np.maximum(count, 1), 0.0)
            return a, np.full(rows, 2.0)
        if self.symmetric:
            idx = np.argmax(np.abs(w), axis=1)
            extreme = w[np.arange(rows), idx]
            return extreme / -self.default_zero, np.full(rows, float(self.default_zero))
        lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
        scale = (hi - lo) / self.qmax
        safe = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.round(-lo / safe), 0, self.qmax)
        return scale, zero

    def codes(self, w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """Nearest codes of ``w[rows, ...]`` on the grids ``scale, zero [rows]`` (uint8)."""
        shape = (-1,) + (1,) * (w.ndim - 1)
        s, z = scale.reshape(shape), zero.reshape(shape)
        if self.scheme == "binary":
            return np.where(w >= 0, 3, 1).astype(np.uint8)
        safe = np.where(s == 0, 1.0, s)
        q = np.round(w / safe) + z
        lo, hi = (1, 3) if self.scheme == "ternary" else (0, self.qmax)
        return np.clip(q, lo, hi).astype(np.uint8)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """``(codes - zero) * scale`` with ``codes [N, G, g]`` and ``scale, zero [N, G]``."""
    return (codes.astype(np.float32) - zero[..., None].astype(np.float32)) * scale[
        ..., None
    ].astype(np.float32)


def quantize_rtn(
    v: np.ndarray, grid: Grid, group: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest: codes ``[N, G, g]``, scales and zeros ``[N, G]`` for ``v [N, K]``.

    K is zero-padded to a multiple of ``group``; padded entries get code ``zero`` (value 0).
    """
    n, k = v.shape
    groups = math.ceil(k / group)
    padded = np.zeros((n, groups * group), dtype=np.float64)
    padded[:, :k] = v
    blocks = padded.reshape(n * groups, group)
    scale, zero = grid.fit(blocks)
    codes = grid.codes(blocks, scale, zero)
    return codes.reshape(n, groups, group), scale.reshape(n, groups), zero.reshape(n, groups)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``codes`` ``8/bits`` per byte, low bits first."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last axis {codes.shape[-1]} is not a multiple of {per_byte}")
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint8)


# -- MatMulNBits --------------------------------------------------------------------------------
def matmulnbits_tensors(
    codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, grid: Grid
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """B ``[N, G, g*b/8]``, scales ``[N*G]`` and packed zero points (or None) for ORT."""
    b = grid.bits
    packed = pack_bits(codes, b)
    scales = scale.astype(np.float32).reshape(-1)
    if not grid.needs_zero_points:
        return packed, scales, None
    n, groups = zero.shape
    per_byte = 8 // b
    zp = np.full((n, math.ceil(groups / per_byte) * per_byte), grid.default_zero, np.uint8)
    zp[:, :groups] = zero.astype(np.uint8)
    return packed, scales, pack_bits(zp, b).reshape(-1)


# -- codebook decode subgraph -------------------------------------------------------------------
def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    taken |= {v.name for v in graph.inputs}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def emit_codebook_decode(
    graph: ir.Graph,
    before: ir.Node,
    base: str,
    codes: np.ndarray,
    bits: int,
    codebook: np.ndarray,
    weight_shape: tuple[int, ...],
    *,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    transpose: bool = False,
) -> ir.Value:
    """Insert, before ``before``, nodes that rebuild a float32 weight from packed codes.

    ``codes [R, G, g]`` index ``codebook [2^bits]``; ``scale``/``offset [R, G]`` (optional)
    give ``w = codebook[code] * scale + offset`` per group. The ``[R, G*g]`` result, cut to
    the weight's element count per row, is reshaped to ``weight_shape`` (transposed first if
    ``transpose``: the codes were laid out as ``[N, K]`` for a ``[K, N]`` weight).
    """
    rows, groups, group = codes.shape
    flat = codes.reshape(-1)
    per_byte = 8 // bits
    pad = (-flat.size) % per_byte
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    packed = pack_bits(flat, bits).reshape(-1, 1)
    name = unique_name(graph, f"{base}_packed{bits}")
    nodes: list[ir.Node] = []

    def op(op_type: str, *inputs: ir.Value, **attrs) -> ir.Value:
        step = f"{name}/{op_type}_{len(nodes)}"
        out = ir.Value(name=step)
        node = ir.node(op_type, list(inputs), attributes=attrs, name=step, outputs=[out])
        node.metadata_props[DECODED_WEIGHT_KEY] = "step"
        nodes.append(node)
        graph.insert_before(before, node)
        return out

    p = _const(graph, name, packed)
    x = op("Cast", p, to=ir.DataType.INT32)
    divisors = (1 << (np.arange(per_byte) * bits)).astype(np.int32)
    x = op("Div", x, _const(graph, f"{name}_shifts", divisors))
    x = op("Mod", x, _const(graph, f"{name}_base", np.array(1 << bits, np.int32)))
    w = op("Gather", _const(graph, f"{name}_codebook", codebook.astype(np.float32)), x, axis=0)
    if pad:  # drop the codes that only filled the last byte
        w = op("Reshape", w, _const(graph, f"{name}_flat", _i64([-1])))
        w = op(
            "Slice",
            w,
            _const(graph, f"{name}_start", _i64([0])),
            _const(graph, f"{name}_count", _i64([codes.size])),
            _const(graph, f"{name}_axis0", _i64([0])),
        )
    if scale is not None:
        if pad:  # groups are multiples of 16 codes, so grouped codes fill whole bytes
            raise ValueError("grouped codes must fill whole bytes")
        w = op("Reshape", w, _const(graph, f"{name}_groups", _i64([rows, groups, group])))
        w = op("Mul", w, _const(graph, f"{name}_scales", scale.astype(np.float32)[..., None]))
        if offset is not None:
            w = op("Add", w, _const(graph, f"{name}_offsets", offset.astype(np.float32)[..., None]))
    w = op("Reshape", w, _const(graph, f"{name}_rows", _i64([rows, -1])))
    per_row = math.prod(weight_shape) // rows
    if groups * group != per_row:
        w = op(
            "Slice",
            w,
            _const(graph, f"{name}_from", _i64([0])),
            _const(graph, f"{name}_to", _i64([per_row])),
            _const(graph, f"{name}_axis", _i64([1])),
        )
    current = (rows, per_row)
    if transpose:
        w = op("Transpose", w, perm=[1, 0])
        current = (per_row, rows)
    if current != tuple(weight_shape):
        w = op("Reshape", w, _const(graph, f"{name}_weight_shape", _i64(list(weight_shape))))
    nodes[-1].metadata_props[DECODED_WEIGHT_KEY] = "weight"
    w.dtype, w.shape = ir.DataType.FLOAT, ir.Shape(weight_shape)
    return w


def _i64(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)

"""Numpy references for the Triton kernels and the ``graphsurgeon`` custom ops.

Each custom op that ``lower-kernels`` writes is *defined* by a function here; the Triton
kernels and the ``raise-kernels`` pass are tested against them. The layouts:

- **W4A16 / W8A16** read ``com.microsoft::MatMulNBits`` tensors as stored (no repacking): B
  ``[N, n_blocks, block_size * bits / 8]`` uint8, codes low bits first along K; scales
  ``[N * n_blocks]``; zero points packed the same way per row (``[N * ceil(n_blocks * bits /
  8)]``) or absent (then ``2^(bits-1)``). ``W[k, n] = (code[n, k] - zero[n, k // bs]) *
  scale[n, k // bs]``, ``y = x @ W``.
- **2:4** (``SparseMatMul24``) stores ``W^T`` (``[N, K]``, the operand sparse tensor cores
  take) compressed along K: in each group of 4 consecutive k at most 2 entries are kept;
  ``values [N, K/2]`` in group order, and their positions in the group (2 bits each) in
  ``meta [N, ceil(K/8)]`` uint8, four positions per byte, low bits first. A group with fewer
  than two nonzeros is padded with zeros at its lowest free positions (positions stay
  distinct and ascending, as the hardware format wants).
- **BSR** (``BsrMatMul``) stores ``W^T`` as block-sparse rows with blocks ``[bn, bk]``: block
  row ``i`` covers outputs ``i*bn .. i*bn+bn-1``; ``data [nnzb, bn, bk]``, the K-block of each
  block in ``indices [nnzb]``, rows delimited by ``indptr [ceil(N/bn) + 1]`` (scipy's BSR of
  ``W^T``). Edge blocks are zero padded.
- **int8** (``MatMulInt8``): ``MatMulInteger``'s semantics, ``(A - a_zp) @ (B - b_zp)`` in
  int32, ``a_zp`` a scalar, ``b_zp`` a scalar or one per column.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "bsr_from_dense",
    "bsr_matmul",
    "bsr_to_dense",
    "compress_24",
    "decompress_24",
    "dequantize_nbits",
    "evaluator",
    "int8_matmul",
    "matmul_nbits",
    "pack_bits",
    "sparse24_matmul",
    "unpack_bits",
]


# -- bit packing --------------------------------------------------------------------------------
def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis ``8/bits`` codes per byte, low bits first (zero padded)."""
    per_byte = 8 // bits
    pad = (-codes.shape[-1]) % per_byte
    c = codes.astype(np.uint8)
    if pad:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], pad), np.uint8)], axis=-1)
    c = c.reshape(*c.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_bits`; keeps the first ``count`` codes of the last axis."""
    shifts = np.arange(8 // bits, dtype=np.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], -1)
    return codes if count is None else codes[..., :count]


# -- W4A16 / W8A16 ------------------------------------------------------------------------------
def dequantize_nbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """The float32 ``[K, N]`` weight that MatMulNBits tensors encode."""
    blocks = math.ceil(k / block_size)
    codes = unpack_bits(np.asarray(b, np.uint8).reshape(n, -1), bits, blocks * block_size)
    scale = np.asarray(scales, np.float32).reshape(n, blocks)
    if zero_points is None:
        zero = np.full((n, blocks), 1 << (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8:
        zero = unpack_bits(zero_points.reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zero = np.asarray(zero_points, np.float32).reshape(n, blocks)
    w = (codes.reshape(n, blocks, block_size).astype(np.float32) - zero[..., None]) * scale[
        ..., None
    ]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def matmul_nbits(
    x: np.ndarray,
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """``x [..., K] @ W [K, N]`` with W from MatMulNBits tensors (float32 math)."""
    w = dequantize_nbits(b, scales, zero_points, k, n, bits, block_size)
    return (np.asarray(x, np.float32) @ w).astype(np.float32)


# -- 2:4 semi-structured ------------------------------------------------------------------------
def compress_24(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W [K, N]`` with at most 2 nonzeros per 4 consecutive k -> ``values [N, K/2]``,
    ``meta [N, ceil(K/8)]`` uint8. Raises ValueError if W is not 2:4 along K."""
    k, n = w.shape
    if k % 4:
        raise ValueError(f"K={k} is not a multiple of 4")
    groups = np.ascontiguousarray(w.T).reshape(n, k // 4, 4)
    nonzero = groups != 0
    if (nonzero.sum(axis=-1) > 2).any():
        raise ValueError("weight is not 2:4 sparse along K (a group has more than 2 nonzeros)")
    # Kept positions: the nonzeros first, then the lowest zeros; two of them, ascending.
    order = np.argsort(~nonzero, axis=-1, kind="stable")[..., :2]
    positions = np.sort(order, axis=-1)
    values = np.take_along_axis(groups, positions, axis=-1).reshape(n, k // 2)
    meta = pack_bits(positions.reshape(n, k // 2).astype(np.uint8), 2)
    return np.ascontiguousarray(values), meta


def decompress_24(values: np.ndarray, meta: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`compress_24`: the dense ``[K, N]`` weight."""
    n = values.shape[0]
    positions = unpack_bits(meta, 2, k // 2).reshape(n, k // 4, 2).astype(np.int64)
    groups = np.zeros((n, k // 4, 4), dtype=values.dtype)
    np.put_along_axis(groups, positions, values.reshape(n, k // 4, 2), axis=-1)
    return np.ascontiguousarray(groups.reshape(n, k).T)


def sparse24_matmul(
    x: np.ndarray, values: np.ndarray, meta: np.ndarray, k: int, bias: np.ndarray | None = None
) -> np.ndarray:
    y = np.asarray(x, np.float32) @ decompress_24(values, meta, k).astype(np.float32)
    return y if bias is None else y + bias


# -- block-sparse rows --------------------------------------------------------------------------
def bsr_from_dense(
    w: np.ndarray, block: tuple[int, int], keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BSR of ``W^T`` (``W [K, N]``) with blocks ``[bn, bk]``: ``data, indices, indptr``.

    ``keep [ceil(N/bn), ceil(K/bk)]`` chooses the stored blocks (default: every block with a
    nonzero); a nonzero outside ``keep`` raises ValueError, since dropping it would change y.
    """
    k, n = w.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    padded = np.zeros((rows * bn, cols * bk), dtype=w.dtype)
    padded[:n, :k] = w.T
    tiles = padded.reshape(rows, bn, cols, bk).transpose(0, 2, 1, 3)  # [rows, cols, bn, bk]
    nonzero = (tiles != 0).any(axis=(2, 3))
    if keep is None:
        keep = nonzero
    elif (nonzero & ~keep).any():
        raise ValueError("the weight has nonzeros outside the kept blocks")
    r, c = np.nonzero(keep)  # row-major: sorted by block row, then column
    data = np.ascontiguousarray(tiles[r, c])
    indptr = np.zeros(rows + 1, np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return data, c.astype(np.int32), indptr


def bsr_to_dense(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, k: int, n: int
) -> np.ndarray:
    """The dense ``[K, N]`` weight of a BSR ``W^T``."""
    bn, bk = data.shape[1:]
    rows, cols = len(indptr) - 1, -(-k // bk)
    padded = np.zeros((rows, cols, bn, bk), dtype=data.dtype)
    r = np.repeat(np.arange(rows), np.diff(indptr))
    padded[r, indices] = data
    return np.ascontiguousarray(padded.transpose(0, 2, 1, 3).reshape(rows * bn, -1)[:n, :k].T)


def bsr_matmul(
    x: np.ndarray,
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    k: int,
    n: int,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    y = np.asarray(x, np.float32) @ bsr_to_dense(data, indices, indptr, k, n).astype(np.float32)
    return y if bias is None else y + bias


# -- int8 ---------------------------------------------------------------------------------------
def int8_matmul(
    a: np.ndarray, b: np.ndarray, a_zero: np.ndarray | int = 0, b_zero: np.ndarray | int = 0
) -> np.ndarray:
    """``(A - a_zero) @ (B - b_zero)`` in int32, as ONNX ``MatMulInteger``."""
    a32 = np.asarray(a).astype(np.int32) - np.asarray(a_zero).astype(np.int32)
    b32 = np.asarray(b).astype(np.int32) - np.asarray(b_zero).astype(np.int32)
    return np.matmul(a32, b32).astype(np.int32)


# -- the custom ops, for onnx's reference evaluator ---------------------------------------------
def evaluator(model: Any) -> Any:
    """An ``onnx.reference.ReferenceEvaluator`` that also runs the ``graphsurgeon`` custom ops
    (with the functions above): a CPU oracle for lowered models, no GPU needed."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=_custom_ops())


def _custom_ops() -> list[type]:
    from onnx.reference.op_run import OpRun

    class _GS(OpRun):
        op_domain = "graphsurgeon"

    class MatMulW4A16(_GS):
        def _run(self, a, b, scales, zero_points=None, K=None, N=None, bits=None,
                 block_size=None, has_zeros=None):  # fmt: skip
            y = matmul_nbits(a, b, scales, zero_points, K, N, bits, block_size)
            return (y.astype(a.dtype),)

    class MatMulW8A16(MatMulW4A16):
        pass

    class SparseMatMul24(_GS):
        def _run(self, a, values, meta, bias=None, K=None, N=None):
            return (sparse24_matmul(a, values, meta, K, bias).astype(a.dtype),)

    class BsrMatMul(_GS):
        def _run(self, a, data, indices, indptr, bias=None, K=None, N=None, blocksize=None):
            return (bsr_matmul(a, data, indices, indptr, K, N, bias).astype(a.dtype),)

    class MatMulInt8(_GS):
        def _run(self, a, b, a_zero_point=None, b_zero_point=None):
            a_zero = 0 if a_zero_point is None else a_zero_point
            b_zero = 0 if b_zero_point is None else b_zero_point
            return (int8_matmul(a, b, a_zero, b_zero),)

    return [MatMulW4A16, MatMulW8A16, SparseMatMul24, BsrMatMul, MatMulInt8]

"""``com.microsoft::MatMulNBits`` for TVM: dequantization fused into the matmul.

TVM's ONNX importer has no converter for it. This one emits a single TE compute whose
reduction reads the packed codes directly:

    Y[m, n] = sum_k A[m, k] * (code(n, k) - zero(n, k // g)) * scale[n * G + k // g]

with ``code`` unpacked from ``B[n, k // g, (k % g) // (8 / b)]`` by a shift and a mask (codes
are packed low bits first), ``G = ceil(K / g)`` blocks per row, and the zero point either
unpacked the same way from ``zero_points[n * ceil(G * b / 8) + ...]`` or ``2^(b - 1)`` when
absent (ORT's default). The dequantization is a stage of the same kernel: the CPU schedule
computes it for one ``[K, vector]`` column slice at a time, inside the matmul's outer loop, so
the slice sits in L1 for every output row while the full float weight never exists: memory
traffic stays at b bits per weight, which is the point of the format. Layout as written by ``quantize-weights``
(:mod:`graphsurgeon.passes._lowbit`) and ORT's contrib op spec.
"""

from __future__ import annotations

import math

from tvm import relax, te, tirx
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

#: The dequantization stage's block: the CPU schedule computes it per column block of the
#: output, right before the matmul reads it (see :mod:`.schedules`), instead of inlining it.
DEQUANT_BLOCK = "dequantize_nbits"


def nbits_matmul(
    a: te.Tensor,
    packed: te.Tensor,
    scales: te.Tensor,
    zero_points: te.Tensor | None,
    *,
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> te.Tensor:
    """``a [M, K] float32`` times the packed ``[K, N]`` weight -> ``[M, N]`` float32."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    blocks = math.ceil(k / block_size)
    zero_row = math.ceil(blocks * bits / 8)
    rk = te.reduce_axis((0, k), name="k")

    def code(j, kk):
        w = kk % block_size
        byte = packed[j, kk // block_size, w // per_byte]
        return (byte >> ((w % per_byte) * bits).astype("uint8")) & tirx.const(mask, "uint8")

    def zero(j, blk):
        if zero_points is None:
            return tirx.const(1 << (bits - 1), "float32")
        byte = zero_points[j * zero_row + blk * bits // 8]
        shift = ((blk * bits) % 8).astype("uint8")
        return ((byte >> shift) & tirx.const(mask, "uint8")).astype("float32")

    def weight(j, kk):
        blk = kk // block_size
        return (code(j, kk).astype("float32") - zero(j, blk)) * scales[j * blocks + blk]

    w = te.compute((k, n), lambda kk, j: weight(j, kk), name=DEQUANT_BLOCK)
    return te.compute(
        (a.shape[0], n), lambda i, j: te.sum(a[i, rk] * w[rk, j], axis=rk), name="matmul_nbits"
    )


class MatMulNBits(OnnxOpConverter):
    """Inputs: A, B (uint8 ``[N, G, blob]``), scales ``[N * G]``, zero_points (optional),
    g_idx (unsupported), bias (optional). Leading dims of A are flattened into M."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        a, packed, scales = inputs[0], inputs[1], inputs[2]
        zero_points = inputs[3] if len(inputs) > 3 else None
        g_idx = inputs[4] if len(inputs) > 4 else None
        bias = inputs[5] if len(inputs) > 5 else None
        k, n, bits = int(attr["K"]), int(attr["N"]), int(attr["bits"])
        block_size = int(attr["block_size"])
        if bits not in (2, 4, 8):
            raise ValueError(f"MatMulNBits with bits={bits} (only 2, 4 and 8 are supported)")
        if g_idx is not None:
            raise ValueError("MatMulNBits with g_idx (act-order) is not supported")
        if zero_points is not None and zero_points.ty.dtype.dtype != "uint8":
            raise ValueError("MatMulNBits with float zero points is not supported")
        if a.ty.dtype.dtype != "float32":
            raise ValueError(f"MatMulNBits with {a.ty.dtype.dtype} input (float32 only)")
        shape = [int(d) for d in a.ty.shape]
        lead = shape[:-1]
        a2 = bb.emit(relax.op.reshape(a, [math.prod(lead), k]))
        args = [a2, packed, scales] + ([zero_points] if zero_points is not None else [])

        def compute(a_t, b_t, s_t, *z):
            return nbits_matmul(
                a_t,
                b_t,
                s_t,
                z[0] if z else None,
                k=k,
                n=n,
                bits=bits,
                block_size=block_size,
            )

        y = bb.emit_te(compute, *args, primfunc_name_hint="matmul_nbits")
        y = relax.op.reshape(y, [*lead, n])
        if bias is not None:
            y = relax.op.add(y, bias)
        return y


class GatherBlockQuantized(OnnxOpConverter):
    """``com.microsoft::GatherBlockQuantized`` (``quantize-weights`` on an embedding table):
    rows looked up from the packed table and dequantized in one TE compute,

        out[..., j] = (code(r, j) - zero(r, j // g)) * scales[r, j // g],   r = ids[...]

    codes packed low bits first in uint8 (two 4-bit codes per byte), zero points packed the
    same way per row or ``2^(bits - 1)`` when absent. Only the rows looked up are decoded: the
    table stays packed (b bits per weight) in the library. Negative ids count from the end.
    Supported: uint8-packed data, ``gather_axis = 0``, ``quantize_axis`` the last axis."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        packed, ids, scales = inputs[0], inputs[1], inputs[2]
        zero_points = inputs[3] if len(inputs) > 3 else None
        bits = int(attr.get("bits", 4))
        block_size = int(attr.get("block_size", 128))
        shape = [int(d) for d in packed.ty.shape]
        if packed.ty.dtype.dtype != "uint8" or len(shape) != 2 or bits not in (2, 4, 8):
            raise ValueError("GatherBlockQuantized: only a 2-D uint8-packed table is supported")
        if int(attr.get("gather_axis", 0)) != 0 or int(attr.get("quantize_axis", 1)) not in (
            1,
            -1,
        ):
            raise ValueError("GatherBlockQuantized: only gather_axis 0, quantize_axis 1")
        rows, per_byte = shape[0], 8 // bits
        width = shape[1] * per_byte
        mask = (1 << bits) - 1
        lead = [int(d) for d in ids.ty.shape]

        def compute(p_t, i_t, s_t, *z):
            def value(*idx):
                r = i_t[idx[:-1]].astype("int64")
                r = tirx.Select(r < 0, r + rows, r)
                j = idx[-1]
                byte = p_t[r, j // per_byte]
                code = (byte >> ((j % per_byte) * bits).astype("uint8")) & tirx.const(mask, "uint8")
                blk = j // block_size
                if z:
                    zb = z[0][r, blk // per_byte]
                    shift = ((blk % per_byte) * bits).astype("uint8")
                    zero = ((zb >> shift) & tirx.const(mask, "uint8")).astype("float32")
                else:
                    zero = tirx.const(1 << (bits - 1), "float32")
                scale = s_t[r, blk].astype("float32")
                return ((code.astype("float32") - zero) * scale).astype(s_t.dtype)

            return te.compute((*lead, width), value, name="gather_block_quantized")

        args = [packed, ids, scales] + ([zero_points] if zero_points is not None else [])
        return bb.emit_te(compute, *args, primfunc_name_hint="gather_block_quantized")

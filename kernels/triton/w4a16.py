"""W4A16 / W8A16: ``y = x @ W`` with W in MatMulNBits' packed low-bit form, dequantized on the fly.

The kernels read MatMulNBits tensors as ORT stores them (see
:func:`graphsurgeon.kernels.reference.dequantize_nbits`): B as ``[N, K * bits / 8]`` bytes
(codes low bits first along K), scales ``[N, n_blocks]``, zero points packed per row or the
default ``2^(bits-1)``. Nothing is repacked.

Math per K-tile: a tile never straddles a quantization block (``BK`` divides
``block_size``), so its scale and zero are one value per output column, loaded once per tile.
The GEMM dequantizes ``(c - z) * s`` into the activations' dtype (fp16/bf16: the rounding
of any W4A16 kernel) and accumulates ``tl.dot`` in fp32 in place (one accumulator: a second
one for per-tile scaling spilled registers at 64x128 tiles on sm_90). The GEMV is CUDA-core
work: it sums ``x_k (c_kn - z_n)`` in fp32 and scales once per tile, ``s_n * sum_k ...``.

Bytes are loaded whole (``[BK * bits / 8, BN]``, contiguous along K, so loads vectorize); the
``8 / bits`` codes of a byte are peeled off with shifts, and each is matched with the
activations at ``k = k0 + j + (8 / bits) * i`` (strided loads of x, which is small and
cached): ``8 / bits`` partial dots per tile instead of an interleave in registers.

Two paths: a tensor-core GEMM (``tl.dot``) for M > ``GEMV_MAX_M`` rows, and for batch 1-4 a
GEMV that reduces with ``tl.sum`` (no 16-row padding of the MMA) and splits K over
``SPLIT_K`` programs that ``atomic_add`` into an fp32 output: at batch 1 the layer is bound
by reading the weight, and split-K keeps every SM streaming it even when N is small.
"""

from __future__ import annotations

import triton
import triton.language as tl
from graphsurgeon.kernels.triton._runtime import LazyKernel

GEMV_MAX_M = 4


def _nbits_gemm(
    x_ptr, b_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_ym, stride_yn,
    b_row, n_blocks, z_row,
    BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    per_byte: tl.constexpr = 8 // BITS
    bkb: tl.constexpr = BK // per_byte  # bytes of a row per K-tile
    code_mask: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n  # grouped order: GROUP_M row tiles share weight tiles in L2
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rb = tl.arange(0, bkb)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kb = k0 // per_byte + rb
        byte = tl.load(
            b_ptr + rn[None, :] * b_row + kb[:, None],
            mask=(rn[None, :] < N) & (kb[:, None] < b_row),
            other=0,
        ).to(tl.int32)  # [bkb, BN], contiguous along K: whole bytes, vectorized loads
        blk = k0 // BLOCK_SIZE
        scale = tl.load(s_ptr + rn * n_blocks + blk, mask=rn < N, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zb = tl.load(z_ptr + rn * z_row + blk // per_byte, mask=rn < N, other=0).to(tl.int32)
            zero = ((zb >> ((blk % per_byte) * BITS)) & code_mask)[None, :]
        else:
            zero = 1 << (BITS - 1)
        for j in tl.static_range(per_byte):  # code j of each byte is k = k0 + j + per_byte * i
            kk = k0 + j + rb * per_byte
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=(rm[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )
            w = ((((byte >> (j * BITS)) & code_mask) - zero) * scale[None, :]).to(x.dtype)
            if IEEE:  # noqa: SIM108 (a constexpr branch: one dot is compiled)
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def _nbits_gemv(
    x_ptr, b_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_ym, stride_yn,
    b_row, n_blocks, z_row,
    BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    per_byte: tl.constexpr = 8 // BITS
    bkb: tl.constexpr = BK // per_byte
    code_mask: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rb = tl.arange(0, bkb)
    # a [bkb, BN] accumulator, summed over K once at the end: no cross-thread reduction per tile
    acc = tl.zeros((bkb, BN), dtype=tl.float32)
    k_chunk = tl.cdiv(tl.cdiv(K, BK), SPLIT_K) * BK
    k_start = pid_k * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    for k0 in range(k_start, k_end, BK):
        kb = k0 // per_byte + rb
        byte = tl.load(
            b_ptr + rn[None, :] * b_row + kb[:, None],
            mask=(rn[None, :] < N) & (kb[:, None] < b_row),
            other=0,
        ).to(tl.int32)
        blk = k0 // BLOCK_SIZE
        scale = tl.load(s_ptr + rn * n_blocks + blk, mask=rn < N, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zb = tl.load(z_ptr + rn * z_row + blk // per_byte, mask=rn < N, other=0).to(tl.int32)
            zero = ((zb >> ((blk % per_byte) * BITS)) & code_mask)[None, :]
        else:
            zero = 1 << (BITS - 1)
        for j in tl.static_range(per_byte):
            kk = k0 + j + rb * per_byte
            x = tl.load(x_ptr + m * stride_xm + kk * stride_xk, mask=kk < K, other=0.0)
            w = (((byte >> (j * BITS)) & code_mask) - zero).to(tl.float32)
            acc += w * (x.to(tl.float32)[:, None] * scale[None, :])
    acc = tl.sum(acc, axis=0)
    out = y_ptr + m * stride_ym + rn * stride_yn
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.atomic_add(out, acc, mask=rn < N)


nbits_gemm = LazyKernel(_nbits_gemm)
nbits_gemv = LazyKernel(_nbits_gemv)

#: Launch configs tried by the autotuner (the first is the default without tuning).
GEMM_CONFIGS = [  # none spills registers on sm_90 (checked with kernels/triton/aot.py)
    {"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 16, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BM": 32, "BN": 64, "BK": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BM": 128, "BN": 256, "BK": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
]
GEMV_CONFIGS = [
    {"BN": 64, "BK": 128, "SPLIT_K": 1, "num_warps": 4},
    {"BN": 32, "BK": 128, "SPLIT_K": 4, "num_warps": 4},
    {"BN": 64, "BK": 64, "SPLIT_K": 2, "num_warps": 4},
    {"BN": 128, "BK": 32, "SPLIT_K": 1, "num_warps": 4},
    {"BN": 16, "BK": 256, "SPLIT_K": 8, "num_warps": 4},
    {"BN": 64, "BK": 128, "SPLIT_K": 4, "num_warps": 8},
]


def launch(
    x2, b, scales, zero_points, y, *, k: int, n: int, bits: int, block_size: int, config: dict
) -> None:
    """Launch the GEMM or GEMV kernel for ``x2 [M, K]`` into ``y [M, N]`` (allocated by the
    caller; zero filled fp32 when ``config["SPLIT_K"] > 1``)."""
    m = x2.shape[0]
    n_blocks = -(-k // block_size)
    z = zero_points if zero_points is not None else scales  # unused pointer when absent
    z_row = zero_points.numel() // n if zero_points is not None else 0
    common = (x2, b, scales, z, y, m, n, k, *x2.stride(), *y.stride(), b.shape[1], n_blocks, z_row)
    bk = min(config["BK"], block_size)  # a tile never straddles a quantization block
    has_zeros = zero_points is not None
    if "BM" not in config:
        bk = max(bk, 8 // bits)  # at least one byte per row
        grid = (triton.cdiv(n, config["BN"]), config["SPLIT_K"], m)
        nbits_gemv[grid](
            *common,
            BITS=bits, BLOCK_SIZE=block_size, HAS_ZEROS=has_zeros,
            BN=config["BN"], BK=bk, SPLIT_K=config["SPLIT_K"], num_warps=config["num_warps"],
        )  # fmt: skip
        return
    grid = (triton.cdiv(m, config["BM"]) * triton.cdiv(n, config["BN"]),)
    nbits_gemm[grid](
        *common,
        BITS=bits, BLOCK_SIZE=block_size, HAS_ZEROS=has_zeros,
        IEEE=x2.dtype == _float32(), BM=config["BM"], BN=config["BN"], BK=bk,
        GROUP_M=config["GROUP_M"], num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip


def _float32():
    import torch

    return torch.float32

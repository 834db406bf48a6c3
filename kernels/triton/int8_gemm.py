"""int8 x int8 -> int32 GEMM with zero points: ONNX ``MatMulInteger`` on the integer tensor cores.

``(A - a_z) @ (B - b_z) = A B - a_z colsum(B) - b_z rowsum(A) + K a_z b_z``: the kernel
runs the raw ``A B`` through ``tl.dot`` (int8 MMA, int32 accumulate) and collects the row and
column sums of the same tiles on the way (each only when its zero point is nonzero: with
symmetric int8 both are skipped), so zero points cost no extra pass. A uint8 A is
shifted to int8 in registers (``A - 128``, with ``a_z - 128``); the lowering stores a uint8 B
as int8 the same way, once. ``b_z`` is a scalar or one per column.
"""

from __future__ import annotations

import triton
import triton.language as tl
from graphsurgeon.kernels.triton._runtime import LazyKernel


def _int8_gemm(
    a_ptr, b_ptr, az_ptr, bz_ptr, y_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_ym, stride_yn, stride_bz,
    A_UNSIGNED: tl.constexpr, ROW_SUM: tl.constexpr, COL_SUM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    row_sum = tl.zeros((BM,), dtype=tl.int32)
    col_sum = tl.zeros((BN,), dtype=tl.int32)
    a_z = tl.load(az_ptr).to(tl.int32)  # a pointer: a zero point computed on the GPU needs no sync
    if A_UNSIGNED:
        a_z = a_z - 128
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a_ptrs = a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak
        a_live = (rm[:, None] < M) & (kk[None, :] < K)
        if A_UNSIGNED:  # u - 128 is u with its top bit flipped, read as int8; padding 128 -> 0
            a = (tl.load(a_ptrs, mask=a_live, other=128) ^ 0x80).to(tl.int8, bitcast=True)
        else:
            a = tl.load(a_ptrs, mask=a_live, other=0)
        b = tl.load(
            b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
            mask=(kk[:, None] < K) & (rn[None, :] < N),
            other=0,
        )
        acc += tl.dot(a, b, out_dtype=tl.int32)
        if ROW_SUM:  # needed only for a nonzero B zero point
            row_sum += tl.sum(a.to(tl.int32), axis=1)
        if COL_SUM:  # needed only for a nonzero (shifted) A zero point
            col_sum += tl.sum(b.to(tl.int32), axis=0)
    b_z = tl.load(bz_ptr + rn * stride_bz, mask=rn < N, other=0).to(tl.int32)
    acc = acc - a_z * col_sum[None, :] - b_z[None, :] * row_sum[:, None] + K * a_z * b_z[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        acc,
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


int8_gemm = LazyKernel(_int8_gemm)

CONFIGS = [  # none spills registers on sm_90 (checked with kernels/triton/aot.py)
    {"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 32, "BN": 64, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 64, "BK": 256, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
]


def launch(a2, b, a_zero, b_zero, y, *, row_sum: bool, col_sum: bool, config: dict) -> None:
    """``a_zero``: int32 ``[1]``; ``b_zero``: int32 ``[1]`` or ``[N]``; the sums are needed for
    a nonzero B zero point (row sums of A) and a nonzero shifted A zero point (column sums)."""
    import torch

    m, k = a2.shape
    n = b.shape[1]
    grid = (triton.cdiv(m, config["BM"]) * triton.cdiv(n, config["BN"]),)
    int8_gemm[grid](
        a2, b, a_zero, b_zero, y, m, n, k,
        *a2.stride(), *b.stride(), *y.stride(), b_zero.stride(0) if b_zero.numel() > 1 else 0,
        A_UNSIGNED=a2.dtype == torch.uint8, ROW_SUM=row_sum, COL_SUM=col_sum,
        BM=config["BM"], BN=config["BN"], BK=config["BK"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip

"""2:4 semi-structured sparse GEMM: ``y = x @ W`` with ``W^T`` stored as values + 2-bit positions.

Layout (see :func:`graphsurgeon.kernels.reference.compress_24`): ``values [N, K/2]`` and
``meta [N, ceil(K/8)]`` uint8, the position (0-3) of each kept value inside its group of 4
consecutive k, four positions per byte, low bits first.

A program computes a ``[BM, BN]`` tile of y. Per K-tile it reads ``BK/2`` values and
``BK/8`` metadata bytes per output column (56% of the dense fp16 bytes), rebuilds the dense
``[BN, BK]`` tile of ``W^T`` in registers (``dense[n, 4g + p] = sum_s v[n, 2g + s] *
[pos[n, 2g + s] == p]``) and runs a dense ``tl.dot``. Triton exposes no sparse MMA
(``mma.sp``), so the gain is in weight traffic: large at small batch, none in the
compute-bound regime (cuSPARSELt / ``torch.sparse.to_sparse_semi_structured`` use the sparse
tensor cores there; ``benchmarks/kernels.py`` compares both).
"""

from __future__ import annotations

import triton
import triton.language as tl
from graphsurgeon.kernels.triton._runtime import LazyKernel


def _sparse24_gemm(
    x_ptr, v_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_ym, stride_yn, v_row, meta_row,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    half: tl.constexpr = BK // 2
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
    rc = tl.arange(0, half)
    slot = tl.arange(0, 4)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cc = k0 // 2 + rc  # compressed column
        live = (rn[:, None] < N) & (cc[None, :] < K // 2)
        v = tl.load(v_ptr + rn[:, None] * v_row + cc[None, :], mask=live, other=0.0)
        byte = tl.load(meta_ptr + rn[:, None] * meta_row + (cc // 4)[None, :], mask=live, other=0)
        pos = (byte.to(tl.int32) >> ((cc % 4) * 2)[None, :]) & 3
        v3 = tl.reshape(v, (BN, half // 2, 2))
        p3 = tl.reshape(pos, (BN, half // 2, 2))
        hit = p3[:, :, :, None] == slot[None, None, None, :]
        dense = tl.sum(tl.where(hit, v3[:, :, :, None], 0.0), axis=2)  # [BN, BK/4, 4]
        w = tl.reshape(dense, (BN, BK)).to(v.dtype)
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        ).to(v.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


sparse24_gemm = LazyKernel(_sparse24_gemm)

CONFIGS = [  # none spills registers on sm_90 (checked with kernels/triton/aot.py)
    {"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 16, "BN": 64, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
]


def launch(x2, values, meta, bias, y, *, k: int, n: int, config: dict) -> None:
    import torch

    m = x2.shape[0]
    grid = (triton.cdiv(m, config["BM"]) * triton.cdiv(n, config["BN"]),)
    sparse24_gemm[grid](
        x2, values, meta, bias if bias is not None else values, y,
        m, n, k, *x2.stride(), *y.stride(), values.stride(0), meta.stride(0),
        HAS_BIAS=bias is not None, IEEE=values.dtype == torch.float32,
        BM=config["BM"], BN=config["BN"], BK=config["BK"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip

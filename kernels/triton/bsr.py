"""Block-sparse GEMM: ``y = x @ W`` with ``W^T`` in BSR form (the blocks ``prune-blocks`` kept).

Layout (see :func:`graphsurgeon.kernels.reference.bsr_from_dense`): ``data [nnzb, bn, bk]``,
``indices [nnzb]`` (K-block of each block), ``indptr [ceil(N/bn) + 1]``. A program owns
``BM`` rows of x and one block row (``bn`` outputs) and walks only that row's stored blocks,
so work and weight traffic scale with the kept blocks. Blocks with both sides >= 16 go
through ``tl.dot`` (tensor cores); smaller blocks (``prune-blocks``' 1x4, 4x4, 8x8) through a
broadcast multiply-sum in fp32, which is correct but leaves the tensor cores idle.
"""

from __future__ import annotations

import triton
import triton.language as tl
from graphsurgeon.kernels.triton._runtime import LazyKernel


def _bsr_gemm(
    x_ptr, data_ptr, indices_ptr, indptr_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    row = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = row * BLOCK_N + tl.arange(0, BLOCK_N)
    bn = tl.arange(0, BLOCK_N)
    bk = tl.arange(0, BLOCK_K)
    start = tl.load(indptr_ptr + row)
    end = tl.load(indptr_ptr + row + 1)
    acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    for i in range(start, end):
        kb = tl.load(indices_ptr + i)
        kk = kb * BLOCK_K + bk
        w = tl.load(data_ptr + i * (BLOCK_N * BLOCK_K) + bn[:, None] * BLOCK_K + bk[None, :])
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        ).to(w.dtype)
        if USE_DOT:
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


bsr_gemm = LazyKernel(_bsr_gemm)

CONFIGS = [
    {"BM": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "num_warps": 8, "num_stages": 3},
    {"BM": 32, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "num_warps": 4, "num_stages": 2},
]


def launch(x2, data, indices, indptr, bias, y, *, k: int, n: int, config: dict) -> None:
    import torch

    m = x2.shape[0]
    block_n, block_k = data.shape[1], data.shape[2]
    use_dot = block_n >= 16 and block_k >= 16
    bm = config["BM"] if use_dot else min(config["BM"], 32)  # the 3-D product lives in registers
    grid = (triton.cdiv(m, bm), indptr.numel() - 1)
    bsr_gemm[grid](
        x2, data, indices, indptr, bias if bias is not None else data, y,
        m, n, k, *x2.stride(), *y.stride(),
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, USE_DOT=use_dot,
        IEEE=data.dtype == torch.float32, BM=bm,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip

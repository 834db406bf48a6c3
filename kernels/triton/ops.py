"""Torch-facing entry points: check the tensors, pick a launch config, launch the kernel.

Every function takes torch tensors on one CUDA device (or on the CPU under
``TRITON_INTERPRET=1``) and returns a new tensor; anything else raises
:class:`~graphsurgeon.errors.GraphSurgeonError` with one line saying what is wrong. Leading
dims of ``x`` are flattened into rows (``[..., K] -> [..., N]``), as ``MatMul`` does.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from graphsurgeon.kernels.triton import autotune, bsr, int8_gemm, sparse24, w4a16
from graphsurgeon.kernels.triton._runtime import check_device

from graphsurgeon.errors import GraphSurgeonError

__all__ = ["bsr_matmul", "int8_matmul", "matmul_nbits", "sparse24_matmul"]


def _rows(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if x.shape[-1] != k:
        raise GraphSurgeonError(f"{what}: x has {x.shape[-1]} columns, the weight has K={k}")
    return x.reshape(-1, k)


def _expect(cond: bool, what: str, problem: str) -> None:
    if not cond:
        raise GraphSurgeonError(f"{what}: {problem}")


def matmul_nbits(
    x: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    *,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``x @ W`` with W in MatMulNBits tensors (W4A16 for bits=4, W8A16 for bits=8, also 2)."""
    what = f"MatMulW{bits}A16"
    check_device(what, x, b, scales, zero_points)
    _expect(bits in (2, 4, 8), what, f"bits must be 2, 4 or 8 (got {bits})")
    _expect(
        block_size >= 16 and block_size & (block_size - 1) == 0,
        what,
        f"block_size must be a power of two >= 16 (got {block_size})",
    )
    n_blocks = -(-k // block_size)
    blob = block_size * bits // 8
    _expect(b.dtype == torch.uint8 and b.numel() == n * n_blocks * blob, what,
            f"B must be uint8 [N, {n_blocks}, {blob}] (got {b.dtype} {list(b.shape)})")  # fmt: skip
    _expect(scales.numel() == n * n_blocks, what, f"scales must have N*{n_blocks} entries")
    if zero_points is not None:
        _expect(zero_points.dtype == torch.uint8, what, "zero points must be packed uint8")
        _expect(zero_points.numel() == n * -(-n_blocks * bits // 8), what,
                "zero points must have N*ceil(n_blocks*bits/8) bytes")  # fmt: skip
        zero_points = zero_points.contiguous()
    x2 = _rows(x, k, what)
    m = x2.shape[0]
    b2 = b.reshape(n, -1).contiguous()
    scales = scales.contiguous()
    # tl.dot needs 16 along K: blocks narrower than 16 bytes per row take the GEMV kernel
    gemv = m <= w4a16.GEMV_MAX_M or block_size * bits // 8 < 16
    name = "w4a16_gemv" if gemv else "w4a16_gemm"

    def run(cfg: dict[str, Any]) -> torch.Tensor:
        split = gemv and cfg.get("SPLIT_K", 1) > 1
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split else None
        if y is None:
            y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        w4a16.launch(x2, b2, scales, zero_points, y, k=k, n=n, bits=bits,
                     block_size=block_size, config=cfg)  # fmt: skip
        return y.to(x.dtype)

    if config is None:
        key = autotune.bucket_key(name, m, n=n, k=k, b=bits, g=block_size)
        config = autotune.choose(
            key,
            w4a16.GEMV_CONFIGS if gemv else w4a16.GEMM_CONFIGS,
            run,
            valid=lambda c: gemv or min(c["BK"], block_size) * bits // 8 >= 16,
        )
    return run(config).reshape(*x.shape[:-1], n)


def sparse24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    k: int,
    n: int,
    bias: torch.Tensor | None = None,
    *,
    config: dict[str, Any] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ W (+ bias)`` with ``W^T`` 2:4-compressed: ``values [N, K/2]``, ``meta [N, K/8]``.

    ``backend="auto"``: on a GPU with at least ``SPARSE_TENSOR_CORE_MIN_M`` fp16/bf16 rows the
    product goes to the sparse tensor cores through torch's semi-structured sparsity
    (cuSPARSELt/CUTLASS; the weight converted once and cached), where Triton, which exposes no
    sparse MMA, would run a dense one; below that (memory bound) and everywhere else, the
    Triton kernel. ``backend="triton"`` always uses the Triton kernel."""
    what = "SparseMatMul24"
    check_device(what, x, values, meta, bias)
    _expect(k % 8 == 0, what, f"K must be a multiple of 8 (got {k})")
    _expect(tuple(values.shape) == (n, k // 2), what, f"values must be [{n}, {k // 2}]")
    _expect(meta.dtype == torch.uint8 and tuple(meta.shape) == (n, k // 8), what,
            f"meta must be uint8 [{n}, {k // 8}]")  # fmt: skip
    x2 = _rows(x, k, what)
    m = x2.shape[0]
    values, meta = values.contiguous(), meta.contiguous()
    if backend == "auto" and x.is_cuda and m >= SPARSE_TENSOR_CORE_MIN_M:
        semi = _semi_structured(values, meta, k, n) if x.dtype == values.dtype else None
        if semi is not None:
            y = torch.mm(semi, x2.t().contiguous()).t()
            y = y if bias is None else y + bias.to(y.dtype)
            return y.reshape(*x.shape[:-1], n)

    def run(cfg: dict[str, Any]) -> torch.Tensor:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        sparse24.launch(x2, values, meta, bias, y, k=k, n=n, config=cfg)
        return y

    if config is None:
        key = autotune.bucket_key("sparse24", m, n=n, k=k)
        config = autotune.choose(key, sparse24.CONFIGS, run)
    return run(config).reshape(*x.shape[:-1], n)


SPARSE_TENSOR_CORE_MIN_M = 256
_SEMI: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _semi_structured(values: torch.Tensor, meta: torch.Tensor, k: int, n: int) -> Any:
    """torch's semi-structured sparse ``W^T`` for these tensors (cached per values tensor), or
    None where torch cannot (no cuSPARSELt/CUTLASS kernel, shape constraints)."""
    cached = _SEMI.get(values)
    if cached is not None and cached[0] is meta:
        return cached[1]
    try:
        from torch.sparse import to_sparse_semi_structured

        shifts = torch.arange(0, 8, 2, device=meta.device, dtype=torch.uint8)
        positions = ((meta[..., None] >> shifts) & 3).reshape(n, k // 4, 2).long()
        dense = torch.zeros((n, k // 4, 4), dtype=values.dtype, device=values.device)
        dense.scatter_(2, positions, values.reshape(n, k // 4, 2))
        semi = to_sparse_semi_structured(dense.reshape(n, k))
    except Exception:  # unsupported GPU, dtype or shape: the Triton kernel it is
        semi = None
    _SEMI[values] = (meta, semi)
    return semi


def bsr_matmul(
    x: torch.Tensor,
    data: torch.Tensor,
    indices: torch.Tensor,
    indptr: torch.Tensor,
    k: int,
    n: int,
    bias: torch.Tensor | None = None,
    *,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``x @ W (+ bias)`` with ``W^T`` in BSR form, blocks ``data.shape[1:] = [bn, bk]``."""
    what = "BsrMatMul"
    check_device(what, x, data, indices, indptr, bias)
    _expect(data.dim() == 3, what, "data must be [nnz_blocks, bn, bk]")
    bn, bk = data.shape[1:]
    for side in (bn, bk):
        _expect(side & (side - 1) == 0, what, f"block sides must be powers of two (got {bn}x{bk})")
    _expect(indptr.numel() == -(-n // bn) + 1, what, f"indptr must have ceil(N/{bn})+1 entries")
    _expect(indices.numel() == data.shape[0], what, "indices must have one entry per block")
    x2 = _rows(x, k, what)
    m = x2.shape[0]
    data = data.contiguous()
    indices, indptr = indices.to(torch.int32).contiguous(), indptr.to(torch.int32).contiguous()

    def run(cfg: dict[str, Any]) -> torch.Tensor:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        bsr.launch(x2, data, indices, indptr, bias, y, k=k, n=n, config=cfg)
        return y

    if config is None:
        key = autotune.bucket_key("bsr", m, n=n, k=k, bn=bn, bk=bk, nnzb=data.shape[0])
        config = autotune.choose(key, bsr.CONFIGS, run)
    return run(config).reshape(*x.shape[:-1], n)


def int8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    a_zero: torch.Tensor | int | None = None,
    b_zero: torch.Tensor | int | None = None,
    *,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``(A - a_zero) @ (B - b_zero)`` in int32; A int8/uint8 ``[..., K]``, B int8 ``[K, N]``."""
    what = "MatMulInt8"
    check_device(what, a, b)
    _expect(a.dtype in (torch.int8, torch.uint8), what, f"A must be int8 or uint8 (got {a.dtype})")
    _expect(b.dtype == torch.int8 and b.dim() == 2, what,
            f"B must be a 2-D int8 tensor (got {b.dtype} {list(b.shape)}); lower-kernels "
            "stores a uint8 B as int8")  # fmt: skip
    k, n = b.shape
    unsigned = a.dtype == torch.uint8
    # Zero points given as tensors stay on the device (no sync); the sums they need are only
    # skipped when they are known (python ints or absent) to cancel.
    az = torch.as_tensor(0 if a_zero is None else a_zero, device=a.device)
    _expect(az.numel() == 1, what, "a_zero_point must be a scalar")
    az = az.reshape(1).to(torch.int32)
    col_sum = not (a_zero is None or isinstance(a_zero, int)) or (a_zero or 0) != 128 * unsigned
    bz = torch.as_tensor(0 if b_zero is None else b_zero, device=b.device)
    _expect(bz.numel() in (1, n), what, f"b_zero_point must be a scalar or have N={n} entries")
    bz = bz.reshape(-1).to(torch.int32).contiguous()
    row_sum = not (b_zero is None or (isinstance(b_zero, int) and b_zero == 0))
    a2 = _rows(a, k, what)
    m = a2.shape[0]

    def run(cfg: dict[str, Any]) -> torch.Tensor:
        y = torch.empty((m, n), dtype=torch.int32, device=a.device)
        int8_gemm.launch(a2, b, az, bz, y, row_sum=row_sum, col_sum=col_sum, config=cfg)
        return y

    if config is None:
        key = autotune.bucket_key("int8", m, n=n, k=k)
        config = autotune.choose(key, int8_gemm.CONFIGS, run)
    return run(config).reshape(*a.shape[:-1], n)

"""Triton GPU kernels for compressed layers, and their torch-facing entry points.

- :mod:`.w4a16`: W4A16/W8A16 dequantize-GEMM and a split-K GEMV, on MatMulNBits tensors as
  stored;
- :mod:`.sparse24`: 2:4 semi-structured sparse GEMM (values + 2-bit positions);
- :mod:`.bsr`: block-sparse (BSR) GEMM for ``prune-blocks`` blocks;
- :mod:`.int8_gemm`: int8 x int8 -> int32 GEMM with zero points;
- :mod:`.autotune`: tuned launch configs, cached on disk per hardware profile;
- :mod:`.ops`: call them with torch tensors; :mod:`.bind`: run a lowered model with them;
- :mod:`.aot`: compile them for an sm_XX GPU on a machine without one (registers, spills).

The semantics of every kernel is the numpy reference in :mod:`graphsurgeon.kernels.reference`.
Kernels are compiled for a CUDA GPU, or run by Triton's interpreter on the CPU when
``TRITON_INTERPRET=1`` (slow; used by the tests with tiny shapes).
"""

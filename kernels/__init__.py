"""Kernel generators, imported as ``graphsurgeon.kernels``.

- :mod:`graphsurgeon.kernels.reference`: numpy references of every kernel (the ground truth
  their tests compare against) and an evaluator for models lowered to ``graphsurgeon`` ops;
- :mod:`graphsurgeon.kernels.triton`: GPU kernels (W4A16/W8A16 dequantize-GEMM and GEMV,
  2:4 sparse, block-sparse BSR, int8 GEMM) bound to the custom ops ``lower-kernels`` emits;
- :mod:`graphsurgeon.kernels.tvm`: TVM Relax compilation and tuning for CPUs (and CUDA).

Passes keep emitting standard ONNX that runs in onnxruntime; kernels are opt-in, through
``lower-kernels`` and ``graphsurgeon compile``.
"""

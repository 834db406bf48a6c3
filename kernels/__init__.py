"""Kernel generators (Triton for GPUs, TVM for CPUs), imported as ``graphsurgeon.kernels``.

Empty until the kernels issue lands: passes emit stock ONNX that runs in onnxruntime.
"""

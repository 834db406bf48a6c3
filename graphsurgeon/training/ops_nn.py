"""Convolutions, pooling, Gemm and normalizations in torch, with ONNX's padding rules.

torch pads symmetrically; ONNX pads each side on its own (``pads = [x1_begin, x2_begin, ...,
x1_end, x2_end, ...]``) or by ``auto_pad``. Every op here pads explicitly with ``F.pad`` and
then runs the torch kernel unpadded, which covers both forms with one code path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graphsurgeon.training.ops import Tensor, attr, op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pads(
    node, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]
) -> list[int]:
    """ONNX begin/end pads for a forward window op, resolving ``auto_pad``."""
    n = len(spatial)
    auto = attr(node, "auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("NOTSET", ""):
        return attr(node, "pads") or [0] * (2 * n)
    if auto == "VALID":
        return [0] * (2 * n)
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def _torch_pads(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] to torch's (last dim first) [b_n, e_n, ..., b_1, e_1]."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _window(node, x: Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[int]]:
    n = len(kernel)
    strides = attr(node, "strides") or [1] * n
    dilations = attr(node, "dilations") or [1] * n
    pads = _pads(node, list(x.shape[2:]), kernel, strides, dilations)
    return strides, dilations, pads


@op("Conv")
def conv(ctx, node, x):
    data, weight = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    kernel = list(weight.shape[2:])
    strides, dilations, pads = _window(node, data, kernel)
    if any(pads):
        data = F.pad(data, _torch_pads(pads))
    conv = _CONV[len(kernel)]
    return [conv(data, weight, bias, strides, 0, dilations, attr(node, "group", 1))]


@op("ConvTranspose")
def _conv_transpose(ctx, node, x):
    data, weight = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    n = weight.dim() - 2
    kernel = list(weight.shape[2:])
    strides = attr(node, "strides") or [1] * n
    dilations = attr(node, "dilations") or [1] * n
    extra = attr(node, "output_padding") or [0] * n
    group = attr(node, "group", 1)
    full = _CONV_T[n](data, weight, None, strides, 0, 0, group, dilations)
    sizes = [
        s * (i - 1) + (k - 1) * d + 1 + e
        for s, i, k, d, e in zip(strides, data.shape[2:], kernel, dilations, extra, strict=True)
    ]
    output_shape = attr(node, "output_shape")
    auto = attr(node, "auto_pad", "NOTSET")
    if output_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is None:
            output_shape = [i * s for i, s in zip(data.shape[2:], strides, strict=True)]
        totals = [size - o for size, o in zip(sizes, output_shape[-n:], strict=True)]
        upper = auto != "SAME_LOWER"
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        pads = begin + [t - b for t, b in zip(totals, begin, strict=True)]
    else:
        pads = attr(node, "pads") or [0] * (2 * n)
    if any(extra):  # output_padding: rows that no input reaches, only the bias
        full = F.pad(full, _torch_pads([0] * n + extra))
    index = tuple(slice(pads[i], full.shape[2 + i] - pads[i + n]) for i in range(n))
    out = full[(slice(None), slice(None), *index)]
    if bias is not None:
        out = out + bias.reshape(1, -1, *[1] * n)
    return [out]


@op("Gemm")
def _gemm(ctx, node, x):
    a, b = x[0], x[1]
    if attr(node, "transA", 0):
        a = a.t()
    if attr(node, "transB", 0):
        b = b.t()
    y = attr(node, "alpha", 1.0) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        y = y + attr(node, "beta", 1.0) * x[2]
    return [y]


@op("BatchNormalization")
def _batch_norm(ctx, node, x):
    if attr(node, "training_mode", 0):
        from graphsurgeon.training.bridge import UnsupportedOpError

        raise UnsupportedOpError(node, "BatchNormalization with training_mode=1")
    data, scale, bias, mean, var = x[:5]
    eps = attr(node, "epsilon", 1e-5)
    return [F.batch_norm(data, mean, var, scale, bias, False, 0.0, eps)]


@op("InstanceNormalization")
def _instance_norm(ctx, node, x):
    return [F.instance_norm(x[0], weight=x[1], bias=x[2], eps=attr(node, "epsilon", 1e-5))]


@op("LayerNormalization")
def _layer_norm(ctx, node, x):
    data, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = attr(node, "axis", -1) % data.dim()
    eps = attr(node, "epsilon", 1e-5)
    shape = tuple(data.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return [F.layer_norm(data, shape, scale, bias, eps)]
    dims = tuple(range(axis, data.dim()))
    mean = data.mean(dim=dims, keepdim=True)
    var = (data - mean).square().mean(dim=dims, keepdim=True)
    out = (data - mean) / torch.sqrt(var + eps) * scale
    return [out if bias is None else out + bias]


@op("MaxPool")
def _max_pool(ctx, node, x):
    data = x[0]
    kernel = attr(node, "kernel_shape")
    if len(node.outputs) > 1 and node.outputs[1].uses():
        from graphsurgeon.training.bridge import UnsupportedOpError

        raise UnsupportedOpError(node, "MaxPool's Indices output")
    strides, dilations, pads = _window(node, data, kernel)
    if any(pads):
        data = F.pad(data, _torch_pads(pads), value=float("-inf"))
    pool = _MAX_POOL[len(kernel)]
    return [pool(data, kernel, strides, 0, dilations, bool(attr(node, "ceil_mode", 0)))]


@op("AveragePool")
def _avg_pool(ctx, node, x):
    data = x[0]
    kernel = attr(node, "kernel_shape")
    strides, dilations, pads = _window(node, data, kernel)
    if any(d != 1 for d in dilations):
        from graphsurgeon.training.bridge import UnsupportedOpError

        raise UnsupportedOpError(node, "AveragePool with dilations")
    ceil = bool(attr(node, "ceil_mode", 0))
    pool = _AVG_POOL[len(kernel)]
    if not any(pads):
        return [pool(data, kernel, strides, 0, ceil, False)]
    padded = F.pad(data, _torch_pads(pads))
    if attr(node, "count_include_pad", 0):
        return [pool(padded, kernel, strides, 0, ceil, True)]
    # mean over the real (unpadded) elements of each window: window sum / window count
    ones = F.pad(torch.ones_like(data[:1, :1]), _torch_pads(pads))
    total = pool(padded, kernel, strides, 0, ceil, True)
    count = pool(ones, kernel, strides, 0, ceil, True)
    return [total / count]


@op("GlobalAveragePool")
def _global_avg(ctx, node, x):
    return [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)]


@op("GlobalMaxPool")
def _global_max(ctx, node, x):
    return [x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)]

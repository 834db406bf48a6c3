"""Channel dependency graph: which channels of which tensors must be removed together.

Like Torch-Pruning's DepGraph, over the ONNX IR. A *group* starts from one layer's output
channels (Conv, ConvTranspose, Gemm, MatMul with a constant weight) and is closed under the
ops that tie channels of one tensor to channels of another: elementwise ops with broadcasting
(residual Add/Sum/Mul, activations, Clip, the Erf-Gelu chain, division by scalars), Concat with
offsets, Split and Slice, BatchNormalization and LayerNormalization, pooling, Transpose,
Squeeze/Unsqueeze, Reshape/Flatten where the mapping is proven from static shapes (the
attention head split ``[b,s,384] -> [b,s,12,32]`` and back), MatMul between activations (a
batch axis like the heads couples both operands, the contracted axis couples Q with K), and the
layers that read the channels (a consumer Conv/Gemm/MatMul loses the matching input rows).

Each tensor axis a group reaches is an :class:`Occurrence`: the group's *units* (a unit is
the smallest block removed at once: one channel, one attention head, one slice of a channel
shuffle) and, per unit, its positions on that axis. Every edge is symmetric, so a group is a
connected component and two groups never share a position.

Removing a set of units deletes their positions from every occurrence: weights, biases, BN/LN
parameters and broadcast constants are sliced; Reshape shapes, Split sizes and Slice bounds
are rewritten (:func:`remove_channels`). A group is *unsafe* when anything is not understood
(an unknown op, a graph input or output carrying the channels, a Reshape whose shape is
computed at runtime, a reduction over the channels): it is reported with the reason and never
touched.
"""

from graphsurgeon.channel_deps import handlers as _handlers  # noqa: F401  (registers op handlers)
from graphsurgeon.channel_deps.groups import (
    ChannelGroup,
    Key,
    Occurrence,
    Removal,
    Unsafe,
    build_groups,
)
from graphsurgeon.channel_deps.removal import remove_channels
from graphsurgeon.channel_deps.values import constant_value, output_weight_axis, refine_shapes

__all__ = [
    "ChannelGroup",
    "Key",
    "Occurrence",
    "Removal",
    "Unsafe",
    "build_groups",
    "constant_value",
    "output_weight_axis",
    "refine_shapes",
    "remove_channels",
]

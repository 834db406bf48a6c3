"""Training: ONNX graphs as torch modules, and short distillation / fine-tuning loops.

``to_torch(model)`` gives a ``torch.nn.Module`` whose Parameters are the model's float
initializers; train it, then ``module.write_back(model)``. ``distill_model`` fine-tunes a student
against a teacher with output KD, feature matching and an optional label loss. The passes
``distill``, ``prune-iterative`` and ``regrow`` are built on these.
"""

from __future__ import annotations

from graphsurgeon.training.bridge import GraphModule, UnsupportedOpError, to_torch
from graphsurgeon.training.loop import distill_model
from graphsurgeon.training.ops import register_op

__all__ = ["GraphModule", "UnsupportedOpError", "distill_model", "register_op", "to_torch"]

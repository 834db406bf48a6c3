"""The training bridge: an ``onnx_ir`` model as a ``torch.nn.Module``, and trained weights back.

:func:`to_torch` builds a :class:`GraphModule` that interprets the graph node by node with the
torch ops of :mod:`graphsurgeon.training.ops` (eagerly, so dynamic shapes just work). Float
initializers become Parameters, everything else buffers; BatchNorm running statistics and
quantization scales and zero points stay buffers (gradient steps on them have no meaning and
can make a variance negative). Quantized weights train through float shadows
(:mod:`graphsurgeon.training.fake_quant`).

Pruning masks (``graphsurgeon.sparsity`` metadata, see :mod:`graphsurgeon.passes.pruning`) are
respected: a masked Parameter's gradient is multiplied by its mask and :meth:`apply_masks`
re-zeroes it after each optimizer step, so pruned weights stay exactly zero. RigL reads the
dense gradient through :meth:`GraphModule.dense_gradients` before the mask is applied.

:meth:`GraphModule.write_back` writes the Parameters into the model's initializers, in their
dtype, only where a value changed, and re-encodes mask metadata whose encoding depends on the
weight; a module that was not trained leaves the serialized model byte-identical.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.layers import LAYER_ID_KEY
from graphsurgeon.training import fake_quant, ops_nn  # noqa: F401  (registers the NN ops)
from graphsurgeon.training.fake_quant import QuantSpec, quantized_weights
from graphsurgeon.training.ops import constant_value, lookup, torch_dtype

MASK_KEY = "graphsurgeon.sparsity"
_FLOAT = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)
# (op, input index) pairs whose initializer operands are not trained
_HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_FROZEN_INPUTS = {
    ("BatchNormalization", 3),
    ("BatchNormalization", 4),
    ("QuantizeLinear", 1),
    ("QuantizeLinear", 2),
    ("DequantizeLinear", 1),
    ("DequantizeLinear", 2),
    ("MatMulIntegerToFloat", 2),
    ("MatMulIntegerToFloat", 3),
    ("MatMulIntegerToFloat", 4),
    ("MatMulIntegerToFloat", 5),
}

__all__ = ["GraphModule", "UnsupportedOpError", "to_torch"]


class UnsupportedOpError(GraphSurgeonError):
    """The bridge has no torch implementation for a node."""

    def __init__(self, node: ir.Node, detail: str | None = None) -> None:
        domain = node.domain or "ai.onnx"
        where = f"node {node.name or '<unnamed>'!r} ({domain}::{node.op_type})"
        if detail is None:
            problem = f"no torch implementation of op {node.op_type} (domain {domain})"
            hint = "; add one with graphsurgeon.training.register_op"
        else:
            problem, hint = f"{detail} is not supported", ""
        super().__init__(f"training bridge: {where}: {problem}{hint}")


class GraphModule(nn.Module):
    """An ONNX graph as a torch module: ``module(**feeds)`` -> ``{output name: tensor}``."""

    def __init__(self, model: ir.Model, *, trainable: bool = True) -> None:
        super().__init__()
        graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self._nodes = list(graph)
        for node in self._nodes:
            if lookup(node) is None:
                raise UnsupportedOpError(node)
        self._inputs = [v for v in graph.inputs]
        self._outputs = [v for v in graph.outputs]
        self._by_name = {v.name: v for v in _values(graph) if v.name}
        self._constants: dict[ir.Node, torch.Tensor | str] = {}
        self._packed: dict[ir.Node, torch.Tensor] = {}
        self.quant: dict[str, QuantSpec] = quantized_weights(graph)
        frozen = _frozen_initializers(graph)
        self.params = nn.ParameterList()
        self.param_index: dict[str, int] = {}
        self._buffer_names: dict[str, str] = {}
        self._half: dict[str, torch.dtype] = {}  # fp16/bf16 initializers trained in float32
        for name, value in graph.initializers.items():
            if value.const_value is None:
                continue
            array = value.const_value.numpy()
            if name in self.quant:
                shadow = torch.from_numpy(np.array(self.quant[name].dequantize(array)))
                self._add_param(name, shadow, trainable)
            elif value.dtype in _HALF and name not in frozen:
                # float32 master weights: Adam's updates (and eps) vanish in 16-bit floats
                self._add_param(name, torch.from_numpy(array.astype(np.float32)), trainable)
                self._half[name] = torch_dtype(value.dtype)
            elif value.dtype in _FLOAT and name not in frozen:
                self._add_param(name, _tensor(array), trainable)
            else:
                key = f"buffer_{len(self._buffer_names)}"
                self.register_buffer(key, _tensor(array), persistent=False)
                self._buffer_names[name] = key
        self.masks: dict[str, torch.Tensor] = {}
        self._hooked: set[str] = set()
        self.mask_layers: dict[str, str] = {}  # layer id -> parameter name
        self._dense_grads: dict[str, torch.Tensor] | None = None
        self._read_masks(model)

    # -- building -----------------------------------------------------------------------------
    def _add_param(self, name: str, tensor: torch.Tensor, trainable: bool) -> None:
        self.param_index[name] = len(self.params)
        self.params.append(nn.Parameter(tensor, requires_grad=trainable))

    def _read_masks(self, model: ir.Model) -> None:
        from graphsurgeon.passes.pruning import _decode  # the mask format lives there

        for node in self._nodes:
            text = node.metadata_props.get(MASK_KEY)
            layer = node.metadata_props.get(LAYER_ID_KEY)
            if text is None or layer is None:
                continue
            meta = json.loads(text)
            name = _backing_initializer(node.inputs[meta["input"]])
            if name is None or name not in self.param_index:
                continue
            param = self.param(name)
            try:
                mask = _decode(meta, node)
            except GraphSurgeonError:
                mask = None
            if mask is None or tuple(mask.shape) != tuple(param.shape):
                mask = param.detach().numpy() != 0  # stale: the weight's zeros still carry it
            self.set_mask(name, torch.from_numpy(np.asarray(mask, dtype=bool)))
            self.mask_layers[layer] = name

    # -- parameters and masks -----------------------------------------------------------------
    def param(self, name: str) -> nn.Parameter:
        return self.params[self.param_index[name]]

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(initializer name, Parameter) pairs."""
        for name, index in self.param_index.items():
            yield name, self.params[index]

    def set_trainable(self, names: Iterable[str] | None) -> None:
        """Train only the initializers in ``names`` (None: all Parameters)."""
        wanted = None if names is None else set(names)
        if wanted is not None:
            unknown = sorted(wanted - set(self.param_index))
            if unknown:
                raise GraphSurgeonError(
                    f"training bridge: {unknown[0]!r} is not a trainable float initializer"
                )
        for name, param in self.named_weights():
            param.requires_grad_(wanted is None or name in wanted)
            self._hook(name)

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Keep ``name`` zero where ``mask`` is False (also zeroes it now)."""
        param = self.param(name)
        self.masks[name] = mask.to(torch.bool)
        with torch.no_grad():
            param.mul_(self.masks[name].to(param.dtype))
        self._hook(name)

    def _hook(self, name: str) -> None:
        """Mask the gradient of a masked weight that trains (a hook needs requires_grad)."""
        param = self.param(name)
        if name in self.masks and param.requires_grad and name not in self._hooked:
            param.register_hook(lambda grad, name=name: self._mask_grad(name, grad))
            self._hooked.add(name)

    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if self._dense_grads is not None:
            self._dense_grads[name] = grad.detach().clone()
        return grad * self.masks[name].to(grad.dtype)

    def apply_masks(self) -> None:
        """Re-zero pruned weights (after an optimizer step: momentum or weight decay)."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.param(name).mul_(mask.to(self.param(name).dtype))

    @contextmanager
    def dense_gradients(self) -> Iterator[dict[str, torch.Tensor]]:
        """Inside, backward also records each masked weight's gradient before masking."""
        self._dense_grads = {}
        try:
            yield self._dense_grads
        finally:
            self._dense_grads = None

    # -- running ------------------------------------------------------------------------------
    def constant(self, node: ir.Node) -> torch.Tensor:
        """A Constant node's value: float ones are buffers (they follow ``.to(device)`` and
        ``.half()`` with the weights), integer ones stay on the CPU as shape plumbing."""
        if node not in self._constants:
            value = torch.from_numpy(np.array(constant_value(node)))
            if value.is_floating_point():
                key = f"constant_{len(self._constants)}"
                self.register_buffer(key, value, persistent=False)
                self._constants[node] = key
            else:
                self._constants[node] = value
        value = self._constants[node]
        return getattr(self, value) if isinstance(value, str) else value

    def packed_weight(self, node: ir.Node) -> torch.Tensor:
        if node not in self._packed:
            from graphsurgeon.packed import matmulnbits_weight

            weight = matmulnbits_weight(node)
            if weight is None:
                raise UnsupportedOpError(node, "MatMulNBits with non-constant or g_idx weights")
            self._packed[node] = torch.from_numpy(np.array(weight.numpy(), dtype=np.float32))
        return self._packed[node]

    def _initializer(self, name: str) -> torch.Tensor:
        if name in self.param_index:
            param = self.param(name)
            if name in self.quant:
                return self.quant[name].fake(param)
            return param.to(self._half[name]) if name in self._half else param
        return getattr(self, self._buffer_names[name])

    def forward(
        self, capture: Iterable[str] | None = None, **feeds: Any
    ) -> dict[str, torch.Tensor]:
        env: dict[ir.Value, torch.Tensor] = {}
        for value in self._inputs:
            if value.name in feeds:
                env[value] = _as_tensor(feeds[value.name])
            elif value.name not in self.param_index and value.name not in self._buffer_names:
                raise GraphSurgeonError(f"training bridge: no feed for input {value.name!r}")
        wanted = list(capture or ())
        for name in wanted:
            if name not in self._by_name:
                raise GraphSurgeonError(f"training bridge: no value named {name!r} to capture")

        def get(value: ir.Value | None) -> torch.Tensor | None:
            if value is None:
                return None
            if value in env:
                return env[value]
            if value.name in self.param_index or value.name in self._buffer_names:
                env[value] = self._initializer(value.name)
                return env[value]
            raise GraphSurgeonError(f"training bridge: value {value.name!r} is never computed")

        for node in self._nodes:
            fn = lookup(node)
            assert fn is not None
            outs = fn(self, node, _same_device([get(v) for v in node.inputs]))
            for value, out in zip(node.outputs, outs, strict=False):
                env[value] = out
        result = {v.name: get(v) for v in self._outputs}
        for name in wanted:
            result[name] = get(self._by_name[name])
        return result

    # -- back to the IR -----------------------------------------------------------------------
    def write_back(self, model: ir.Model) -> list[str]:
        """Write trained Parameters into ``model``'s initializers (in place, dtype kept);
        returns the names of the initializers whose values changed."""
        changed = []
        initializers = model.graph.initializers
        for name, param in self.named_weights():
            value = initializers.get(name)
            if value is None or value.const_value is None:
                raise GraphSurgeonError(f"training bridge: the model has no initializer {name!r}")
            old = value.const_value.numpy()
            array = param.detach().cpu()
            array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
            new = (
                self.quant[name].quantize(array) if name in self.quant else array.astype(old.dtype)
            )
            if new.shape != old.shape:
                raise GraphSurgeonError(
                    f"training bridge: initializer {name!r} has shape {list(old.shape)} in the "
                    f"model, {list(new.shape)} in the module"
                )
            if new.tobytes() == np.ascontiguousarray(old).tobytes():
                continue
            value.const_value = ir.tensor(np.ascontiguousarray(new), name=name)
            changed.append(name)
        self._write_masks(model)
        return changed

    def _write_masks(self, model: ir.Model) -> None:
        """Mask metadata in step with the module's masks (regrowth changes them) and weights
        (the ``zeros`` encoding lists kept weights that are exactly zero)."""
        from graphsurgeon.passes.pruning import _encode

        for node in model.graph:
            text = node.metadata_props.get(MASK_KEY)
            name = self.mask_layers.get(node.metadata_props.get(LAYER_ID_KEY, ""))
            if text is None or name is None:
                continue
            meta = json.loads(text)
            mask = self.masks[name].numpy()
            weight = model.graph.initializers[name].const_value.numpy()
            meta["sparsity"] = round(float(1.0 - mask.mean()), 6)
            meta.update(_encode(mask, weight, meta.get("encoding", "zeros")))
            new = json.dumps(meta, separators=(",", ":"))
            if new != text and json.loads(text) != meta:
                node.metadata_props[MASK_KEY] = new


def to_torch(model: ir.Model, *, trainable: bool = True) -> GraphModule:
    """The model's main graph as a :class:`GraphModule` (raises UnsupportedOpError)."""
    return GraphModule(model, trainable=trainable)


# -- helpers ----------------------------------------------------------------------------------
def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _frozen_initializers(graph: ir.Graph) -> set[str]:
    """Float initializers read only as norm statistics or quantization parameters."""
    frozen = set()
    for name, value in graph.initializers.items():
        uses = list(value.uses())
        if uses and all((u.node.op_type, u.idx) in _FROZEN_INPUTS for u in uses):
            frozen.add(name)
    return frozen


def _backing_initializer(value: ir.Value | None) -> str | None:
    """The initializer holding a layer's weight: itself, or the int input of its DQ."""
    if value is None:
        return None
    if value.is_initializer():
        return value.name
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs:
        inner = producer.inputs[0]
        if inner is not None and inner.is_initializer():
            return inner.name
    return None


def _same_device(inputs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Shape plumbing is computed on the CPU; where it meets tensors on an accelerator, it
    moves there (0-d CPU tensors mix with any device and stay)."""
    devices = {t.device for t in inputs if t is not None and t.dim() > 0}
    if len(devices) <= 1:
        return inputs
    target = next(d for d in devices if d.type != "cpu")
    return [t if t is None or t.device == target else t.to(target) for t in inputs]


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A writable torch copy; bfloat16 (ml_dtypes in numpy, unknown to torch) via float32."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)))


def feeds_from(arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: _as_tensor(v) for k, v in arrays.items()}


__all__ += ["feeds_from", "torch_dtype"]

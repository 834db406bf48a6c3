"""``lower-kernels`` / ``raise-kernels``: compressed layers <-> ``graphsurgeon`` custom ops.

``lower-kernels`` turns the patterns the compression passes leave in the graph into custom
ops of the ``graphsurgeon`` domain (version 1), each bound to a Triton kernel
(:mod:`graphsurgeon.kernels.triton.bind`) and defined by a numpy reference
(:mod:`graphsurgeon.kernels.reference`):

==========================================  ======================================================
pattern                                     custom op (inputs; attributes)
==========================================  ======================================================
``com.microsoft::MatMulNBits`` bits 4 / 8   ``MatMulW4A16`` / ``MatMulW8A16`` (A, B, scales
                                            [, zero_points]; K, N, bits, block_size, has_zeros):
                                            the MatMulNBits tensors as they are
blocked ``DequantizeLinear`` (int4/uint4/   the same ops; codes repacked once, here, into the
int8/uint8, ``block_size`` >= 16) + MatMul  MatMulNBits layout (signed codes shifted by 2^(b-1))
MatMul/Gemm with a ``prune-nm`` mask that   ``SparseMatMul24`` (A, values, meta [, bias]; K, N)
is 2:4 (2:4, 1:4 patterns)
MatMul/Gemm with a ``prune-blocks`` mask    ``BsrMatMul`` (A, data, indices, indptr [, bias];
                                            K, N, blocksize = [bn, bk])
``MatMulInteger`` with a constant B         ``MatMulInt8`` (A, B int8, a_zero_point,
                                            b_zero_point): a uint8 B is stored as B - 128
==========================================  ======================================================

Every custom op computes exactly what the ONNX form it replaces computes (with the stored
values, in float32 / int32): the pass is ``exact``. The 2:4 and BSR forms hold the weight's
nonzeros exactly; a layer whose weight does not fit the pattern it claims (say a 2:4 mask
after a later pass changed the weight) is skipped with a reason. Each custom node records in
``graphsurgeon.lowered_from`` (metadata, JSON) what it came from (op, layout, and the pruning
mask of a sparse layer), so ``raise-kernels`` restores the very same standard form:
MatMulNBits, DequantizeLinear + MatMul, MatMul or Gemm (same layout, same mask metadata),
MatMulInteger.

**A lowered model does not run in stock onnxruntime** (it has no ``graphsurgeon`` kernels):
run it with :func:`graphsurgeon.kernels.triton.bind.load_lowered` on a CUDA GPU, or
``raise-kernels`` it back. Numeric verification in onnxruntime (``--verify numeric``) is not
possible on a lowered model; the structural checks still run.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
from graphsurgeon.kernels import reference as ref
from graphsurgeon.passes._lowbit import unique_name
from graphsurgeon.passes.pruning import MASK_KEY

from graphsurgeon.layers import LAYER_ID_KEY
from graphsurgeon.options import PassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register

GS_DOMAIN = "graphsurgeon"
MS_DOMAIN = "com.microsoft"
LOWERED_FROM_KEY = "graphsurgeon.lowered_from"
CUSTOM_OPS = ("MatMulW4A16", "MatMulW8A16", "SparseMatMul24", "BsrMatMul", "MatMulInt8")
Kernel = Literal["w4a16", "w8a16", "sparse24", "bsr", "int8"]
_NUMPY_CODES = {
    ir.DataType.INT4: ml_dtypes.int4,
    ir.DataType.UINT4: ml_dtypes.uint4,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
}
_DQ_CODES = {  # DequantizeLinear code type -> (bits, shift that makes the codes unsigned)
    ir.DataType.INT4: (4, 8),
    ir.DataType.UINT4: (4, 0),
    ir.DataType.INT8: (8, 128),
    ir.DataType.UINT8: (8, 0),
}


class LowerKernelsOptions(PassOptions):
    kernels: list[Kernel] = option(
        ["w4a16", "w8a16", "sparse24", "bsr", "int8"],
        "Which patterns to lower: w4a16/w8a16 (4/8-bit packed weights), sparse24 (2:4 masks), "
        "bsr (block masks), int8 (MatMulInteger).",
    )
    bsr_min_sparsity: float = option(
        0.5,
        "Lower a block-pruned layer to BSR only if at least this fraction of its blocks is "
        "zero (below it a dense GEMM is faster).",
        ge=0.0,
        le=1.0,
    )


class _Skip(Exception):
    """A layer left alone; the message is the reason."""


class _Edit:
    """Replace ``old`` nodes by ``new`` ones (outputs of the last old node -> of the last new),
    drop initializers no longer read, and keep the layer id."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        name = unique_name(self.graph, base)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype
        self.graph.register_initializer(value)
        return value

    def replace(self, old: list[ir.Node], new: list[ir.Node]) -> None:
        last_old, last_new = old[-1], new[-1]
        y, out = last_old.outputs[0], last_new.outputs[0]
        out.type, out.shape = y.type, y.shape
        if LAYER_ID_KEY in last_old.metadata_props:
            last_new.metadata_props[LAYER_ID_KEY] = last_old.metadata_props[LAYER_ID_KEY]
        origin = json.loads(last_old.metadata_props.get(LOWERED_FROM_KEY, "null"))
        if isinstance(origin, dict) and "mask" in origin:  # raising: the mask goes back
            last_new.metadata_props[MASK_KEY] = origin["mask"]
        if not last_new.name:
            last_new.name = last_old.name
        inputs = {v for n in old for v in n.inputs if v is not None}
        ir.convenience.replace_nodes_and_values(self.graph, last_old, old, new, [y], [out])
        for value in inputs:
            if value.is_initializer() and not value.uses() and not value.is_graph_output():
                del self.graph.initializers[value.name]


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _node(op: str, inputs: list[ir.Value | None], attrs: dict[str, Any], origin: dict) -> ir.Node:
    node = ir.node(op, inputs, attributes=attrs, domain=GS_DOMAIN, outputs=[ir.Value()])
    node.metadata_props[LOWERED_FROM_KEY] = json.dumps(origin, separators=(",", ":"))
    return node


# -- lowering -------------------------------------------------------------------------------------
@register
class LowerKernels(GSPass):
    """Lower packed, 2:4, block-sparse and int8 layers to ``graphsurgeon`` custom ops.

    See the module docstring for the patterns and the op signatures. Refused, with a reason:
    MatMulNBits with g_idx, a bias input, float zero points or 2 bits; blocked
    DequantizeLinear whose block size is not a power of two >= 16 or not along K; 2:4 layers
    whose K is not a multiple of 8 or whose weight is not 2:4; BSR layers below
    ``bsr_min_sparsity`` or with blocks that are not powers of two; MatMulInteger with a
    non-constant or non-2-D B or a per-row A zero point; Gemm with alpha/beta != 1 or transA;
    nodes outside the main graph. The output runs only where the ops are bound (see
    :mod:`graphsurgeon.kernels.triton.bind`), not in stock onnxruntime.
    """

    name = "lower-kernels"
    kind = "exact"
    Options = LowerKernelsOptions

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        assert isinstance(opts, LowerKernelsOptions)
        edit = _Edit(model.graph)
        counts: dict[str, int] = {}
        for node in list(model.graph):
            if not self.selects(node) or node.graph is None:
                continue
            try:
                op = self._lower(edit, node, opts)
            except _Skip as e:
                self.skip(node, str(e))
                continue
            if op is not None:
                counts[op] = counts.get(op, 0) + 1
        if counts:
            model.opset_imports.setdefault(GS_DOMAIN, 1)
            if not any(n.domain == MS_DOMAIN for n in model.graph):
                model.opset_imports.pop(MS_DOMAIN, None)
        self.note("lowered", counts)
        return PassResult(model, bool(counts))

    def _lower(self, edit: _Edit, node: ir.Node, opts: LowerKernelsOptions) -> str | None:
        wanted = set(opts.kernels)
        if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
            return _lower_nbits(edit, node, wanted)
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "MatMul":
            producer = node.inputs[1].producer() if node.inputs[1] is not None else None
            if producer is not None and producer.op_type == "DequantizeLinear":
                return _lower_dq(edit, producer, node, wanted)
        if node.op_type in ("MatMul", "Gemm") and MASK_KEY in node.metadata_props:
            meta = json.loads(node.metadata_props[MASK_KEY])
            # any N:M whose weight has at most 2 nonzeros per 4 (2:4, 1:4, 1:2): compress_24
            # checks the weight itself and refuses the others (4:8) with a reason
            if meta.get("method") == "nm" and "sparse24" in wanted:
                return _lower_sparse(edit, node, "sparse24", opts)
            if meta.get("method") == "blocks" and "bsr" in wanted:
                return _lower_sparse(edit, node, "bsr", opts, meta["block"])
        if node.op_type == "MatMulInteger" and "int8" in wanted:
            return _lower_int8(edit, node)
        return None


def _lower_nbits(edit: _Edit, node: ir.Node, wanted: set[str]) -> str | None:
    attrs = node.attributes
    bits = attrs.get_int("bits", 4)
    if f"w{bits}a16" not in wanted:
        return None if bits in (4, 8) else _refuse(f"MatMulNBits with {bits} bits has no kernel")
    inputs = [*node.inputs, None, None, None, None][:6]
    a, b, scales, zp, g_idx, bias = inputs
    if g_idx is not None or bias is not None:
        raise _Skip("MatMulNBits with g_idx or bias")
    if _const(b) is None or _const(scales) is None or (zp is not None and _const(zp) is None):
        raise _Skip("MatMulNBits with non-constant weights")
    if zp is not None and zp.dtype != ir.DataType.UINT8:
        raise _Skip("MatMulNBits with float zero points")
    block = attrs.get_int("block_size")
    k, n = attrs.get_int("K"), attrs.get_int("N")
    new = _node(
        f"MatMulW{bits}A16",
        [a, b, scales] + ([zp] if zp is not None else []),
        {"K": k, "N": n, "bits": bits, "block_size": block, "has_zeros": int(zp is not None)},
        {"op": "MatMulNBits", "accuracy_level": attrs.get_int("accuracy_level", 0)},
    )
    edit.replace([node], [new])
    return new.op_type


def _lower_dq(edit: _Edit, dq: ir.Node, matmul: ir.Node, wanted: set[str]) -> str | None:
    w_q, scale, zp = [*dq.inputs, None, None][:3]
    q, s = _const(w_q), _const(scale)
    if q is None or s is None or w_q.dtype not in _DQ_CODES:
        return None
    bits, shift = _DQ_CODES[w_q.dtype]
    if f"w{bits}a16" not in wanted:
        return None
    block = dq.attributes.get_int("block_size", 0)
    axis = dq.attributes.get_int("axis", 1)
    if q.ndim != 2 or block <= 0 or axis not in (0, -2):
        raise _Skip("DequantizeLinear is not blocked along K of a 2-D weight")
    if block < 16 or block & (block - 1):
        raise _Skip(f"block_size {block} is not a power of two >= 16")
    if not _single_use(dq.outputs[0]) or s.dtype != np.float32:  # float32 W: float32 x
        raise _Skip("dequantized weight shared, or not float32")
    z = _const(zp) if zp is not None else None
    if zp is not None and z is None:
        raise _Skip("non-constant zero point")
    k, n = q.shape
    blocks = -(-k // block)
    codes = np.zeros((n, blocks * block), np.uint8)
    codes[:, :k] = (q.astype(np.int32).T + shift).astype(np.uint8)
    zeros = None
    if z is not None or shift == 0:  # unsigned without zero point: zero is 0, not 2^(b-1)
        z_full = np.zeros((blocks, n), np.int32) if z is None else z.astype(np.int32)
        zeros = ref.pack_bits((z_full.T + shift).astype(np.uint8), bits).reshape(-1)
    base = w_q.name or "w"
    inputs = [
        matmul.inputs[0],
        edit.const(f"{base}_q{bits}", ref.pack_bits(codes, bits).reshape(n, blocks, -1)),
        edit.const(f"{base}_scales", np.ascontiguousarray(s.T).reshape(-1)),
    ]
    if zeros is not None:
        inputs.append(edit.const(f"{base}_zero_points", zeros))
    origin = {
        "op": "DequantizeLinear",
        "dtype": w_q.dtype.name,
        "zero_point": zp is not None,
        "names": [v.name for v in (w_q, scale, zp) if v is not None],
    }
    new = _node(
        f"MatMulW{bits}A16",
        inputs,
        {"K": k, "N": n, "bits": bits, "block_size": block, "has_zeros": int(zeros is not None)},
        origin,
    )
    edit.replace([dq, matmul], [new])
    return new.op_type


def _lower_sparse(
    edit: _Edit, node: ir.Node, kind: str, opts: LowerKernelsOptions, block: list | None = None
) -> str:
    attrs = node.attributes
    trans_b = 0
    bias = None
    if node.op_type == "Gemm":
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
            raise _Skip("Gemm with transA or alpha != 1")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = _const(node.inputs[2])
            if c is None or c.ndim != 1 or attrs.get_float("beta", 1.0) != 1.0:
                raise _Skip("Gemm bias that is not a constant [N] vector with beta 1")
            bias = node.inputs[2]
        trans_b = attrs.get_int("transB", 0)
    x, w_value = node.inputs[0], node.inputs[1]
    w = _const(w_value)
    if w is None or w.ndim != 2 or w.dtype != np.float32:
        raise _Skip("weight is not a constant 2-D float32 input B")
    wt = w.T if trans_b else w  # [K, N]
    k, n = wt.shape
    # the mask describes the dense weight: kept in the origin (for raise-kernels), not as a
    # mask of this node's inputs (which other passes would read as the weight's)
    origin = {"op": node.op_type, "transB": trans_b, "mask": node.metadata_props[MASK_KEY]}
    base = w_value.name or "w"
    if kind == "sparse24":
        if k % 8:
            raise _Skip(f"2:4 needs K % 8 == 0 (K={k})")
        try:
            values, meta = ref.compress_24(wt)
        except ValueError as e:
            raise _Skip(str(e)) from None
        inputs = [x, edit.const(f"{base}_24values", values), edit.const(f"{base}_24meta", meta)]
        attributes: dict[str, Any] = {"K": k, "N": n}
        op = "SparseMatMul24"
    else:
        bh, bw = int(block[0]), int(block[1])  # type: ignore[index]
        bn, bk = (bh, bw) if trans_b else (bw, bh)  # the mask's block in W^T = [N, K]
        if bn & (bn - 1) or bk & (bk - 1):
            raise _Skip(f"block {bh}x{bw} has a side that is not a power of two")
        data, indices, indptr = ref.bsr_from_dense(wt, (bn, bk))
        total = (-(-n // bn)) * (-(-k // bk))
        sparsity = 1.0 - len(indices) / total
        if sparsity < opts.bsr_min_sparsity:
            raise _Skip(f"block sparsity {sparsity:.2f} < bsr_min_sparsity")
        inputs = [
            x,
            edit.const(f"{base}_bsr_data", data),
            edit.const(f"{base}_bsr_indices", indices),
            edit.const(f"{base}_bsr_indptr", indptr),
        ]
        attributes = {"K": k, "N": n, "blocksize": [bn, bk]}
        op = "BsrMatMul"
    new = _node(op, inputs + ([bias] if bias is not None else []), attributes, origin)
    edit.replace([node], [new])
    return op


def _lower_int8(edit: _Edit, node: ir.Node) -> str:
    a, b_value, a_zp, b_zp = [*node.inputs, None, None][:4]
    b = _const(b_value)
    if b is None or b.ndim != 2:
        raise _Skip("MatMulInteger with a non-constant or non-2-D B")
    shape = a_zp.shape if a_zp is not None else None
    if shape is not None and shape.rank() > 0 and (shape.rank() > 1 or shape[0] != 1):
        raise _Skip("MatMulInteger with a per-row A zero point")  # rank 0 or [1] fit
    bz = _const(b_zp) if b_zp is not None else np.zeros((), b.dtype)
    if bz is None or bz.size not in (1, b.shape[1]):
        raise _Skip("MatMulInteger with a non-constant or per-row B zero point")
    inputs = [a, b_value, a_zp, b_zp]
    if b.dtype == np.uint8:  # stored once as int8: (B - 128) - (b_zp - 128) = B - b_zp
        base = b_value.name or "b"
        inputs[1] = edit.const(f"{base}_s8", (b.astype(np.int16) - 128).astype(np.int8))
        shifted = (bz.astype(np.int16) - 128).astype(np.int8)
        inputs[3] = edit.const(f"{base}_zero_point_s8", shifted)
    while inputs[-1] is None:
        inputs.pop()
    origin = {
        "op": "MatMulInteger",
        "b_dtype": str(b.dtype),
        "b_zero_point": b_zp is not None,
        "names": [v.name for v in (b_value, b_zp) if v is not None],
    }
    new = _node("MatMulInt8", inputs, {}, origin)
    edit.replace([node], [new])
    return "MatMulInt8"


def _refuse(reason: str) -> None:
    raise _Skip(reason)


# -- raising --------------------------------------------------------------------------------------
@register
class RaiseKernels(GSPass):
    """The inverse of ``lower-kernels``: ``graphsurgeon`` custom ops back to standard ops.

    Each custom node becomes the form its ``graphsurgeon.lowered_from`` metadata names
    (MatMulNBits, blocked DequantizeLinear + MatMul, MatMul, Gemm in its original layout, or
    MatMulInteger); without the metadata: MatMulNBits, MatMul (Gemm when there is a bias)
    and MatMulInteger. The result runs in stock onnxruntime and gives the outputs the model
    had before lowering.
    """

    name = "raise-kernels"
    kind = "exact"

    def call(self, model: ir.Model) -> PassResult:
        edit = _Edit(model.graph)
        count = 0
        for node in list(model.graph):
            if node.domain != GS_DOMAIN or node.op_type not in CUSTOM_OPS or not self.selects(node):
                continue
            origin = json.loads(node.metadata_props.get(LOWERED_FROM_KEY, "{}"))
            new = _RAISE[node.op_type](edit, node, origin, model)
            for n in new:
                n.metadata_props.pop(LOWERED_FROM_KEY, None)
            count += 1
        if count:
            if not any(n.domain == GS_DOMAIN for n in model.graph):
                model.opset_imports.pop(GS_DOMAIN, None)
            if any(n.domain == MS_DOMAIN for n in model.graph):
                model.opset_imports.setdefault(MS_DOMAIN, 1)
        self.note("raised", count)
        return PassResult(model, bool(count))


def _raise_nbits(edit: _Edit, node: ir.Node, origin: dict, model: ir.Model) -> list[ir.Node]:
    attrs = node.attributes
    k, n = attrs.get_int("K"), attrs.get_int("N")
    bits, block = attrs.get_int("bits"), attrs.get_int("block_size")
    x = node.inputs[0]
    if origin.get("op") == "DequantizeLinear":
        dtype = ir.DataType[origin["dtype"]]
        _, shift = _DQ_CODES[dtype]
        b, s = _const(node.inputs[1]), _const(node.inputs[2])
        blocks = -(-k // block)
        codes = ref.unpack_bits(b.reshape(n, -1), bits, k).astype(np.int32)
        q = (codes.T - shift).astype(np.int8 if shift else np.uint8)
        zp = _const(node.inputs[3]) if len(node.inputs) > 3 else None
        base = (node.inputs[1].name or "w").rsplit("_q", 1)[0]
        store = _NUMPY_CODES[dtype]
        names = [*(origin.get("names") or [base, f"{base}_scale"]), f"{base}_zero_point"]
        inputs = [
            edit.const(names[0], q.astype(store)),
            edit.const(names[1], s.reshape(n, blocks).T.copy()),
        ]
        if origin.get("zero_point", zp is not None):
            z = ref.unpack_bits(zp.reshape(n, -1), bits, blocks).astype(np.int32).T - shift
            inputs.append(edit.const(names[2], z.astype(store)))
        deq = ir.Value(name=unique_name(edit.graph, f"{base}_dequantized"))
        dq = ir.node(
            "DequantizeLinear", inputs, attributes={"axis": 0, "block_size": block}, outputs=[deq]
        )
        matmul = ir.node("MatMul", [x, deq], name=node.name, outputs=[ir.Value()])
        if model.opset_imports.get("", 1) < 21:
            model.opset_imports[""] = 21  # blocked DequantizeLinear and int4 need opset 21
        edit.replace([node], [dq, matmul])
        return [dq, matmul]
    new = ir.node(
        "MatMulNBits",
        list(node.inputs),
        attributes={
            "K": k,
            "N": n,
            "bits": bits,
            "block_size": block,
            "accuracy_level": int(origin.get("accuracy_level", 0)),
        },
        domain=MS_DOMAIN,
        name=node.name,
        outputs=[ir.Value()],
    )
    if not new.attributes.get_int("accuracy_level"):
        new.attributes.pop("accuracy_level")
    edit.replace([node], [new])
    return [new]


def _dense_node(edit: _Edit, node: ir.Node, origin: dict, wt: np.ndarray) -> list[ir.Node]:
    """MatMul/Gemm with the dense ``W [K, N]`` in the original layout."""
    x = node.inputs[0]
    bias = node.inputs[-1] if _has_bias(node) else None
    trans_b = int(origin.get("transB", 0))
    op = origin.get("op", "Gemm" if bias is not None else "MatMul")
    base = node.inputs[1].name or "w"
    for lowered_suffix in ("_24values", "_bsr_data"):  # the weight's own name, back
        base = base.removesuffix(lowered_suffix)
    w = edit.const(base, np.ascontiguousarray(wt.T if trans_b else wt))
    if op == "Gemm":
        attrs = {"transB": trans_b} if trans_b else {}
        new = ir.node("Gemm", [x, w, bias], attributes=attrs, name=node.name, outputs=[ir.Value()])
        if bias is None:
            new.resize_inputs(2)
    else:
        new = ir.node("MatMul", [x, w], name=node.name, outputs=[ir.Value()])
    edit.replace([node], [new])
    return [new]


def _has_bias(node: ir.Node) -> bool:
    expected = {"SparseMatMul24": 3, "BsrMatMul": 4}[node.op_type]
    return len(node.inputs) > expected and node.inputs[expected] is not None


def _raise_sparse24(edit: _Edit, node: ir.Node, origin: dict, model: ir.Model) -> list[ir.Node]:
    k = node.attributes.get_int("K")
    wt = ref.decompress_24(_const(node.inputs[1]), _const(node.inputs[2]), k)
    return _dense_node(edit, node, origin, wt)


def _raise_bsr(edit: _Edit, node: ir.Node, origin: dict, model: ir.Model) -> list[ir.Node]:
    k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
    data, indices, indptr = (_const(v) for v in node.inputs[1:4])
    wt = ref.bsr_to_dense(data, indices, indptr, k, n)
    return _dense_node(edit, node, origin, wt)


def _raise_int8(edit: _Edit, node: ir.Node, origin: dict, model: ir.Model) -> list[ir.Node]:
    a, b_value, a_zp, b_zp = [*node.inputs, None, None][:4]
    inputs = [a, b_value, a_zp, b_zp]
    if origin.get("b_dtype") == "uint8":
        base = (b_value.name or "b").removesuffix("_s8")
        b, bz = _const(b_value), _const(b_zp) if b_zp is not None else np.zeros((), np.int8)
        names = [*origin.get("names", [base]), f"{base}_zero_point"]
        inputs[1] = edit.const(names[0], (b.astype(np.int16) + 128).astype(np.uint8))
        inputs[3] = None
        if origin.get("b_zero_point", True):
            zero = (bz.astype(np.int16) + 128).astype(np.uint8)
            inputs[3] = edit.const(names[1], zero)
    while inputs[-1] is None:
        inputs.pop()
    new = ir.node("MatMulInteger", inputs, name=node.name, outputs=[ir.Value()])
    edit.replace([node], [new])
    return [new]


_RAISE = {
    "MatMulW4A16": _raise_nbits,
    "MatMulW8A16": _raise_nbits,
    "SparseMatMul24": _raise_sparse24,
    "BsrMatMul": _raise_bsr,
    "MatMulInt8": _raise_int8,
}

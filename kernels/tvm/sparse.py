"""Block-sparse MatMul/Gemm for TVM: BSR weights and a kernel that skips the zero blocks.

``prune-blocks`` zeroes whole blocks of a weight but keeps it dense, so a dense kernel does
every multiply-add anyway. Before import, :func:`lower_block_sparse` swaps each MatMul/Gemm
whose constant weight is block-sparse (the block shape from the pass's mask metadata, or found
by trying common shapes on the zeros) for a ``graphsurgeon.tvm::BlockSparseMatMul`` node
holding the weight in BSR form (``scipy.sparse.bsr_matrix``): with ``Wt = W^T`` (``[N, K]``,
one row per output column) cut into ``br x bc`` blocks, only the blocks with a nonzero are
kept, row by row::

    Y[m, nb*br + j] = bias[nb*br + j]
                      + sum_{e in indptr[nb]..indptr[nb+1]} sum_c data[e, j, c] * X[m, indices[e]*bc + c]

The importer converts the node to one TIR kernel (TVM 0.27 has no TOPI ``sparse_dense`` any
more, and a data-dependent reduction in TE cannot be scheduled), written so the innermost loop
is a SIMD vector with no gather:

- ``batch`` (``M >= 8``): ``X`` is transposed once per call to ``[K, M]``; every stored weight
  is broadcast and multiplies a contiguous vector of ``M`` rows (``M`` lanes per FMA);
- ``dot`` (small ``M``, ``bc >= br``): a block row of ``data`` and the matching slice of ``X``
  are both contiguous along ``c``: ``bc``-lane products, summed across lanes once per output;
- ``rows`` (small ``M``, ``br > bc``): ``data`` stored ``[e, c, j]``, so the ``br`` outputs of
  a block row are the vector lanes and each ``X`` element is broadcast.

Exact: every skipped block is all zeros (the BSR is built from the weight's own values).
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter
from tvm.script import tirx as T

DOMAIN = "graphsurgeon.tvm"
OP = "BlockSparseMatMul"
#: Lower a weight only when at least this fraction of its blocks is zero: below it, the dense
#: kernel's regular loads and full SIMD use beat skipping blocks (an index load per block).
MIN_BLOCK_SPARSITY = 0.7
#: Block shapes (rows of ``Wt``, i.e. output columns; columns of ``Wt``, i.e. inputs) tried on
#: a weight without mask metadata; the one with the least work (kept multiply-adds plus
#: ``BLOCK_OVERHEAD`` per kept block, in multiply-adds) wins: 1x4 blocks 90% zero beat 1x8
#: blocks 81% zero.
CANDIDATE_BLOCKS = ((16, 1), (1, 16), (8, 1), (1, 8), (4, 4), (4, 1), (1, 4), (2, 2))
BLOCK_OVERHEAD = 4
_MASK_KEY = "graphsurgeon.sparsity"  # graphsurgeon.passes.pruning.MASK_KEY


def lower_block_sparse(model: ir.Model, *, min_sparsity: float = MIN_BLOCK_SPARSITY) -> list[dict]:
    """Replace block-sparse MatMul/Gemm nodes of ``model`` (in place) by BSR nodes.

    Returns one record per lowered node: name, ``block`` (of ``Wt``), block sparsity, and
    where the block shape came from (``mask`` metadata or ``detected``).
    """
    lowered = []
    for node in list(model.graph):
        found = _sparse_weight(node, min_sparsity)
        if found is None:
            continue
        wt, bias, (br, bc), source = found
        lowered.append(_replace(model, node, wt, bias, br, bc, source))
    if lowered:
        model.opset_imports[DOMAIN] = 1
    return lowered


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None and value.producer() is not None:
        producer = value.producer()
        if producer.op_type == "Constant" and "value" in producer.attributes:
            tensor = producer.attributes["value"].as_tensor()
    return None if tensor is None else np.asarray(tensor.numpy())


def _sparse_weight(node: ir.Node, min_sparsity: float):
    """(Wt [N, K] float32, bias [N] or None, (br, bc), source) when ``node`` qualifies."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    if len(node.inputs) < 2 or node.inputs[0] is None:
        return None
    w = _const(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32:
        return None
    x_type = node.inputs[0].dtype
    if x_type is not None and x_type != ir.DataType.FLOAT:
        return None
    bias = None
    attrs = node.attributes
    trans_b = False
    if node.op_type == "Gemm":
        if attrs.get_int("transA", 0):
            return None
        trans_b = bool(attrs.get_int("transB", 0))
        alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
        n = w.shape[0] if trans_b else w.shape[1]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = _const(node.inputs[2])
            if c is None or c.size not in (1, n) or c.shape[:-1] not in ((), (1,)):
                return None  # a per-row bias (C of shape [M, N]) stays a dense Gemm
            bias = np.broadcast_to(beta * c.astype(np.float32).ravel(), (n,)).copy()
        w = w * np.float32(alpha)
    elif node.inputs[0].shape is not None and len(node.inputs[0].shape) < 2:
        return None  # a vector times a matrix: leave it to MatMul's own broadcasting rules
    wt = w if trans_b else w.T  # [N, K]
    block, source = _declared_block(node, trans_b), "mask"
    if block is not None:
        block = (math.gcd(block[0], wt.shape[0]), math.gcd(block[1], wt.shape[1]))
        if _zero_block_fraction(wt, block) < min_sparsity:
            return None
    else:
        source = "detected"
        best = math.inf
        for candidate in CANDIDATE_BLOCKS:
            if wt.shape[0] % candidate[0] or wt.shape[1] % candidate[1]:
                continue
            zero = _zero_block_fraction(wt, candidate)
            area = candidate[0] * candidate[1]
            # work per weight: the kept blocks' multiply-adds plus each block's index load
            cost = (1 - zero) * (area + BLOCK_OVERHEAD) / area
            if zero >= min_sparsity and cost < best:
                block, best = candidate, cost
        if block is None:
            return None
    return np.ascontiguousarray(wt, dtype=np.float32), bias, block, source


def _declared_block(node: ir.Node, trans_b: bool) -> tuple[int, int] | None:
    """The block of ``Wt`` from prune-blocks' metadata (its block is on the stored weight)."""
    text = node.metadata_props.get(_MASK_KEY)
    if not text:
        return None
    try:
        meta = json.loads(text)
        if meta.get("method") != "blocks" or meta.get("input") != 1:
            return None
        bh, bw = (int(v) for v in meta["block"])
    except (ValueError, KeyError, TypeError):
        return None
    return (bh, bw) if trans_b else (bw, bh)


def _zero_block_fraction(wt: np.ndarray, block: tuple[int, int]) -> float:
    br, bc = block
    n, k = wt.shape
    blocks = wt.reshape(n // br, br, k // bc, bc)
    return float(np.mean(~np.any(blocks != 0, axis=(1, 3))))


def _replace(model, node, wt, bias, br, bc, source) -> dict:
    import scipy.sparse

    n, k = wt.shape
    bsr = scipy.sparse.bsr_matrix(wt, blocksize=(br, bc))
    bsr.eliminate_zeros()  # only blocks holding a nonzero remain
    bsr.sort_indices()
    name = node.name or node.outputs[0].name
    data = np.ascontiguousarray(bsr.data, dtype=np.float32).reshape(-1, br, bc)
    if data.shape[0] == 0:  # an all-zero weight: one zero block keeps the kernel's shapes
        data = np.zeros((1, br, bc), np.float32)
        indices = np.zeros(1, np.int32)
        indptr = np.zeros(n // br + 1, np.int32)
    else:
        indices = bsr.indices.astype(np.int32)
        indptr = bsr.indptr.astype(np.int32)
    consts = {
        "data": data,
        "indices": indices,
        "indptr": indptr,
        "bias": bias if bias is not None else np.zeros(n, np.float32),
    }
    inputs = [node.inputs[0]]
    for role, array in consts.items():
        value = ir.Value(name=f"{name}.bsr_{role}", const_value=ir.tensor(array))
        model.graph.register_initializer(value)
        inputs.append(value)
    new = ir.Node(
        DOMAIN,
        OP,
        inputs,
        attributes=[ir.AttrInt64("N", n), ir.AttrInt64("K", k)],
        num_outputs=1,
        name=name,
    )
    model.graph.insert_before(node, new)
    old_out = node.outputs[0]
    out_name, old_out.name = old_out.name, f"{old_out.name}.dense"
    new.outputs[0].name = out_name
    new.outputs[0].shape = old_out.shape
    new.outputs[0].type = old_out.type
    old_out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    model.graph.remove(node, safe=True)
    total = (n // br) * (k // bc)
    return {
        "node": name,
        "block": [br, bc],
        "block_sparsity": round(1.0 - int(indptr[-1]) / total, 4),
        "source": source,
    }


# -- the kernels -------------------------------------------------------------------------------
def bsr_kernel(m: int, k: int, n: int, nnzb: int, br: int, bc: int, lanes: int):
    """``(kernel name, PrimFunc, data layout)`` for ``X [m, k] @ W`` with ``W^T`` in BSR.

    The layout is the order of ``data``'s block axes the kernel reads: ``"jc"`` as scipy
    stores it, ``"cj"`` transposed per block."""
    nbr = n // br
    if m >= 8:
        mt = _divisor_at_most(m, 2 * lanes)
        return "batch", _batch(m, k, n, nnzb, br, bc, mt, nbr), "cj"
    mt = _divisor_at_most(m, 4)
    if bc >= br:
        return "dot", _dot(m, k, n, nnzb, br, bc, mt, nbr), "jc"
    return "rows", _rows(m, k, n, nnzb, br, bc, mt, nbr), "cj"


def _divisor_at_most(extent: int, limit: int) -> int:
    return next(d for d in range(min(limit, extent), 0, -1) if extent % d == 0)


def _batch(m, k, n, nnzb, br, bc, mt, nbr):
    mo = m // mt

    @T.prim_func(private=True)
    def bsr_batch(
        x: T.Buffer((m, k), "float32"),
        data: T.Buffer((nnzb, bc, br), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nbr + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xt = T.alloc_buffer((mo, k, mt), "float32")
        for io, kk, ii in T.grid(mo, k, mt):
            xt[io, kk, ii] = x[io * mt + ii, kk]
        for nb in T.serial(nbr):
            for io in T.serial(mo):
                acc = T.alloc_local((br, mt), "float32")
                for j in T.unroll(br):
                    for ii in T.vectorized(mt):
                        acc[j, ii] = T.float32(0)
                for e in T.serial(indptr[nb + 1] - indptr[nb]):
                    for c in T.unroll(bc):
                        for j in T.unroll(br):
                            for ii in T.vectorized(mt):
                                acc[j, ii] = (
                                    acc[j, ii]
                                    + xt[io, indices[indptr[nb] + e] * bc + c, ii]
                                    * data[indptr[nb] + e, c, j]
                                )
                for j in T.unroll(br):
                    for ii in T.serial(mt):
                        y[io * mt + ii, nb * br + j] = acc[j, ii] + bias[nb * br + j]

    return bsr_batch


def _dot(m, k, n, nnzb, br, bc, mt, nbr):
    mo = m // mt

    @T.prim_func(private=True)
    def bsr_dot(
        x: T.Buffer((m, k), "float32"),
        data: T.Buffer((nnzb, br, bc), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nbr + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for nb in T.serial(nbr):
            for io in T.serial(mo):
                acc = T.alloc_local((mt, br, bc), "float32")
                for ii in T.unroll(mt):
                    for j in T.unroll(br):
                        for c in T.vectorized(bc):
                            acc[ii, j, c] = T.float32(0)
                for e in T.serial(indptr[nb + 1] - indptr[nb]):
                    for ii in T.unroll(mt):
                        for j in T.unroll(br):
                            for c in T.vectorized(bc):
                                acc[ii, j, c] = (
                                    acc[ii, j, c]
                                    + x[io * mt + ii, indices[indptr[nb] + e] * bc + c]
                                    * data[indptr[nb] + e, j, c]
                                )
                for ii in T.unroll(mt):
                    for j in T.unroll(br):
                        total = T.alloc_local((1,), "float32")
                        total[0] = bias[nb * br + j]
                        for c in T.serial(bc):
                            total[0] = total[0] + acc[ii, j, c]
                        y[io * mt + ii, nb * br + j] = total[0]

    return bsr_dot


def _rows(m, k, n, nnzb, br, bc, mt, nbr):
    mo = m // mt

    @T.prim_func(private=True)
    def bsr_rows(
        x: T.Buffer((m, k), "float32"),
        data: T.Buffer((nnzb, bc, br), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nbr + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for nb in T.serial(nbr):
            for io in T.serial(mo):
                acc = T.alloc_local((mt, br), "float32")
                for ii in T.unroll(mt):
                    for j in T.vectorized(br):
                        acc[ii, j] = T.float32(0)
                for e in T.serial(indptr[nb + 1] - indptr[nb]):
                    for c in T.unroll(bc):
                        for ii in T.unroll(mt):
                            for j in T.vectorized(br):
                                acc[ii, j] = (
                                    acc[ii, j]
                                    + x[io * mt + ii, indices[indptr[nb] + e] * bc + c]
                                    * data[indptr[nb] + e, c, j]
                                )
                for ii in T.unroll(mt):
                    for j in T.vectorized(br):
                        y[io * mt + ii, nb * br + j] = acc[ii, j] + bias[nb * br + j]

    return bsr_rows


class BlockSparseMatMul(OnnxOpConverter):
    """``graphsurgeon.tvm::BlockSparseMatMul(X, data, indices, indptr, bias)`` -> one call of
    a BSR kernel. ``X``'s leading dims are flattened into ``M``; the kernel is picked for the
    static ``M`` (see the module docstring)."""

    lanes = 16  # SIMD lanes of the batch kernel's vectors (two AVX2 / one AVX-512 register)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, data, indices, indptr, bias = inputs
        n, k = int(attr["N"]), int(attr["K"])
        if not all(isinstance(v, Constant) for v in (data, indices, indptr, bias)):
            raise ValueError("BlockSparseMatMul needs constant BSR weights")
        if x.ty.dtype.dtype != "float32":
            raise ValueError(f"BlockSparseMatMul with {x.ty.dtype.dtype} input (float32 only)")
        shape = [int(d) for d in x.ty.shape]
        lead = shape[:-1]
        m = math.prod(lead)
        blocks = data.value.numpy()
        nnzb, br, bc = blocks.shape
        name, func, layout = bsr_kernel(m, k, n, nnzb, br, bc, cls.lanes)
        if layout == "cj":
            blocks = np.ascontiguousarray(blocks.transpose(0, 2, 1))
        gv = bb.add_func(func.with_attr("op_pattern", 8), f"bsr_{name}")  # 8: opaque
        x2 = bb.emit(relax.op.reshape(x, [m, k]))
        y = bb.emit(
            relax.call_tir(
                gv,
                [x2, relax.const(blocks), indices, indptr, bias],
                out_ty=relax.TensorType((m, n), "float32"),
            )
        )
        return relax.op.reshape(y, [*lead, n])

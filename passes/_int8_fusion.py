"""Static int8 MatMuls with float outputs as onnxruntime's ``MatMulIntegerToFloat``.

``quantize-int8`` keeps transformer MatMul outputs in float (a static range on them clips
outliers). In QDQ form that is ``MatMul(DQ(Q(x)), DQ(W_int8)) [+ bias]``, which onnxruntime
fuses into its integer ``MatMulIntegerToFloat`` kernel - unless the input shapes are static:
then its MatMul+Add->Gemm fusion runs first and leaves a float Gemm on a dequantized weight,
slower than the float model (MiniLM 1x128: 23.6 ms against 10.3 ms float). Writing the fused
op ourselves makes the speed independent of the session's shapes and fusion order.

``Y = (A - a_zp) * a_scale @ (B - b_zp) * b_scale + bias`` with one ``a_scale`` (per tensor)
and ``b_scale`` per output column: exactly what the two DequantizeLinear nodes computed.
"""

from __future__ import annotations

import onnx_ir as ir

from graphsurgeon.layers import LAYER_ID_KEY

_INT8 = (ir.DataType.INT8, ir.DataType.UINT8)


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    return None if value is None else ir.convenience.get_const_tensor(value)


def _dq_parts(value: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value | None, int] | None:
    """(int input, scale, zero point, axis) of the DequantizeLinear producing ``value``."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    x, scale = node.inputs[0], node.inputs[1]
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    # ORT's quantizer writes no value_info for Q outputs: read the dtype off the zero point
    zp_tensor = _const(zp)
    dtype = x.dtype if x is not None and x.dtype is not None else getattr(zp_tensor, "dtype", None)
    if x is None or scale is None or dtype not in _INT8:
        return None
    return x, scale, zp, node.attributes.get_int("axis", 1)


def _bias_add(matmul: ir.Node, n: int) -> tuple[ir.Node, ir.Value] | None:
    """The single ``Add(matmul_out, bias[N])`` reading the MatMul, if there is one."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    bias = add.inputs[1 - uses[0].idx]
    tensor = _const(bias)
    if tensor is None or list(tensor.shape) != [n] or tensor.dtype != ir.DataType.FLOAT:
        return None
    return add, bias


def fuse_matmul_integer_to_float(model: ir.Model) -> int:
    """Rewrite every eligible QDQ MatMul in the main graph; returns how many.

    Only MatMuls whose result stays float: one whose output (or bias Add) feeds a
    QuantizeLinear is left for onnxruntime's QLinearMatMul fusion.
    """
    graph = model.graph
    fused = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        a, b = _dq_parts(node.inputs[0]), _dq_parts(node.inputs[1])
        if a is None or b is None:
            continue
        a_q, a_scale, a_zp, _ = a
        b_q, b_scale, b_zp, b_axis = b
        w, ws, wz = _const(b_q), _const(b_scale), _const(b_zp) if b_zp is not None else None
        sa = _const(a_scale)
        if w is None or ws is None or sa is None or sa.size != 1 or len(w.shape) != 2:
            continue
        n = w.shape[1]
        per_column = ws.size == n and b_axis in (1, -1)
        if not (ws.size == 1 or per_column) or (b_zp is not None and wz is None):
            continue
        bias = _bias_add(node, n)
        result = (bias[0] if bias is not None else node).outputs[0]
        if any(u.node.op_type == "QuantizeLinear" for u in result.uses()):
            continue
        inputs = [a_q, b_q, a_scale, b_scale, a_zp, b_zp]
        if bias is not None:
            inputs.append(bias[1])
        while inputs and inputs[-1] is None:
            inputs.pop()
        last = bias[0] if bias is not None else node
        new = ir.node(
            "MatMulIntegerToFloat",
            inputs,
            domain="com.microsoft",
            name=(node.name or "matmul") + "/int8",
        )
        new.outputs[0].dtype = ir.DataType.FLOAT
        new.outputs[0].shape = last.outputs[0].shape
        if LAYER_ID_KEY in node.metadata_props:
            new.metadata_props[LAYER_ID_KEY] = node.metadata_props[LAYER_ID_KEY]
        graph.insert_before(node, new)
        old = last.outputs[0]
        name = old.name
        ir.convenience.replace_all_uses_with(old, new.outputs[0], replace_graph_outputs=True)
        if new.outputs[0].is_graph_output():
            old.name = None  # the graph output keeps its name
            new.outputs[0].name = name
        if bias is not None:
            graph.remove(bias[0], safe=True)
        graph.remove(node, safe=True)
        fused += 1
    if fused:
        model.opset_imports.setdefault("com.microsoft", 1)
    return fused

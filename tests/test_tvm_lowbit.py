"""TVM converters for ``quantize-weights``' ORT contrib ops, checked against onnxruntime
running the same quantized model (same codes, so only float rounding differs)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")

from graphsurgeon.kernels.tvm import compile_model, load

from graphsurgeon.pipeline import run_pipeline
from graphsurgeon.profiles import load_profile


def embedding_model(rows: int = 50, width: int = 64) -> ir.Model:
    """ids [2, 7] -> Gather(table [rows, width]) -> Add(1) -> y [2, 7, width]."""
    table = np.random.default_rng(5).standard_normal((rows, width)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["y"]),
        ],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, width])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.ones(1, np.float32), "one"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(proto)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_embedding_gather_block_quantized_matches_ort(tmp_path, symmetric):
    spec = [
        {
            "name": "quantize-weights",
            "options": {"bits": 4, "group_size": 32, "symmetric": symmetric},
        }
    ]
    quantized = run_pipeline(embedding_model(), spec, verify="off").model
    assert "GatherBlockQuantized" in [n.op_type for n in quantized.graph]
    build = compile_model(quantized, load_profile("x86-avx2"), tmp_path, threads=1, mcpu="host")
    ids = np.array([[0, 1, 2, 49, -1, 7, 7], [3, 10, 20, 30, 40, 48, -50]], np.int64)
    got = load(build.lib_path, build.meta_path)({"ids": ids})["y"]
    sess = ort.InferenceSession(
        ir.to_proto(quantized).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    ref = sess.run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)

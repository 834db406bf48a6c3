"""Triton kernels against the numpy references and onnxruntime.

Without a GPU they run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set here, at
import, because triton reads it when it is imported. With a GPU the same tests run compiled
on it. Shapes are tiny and ragged (M, N, K not multiples of the tiles) so every mask and edge
path runs (the interpreter is slow). fp16 tests at real sizes are marked ``gpu``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("triton")
from graphsurgeon.kernels import reference as ref
from graphsurgeon.kernels.triton import autotune, ops
from graphsurgeon.passes.weight_quant import QuantizeWeights
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.execution import make_session, run
from graphsurgeon.packed import matmulnbits_weight

RNG = np.random.default_rng(11)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def T(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).to(DEVICE)


@pytest.fixture(autouse=True)
def tuning_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHSURGEON_TRITON_CACHE", str(tmp_path / "tuned"))


def nbits_tensors(k: int, n: int, bits: int, block: int, zeros: bool):
    blocks = -(-k // block)
    codes = RNG.integers(0, 1 << bits, (n, blocks * block)).astype(np.uint8)
    b = ref.pack_bits(codes, bits).reshape(n, blocks, -1)
    scales = RNG.uniform(0.01, 0.1, n * blocks).astype(np.float32)
    zp = None
    if zeros:
        zp = ref.pack_bits(RNG.integers(0, 1 << bits, (n, blocks)).astype(np.uint8), bits)
        zp = zp.reshape(-1)
    return b, scales, zp


# -- W4A16 / W8A16 ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize(
    ("m", "config"),
    [
        (1, None),  # GEMV, one program per column tile
        (3, {"BN": 16, "BK": 32, "SPLIT_K": 3, "num_warps": 4}),  # GEMV, split-K atomics
        (19, {"BM": 16, "BN": 16, "BK": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}),
    ],
)
def test_nbits_kernel_matches_reference(bits, zeros, m, config):
    k, n, block = 80, 40, 32  # K is not a multiple of the block: the padded codes are masked
    b, scales, zp = nbits_tensors(k, n, bits, block, zeros)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    got = ops.matmul_nbits(
        T(x), T(b), T(scales), None if zp is None else T(zp), k, n, bits, block, config=config
    )
    expected = ref.matmul_nbits(x, b, scales, zp, k, n, bits, block)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("bits", "block"), [(2, 64), (4, 16)])
def test_nbits_kernel_two_bits_and_narrow_blocks(bits, block):
    """2-bit codes (4 per byte) through the tensor-core path; a block of 8 bytes per row is
    narrower than tl.dot's 16 and goes through the GEMV kernel even at 6 rows."""
    k, n, m = 128, 24, 6
    b, scales, zp = nbits_tensors(k, n, bits, block, True)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    got = ops.matmul_nbits(T(x), T(b), T(scales), T(zp), k, n, bits, block)
    expected = ref.matmul_nbits(x, b, scales, zp, k, n, bits, block)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_reference_decodes_like_onnxruntime_and_the_layer_finder():
    """The reference reads quantize-weights' MatMulNBits exactly as ORT does; so does the
    kernel (batched leading dims are flattened like MatMul)."""
    k, n = 64, 24
    w = RNG.uniform(-1, 1, (k, n)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, n])],
        [nh.from_array(w, "W")],
    )
    model = ir.from_proto(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    )
    QuantizeWeights({"bits": 4, "symmetric": False, "group_size": 16})(model)
    node = model.graph.node(0)
    assert node.op_type == "MatMulNBits"
    b, scales, zp = (v.const_value.numpy() for v in node.inputs[1:4])
    decoded = ref.dequantize_nbits(b, scales, zp, k, n, 4, 16)
    np.testing.assert_array_equal(decoded, matmulnbits_weight(node).numpy())
    x = RNG.standard_normal((2, 3, k)).astype(np.float32)
    expected = run(make_session(model), {"x": x})["y"]
    np.testing.assert_allclose(ref.matmul_nbits(x, b, scales, zp, k, n, 4, 16), expected, atol=1e-4)
    got = ops.matmul_nbits(T(x), T(b), T(scales), T(zp), k, n, 4, 16)
    assert got.shape == (2, 3, n)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-5, atol=1e-4)


# -- 2:4 --------------------------------------------------------------------------------------
def two_four(k: int, n: int) -> np.ndarray:
    w = RNG.standard_normal((k, n)).astype(np.float32)
    groups = w.T.reshape(n, k // 4, 4)
    drop = np.argsort(np.abs(groups), axis=-1)[..., :2]
    np.put_along_axis(groups, drop, 0.0, axis=-1)
    groups[0, 0] = 0.0  # a group with no nonzero and one with a single nonzero
    groups[1, 1, 1:] = 0.0
    return np.ascontiguousarray(groups.reshape(n, k).T)


def test_compress_24_round_trips_and_refuses_dense():
    w = two_four(32, 6)
    values, meta = ref.compress_24(w)
    assert values.shape == (6, 16) and meta.shape == (6, 4)
    positions = ref.unpack_bits(meta, 2).reshape(6, 8, 2)
    assert (positions[..., 0] < positions[..., 1]).all()  # distinct and ascending
    np.testing.assert_array_equal(ref.decompress_24(values, meta, 32), w)
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        ref.compress_24(np.ones((8, 2), np.float32))


@pytest.mark.parametrize("bias", [False, True])
def test_sparse24_kernel_matches_reference(bias):
    k, n, m = 72, 24, 5
    w = two_four(k, n)
    values, meta = ref.compress_24(w)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32) if bias else None
    config = {"BM": 16, "BN": 16, "BK": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
    got = ops.sparse24_matmul(
        T(x), T(values), T(meta), k, n, None if b is None else T(b), config=config
    )
    expected = x @ w + (0 if b is None else b)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.sparse24_matmul(x, values, meta, k, b), expected, atol=1e-5)


# -- BSR --------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [(4, 4), (1, 4), (16, 16)])
def test_bsr_kernel_matches_reference(block):
    k, n, m = 40, 36, 5  # neither is a multiple of 16: partial edge blocks
    bn, bk = block
    keep = RNG.random((-(-n // bn), -(-k // bk))) < 0.4
    mask = np.repeat(np.repeat(keep, bn, 0), bk, 1)[:n, :k].T
    w = RNG.standard_normal((k, n)).astype(np.float32) * mask
    data, indices, indptr = ref.bsr_from_dense(w, block)
    assert len(indices) == keep.sum()
    np.testing.assert_array_equal(ref.bsr_to_dense(data, indices, indptr, k, n), w)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    bias = RNG.standard_normal(n).astype(np.float32)
    got = ops.bsr_matmul(
        T(x), T(data), T(indices), T(indptr), k, n, T(bias), config={"BM": 16, **_small()}
    )
    np.testing.assert_allclose(got.cpu().numpy(), x @ w + bias, rtol=1e-5, atol=1e-5)


def test_bsr_from_dense_refuses_nonzeros_outside_the_kept_blocks():
    w = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError, match="outside the kept blocks"):
        ref.bsr_from_dense(w, (4, 4), keep=np.eye(2, dtype=bool))


# -- int8 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("a_dtype", [np.uint8, np.int8])
def test_int8_kernel_matches_reference_and_onnxruntime(a_dtype):
    k, n, m = 50, 30, 7
    info = np.iinfo(a_dtype)
    a = RNG.integers(info.min, info.max + 1, (m, k)).astype(a_dtype)
    b = RNG.integers(-128, 128, (k, n)).astype(np.int8)
    a_zero = np.array(3 if a_dtype == np.uint8 else -5, a_dtype)
    b_zero = RNG.integers(-10, 10, n).astype(np.int8)
    config = {"BM": 16, "BN": 16, "BK": 32, "GROUP_M": 2, **_small()}
    got = ops.int8_matmul(T(a), T(b), T(a_zero), T(b_zero), config=config).cpu().numpy()
    expected = ref.int8_matmul(a, b, a_zero, b_zero)
    np.testing.assert_array_equal(got, expected)
    graph = oh.make_graph(
        [oh.make_node("MatMulInteger", ["a", "B", "az", "bz"], ["y"])],
        "g",
        [oh.make_tensor_value_info("a", TensorProto.UINT8 if a_dtype == np.uint8 else TensorProto.INT8, [m, k])],
        [oh.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [nh.from_array(b, "B"), nh.from_array(a_zero, "az"), nh.from_array(b_zero, "bz")],
    )  # fmt: skip
    model = ir.from_proto(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    )
    np.testing.assert_array_equal(run(make_session(model), {"a": a})["y"], expected)


# -- a lowered model through the ONNX -> torch bridge -----------------------------------------
def test_load_lowered_runs_the_custom_ops_with_the_kernels():
    pytest.importorskip("graphsurgeon.training")
    from graphsurgeon.kernels.triton.bind import load_lowered
    from graphsurgeon.passes.lowering import LowerKernels
    from graphsurgeon.passes.pruning import PruneBlocks, PruneNM

    from graphsurgeon.targets import Targets

    k, h, n = 64, 48, 16
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"),
            oh.make_node("Relu", ["a"], ["r"], name="relu"),
            oh.make_node("MatMul", ["r", "W2"], ["b"], name="fc2"),
            oh.make_node("Gemm", ["b", "W3", "c"], ["y"], name="fc3", transB=1),
        ],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [
            nh.from_array(RNG.uniform(-1, 1, (k, h)).astype(np.float32), "W1"),
            nh.from_array(RNG.uniform(-1, 1, (h, h)).astype(np.float32), "W2"),
            nh.from_array(RNG.uniform(-1, 1, (n, h)).astype(np.float32), "W3"),
            nh.from_array(RNG.uniform(-1, 1, n).astype(np.float32), "c"),
        ],
    )
    model = ir.from_proto(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    )
    QuantizeWeights({"bits": 4}, Targets(layers=["fc1"]))(model)
    PruneNM({}, Targets(layers=["fc2"]))(model)
    PruneBlocks({"block": "4x4", "sparsity": 0.7}, Targets(layers=["fc3"]))(model)
    feeds = {"x": RNG.standard_normal((3, k)).astype(np.float32)}
    expected = run(make_session(model), feeds)["y"]
    LowerKernels()(model)
    assert [n.op_type for n in model.graph] == [
        "MatMulW4A16", "Relu", "SparseMatMul24", "BsrMatMul"
    ]  # fmt: skip
    runner = load_lowered(model, device=DEVICE, half=False)
    got = runner(feeds)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_int8_kernel_skips_the_sums_zero_points_cancel():
    """No zero points (symmetric int8) and a uint8 A with zero point 128: no row/column sums."""
    a8 = RNG.integers(-128, 128, (5, 40)).astype(np.int8)
    u8 = RNG.integers(0, 256, (5, 40)).astype(np.uint8)
    b = RNG.integers(-128, 128, (40, 20)).astype(np.int8)
    config = {"BM": 16, "BN": 16, "BK": 32, "GROUP_M": 2, **_small()}
    got = ops.int8_matmul(T(a8), T(b), config=config).cpu().numpy()
    np.testing.assert_array_equal(got, ref.int8_matmul(a8, b))
    got = ops.int8_matmul(T(u8), T(b), 128, 0, config=config).cpu().numpy()
    np.testing.assert_array_equal(got, ref.int8_matmul(u8, b, 128, 0))


def test_digits_lowered_runs_like_onnxruntime(digits, tmp_path):
    """The bundle's path: prune-nm, lower-kernels, save, load, run with the kernels (Conv and
    the rest through the bridge's torch ops) -> the logits ORT gives the pruned model."""
    pytest.importorskip("graphsurgeon.training")
    from graphsurgeon.kernels.triton.bind import load_lowered

    import graphsurgeon as gs
    from graphsurgeon.data import load_npz

    pruned = gs.run_pipeline(gs.load(digits["model"]), {"steps": ["cleanup", "prune-nm"]}).model
    feeds = load_npz(digits["test"], pruned).feeds(8, batch_size=8)[0]
    expected = run(make_session(pruned), feeds)["logits"]
    lowered = gs.run_pipeline(pruned, "lower-kernels", verify="off").model
    gs.save(lowered, tmp_path / "lowered.onnx")
    runner = load_lowered(gs.load(tmp_path / "lowered.onnx"), device=DEVICE, half=False)
    np.testing.assert_allclose(runner(feeds)["logits"], expected, rtol=1e-4, atol=1e-4)


# -- errors, autotune -------------------------------------------------------------------------
def test_without_gpu_or_interpreter_the_error_says_so(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b, scales, _ = nbits_tensors(32, 16, 4, 32, False)
    with pytest.raises(GraphSurgeonError, match=r"needs a CUDA GPU \(or TRITON_INTERPRET=1"):
        ops.matmul_nbits(torch.zeros(1, 32), T(b), T(scales), None, 32, 16, 4, 32)


def test_bad_tensors_are_clear_errors():
    b, scales, _ = nbits_tensors(32, 16, 4, 32, False)
    with pytest.raises(
        GraphSurgeonError, match="MatMulW4A16: x has 30 columns, the weight has K=32"
    ):
        ops.matmul_nbits(torch.zeros(1, 30, device=DEVICE), T(b), T(scales), None, 32, 16, 4, 32)
    with pytest.raises(GraphSurgeonError, match="block_size must be a power of two"):
        ops.matmul_nbits(T(np.zeros((1, 32), np.float32)), T(b), T(scales), None, 32, 16, 4, 24)
    with pytest.raises(GraphSurgeonError, match="MatMulInt8: B must be a 2-D int8 tensor"):
        ops.int8_matmul(T(np.zeros((2, 4), np.uint8)), T(np.zeros((4, 3), np.uint8)))


def test_autotune_cache_is_per_profile_and_shape_bucket(tmp_path):
    assert autotune.bucket_key("w4a16_gemm", 48, n=4096, k=4096) == "w4a16_gemm|m64|n4096|k4096"
    assert autotune.bucket_key("w4a16_gemv", 1, n=8) == "w4a16_gemv|m1|n8"
    candidates = [{"BM": 64}, {"BM": 16}]
    autotune.use_profile("test-gpu")
    try:
        path = autotune.cache_path()
        assert path == tmp_path / "tuned" / "test-gpu.json"
        assert autotune.choose("k|m1", candidates) == {"BM": 64}  # no GPU: the default
        assert not autotune.tuning_enabled()  # the interpreter never tunes
        path.parent.mkdir(parents=True)
        tuned = {"profile": "test-gpu", "configs": {"k|m2": {"config": {"BM": 16}, "ms": 0.1}}}
        path.write_text(json.dumps(tuned))
        autotune._loaded.clear()
        assert autotune.choose("k|m2", candidates) == {"BM": 16}  # a cached config wins
        autotune.use_profile("other")
        assert autotune.choose("k|m2", candidates) == {"BM": 64}
        bundle = tmp_path / "bundle" / "triton" / "tuned"  # a bundle ships its tuned configs
        bundle.mkdir(parents=True)
        (bundle / "other.json").write_text(json.dumps(tuned))
        autotune.use_cache_dir(bundle)
        assert autotune.choose("k|m2", candidates) == {"BM": 16}
    finally:
        autotune.use_profile(None)
        autotune.use_cache_dir(None)
        autotune._loaded.clear()


def _small() -> dict[str, int]:
    return {"num_warps": 4, "num_stages": 2}


def test_kernels_compile_for_hopper_without_spills():
    """Each kernel compiles through Triton's GPU pipeline to an sm_90 cubin (bundled ptxas, no
    GPU needed): what the interpreter cannot check. Default configs use no spill stack."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "graphsurgeon.kernels.triton.aot", "--arch", "90"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if "sm_90" in line]
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(lines) == 6 and all(line.startswith("ok") for line in lines), done.stdout
    assert all("spill_stack 0," in line for line in lines), done.stdout
    assert sum("mma wgmma" in line for line in lines) == 4  # Hopper tensor cores


# -- on a GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 64])
def test_w4a16_fp16_on_gpu(m):
    k, n, block = 1024, 512, 32
    b, scales, zp = nbits_tensors(k, n, 4, block, True)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    w = torch.from_numpy(ref.dequantize_nbits(b, scales, zp, k, n, 4, block)).cuda()
    got = ops.matmul_nbits(x, T(b).cuda(), T(scales).half().cuda(), T(zp).cuda(), k, n, 4, block)
    torch.testing.assert_close(got.float(), x.float() @ w, rtol=2e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sparse_bsr_int8_on_gpu():
    k, n, m = 512, 256, 64
    w = two_four(k, n)
    values, meta = ref.compress_24(w)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    wt = torch.from_numpy(w).cuda()
    got = ops.sparse24_matmul(x, T(values).half().cuda(), T(meta).cuda(), k, n)
    torch.testing.assert_close(got.float(), x.float() @ wt, rtol=2e-2, atol=5e-2)
    big = torch.randn(512, k, dtype=torch.float16, device="cuda")  # auto: sparse tensor cores
    got = ops.sparse24_matmul(big, T(values).half(), T(meta), k, n, T(np.ones(n, np.float32)))
    torch.testing.assert_close(got.float(), big.float() @ wt + 1, rtol=2e-2, atol=5e-2)
    data, indices, indptr = ref.bsr_from_dense(w * (RNG.random((k, n)) < 2), (16, 16))
    got = ops.bsr_matmul(x, T(data).half().cuda(), T(indices).cuda(), T(indptr).cuda(), k, n)
    torch.testing.assert_close(got.float(), x.float() @ wt, rtol=2e-2, atol=5e-2)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    b8 = torch.randint(-128, 128, (k, n), dtype=torch.int8, device="cuda")
    expected = ref.int8_matmul(a.cpu().numpy(), b8.cpu().numpy(), 0, 0)
    np.testing.assert_array_equal(ops.int8_matmul(a, b8).cpu().numpy(), expected)

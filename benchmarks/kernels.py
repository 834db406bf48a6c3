"""Triton kernels against torch's fp16 GEMM (cuBLAS) on one GPU, side by side, with ratios.

Cases (weights ``[K, N]``, shapes 4096x4096 and 4096x14336, activations fp16):

- W4A16 (MatMulNBits packing, symmetric, fp16 scales, block 128 and 32) at batch 1, 16, 64
  against ``x @ W`` in fp16. Target >= 3x at batch 1; the memory bound is 3.88x (block 128:
  0.5 + 2/128 bytes per weight instead of 2). W8A16 at batch 1.
- 2:4 at batch 2048 and 8192 against dense fp16: the Triton kernel alone, ``auto`` (what
  ``SparseMatMul24`` runs: the sparse tensor cores through torch's semi-structured sparsity at
  batch >= 256, else Triton), and torch's ``to_sparse_semi_structured`` by itself. Target
  >= 1.3x.
- BSR, 16x16 blocks (prune-blocks' largest), 90% of blocks zero, at batch 16 and 2048.
- int8 x int8 -> int32 at batch 64 and 2048 against fp16, and ``torch._int_mm`` (cuBLASLt).

Every kernel is first checked against the dense result. Timing: each call is captured in a
CUDA graph (no launch overhead on either side), the L2 is flushed before every run by writing
a 256 MB buffer, and CUDA events time the replays; the figure is the median. Launch configs
are tuned once per shape (``graphsurgeon.kernels.triton.autotune``) and cached under the
profile name. Writes ``benchmarks/results/kernels-<device>.json``.

    python benchmarks/kernels.py [--profile nvidia-h100-sxm] [--reps 100] [--no-tune]
    python benchmarks/kernels.py --smoke   # no GPU: tiny shapes in the interpreter (logic only)

Without a CUDA GPU (and without --smoke) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = [(4096, 4096), (4096, 14336)]


def device_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-interpreter"


class Timer:
    """Median time of ``fn`` in ms: CUDA graph replays timed with events, L2 flushed before each."""

    def __init__(self, reps: int, smoke: bool) -> None:
        self.reps, self.smoke = reps, smoke
        if not smoke:
            self.flush_buffer = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.smoke:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        for _ in range(3):
            fn()  # tunes and compiles outside the graph
        torch.cuda.synchronize()
        replay = fn
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            replay = graph.replay
        except Exception as e:  # not capturable: time plain launches
            print(f"  (no CUDA graph: {type(e).__name__}: {e}; timing direct launches)")
        times = []
        for _ in range(self.reps):
            self.flush_buffer.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def check(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float = 2e-2) -> None:
    err = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item() + 1e-6
    if err > tol * scale:
        raise SystemExit(
            f"{name}: wrong result (max abs error {err:.3g}, output scale {scale:.3g})"
        )


def w4a16_cases(timer: Timer, shapes, batches, dev: str) -> list[dict]:
    from graphsurgeon.kernels import reference as ref
    from graphsurgeon.kernels.triton import ops

    rows = []
    for k, n in shapes:
        for bits, block in ((4, 128), (4, 32), (8, 128)):
            blocks = -(-k // block)
            codes = np.random.default_rng(0).integers(0, 1 << bits, (n, blocks * block), np.uint8)
            b = torch.from_numpy(ref.pack_bits(codes, bits).reshape(n, blocks, -1)).to(dev)
            scales = (torch.rand(n * blocks, device=dev) * 0.01 + 0.001).half()
            w = torch.from_numpy(
                ref.dequantize_nbits(
                    b.cpu().numpy(), scales.float().cpu().numpy(), None, k, n, bits, block
                )
            ).to(dev, torch.float16)
            for m in batches if bits == 4 else batches[:1]:
                x = torch.randn(m, k, device=dev, dtype=torch.float16) / k**0.5
                ours = partial(ops.matmul_nbits, x, b, scales, None, k, n, bits, block)
                dense = partial(torch.matmul, x, w)
                check(f"W{bits}A16 {k}x{n} m{m}", ours(), dense())
                t_ours, t_dense = timer(ours), timer(dense)
                rows.append({
                    "kernel": f"w{bits}a16", "block_size": block, "K": k, "N": n, "M": m,
                    "ours_ms": t_ours, "torch_fp16_ms": t_dense, "speedup": t_dense / t_ours,
                })  # fmt: skip
                print(f"W{bits}A16 g{block:<3} {k}x{n} batch {m:>4}: ours {t_ours:.4f} ms, "
                      f"cuBLAS fp16 {t_dense:.4f} ms -> {t_dense / t_ours:.2f}x")  # fmt: skip
    return rows


def sparse24_cases(timer: Timer, shapes, batches, dev: str) -> list[dict]:
    from graphsurgeon.kernels import reference as ref
    from graphsurgeon.kernels.triton import ops

    rows = []
    for k, n in shapes:
        w = torch.randn(k, n, dtype=torch.float16)
        groups = w.T.reshape(n, k // 4, 4).clone()
        drop = groups.abs().argsort(dim=-1)[..., :2]
        groups.scatter_(-1, drop, 0)
        w = groups.reshape(n, k).T.contiguous()
        values, meta = (torch.from_numpy(a).to(dev) for a in ref.compress_24(w.numpy()))
        w = w.to(dev)
        semi = None
        try:
            from torch.sparse import to_sparse_semi_structured

            if dev == "cuda":
                semi = to_sparse_semi_structured(w.T.contiguous())  # the [N, K] operand
        except Exception as e:
            print(f"  (torch semi-structured unavailable: {type(e).__name__}: {e})")
        for m in batches:
            x = torch.randn(m, k, device=dev, dtype=torch.float16) / k**0.5
            ours = partial(ops.sparse24_matmul, x, values, meta, k, n, backend="triton")
            auto = partial(ops.sparse24_matmul, x, values, meta, k, n, backend="auto")
            dense = partial(torch.matmul, x, w)
            check(f"2:4 {k}x{n} m{m}", ours(), dense())
            check(f"2:4 auto {k}x{n} m{m}", auto(), dense())
            t_ours, t_auto, t_dense = timer(ours), timer(auto), timer(dense)
            row = {"kernel": "sparse24", "K": k, "N": n, "M": m, "ours_ms": t_ours,
                   "auto_ms": t_auto, "torch_fp16_ms": t_dense, "speedup": t_dense / t_ours,
                   "auto_speedup": t_dense / t_auto}  # fmt: skip
            text = (
                f"2:4 {k}x{n} batch {m:>5}: Triton {t_ours:.4f} ms ({t_dense / t_ours:.2f}x), "
                f"auto {t_auto:.4f} ms ({t_dense / t_auto:.2f}x), dense {t_dense:.4f} ms"
            )
            if semi is not None:
                xt = x.T.contiguous()
                torch_sparse = partial(torch.mm, semi, xt)
                check(f"torch 2:4 {k}x{n}", torch_sparse().T, dense())
                t_semi = timer(torch_sparse)
                row.update(torch_semi_structured_ms=t_semi, torch_semi_speedup=t_dense / t_semi)
                text += f", torch 2:4 alone {t_semi:.4f} ms ({t_dense / t_semi:.2f}x)"
            rows.append(row)
            print(text)
    return rows


def bsr_cases(timer: Timer, shapes, batches, dev: str, block: int = 16) -> list[dict]:
    from graphsurgeon.kernels import reference as ref
    from graphsurgeon.kernels.triton import ops

    rows = []
    rng = np.random.default_rng(0)
    for k, n in shapes:
        keep = rng.random((n // block, k // block)) >= 0.9  # 90% of blocks zero
        mask = np.repeat(np.repeat(keep, block, 0), block, 1).T
        w_np = (rng.standard_normal((k, n)) * mask).astype(np.float16)
        data, indices, indptr = (
            torch.from_numpy(a).to(dev) for a in ref.bsr_from_dense(w_np, (block, block))
        )
        w = torch.from_numpy(w_np).to(dev)
        for m in batches:
            x = torch.randn(m, k, device=dev, dtype=torch.float16) / k**0.5
            ours = partial(ops.bsr_matmul, x, data, indices, indptr, k, n)
            dense = partial(torch.matmul, x, w)
            check(f"BSR {k}x{n} m{m}", ours(), dense())
            t_ours, t_dense = timer(ours), timer(dense)
            rows.append({"kernel": "bsr", "block": [block, block], "block_sparsity":
                         round(1 - float(keep.mean()), 4), "K": k, "N": n, "M": m,
                         "ours_ms": t_ours, "torch_fp16_ms": t_dense,
                         "speedup": t_dense / t_ours})  # fmt: skip
            print(f"BSR {block}x{block} 90% {k}x{n} batch {m:>5}: ours {t_ours:.4f} ms, "
                  f"dense {t_dense:.4f} ms -> {t_dense / t_ours:.2f}x")  # fmt: skip
    return rows


def int8_cases(timer: Timer, shapes, batches, dev: str) -> list[dict]:
    from graphsurgeon.kernels.triton import ops

    rows = []
    for k, n in shapes:
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, device=dev)
        w = b.half()
        for m in batches:
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
            x = a.half()
            ours = partial(ops.int8_matmul, a, b)
            dense = partial(torch.matmul, x, w)
            exact = (a.cpu().int() @ b.cpu().int()).to(dev) if dev == "cpu" else None
            got = ours()
            if exact is not None and not torch.equal(got, exact):
                raise SystemExit("int8: wrong result")
            t_ours, t_dense = timer(ours), timer(dense)
            row = {"kernel": "int8", "K": k, "N": n, "M": m, "ours_ms": t_ours,
                   "torch_fp16_ms": t_dense, "speedup": t_dense / t_ours}  # fmt: skip
            text = f"int8 {k}x{n} batch {m:>5}: ours {t_ours:.4f} ms, fp16 {t_dense:.4f} ms"
            if dev == "cuda" and m > 16:
                try:
                    ref_mm = torch._int_mm(a, b)
                    if not torch.equal(got, ref_mm):
                        raise SystemExit("int8: differs from torch._int_mm")
                    t_int = timer(partial(torch._int_mm, a, b))
                    row.update(torch_int_mm_ms=t_int)
                    text += f", torch._int_mm {t_int:.4f} ms"
                except RuntimeError as e:
                    print(f"  (torch._int_mm unavailable: {e})")
            rows.append(row)
            print(f"{text} -> {t_dense / t_ours:.2f}x vs fp16")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="nvidia-h100-sxm", help="tuning cache key")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--no-tune", action="store_true", help="default configs, no tuning")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in the interpreter")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernels.py: needs a CUDA GPU (H100/H200); none here, nothing measured")
        return 0
    from graphsurgeon.kernels.triton import autotune

    autotune.use_profile(args.profile)
    autotune.enable_tuning(not args.no_tune and not args.smoke)
    dev = "cpu" if args.smoke else "cuda"
    timer = Timer(args.reps, args.smoke)
    torch.manual_seed(0)
    if args.smoke:
        shapes, small, large = [(64, 64)], [1, 16], [32]
    else:
        shapes, small, large = SHAPES, [1, 16, 64], [2048, 8192]
    name = device_name()
    print(f"device: {name}; torch {torch.__version__}; L2 flushed (256 MB) before every run")
    rows = w4a16_cases(timer, shapes, small, dev)
    rows += sparse24_cases(timer, shapes, large, dev)
    rows += bsr_cases(timer, shapes, [small[1], large[0]], dev)
    rows += int8_cases(timer, shapes, [small[-1], large[0]], dev)
    if args.smoke:
        print("smoke run: logic checked in the interpreter; timings meaningless, nothing written")
        return 0
    import triton

    out = args.json or RESULTS / f"kernels-{name.replace(' ', '-').lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "profile": args.profile,
        "tuned": not args.no_tune,
        "timing": "CUDA graph replay, CUDA events, median of reps; L2 flushed before each",
        "reps": args.reps,
        "cases": [
            {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows
        ],
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

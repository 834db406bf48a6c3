"""Compile the kernels ahead of time for an NVIDIA architecture, without a GPU.

Triton's wheel bundles ``ptxas``, so every kernel variant (kernel x launch config x
specialization) can be compiled to a cubin for, say, sm_90 on a CPU-only machine. This checks
what the interpreter cannot: that the kernels lower through Triton's GPU pipeline, and what
they cost in registers, spills (``STACK``) and shared memory, and whether the tensor-core
path is Hopper's ``wgmma``. Arguments are specialized as they are at run time on real shapes
(pointers and strides divisible by 16).

    python -m graphsurgeon.kernels.triton.aot [--arch 90] [--all]

Run it with ``TRITON_INTERPRET`` unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from graphsurgeon.kernels.triton import bsr, int8_gemm, sparse24, w4a16

_NBITS_ARGS = {
    "x_ptr": "*fp16", "b_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "y_ptr": "*fp16",
    "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_xk": "i32",
    "stride_ym": "i32", "stride_yn": "i32", "b_row": "i32", "n_blocks": "i32", "z_row": "i32",
}  # fmt: skip
_SPARSE24_ARGS = {
    "x_ptr": "*fp16", "v_ptr": "*fp16", "meta_ptr": "*u8", "bias_ptr": "*fp16", "y_ptr": "*fp16",
    "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_xk": "i32",
    "stride_ym": "i32", "stride_yn": "i32", "v_row": "i32", "meta_row": "i32",
}  # fmt: skip
_BSR_ARGS = {
    "x_ptr": "*fp16", "data_ptr": "*fp16", "indices_ptr": "*i32", "indptr_ptr": "*i32",
    "bias_ptr": "*fp16", "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
    "stride_xm": "i32", "stride_xk": "i32", "stride_ym": "i32", "stride_yn": "i32",
}  # fmt: skip
_INT8_ARGS = {
    "a_ptr": "*u8", "b_ptr": "*i8", "az_ptr": "*i32", "bz_ptr": "*i32", "y_ptr": "*i32",
    "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32",
    "stride_bn": "i32", "stride_ym": "i32", "stride_yn": "i32", "stride_bz": "i32",
}  # fmt: skip
#: Arguments not specialized as divisible by 16 (unit strides, sizes that vary, zero points).
_NOT_DIVISIBLE = {"M", "stride_xk", "stride_yn", "stride_ak", "stride_bn", "stride_bz"}


@dataclass
class Variant:
    name: str
    fn: Any
    args: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 3


def variants(everything: bool = False) -> list[Variant]:
    """One representative variant per kernel, or (``everything``) every tuning candidate."""
    out = []
    for i, c in enumerate(w4a16.GEMM_CONFIGS if everything else w4a16.GEMM_CONFIGS[:1]):
        const = {"BITS": 4, "BLOCK_SIZE": 128, "HAS_ZEROS": True, "IEEE": False}
        const |= {k: c[k] for k in ("BM", "BN", "BK", "GROUP_M")}
        out.append(Variant(f"w4a16_gemm[{i}]", w4a16._nbits_gemm, _NBITS_ARGS, const,
                           c["num_warps"], c["num_stages"]))  # fmt: skip
    for i, c in enumerate(w4a16.GEMV_CONFIGS if everything else w4a16.GEMV_CONFIGS[1:2]):
        const = {"BITS": 4, "BLOCK_SIZE": 128, "HAS_ZEROS": False}
        const |= {k: c[k] for k in ("BN", "BK", "SPLIT_K")}
        args = {**_NBITS_ARGS, "y_ptr": "*fp32" if c["SPLIT_K"] > 1 else "*fp16"}
        out.append(Variant(f"w4a16_gemv[{i}]", w4a16._nbits_gemv, args, const, c["num_warps"]))
    for i, c in enumerate(sparse24.CONFIGS if everything else sparse24.CONFIGS[:1]):
        const = {"HAS_BIAS": True, "IEEE": False} | {k: c[k] for k in ("BM", "BN", "BK", "GROUP_M")}
        out.append(Variant(f"sparse24[{i}]", sparse24._sparse24_gemm, _SPARSE24_ARGS, const,
                           c["num_warps"], c["num_stages"]))  # fmt: skip
    for block, use_dot, bm in ((16, True, 64), (4, False, 32)):
        const = {"BLOCK_N": block, "BLOCK_K": block, "HAS_BIAS": False, "USE_DOT": use_dot,
                 "IEEE": False, "BM": bm}  # fmt: skip
        out.append(Variant(f"bsr[{block}x{block}]", bsr._bsr_gemm, _BSR_ARGS, const, 4))
    for i, c in enumerate(int8_gemm.CONFIGS if everything else int8_gemm.CONFIGS[:1]):
        const = {"A_UNSIGNED": True, "ROW_SUM": False, "COL_SUM": True}
        const |= {k: c[k] for k in ("BM", "BN", "BK", "GROUP_M")}
        out.append(Variant(f"int8[{i}]", int8_gemm._int8_gemm, _INT8_ARGS, const,
                           c["num_warps"], c["num_stages"]))  # fmt: skip
    return out


def compile_variant(variant: Variant, arch: int = 90) -> dict[str, Any]:
    """Compile one variant to a cubin; its registers, spill stack, shared memory, MMA kind."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(variant.args) | {k: "constexpr" for k in variant.constexprs}
    names = list(variant.args)
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in _NOT_DIVISIBLE
    }
    source = ASTSource(
        fn=triton.jit(variant.fn), signature=signature, constexprs=variant.constexprs, attrs=attrs
    )
    row: dict[str, Any] = {"kernel": variant.name}
    try:
        kernel = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
    except Exception as e:
        return row | {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return row | {"ok": True, "shared": kernel.metadata.shared, "mma": mma, **_usage(kernel)}


def _usage(kernel: Any) -> dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        try:
            text = subprocess.run(
                [tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60
            ).stdout
        except OSError:
            return {}
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
            return {"registers": int(fields["REG"]), "spill_stack": int(fields["STACK"])}
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--all", action="store_true", help="every tuning candidate")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    failed = 0
    for variant in variants(args.all):
        row = compile_variant(variant, args.arch)
        failed += not row["ok"]
        detail = row.get("error") or ", ".join(
            f"{k} {row[k]}" for k in ("registers", "spill_stack", "shared", "mma") if k in row
        )
        print(f"{'ok  ' if row['ok'] else 'FAIL'} sm_{args.arch} {row['kernel']:<16} {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile a prepared model with TVM Relax for a hardware profile and export it.

The target comes from the profile: ``llvm`` with ``mcpu`` (the profile's CPU model when we
know its LLVM name, else the newest generic CPU its features imply) and ``num-cores``, or
``cuda`` with the ``arch`` of the profile's compute capability. CPU kernels get the hand
schedules of :mod:`.schedules` (knobs from the tuning database when there is one); CUDA uses
TVM's default pipeline, whose dlight GPU rules bind every kernel to threads.

The result is a shared library from ``export_library`` plus a small JSON file with the input
and output names, shapes and dtypes, the target and the thread count, which
:func:`graphsurgeon.kernels.tvm.runtime.load` needs to call it by name.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx_ir as ir

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.profiles import HardwareProfile
from graphsurgeon.shapes import static_dims

META_FORMAT = "graphsurgeon-tvm/1"
#: LLVM CPU names of the CPUs in the shipped profiles (``device.model``).
LLVM_CPUS = {
    "EPYC 9755": "znver5",
    "EPYC 7763": "znver3",
    "Altra Q80-30": "neoverse-n1",
}


@dataclass(frozen=True)
class TvmBuild:
    lib_path: Path
    meta_path: Path
    seconds: float
    target: str


def cpu_target(profile: HardwareProfile, *, threads: int | None = None, mcpu: str | None = None):
    """``llvm -mcpu=... -num-cores=...`` for a CPU profile (``mcpu`` overrides; ``"host"``
    is this machine's CPU)."""
    import tvm
    from tvm.target import codegen

    device = profile.device
    if device.kind != "cpu":
        raise GraphSurgeonError(f"profile {profile.name!r} is a GPU profile; use target='cuda'")
    if mcpu == "host":
        mcpu = codegen.llvm_get_system_cpu()
    mcpu = mcpu or LLVM_CPUS.get(device.model)
    if mcpu is None:
        if device.isa in ("x86_64", "amd64"):
            feats = profile.features
            mcpu = (
                "sapphirerapids"
                if feats.amx
                else "cascadelake"
                if feats.vnni
                else "haswell"  # AVX2 + FMA, the baseline of every x86 server CPU since 2013
            )
        elif device.isa in ("aarch64", "arm64"):
            mcpu = "neoverse-n1"
        else:
            mcpu = codegen.llvm_get_system_cpu()
    spec = {"kind": "llvm", "mcpu": mcpu, "num-cores": int(threads or profile.threads())}
    if device.isa in ("aarch64", "arm64"):
        spec["mtriple"] = "aarch64-linux-gnu"
    return tvm.target.Target(spec)


def cuda_target(profile: HardwareProfile):
    import tvm

    cc = profile.device.compute_capability
    if profile.device.kind != "gpu" or not cc:
        raise GraphSurgeonError(
            f"profile {profile.name!r} is a CPU profile; target='cuda' needs a GPU profile"
        )
    arch = "sm_" + cc.replace(".", "")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def relax_pipeline(target, choose=None):
    """The CPU backend's own pass list with our schedules applied after fusion."""
    import tvm
    from graphsurgeon.kernels.tvm.schedules import Knobs, cpu_schedule_pass
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    choose = choose or (lambda func: Knobs())

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                [
                    *_fusion_passes(target),
                    cpu_schedule_pass(choose),
                    *cpu_generic.dataflow_lower_passes(target),
                    *cpu_generic.finalize_passes(target),
                ]
            )
            return seq(mod)

    return _pipeline


def fused_kernels(mod, target):
    """The Relax module after legalization and fusion: the kernels the schedules see."""
    import tvm

    with target:
        return tvm.transform.Sequential(_fusion_passes(target))(mod)


def _fusion_passes(target) -> list:
    """Up to fused TIR kernels. ``FastMathTransform`` swaps erf/exp/tanh for TVM's vectorizable
    polynomial forms (a scalar libm ``erf`` per element made the GELU epilogue cost more than
    its matmul); onnxruntime's own Erf/Gelu kernels use approximations of the same kind."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FastMathTransform(),
        *cpu_generic.library_dispatch_passes(target),
        *cpu_generic.legalize_passes(target),
    ]


def build(
    model: ir.Model,
    relax_mod,
    out_dir: Path,
    *,
    target,
    profile: HardwareProfile,
    threads: int,
    choose=None,
    tuned: dict | None = None,
    block_sparse: list | None = None,
) -> TvmBuild:
    """Compile ``relax_mod`` (imported from ``model``) and write ``model.so`` + ``model.json``."""
    import tvm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # CUDA: TVM's default pipeline (dlight GPU rules); CPU: ours, with the Relax VM's program
    # compiled to native code ("compiled" mode: no bytecode interpreter between the kernels,
    # about 1.5 us less per call of the digits CNN's 26 VM instructions)
    cuda = target.kind.name == "cuda"
    pipeline = "default" if cuda else relax_pipeline(target, choose)
    try:
        executable = tvm.relax.build(
            relax_mod,
            target,
            relax_pipeline=pipeline,
            exec_mode="bytecode" if cuda else "compiled",
        )
    except Exception as e:
        text = " ".join(str(e).split())[:300]
        raise GraphSurgeonError(f"TVM could not compile the model for {target}: {text}") from None
    lib_path = out_dir / "model.so"
    tmp = lib_path.with_suffix(".so.tmp")
    executable.export_library(str(tmp))
    tmp.replace(lib_path)
    seconds = time.perf_counter() - start
    meta = {
        "format": META_FORMAT,
        "tvm_version": tvm.__version__,
        "target": str(target),
        "device": "cuda" if cuda else "cpu",
        "profile": profile.name,
        "threads": threads,
        "inputs": [_describe(v) for v in model.graph.inputs],
        "outputs": [_describe(v) for v in model.graph.outputs],
        "compile_seconds": round(seconds, 3),
        "tuned": tuned or {},
        "block_sparse": block_sparse or [],
    }
    meta_path = out_dir / "model.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return TvmBuild(lib_path, meta_path, seconds, str(target))


def _describe(value: ir.Value) -> dict:
    dtype = value.dtype
    return {
        "name": value.name,
        "shape": static_dims(value.shape),  # None: left to the run to tell
        "dtype": dtype.numpy().name if dtype is not None else None,
    }


Target = Literal["cpu", "cuda"]

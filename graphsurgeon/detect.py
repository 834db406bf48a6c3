"""``graphsurgeon profile detect``: describe this machine and measure what it can do.

CPU facts come from ``/proc/cpuinfo`` and sysfs; an NVIDIA GPU, if any, from NVML (and torch
for the SM count). Microbenchmarks, all in onnxruntime on the CPU with every core:

- GEMM throughput: an fp32 ``MatMul`` and an int8 ``MatMulInteger`` of n x n x n;
- memory bandwidth: a large numpy copy (bytes read + written per second);
- launch overhead: the median latency of a one-``Add`` model.

The power model cannot be measured without counters, so it is taken from the closest shipped
profile (by ISA and features), scaled to this machine's core count, with ``pj_per_flop``
recomputed from the *measured* peaks; the profile's ``sources`` say so.
"""

from __future__ import annotations

import importlib.util
import platform
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphsurgeon.latency import measure_latency
from graphsurgeon.measure import available_cpus
from graphsurgeon.profiles import HardwareProfile, load_profile


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _cache_kb() -> dict[str, int]:
    """Per-chip cache sizes: each distinct cache instance in sysfs counted once."""
    totals: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    for index in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        key = f"l{level}" + ("d" if kind == "Data" else "")
        if (key, shared) in seen:
            continue
        seen.add((key, shared))
        value = int(size.rstrip("KMG")) * {"K": 1, "M": 1024, "G": 1 << 20}.get(size[-1], 1)
        totals[key] = totals.get(key, 0) + value
    return totals


def _clock_ghz(info: dict[str, str]) -> float:
    try:
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        return int(khz) / 1e6
    except (OSError, ValueError):
        pass
    try:
        return float(info.get("cpu MHz", "0")) / 1000 or 1.0
    except ValueError:
        return 1.0


def _matmul_model(n: int, int8: bool) -> bytes:
    rng = np.random.default_rng(0)
    if int8:
        w = helper.make_tensor(
            "W",
            TensorProto.INT8,
            [n, n],
            rng.integers(-8, 8, (n, n)).astype(np.int8).tobytes(),
            raw=True,
        )
        node = helper.make_node("MatMulInteger", ["X", "W"], ["Y"])
        x = helper.make_tensor_value_info("X", TensorProto.UINT8, [n, n])
        y = helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])
    else:
        w = helper.make_tensor(
            "W",
            TensorProto.FLOAT,
            [n, n],
            rng.standard_normal((n, n), dtype=np.float32).tobytes(),
            raw=True,
        )
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [n, n])
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([node], "gemm", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def gemm_tops(n: int, int8: bool, threads: int, repeats: int) -> float:
    """Measured TFLOP/s (TOP/s for int8) of an n x n x n product: 2 n^3 ops per run."""
    rng = np.random.default_rng(1)
    x = (
        rng.integers(0, 16, (n, n)).astype(np.uint8)
        if int8
        else rng.standard_normal((n, n), dtype=np.float32)
    )
    stats = measure_latency(
        _matmul_model(n, int8), [{"X": x}], threads=threads, warmup=2, repeats=repeats
    )
    return 2 * n**3 / stats.median_s / 1e12


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth: a copy reads and writes every byte, so 2 x size per copy."""
    src = np.ones(mib * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def launch_overhead_us(threads: int) -> float:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["X", "X"], ["Y"])], "add", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feed = {"X": np.ones(1, dtype=np.float32)}
    stats = measure_latency(
        model.SerializeToString(), [feed], threads=threads, warmup=20, repeats=200
    )
    return stats.median_s * 1e6


def _base_profile(isa: str, flags: set[str]) -> HardwareProfile:
    if isa in ("aarch64", "arm64"):
        return load_profile("arm64-neon")
    if "avx512_vnni" in flags or "avx512f" in flags:
        return load_profile("x86-avx512-vnni")
    return load_profile("x86-avx2")


def _gpu() -> dict | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        power = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
        return {"name": name, "cc": f"{major}.{minor}", "memory_gb": memory / 1e9, "power_w": power}
    except Exception:
        return None


def detect_profile(*, quick: bool = False) -> HardwareProfile:
    """A measured profile of this machine's CPU (GPUs are listed in ``microbenchmarks``)."""
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    isa = platform.machine()
    cores = available_cpus()
    base = _base_profile(isa, flags)
    n, repeats = (256, 10) if quick else (1024, 20)
    fp32 = gemm_tops(n, False, cores, repeats)
    int8 = gemm_tops(n, True, cores, repeats)
    bandwidth = memory_bandwidth_gbs(64 if quick else 256)
    overhead = launch_overhead_us(cores)
    scale = cores / base.device.cores
    tdp, idle = base.power.tdp_w * scale, base.power.idle_w * scale
    peak = {"fp32": {"dense": round(fp32, 4)}, "int8": {"dense": round(int8, 4)}}
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()
        memory_gb = int(meminfo[1]) / 1e6
    except (OSError, IndexError, ValueError):
        memory_gb = 1.0
    clock = _clock_ghz(info)
    gpu = _gpu()
    data = {
        "name": f"detected-{platform.node() or 'host'}",
        "description": f"measured on {info.get('model name', isa)} ({cores} CPUs available)",
        "device": {
            "kind": "cpu",
            "vendor": info.get("vendor_id", "unknown"),
            "model": info.get("model name", isa),
            "isa": isa,
            "cores": cores,
            "threads_per_core": 1,
            "clocks": {"base_ghz": round(clock, 3)},
            "cache_kb": _cache_kb(),
        },
        "memory": {"size_gb": round(memory_gb, 2), "bandwidth_gbs": round(bandwidth, 2)},
        "peak": peak,
        "features": {
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
            "amx": "amx_tile" in flags,
            "bf16": bool({"avx512_bf16", "bf16"} & flags),
            "fp16": bool({"avx512_fp16", "fphp", "asimdhp"} & flags),
        },
        "power": {
            "tdp_w": round(tdp, 3),
            "idle_w": round(idle, 3),
            "pj_per_flop": {
                k: round((tdp - idle) / (v["dense"] * 1e12) * 1e12, 3) for k, v in peak.items()
            },
            "pj_per_dram_byte": base.power.pj_per_dram_byte,
        },
        # the backends this machine has installed (a GPU gets its own profile)
        "backends": ["ort-cpu", *(["tvm-llvm"] if importlib.util.find_spec("tvm") else [])],
        "measurement": {
            "threads": cores,
            "warmup": 5,
            "repeats": 30,
            "max_repeats": 300,
            "target_cv": 0.05,
        },
        "measured": True,
        "microbenchmarks": {
            "ort-cpu": {
                "gemm_fp32_tflops": round(fp32, 4),
                "gemm_int8_tops": round(int8, 4),
                "gemm_n": n,
                "launch_overhead_us": round(overhead, 2),
            },
            "memory_copy_gbs": round(bandwidth, 2),
            "onnx_version": onnx.__version__,
            "cpu_flags": sorted(
                f for f in flags if f.startswith(("avx", "amx", "sve", "asimd", "fma"))
            ),
            **({"gpu": gpu} if gpu else {}),
        },
        "sources": [
            {
                "fields": ["peak", "memory.bandwidth_gbs", "microbenchmarks"],
                "source": "measured by graphsurgeon profile detect",
            },
            {
                "fields": ["power"],
                "source": f"{base.name} profile scaled by cores ({cores}/{base.device.cores}); pj_per_flop from the measured peaks",
            },
        ],
    }
    return HardwareProfile.model_validate(data)


__all__ = ["detect_profile", "gemm_tops", "launch_overhead_us", "memory_bandwidth_gbs"]

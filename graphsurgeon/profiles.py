"""Hardware profiles: what a device is and what it can do, validated against one schema.

A profile is YAML. Shipped ones live in ``hardware_profiles/`` (installed as
``graphsurgeon.hardware_profiles``) and are named by file stem; any other path works too.
Datasheet numbers name their source in ``sources``; ``graphsurgeon profile detect`` writes
measured profiles (``measured: true``) with microbenchmark results instead.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from graphsurgeon.errors import GraphSurgeonError

Backend = Literal["ort-cpu", "ort-cuda", "tvm-llvm", "tvm-cuda", "triton-cuda"]
DType = Literal["fp64", "fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Clocks(_Strict):
    base_ghz: float = Field(gt=0)
    boost_ghz: float | None = Field(default=None, gt=0)


class Device(_Strict):
    kind: Literal["cpu", "gpu"]
    vendor: str
    model: str
    isa: str | None = Field(default=None, description="x86_64, aarch64 ... (CPUs)")
    compute_capability: str | None = Field(default=None, description="e.g. '9.0' (GPUs)")
    cores: int = Field(gt=0, description="physical cores (CPU) or SMs (GPU)")
    threads_per_core: int = Field(default=1, gt=0)
    clocks: Clocks
    cache_kb: dict[str, int] = Field(default_factory=dict, description="l1d, l2, l3 (per chip)")

    @model_validator(mode="after")
    def _isa_or_cc(self) -> Device:
        if self.kind == "cpu" and not self.isa:
            raise ValueError("a CPU profile needs 'isa'")
        if self.kind == "gpu" and not self.compute_capability:
            raise ValueError("a GPU profile needs 'compute_capability'")
        return self


class Memory(_Strict):
    size_gb: float = Field(gt=0)
    bandwidth_gbs: float = Field(gt=0, description="peak DRAM/HBM bandwidth, GB/s")


class Throughput(_Strict):
    dense: float = Field(gt=0, description="TFLOP/s (TOP/s for ints)")
    sparse: float | None = Field(default=None, gt=0, description="with 2:4 sparsity, if any")


class Features(_Strict):
    vnni: bool = False
    amx: bool = False
    bf16: bool = False
    fp16: bool = False
    sparse_2_4: bool = False
    fp8: bool = False


class Power(_Strict):
    tdp_w: float = Field(gt=0)
    idle_w: float = Field(ge=0)
    pj_per_flop: dict[DType, float] = Field(description="dynamic energy per op, picojoules")
    pj_per_dram_byte: float = Field(gt=0)

    @model_validator(mode="after")
    def _idle_below_tdp(self) -> Power:
        if self.idle_w >= self.tdp_w:
            raise ValueError("idle_w must be below tdp_w")
        if not self.pj_per_flop:
            raise ValueError("pj_per_flop needs at least one dtype")
        if any(v <= 0 for v in self.pj_per_flop.values()):
            raise ValueError("pj_per_flop values must be > 0")
        return self


class Measurement(_Strict):
    threads: int = Field(default=0, ge=0, description="intra-op threads; 0 = all cores")
    warmup: int = Field(default=5, ge=0)
    repeats: int = Field(default=30, ge=3, description="timed runs at least")
    max_repeats: int = Field(default=300, ge=3, description="cap when the spread stays high")
    target_cv: float = Field(default=0.05, gt=0, description="stop once stdev/mean is below")
    batch: int = Field(default=1, gt=0)
    shapes: dict[str, list[int]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _caps(self) -> Measurement:
        if self.max_repeats < self.repeats:
            raise ValueError("max_repeats must be >= repeats")
        return self


class Source(_Strict):
    fields: list[str]
    source: str


class HardwareProfile(_Strict):
    name: str
    description: str = ""
    device: Device
    memory: Memory
    peak: dict[DType, Throughput] = Field(description="peak throughput per dtype")
    features: Features = Field(default_factory=Features)
    power: Power
    backends: list[Backend] = Field(min_length=1)
    measurement: Measurement = Field(default_factory=Measurement)
    measured: bool = False
    microbenchmarks: dict[str, Any] = Field(default_factory=dict)
    sources: list[Source] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        if "fp32" not in self.peak:
            raise ValueError("peak needs at least fp32")
        if not self.measured and not self.sources:
            raise ValueError("a datasheet profile must name its sources")
        gpu_only = {"ort-cuda", "tvm-cuda", "triton-cuda"}
        if self.device.kind == "cpu" and gpu_only & set(self.backends):
            raise ValueError(f"a CPU profile cannot list {sorted(gpu_only & set(self.backends))}")
        return self

    def threads(self) -> int:
        return self.measurement.threads or self.device.cores


def shipped_profiles() -> dict[str, Path]:
    folder = resources.files("graphsurgeon.hardware_profiles")
    return {
        Path(str(p)).stem: Path(str(p))
        for p in folder.iterdir()
        if p.name.endswith((".yaml", ".yml"))
    }


def load_profile(name_or_path: str | os.PathLike) -> HardwareProfile:
    """A shipped profile by name (``x86-avx512-vnni``) or a YAML file. Errors name the field."""
    text = os.fspath(name_or_path)
    shipped = shipped_profiles()
    path = shipped[text] if text in shipped else Path(text)
    if not path.is_file():
        names = ", ".join(sorted(shipped))
        raise GraphSurgeonError(f"no such profile file (shipped profiles: {names})", where=path)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise GraphSurgeonError(f"not valid YAML: {' '.join(str(e).split())}", where=path) from None
    if not isinstance(data, dict):
        raise GraphSurgeonError("a profile is a YAML mapping", where=path)
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "profile"
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise GraphSurgeonError(f"{loc}: {err['msg']}{got}{more}", where=path) from None


def dump_profile(profile: HardwareProfile) -> str:
    return yaml.safe_dump(profile.model_dump(mode="json", exclude_none=True), sort_keys=False)

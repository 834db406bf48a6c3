"""Energy: measured where the machine allows, estimated from the profile elsewhere.

Measured:
- CPUs: RAPL package counters in ``/sys/class/powercap/*/energy_uj`` (Intel, and AMD through
  the same driver), read around the timed window; a counter that wraps is corrected with its
  ``max_energy_range_uj``.
- NVIDIA GPUs: NVML's total-energy counter (millijoules), over windows of at least
  ``MIN_WINDOW_S`` because it updates only every few tens of milliseconds.

Estimated (labelled so): ``E = idle_w * share * t + sum_dtype(pJ/op * ops) + pJ/byte * DRAM
bytes``, where ``share`` is the fraction of the device's cores the run uses,
with the profile's coefficients; DRAM bytes are taken as the weights plus the graph inputs
and outputs read or written once per inference (a lower bound: activations that spill from
cache add more).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from graphsurgeon.profiles import HardwareProfile

MIN_WINDOW_S = 1.0


@dataclass(frozen=True)
class EnergyEstimate:
    joules: float
    static_j: float
    compute_j: float
    memory_j: float


def estimate_energy(
    profile: HardwareProfile,
    seconds: float,
    ops_by_dtype: dict[str, float],
    dram_bytes: float,
    *,
    cores_used: int | None = None,
) -> EnergyEstimate:
    """Profile-model energy of one inference taking ``seconds``.

    ``ops_by_dtype`` counts FLOPs (or integer ops) per dtype; a dtype the profile has no
    coefficient for is charged at the fp32 rate, the conservative choice. A run on
    ``cores_used`` of the device's cores is charged that share of its idle power.
    """
    coeff = profile.power.pj_per_flop
    fallback = coeff.get("fp32", max(coeff.values()))
    compute = sum(ops * coeff.get(dtype, fallback) for dtype, ops in ops_by_dtype.items()) * 1e-12
    memory = dram_bytes * profile.power.pj_per_dram_byte * 1e-12
    share = 1.0 if cores_used is None else min(1.0, cores_used / profile.device.cores)
    static = profile.power.idle_w * share * seconds
    return EnergyEstimate(static + compute + memory, static, compute, memory)


class RaplCounter:
    """Sum of the package-level RAPL counters, in joules, if readable."""

    def __init__(self, root: str = "/sys/class/powercap") -> None:
        self.domains = []
        for path in sorted(glob.glob(os.path.join(root, "*", "energy_uj"))):
            folder = os.path.dirname(path)
            name = _read(os.path.join(folder, "name")) or ""
            # package domains only: their sub-domains (core, uncore, dram) are included in them
            if name.startswith("package") and os.access(path, os.R_OK):
                top = int(_read(os.path.join(folder, "max_energy_range_uj")) or 0)
                self.domains.append((path, top))

    @property
    def available(self) -> bool:
        return bool(self.domains) and all(_read(p) is not None for p, _ in self.domains)

    def read(self) -> list[int]:
        return [int(_read(p) or 0) for p, _ in self.domains]

    def joules_between(self, start: list[int], end: list[int]) -> float:
        total = 0
        for (_, top), a, b in zip(self.domains, start, end, strict=True):
            total += b - a if b >= a else b + top - a  # the counter wrapped once
        return total * 1e-6


class NvmlCounter:
    """NVML total energy of one GPU, in joules, if pynvml and a driver are present."""

    def __init__(self, index: int = 0) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self._nvml = pynvml
        except Exception:
            self.handle = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def read(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def joules_between(self, start: int, end: int) -> float:
        return (end - start) * 1e-3


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None

"""Pass instruments: measurements taken around every pass, never inside it.

An instrument sees ``before(step, pass_, model)`` and ``after(step, pass_, model, record)``
(befores in list order, afters in reverse, so the last instrument sits closest to the pass) and writes what it measured into the step's :class:`PassRecord`. Built-ins:
wall time, peak memory, node/param/byte/FLOP statistics per layer, connections created and
pruned (:mod:`graphsurgeon.plasticity`), and an optional IR dump.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphsurgeon.pass_base import GSPass
from graphsurgeon.stats import ModelStats, model_stats


@dataclass
class PassRecord:
    """What happened in one pass step: the row of the ``run`` table and of ``--report``."""

    step: str
    name: str
    kind: str
    modified: bool = False
    time_s: float = 0.0
    peak_rss_delta_bytes: int | None = None
    before: ModelStats | None = None
    after: ModelStats | None = None
    drift: dict[str, Any] | None = None
    verified: str | None = None  # "structural" or "numeric" once the checks passed
    notes: dict[str, Any] = field(default_factory=dict)
    #: connections created/pruned by the pass and so far (graphsurgeon.plasticity)
    plasticity: dict[str, Any] | None = None

    def layer_changes(self) -> dict[str, dict[str, Any]]:
        """Per-layer params/bytes/FLOPs before and after, for layers that changed or vanished."""
        if self.before is None or self.after is None:
            return {}
        changes = {}
        for lid in sorted(set(self.before.layers) | set(self.after.layers)):
            b, a = self.before.layers.get(lid), self.after.layers.get(lid)
            keys = ("params", "bytes", "flops")
            if (
                b is not None
                and a is not None
                and all(getattr(b, k) == getattr(a, k) for k in keys)
            ):
                continue
            changes[lid] = {
                k: [getattr(b, k) if b else None, getattr(a, k) if a else None] for k in keys
            }
        return changes

    def to_dict(self) -> dict[str, Any]:
        def totals(s: ModelStats | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {"nodes": s.nodes, "params": s.params, "bytes": s.bytes, "flops": s.flops}

        return {
            "step": self.step,
            "pass": self.name,
            "kind": self.kind,
            "modified": self.modified,
            "time_s": round(self.time_s, 6),
            "peak_rss_delta_bytes": self.peak_rss_delta_bytes,
            "before": totals(self.before),
            "after": totals(self.after),
            "layers": self.layer_changes(),
            "drift": self.drift,
            "verified": self.verified,
            "plasticity": self.plasticity,
            "notes": self.notes,
        }


class Instrument:
    def before(self, step: str, pass_: GSPass, model: ir.Model) -> None:
        pass

    def after(self, step: str, pass_: GSPass, model: ir.Model, record: PassRecord) -> None:
        pass


class Timing(Instrument):
    """Wall time of the pass alone."""

    def before(self, step: str, pass_: GSPass, model: ir.Model) -> None:
        self._t0 = time.perf_counter()

    def after(self, step: str, pass_: GSPass, model: ir.Model, record: PassRecord) -> None:
        record.time_s = time.perf_counter() - self._t0


def status_kib(field_name: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (Linux); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory(Instrument):
    """Peak resident memory during the pass, above the resident memory before it.

    On Linux the kernel's high-water mark (VmHWM) is reset before the pass by writing ``5`` to
    ``/proc/self/clear_refs``; this costs nothing while the pass runs, unlike tracemalloc.
    Elsewhere the figure is left empty.
    """

    def before(self, step: str, pass_: GSPass, model: ir.Model) -> None:
        self._rss0 = status_kib("VmRSS")
        self._ok = reset_peak_rss() and self._rss0 is not None

    def after(self, step: str, pass_: GSPass, model: ir.Model, record: PassRecord) -> None:
        hwm = status_kib("VmHWM") if self._ok else None
        if hwm is not None and self._rss0 is not None:
            record.peak_rss_delta_bytes = max(0, hwm - self._rss0) * 1024


class Statistics(Instrument):
    """Nodes, params, bytes and FLOPs, model-wide and per layer, before and after.

    A pass that reports ``modified=False`` left the model as it was, so its statistics are
    reused rather than recomputed; so are the last pass's "after" as the next one's "before".
    """

    def __init__(self) -> None:
        self._last: tuple[ir.Model, ModelStats] | None = None

    def before(self, step: str, pass_: GSPass, model: ir.Model) -> None:
        if self._last is not None and self._last[0] is model:
            self._before = self._last[1]
        else:
            self._before = model_stats(model)

    def after(self, step: str, pass_: GSPass, model: ir.Model, record: PassRecord) -> None:
        record.before = self._before
        record.after = model_stats(model) if record.modified else self._before
        self._last = (model, record.after)


class IRDump(Instrument):
    """Write the IR as text after every pass: ``DIR/NN-<pass>.txt`` (NN counts passes run)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def after(self, step: str, pass_: GSPass, model: ir.Model, record: PassRecord) -> None:
        self._count += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self._count:03d}-{pass_.name}")
        (self.directory / f"{safe}.txt").write_text(str(model))


def default_instruments() -> list[Instrument]:
    """Outermost first: statistics are not timed, timing sees only the pass."""
    from graphsurgeon.plasticity import Plasticity  # it builds on this module

    return [Statistics(), Plasticity(), PeakMemory(), Timing()]

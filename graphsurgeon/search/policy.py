"""A compression policy: one decision per slot (layer or coupled channel group).

A policy *is* a pipeline: :meth:`Policy.to_pipeline` writes the spec that ``graphsurgeon run``
replays on the original model. Each method becomes one step whose ``targets`` select exactly
the layers that chose it and whose per-layer ``overrides`` carry their parameters, so one step
gives every layer its own sparsity, rank or bit width.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from graphsurgeon.errors import GraphSurgeonError

#: Order in which method steps run. Structure changes first (removal, channels), then element
#: sparsity and factorization on float weights, then the encodings that consume float weights
#: (codebooks, low-bit codes, int8), so no pass sees another pass's packed output.
STEP_ORDER = (
    "remove",  # remove-layers: units are found on the unmodified graph
    "prune-channels",
    "prune-magnitude",
    "prune-nm",
    "prune-blocks",
    "factorize-lowrank",
    "share-weights",
    "quantize-weights",
    "quantize-dynamic",
    "quantize-int8",
)


@dataclass(frozen=True)
class Decision:
    """What one slot does: ``method`` (a pass name, ``none`` or ``remove``) and its params."""

    slot: str
    layers: tuple[str, ...]
    method: str = "none"
    params: tuple[tuple[str, Any], ...] = ()
    distill: bool = False
    #: What the slot is, for transfer to another model: op, weight shape, depth in [0, 1].
    role: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.params)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slot": self.slot, "layers": list(self.layers)}
        out["method"] = self.method
        if self.params:
            out["params"] = dict(self.params)
        if self.distill:
            out["distill"] = True
        if self.role:
            out["role"] = dict(self.role)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        try:
            return cls(
                slot=str(data["slot"]),
                layers=tuple(str(x) for x in data["layers"]),
                method=str(data.get("method", "none")),
                params=tuple(sorted((str(k), v) for k, v in (data.get("params") or {}).items())),
                distill=bool(data.get("distill", False)),
                role=tuple(sorted((data.get("role") or {}).items())),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise GraphSurgeonError(f"policy decision {data!r}: {e}") from None

    def summary(self) -> str:
        if self.method == "none":
            return "none"
        args = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.method}({args})" if args else self.method


@dataclass(frozen=True)
class Policy:
    """Per-slot decisions, plus the steps (``prelude``) that prepare the model first."""

    decisions: tuple[Decision, ...]
    prelude: tuple[Any, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "prelude": list(self.prelude),
            "decisions": [d.to_dict() for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        if not isinstance(data, dict) or "decisions" not in data:
            raise GraphSurgeonError("a policy is a mapping with 'decisions'")
        return cls(
            decisions=tuple(Decision.from_dict(d) for d in data["decisions"]),
            prelude=tuple(data.get("prelude") or ()),
        )

    def key(self) -> str:
        """A stable hash of the decisions (same policy, same key, across runs and machines)."""
        data = self.to_dict()
        for d in data["decisions"]:
            d.pop("role", None)  # descriptive only: the same choices are the same policy
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def active(self) -> list[Decision]:
        return [d for d in self.decisions if d.method != "none" or d.distill]

    def summary(self, limit: int = 6) -> str:
        active = self.active
        if not active:
            return "uncompressed"
        parts = [
            f"{d.slot}: {d.summary()}{' +distill' if d.distill else ''}" for d in active[:limit]
        ]
        if len(active) > limit:
            parts.append(f"... {len(active) - limit} more")
        return "; ".join(parts)

    def to_pipeline(self, prelude: bool = True) -> dict[str, Any]:
        """The pipeline spec that applies this policy to the original model (``prelude``
        False: to the model the prelude already prepared)."""
        steps: list[Any] = list(self.prelude) if prelude else []
        by_method: dict[str, list[Decision]] = {}
        for d in self.decisions:
            if d.method != "none":
                by_method.setdefault(d.method, []).append(d)
        for method in sorted(by_method, key=_step_rank):
            steps.append(_step(method, by_method[method]))
        distilled = [lid for d in self.decisions if d.distill for lid in d.layers]
        if distilled:  # last: the student is the compressed model, the teacher the original
            steps.append({"name": "distill", "options": {"feature_layers": distilled}})
        if not steps:
            steps = ["eliminate-dead-code"]  # a pipeline is never empty: the identity policy
        text = f"graphsurgeon policy {self.key()}: {self.summary()}"
        if distilled:
            text += f"; distillation targets: {', '.join(distilled)}"
        return {"description": text, "steps": steps}


def _step_rank(method: str) -> int:
    return STEP_ORDER.index(method) if method in STEP_ORDER else len(STEP_ORDER)


def _step(method: str, decisions: list[Decision]) -> dict[str, Any]:
    if method == "remove":
        units = sorted({d.options["unit"] for d in decisions})
        return {"name": "remove-layers", "options": {"layers": [re.escape(u) for u in units]}}
    layers = [lid for d in decisions for lid in d.layers]
    overrides = {lid: d.options for d in decisions for lid in d.layers if d.params}
    options: dict[str, Any] = {}
    if overrides:
        options["overrides"] = overrides
    step: dict[str, Any] = {"name": method}
    if options:
        step["options"] = options
    step["targets"] = {"layers": [re.escape(lid) for lid in layers]}
    return step

"""Transfer: apply a policy found for one model to another model of similar architecture.

Layer ids differ between models (``bert/encoder/layer.3/...`` vs ``encoder.layers.3...``,
another width, more blocks), so decisions are matched by *role* and *shape*: each target slot
takes the decision of the source slot with the same op type that scores best on

    name similarity (Jaccard of the id's word tokens, digits dropped)
    + 1 if the weight shapes are equal (0.5 if only the rank is)
    + 1 - |relative depth difference|

and whose method the target slot allows. Searched parameters are carried over and snapped
into the target slot's space (a rank capped at the target's size, say); options the source
decision holds outside the search (a method's fixed settings, such as ``accuracy_level``, or
options edited into a stored policy) are kept where the pass declares them, rather than
replaced by the target catalogue's defaults. Whatever could not be mapped is reported: source
decisions no target slot took, options the target pass does not take, and target slots left
uncompressed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from graphsurgeon.search.policy import Decision, Policy
from graphsurgeon.search.space import SearchSpace, _nearest

_MIN_SCORE = 1.0  # below this (about: same op, far apart, unrelated names) nothing is mapped


@dataclass
class TransferReport:
    mapped: list[dict[str, Any]] = field(default_factory=list)
    unmapped_source: list[dict[str, Any]] = field(default_factory=list)
    unmatched_target: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mapped": self.mapped,
            "unmapped_source": self.unmapped_source,
            "unmatched_target": self.unmatched_target,
        }


def _tokens(text: str) -> set[str]:
    return {t for t in re.split(r"[^a-z]+", text.lower()) if t}


def _role(d: Decision) -> dict[str, Any]:
    return dict(d.role)


def _score(src: Decision, slot_id: str, role: dict[str, Any]) -> float | None:
    r = _role(src)
    if r.get("op") != role["op"]:
        return None
    a, b = _tokens(src.slot), _tokens(slot_id)
    name = len(a & b) / max(len(a | b), 1)
    s_shape, t_shape = list(r.get("shape") or []), list(role["shape"])
    shape = 1.0 if s_shape == t_shape else 0.5 if len(s_shape) == len(t_shape) else 0.0
    depth = 1.0 - abs(float(r.get("depth", 0.5)) - float(role["depth"]))
    return name + shape + depth


def transfer(policy: Policy, space: SearchSpace) -> tuple[Policy, TransferReport]:
    """``policy`` (from another model) re-expressed over ``space`` (the target model's)."""
    report = TransferReport()
    active = [d for d in policy.decisions if d.method != "none"]
    taken: dict[str, tuple[Decision, float]] = {}
    for slot in space.slots:
        role = dict(space.roles[slot.id])
        best: tuple[float, Decision] | None = None
        for d in active:
            if d.method not in [m.name for m in slot.methods]:
                continue
            s = _score(d, slot.id, role)
            if s is not None and s >= _MIN_SCORE and (best is None or s > best[0]):
                best = (s, d)
        if best is not None:
            taken[slot.id] = (best[1], best[0])
    decisions = []
    used: set[str] = set()
    kept: dict[str, dict[str, Any]] = {}  # slot -> the source's options outside the search
    for slot in space.slots:
        role_t = space.roles[slot.id]
        if slot.id not in taken:
            decisions.append(Decision(slot.id, tuple(slot.layers), role=role_t))
            report.unmatched_target.append(slot.id)
            continue
        src, s = taken[slot.id]
        names = [m.name for m in slot.methods]
        spaces = slot.spaces[names.index(src.method)]
        options = src.options
        dropped: list[str] = []
        if src.method == "remove":
            params = {"unit": slot.units[0]}
        else:
            params = {k: _nearest(sp, options.get(k, _default(sp))) for k, sp in spaces.items()}
            declared = _declared_options(src.method)
            extra = {k: v for k, v in options.items() if k not in spaces}
            kept[slot.id] = {k: v for k, v in extra.items() if k in declared}
            dropped = sorted(k for k in extra if k not in declared)
        decisions.append(
            Decision(
                slot.id, tuple(slot.layers), src.method, tuple(sorted(params.items())), role=role_t
            )
        )
        used.add(src.slot)
        entry = {"target": slot.id, "source": src.slot, "score": round(s, 3)}
        if dropped:
            entry["options_not_taken"] = dropped
        report.mapped.append(entry)
    for d in active:
        if d.slot not in used:
            reason = (
                "no target layer with the same op type and a close enough role allows " + d.method
            )
            report.unmapped_source.append(
                {"source": d.slot, "decision": d.summary(), "reason": reason}
            )
    moved = space.decode(space.encode(Policy(tuple(decisions), space.prelude)))
    final = []
    for d in moved.decisions:
        extra = kept.get(d.slot) if d.method != "none" else None
        if extra:
            d = replace(d, params=tuple(sorted({**d.options, **extra}.items())))
        final.append(d)
    by_slot = {d.slot: d for d in final}
    for entry in report.mapped:
        entry["decision"] = by_slot[entry["target"]].summary()
    return Policy(tuple(final), moved.prelude), report


def _declared_options(method: str) -> set[str]:
    from graphsurgeon.registry import get_pass

    try:
        return set(get_pass(method).Options.model_fields)
    except Exception:
        return set()


def _default(space: Any) -> Any:
    from graphsurgeon.options import Choice

    if isinstance(space, Choice):
        return space.values[0]
    return (space.low + space.high) / 2

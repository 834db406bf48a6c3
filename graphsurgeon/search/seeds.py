"""Informed first policies: what every strategy evaluates before its own proposals.

An autotuner that starts from random points spends its first generation on policies that mix
a dozen methods at random settings; on a transformer almost all of them lose accuracy, and
with ~20 s per MiniLM evaluation a 20-minute budget is ~60 evaluations. The seeds are the
policies an engineer would try first:

- **uniform**: every slot that allows a method uses it with a known-good setting
  (:data:`SEED_SETTINGS`; the pass's declared default otherwise), one policy per method and
  setting: int8 (min/max and MSE calibration), dynamic int8 (per channel and per tensor),
  4-bit weights, 50% magnitude
  pruning, 2:4 sparsity, 25% channel pruning, 8-bit weight sharing;
- **all but the k most sensitive**: the same for int8 (:data:`MIXED`), with the ``k`` of its
  slots whose layers lose the most when compressed alone (``slot.stats["sensitivity"]``: the
  per-layer drift ``optimize`` measures with :mod:`graphsurgeon.sensitivity`) kept as they
  are: the usual mixed-precision recipe.

Seeds are ordinary policies: evaluated, cached and selected like any other, and a strategy
that starts from an initial population (GA, random, BO through ``enqueue_trial``, PPO as
its first batch) takes them first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from graphsurgeon.options import search_spaces
from graphsurgeon.registry import get_pass
from graphsurgeon.search.policy import Decision, Policy
from graphsurgeon.search.space import SearchSpace

#: Per method, the settings of its uniform seeds, most promising first.
SEED_SETTINGS: dict[str, tuple[dict[str, Any], ...]] = {
    "quantize-int8": ({"calibration": "mse"}, {"calibration": "minmax"}),
    "quantize-dynamic": ({"per_channel": True}, {"per_channel": False}),
    "quantize-weights": ({"bits": 4, "group_size": 32},),
    "prune-magnitude": ({"sparsity": 0.5},),
    "prune-nm": ({"pattern": "2:4"},),
    "prune-channels": ({"ratio": 0.25},),
    "share-weights": ({"bits": 8},),
}
#: Settings that also get "all but the k most sensitive slots" seeds: int8 with MSE ranges is
#: the most accurate static form (MiniLM: mean cosine 0.9904 on all MatMuls, min/max ranges
#: 0.9896); dynamic int8 with per-channel weight scales the most accurate dynamic one (0.994,
#: per tensor 0.966) and, after fuse-attention, the fastest.
MIXED = (("quantize-int8", {"calibration": "mse"}), ("quantize-dynamic", {"per_channel": True}))
#: Methods without a uniform seed: their good setting depends on the layer (a rank).
NO_UNIFORM = frozenset({"none", "remove", "factorize-lowrank"})


def seed_policies(space: SearchSpace, ks: Sequence[int] = (1, 2, 4)) -> list[Policy]:
    """The seeds for ``space``, most promising first, without duplicates or no-ops."""
    out: dict[str, Policy] = {}

    def add(policy: Policy) -> None:
        if policy.active:
            out.setdefault(policy.key(), policy)

    offered = {m.name for slot in space.slots for m in slot.methods}
    order = [*SEED_SETTINGS, *sorted(offered - set(SEED_SETTINGS) - NO_UNIFORM)]
    uniform: dict[tuple[str, str], Policy] = {}
    for method in order:
        if method not in offered or method in NO_UNIFORM:
            continue
        for settings in SEED_SETTINGS.get(method, (_defaults(method),)):
            policy = space.uniform(method, **settings)
            uniform[(method, repr(sorted(settings.items())))] = policy
            add(policy)
    ranked = _by_sensitivity(space)
    if ranked:
        for method, settings in MIXED:
            policy = uniform.get((method, repr(sorted(settings.items()))))
            if policy is None:
                continue
            mine = [sid for sid in ranked if sid in {d.slot for d in policy.active}]
            for k in ks:
                if 0 < k < len(mine):
                    add(_keep(policy, set(mine[:k])))
    return list(out.values())


def _defaults(method: str) -> dict[str, Any]:
    """The pass's declared defaults for the options the method searches."""
    fields = get_pass(method).Options.model_fields
    return {k: fields[k].default for k in search_spaces(get_pass(method).Options)}


def _by_sensitivity(space: SearchSpace) -> list[str]:
    """Slot ids, most sensitive first; empty when no sensitivity was measured."""
    sens = {s.id: s.stats.get("sensitivity", 0.0) for s in space.slots}
    if not any(v > 0 for v in sens.values()):
        return []
    return sorted(sens, key=lambda sid: -sens[sid])


def _keep(policy: Policy, slots: set[str]) -> Policy:
    """``policy`` with ``slots`` left uncompressed."""
    decisions = tuple(
        Decision(d.slot, d.layers, role=d.role) if d.slot in slots else d for d in policy.decisions
    )
    return Policy(decisions, policy.prelude)


__all__ = ["MIXED", "SEED_SETTINGS", "seed_policies"]

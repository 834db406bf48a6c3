"""Sparse training: ``prune-iterative`` (gradual magnitude pruning with recovery between
rounds, optionally with Lottery-Ticket weight rewinding) and ``regrow`` (RigL dynamic sparsity).

``prune-iterative`` reaches the target sparsity ``s`` over ``R`` rounds on a geometric
schedule: after round ``r`` a fraction ``(1 - s)^(r/R)`` of each layer's weights is kept, so
every round removes the same share of what is left (pruning a trained network in small steps
and letting it recover in between loses less than one big cut; Han et al. 2015, Zhu & Gupta
2017). Each round is ``prune-magnitude`` (same criteria, masks and metadata: masks AND across
rounds) followed by distillation from the teacher. With ``rewind``, the surviving weights are
reset to their values at the start of the pass before each round's training (Frankle & Carbin
2019; rewinding to a trained network rather than to initialization, Renda et al. 2020).

``regrow`` is RigL (Evci et al. 2020): while distilling at a fixed sparsity per layer, every
``interval`` steps each layer drops the ``k`` active weights of smallest magnitude and enables
the ``k`` pruned weights whose loss gradient is largest (``criterion: random`` is SET, Mocanu
et al. 2018), with ``k = drop_fraction/2 * (1 + cos(pi t / T_end))`` of its active weights,
stopping at ``end_fraction`` of training. New connections start at zero so the function is
unchanged at the swap; Adam's moments are reset where the mask changed. The mask metadata is
rewritten; notes count connections created and dropped per layer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import onnx_ir as ir

from graphsurgeon.layers import LAYER_ID_KEY, find_layers
from graphsurgeon.options import Choice, FloatRange, IntRange, option
from graphsurgeon.pass_base import PassResult
from graphsurgeon.registry import register

from .distill import TrainingPass, TrainOptions
from .pruning import MASK_KEY, PruneMagnitude

if TYPE_CHECKING:
    from graphsurgeon.training.bridge import GraphModule

__all__ = ["PruneIterative", "Regrow"]


# -- prune-iterative --------------------------------------------------------------------------
class IterativeOptions(TrainOptions):
    sparsity: float = option(
        0.9,
        "Final fraction of each layer's weights set to zero.",
        FloatRange(0.5, 0.95),
        ge=0.0,
        lt=1.0,
    )
    rounds: int = option(3, "Prune-then-train rounds (geometric schedule).", IntRange(1, 8), ge=1)
    steps: int = option(100, "Training steps after each round.", IntRange(20, 1000, log=True), ge=1)
    rewind: bool = option(
        False,
        "Before each round's training, reset surviving weights to their values at the start "
        "of the pass (Lottery Ticket rewinding).",
        Choice([False, True]),
    )
    criterion: Literal["l1", "l2", "activation"] = option(
        "l1", "Pruning score (see prune-magnitude).", Choice(["l1", "activation"])
    )
    min_params: int = option(0, "Layers with fewer weights stay dense.", ge=0)
    include_embeddings: bool = option(False, "Also prune Gather embedding tables.")
    mask_encoding: Literal["zeros", "bits"] = option(
        "zeros", "Mask metadata encoding (see prune-magnitude)."
    )
    overrides: dict[str, dict[str, Any]] = option(
        {},
        "Per-layer prune-magnitude options (layer id or regex -> {sparsity, criterion, "
        "min_params}); a layer's sparsity follows the same geometric schedule.",
    )


def scheduled_sparsity(final: float, round_: int, rounds: int) -> float:
    """Sparsity after ``round_`` of ``rounds``: keep ``(1 - final)^(round_/rounds)``."""
    return 1.0 - (1.0 - final) ** (round_ / rounds)


@register
class PruneIterative(TrainingPass):
    """Magnitude pruning in rounds with distillation between them (optional rewinding)."""

    name = "prune-iterative"
    kind = "lossy"
    Options = IterativeOptions

    def call(self, model: ir.Model) -> PassResult:
        from graphsurgeon.training import to_torch
        from graphsurgeon.training.sparse import rewind

        opts = self.options
        teacher = self.teacher(model, fallback=True)
        feeds, labels = self.training_data(model)
        origin = {
            name: value.const_value.numpy().copy()
            for name, value in model.graph.initializers.items()
            if value.const_value is not None
            and value.dtype is not None
            and value.dtype.is_floating_point()
        }
        modified = False
        rounds = []
        prune: PruneMagnitude | None = None
        for r in range(1, opts.rounds + 1):
            target = scheduled_sparsity(opts.sparsity, r, opts.rounds)
            prune = PruneMagnitude(self._prune_options(r), self.targets)
            prune.calib = self.calib
            modified |= prune(model).modified
            module = to_torch(model)
            if opts.rewind:
                rewind(module, origin)
            stats = self.train(model, teacher, feeds, labels, module=module)
            modified |= bool(stats["changed"])
            rounds.append(
                {
                    "sparsity": round(target, 4),
                    "loss_before": round(stats["loss_before"], 6),
                    "loss_after": round(stats["loss_after"], 6),
                    "seconds": stats["seconds"],
                }
            )
        assert prune is not None
        self.note("rounds", rounds)
        self.note("sparsity", prune.notes.get("sparsity", {}))
        self.note("steps", opts.steps * opts.rounds)
        for reason, count in prune.skipped.items():
            self.skipped[reason] += count
        return PassResult(model, modified)

    def _prune_options(self, round_: int) -> dict[str, Any]:
        opts = self.options
        overrides = {}
        for key, values in opts.overrides.items():
            final = values.get("sparsity", opts.sparsity)
            overrides[key] = {**values, "sparsity": scheduled_sparsity(final, round_, opts.rounds)}
        return {
            "sparsity": scheduled_sparsity(opts.sparsity, round_, opts.rounds),
            "criterion": opts.criterion,
            "min_params": opts.min_params,
            "include_embeddings": opts.include_embeddings,
            "mask_encoding": opts.mask_encoding,
            "overrides": overrides,
        }


# -- regrow -----------------------------------------------------------------------------------
class RegrowOptions(TrainOptions):
    interval: int = option(
        20, "Steps between drop-and-grow updates.", IntRange(5, 100, log=True), ge=1
    )
    drop_fraction: float = option(
        0.3,
        "Fraction of active weights swapped at the first update (cosine-decayed).",
        FloatRange(0.05, 0.5),
        gt=0.0,
        le=1.0,
    )
    end_fraction: float = option(
        0.75,
        "Stop updating the masks after this fraction of the steps.",
        FloatRange(0.5, 1.0),
        gt=0.0,
        le=1.0,
    )
    criterion: Literal["gradient", "random"] = option(
        "gradient",
        "Which pruned weights grow back: largest gradient magnitude (RigL) or random (SET).",
        Choice(["gradient", "random"]),
    )


@register
class Regrow(TrainingPass):
    """RigL: fixed-sparsity drop-and-grow of connections while distilling from the teacher."""

    name = "regrow"
    kind = "surgery"
    Options = RegrowOptions

    def call(self, model: ir.Model) -> PassResult:
        from graphsurgeon.training import to_torch
        from graphsurgeon.training.sparse import RigL

        had_id = {node for node in model.graph if LAYER_ID_KEY in node.metadata_props}
        module = to_torch(model)
        layers = self._layers(model, module)
        if not layers:
            for node in model.graph:  # ids find_layers gave are no change: roll them back
                if node not in had_id:
                    node.metadata_props.pop(LAYER_ID_KEY, None)
            self.note("layers", 0)
            return PassResult(model, False)
        teacher = self.teacher(model, fallback=False)
        feeds, labels = self.training_data(model)
        opts = self.options
        hook = RigL(
            layers,
            opts.steps,
            interval=opts.interval,
            drop_fraction=opts.drop_fraction,
            end_fraction=opts.end_fraction,
            criterion=opts.criterion,
            seed=opts.seed,
        )
        stats = self.train(model, teacher, feeds, labels, hook=hook, module=module)
        self.note_training(stats)
        self.note("mask_updates", hook.updates)
        self.note("connections_created", hook.created)
        self.note("connections_dropped", hook.dropped)
        self.note("created_total", sum(hook.created.values()))
        self.note("dropped_total", sum(hook.dropped.values()))
        return PassResult(model, bool(stats["changed"]))

    def _layers(self, model: ir.Model, module: GraphModule) -> dict[str, str]:
        """Layer id -> masked parameter, for selected layers with an unstructured mask."""
        layers = {}
        for layer in find_layers(model):
            node, lid = layer.node, layer.id
            if not self.selects(node):
                self.skip(node, "not selected by the targets")
                continue
            text = node.metadata_props.get(MASK_KEY)
            if text is None or lid not in module.mask_layers:
                self.skip(node, "no pruning mask on a trainable weight (prune first)")
                continue
            method = json.loads(text).get("method")
            if method != "magnitude":
                self.skip(node, f"{method} mask: regrowth would break its pattern")
                continue
            layers[lid] = module.mask_layers[lid]
        return layers

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
import math
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import torch

from graphsurgeon.layers import LAYER_ID_KEY, find_layers
from graphsurgeon.options import Choice, FloatRange, IntRange, option
from graphsurgeon.pass_base import PassResult
from graphsurgeon.registry import register
from graphsurgeon.training import to_torch
from graphsurgeon.training.bridge import MASK_KEY, GraphModule
from graphsurgeon.training.loop import StepHook

from .distill import TrainingPass, TrainOptions
from .pruning import PruneMagnitude

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
                _rewind(module, origin)
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


def _rewind(module: GraphModule, origin: dict[str, np.ndarray]) -> None:
    """Surviving weights back to their values at the start of the pass (masks re-applied)."""
    with torch.no_grad():
        for name, param in module.named_weights():
            if name in origin and name not in module.quant:
                param.copy_(torch.from_numpy(origin[name]).to(param.dtype))
    module.apply_masks()


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


class _RigL(StepHook):
    """Drop the smallest active weights and grow where the dense gradient is largest."""

    def __init__(self, layers: dict[str, str], steps: int, opts: RegrowOptions) -> None:
        self.layers = layers  # layer id -> parameter name
        self.interval = opts.interval
        self.drop_fraction = opts.drop_fraction
        self.end = max(1, int(opts.end_fraction * steps))
        self.random = opts.criterion == "random"
        self.rng = torch.Generator().manual_seed(opts.seed)
        self.created = dict.fromkeys(layers, 0)
        self.dropped = dict.fromkeys(layers, 0)
        self.updates = 0

    def wants_gradients(self, step: int) -> bool:
        return step > 0 and step % self.interval == 0 and step < self.end

    def fraction(self, step: int) -> float:
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.end))

    def after_backward(
        self,
        step: int,
        module: GraphModule,
        dense: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.updates += 1
        fraction = self.fraction(step)
        for lid, name in self.layers.items():
            param, old = module.param(name), module.masks[name]
            active = int(old.sum())
            k = min(int(fraction * active), old.numel() - active)
            if k <= 0:
                continue
            weight = param.detach().abs().flatten()
            drop_score = torch.where(old.flatten(), weight, torch.full_like(weight, math.inf))
            new = old.flatten().clone()
            new[torch.topk(drop_score, k, largest=False).indices] = False
            if self.random:
                grow = torch.rand(weight.shape, generator=self.rng, dtype=torch.float64)
            else:
                grad = dense.get(name)
                if grad is None:
                    continue  # the weight took no part in this step's loss
                grow = grad.detach().abs().flatten().to(torch.float64)
            grow = torch.where(new, torch.full_like(grow, -math.inf), grow)
            new[torch.topk(grow, k).indices] = True
            new = new.reshape(old.shape)
            created, dropped = new & ~old, old & ~new
            with torch.no_grad():
                param[created] = 0.0  # new connections start at zero: the function is unchanged
            _reset_moments(optimizer, param, created | dropped)
            module.set_mask(name, new)
            self.created[lid] += int(created.sum())
            self.dropped[lid] += int(dropped.sum())


def _reset_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor):
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][where] = 0.0


@register
class Regrow(TrainingPass):
    """RigL: fixed-sparsity drop-and-grow of connections while distilling from the teacher."""

    name = "regrow"
    kind = "surgery"
    Options = RegrowOptions

    def call(self, model: ir.Model) -> PassResult:
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
        hook = _RigL(layers, self.options.steps, self.options)
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

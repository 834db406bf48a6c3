"""``distill``: fine-tune the current model with the original model as its teacher.

Compression removes or blurs weights; a short distillation run lets the survivors take over
the work. The teacher is the model as it was when the pipeline started (``teacher: PATH``
overrides it); the student is the current model, trained through the torch bridge
(:mod:`graphsurgeon.training`) and written back in place, so the output keeps its form:
pruned weights stay zero (their masks are respected) and a QDQ model stays QDQ (the run is
quantization-aware training, with straight-through rounding).

Loss (see :mod:`graphsurgeon.training.losses`): output KD with temperature on logits, relative
MSE on other outputs, feature matching on ``feature_layers`` (searchable: ``none``, ``auto`` =
four layers spread over depth, ``all``, or a list of layer ids), and cross-entropy when the
calibration file has ``labels``. Data: the ``--calib`` inputs, else generated ones (a warning:
random inputs teach the student the teacher's function only where random data lands).

The shared training options and data plumbing here are reused by ``prune-iterative`` and
``regrow`` (:mod:`graphsurgeon.passes.sparse_training`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
from pydantic import field_validator

from graphsurgeon.data import Dataset, Feed, generate_inputs
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import load
from graphsurgeon.options import Choice, FloatRange, IntRange, PassOptions, option
from graphsurgeon.pass_base import GSPass, PassResult
from graphsurgeon.registry import register

if TYPE_CHECKING:  # torch is imported only when a training pass runs
    from graphsurgeon.training.bridge import GraphModule
    from graphsurgeon.training.loop import StepHook

GENERATED_FEEDS = 8
TRANSFORMER_LR, CNN_LR = 1e-3, 5e-3

__all__ = ["Distill", "TrainOptions", "TrainingPass"]


class TrainOptions(PassOptions):
    steps: int = option(200, "Optimizer steps (minibatches).", IntRange(50, 2000, log=True), ge=1)
    lr: float | None = option(
        None,
        "Adam learning rate (10% warmup, then cosine decay); default: 1e-3 for models with "
        "LayerNormalization (transformers), else 5e-3.",
        FloatRange(1e-4, 2e-2, log=True),
        gt=0,
    )
    batch_size: int = option(32, "Samples per step (a model's fixed batch dim wins).", ge=1)
    temperature: float = option(4.0, "KD temperature on logits.", FloatRange(1.0, 8.0), gt=0)
    feature_layers: str | list[str] = option(
        "auto",
        "Intermediate layers to match: 'none', 'auto' (4 spread over depth), 'all', or ids.",
        Choice(["none", "auto", "all"]),
    )
    feature_weight: float = option(
        1.0, "Weight of the feature-matching loss.", FloatRange(0.1, 10.0, log=True), ge=0
    )
    label_weight: float = option(
        0.5,
        "Weight of the cross-entropy on calibration labels (if any).",
        FloatRange(0.0, 1.0),
        ge=0,
    )
    samples: int = option(2048, "Calibration samples to train on, at most.", ge=1)
    teacher: str | None = option(
        None, "Teacher model file; default: the model as it was when the pipeline started."
    )
    seed: int = option(0, "Seed for minibatch order.")
    progress: bool = option(True, "Show a progress bar (only on a terminal).")

    @field_validator("feature_layers")
    @classmethod
    def _layers(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value not in ("none", "auto", "all"):
            return [value]  # one layer id
        return value


class TrainingPass(GSPass):
    """Shared by the passes that train: teacher, data and the distillation call."""

    needs_original = True
    Options = TrainOptions

    # -- teacher ----------------------------------------------------------------------------
    def teacher(self, model: ir.Model, *, fallback: bool) -> ir.Model:
        """The teacher: ``options.teacher``, else the pipeline's original model, else (when
        ``fallback``) a copy of ``model`` as the pass found it."""
        path = self.options.teacher
        if path is not None:
            if not Path(path).is_file():
                raise GraphSurgeonError("options.teacher: no such file", where=path)
            return load(path)
        if self.original is not None:
            return self.original()
        if fallback:
            return ir.from_proto(ir.to_proto(model))
        raise GraphSurgeonError(
            f"{self.name} needs a teacher: run it in a pipeline (the teacher is the pipeline's "
            "input model) or set options.teacher to a model file"
        )

    # -- data ----------------------------------------------------------------------------------
    def batched(self) -> bool | None:
        """Whether calibration samples are batched along the model's first axis."""
        return None if self.calib is None else all(self.calib.batched.values())

    def training_data(self, model: ir.Model) -> tuple[list[Feed], Any]:
        """Feeds and labels from ``--calib``, else generated feeds (with a warning)."""
        calib: Dataset | None = self.calib
        opts = self.options
        if calib is None:
            message = (
                f"{self.name}: no --calib data; training on generated random inputs "
                "(pass --calib with real inputs for a meaningful result)"
            )
            warnings.warn(message, stacklevel=2)
            self.note("data", "generated")
            batch = max(1, opts.batch_size)
            feeds = []
            for i in range(GENERATED_FEEDS):
                try:
                    feeds.append(generate_inputs(model, seed=i, batch=batch))
                except GraphSurgeonError as e:
                    raise GraphSurgeonError(
                        f"{self.name}: no --calib data and inputs cannot be generated "
                        f"({e.problem}); pass --calib"
                    ) from None
            return feeds, None
        feeds = calib.feeds(opts.samples, batch_size=max(opts.batch_size, 64))
        self.note("data", f"calibration ({sum(_count(f) for f in feeds)} samples)")
        labels = None
        if calib.labels is not None:
            if all(calib.batched.values()):
                total = sum(_count(f) for f in feeds)
                labels = np.asarray(calib.labels[:total])
            else:
                labels = [np.asarray(calib.labels[i : i + 1]) for i in range(len(feeds))]
        return feeds, labels

    def trainable(self, model: ir.Model, module: GraphModule) -> list[str] | None:
        """Initializers of the selected nodes (None: every float initializer)."""
        from graphsurgeon.training.bridge import _backing_initializer

        if self.targets.empty:
            return None
        names = []
        for node in model.graph:
            if not self.selects(node):
                continue
            for value in node.inputs:
                name = _backing_initializer(value)
                if name is not None and name in module.param_index and name not in names:
                    names.append(name)
        if not names:
            raise GraphSurgeonError(f"{self.name}: the targets select no trainable weights")
        return names

    def train(
        self,
        model: ir.Model,
        teacher: ir.Model,
        feeds: list[Feed],
        labels: Any,
        *,
        steps: int | None = None,
        hook: StepHook | None = None,
        module: GraphModule | None = None,
    ) -> dict[str, Any]:
        from graphsurgeon.training import distill_model, to_torch

        opts = self.options
        module = module if module is not None else to_torch(model)
        self.note("lr", self.learning_rate(model))
        return distill_model(
            model,
            teacher,
            feeds,
            steps=steps or opts.steps,
            lr=self.learning_rate(model),
            temperature=opts.temperature,
            feature_layers=opts.feature_layers,
            feature_weight=opts.feature_weight,
            labels=labels,
            label_weight=opts.label_weight,
            trainable=self.trainable(model, module),
            batch_size=opts.batch_size,
            seed=opts.seed,
            progress=opts.progress,
            hook=hook,
            module=module,
            label=self.name,
            batched=self.batched(),
        )

    def learning_rate(self, model: ir.Model) -> float:
        """``options.lr``, else by architecture. Measured: MiniLM pruned 50%, 30 steps, loss
        0.51 -> 0.17 at 1e-3 but -> 0.71 at 5e-3; the digits CNN pruned 90%, 200 steps, 96%
        accuracy at 3e-3 and 98% at 1e-2."""
        if self.options.lr is not None:
            return self.options.lr
        transformer = any(node.op_type == "LayerNormalization" for node in model.graph)
        return TRANSFORMER_LR if transformer else CNN_LR

    def note_training(self, stats: dict[str, Any], prefix: str = "") -> None:
        for key in ("steps", "seconds", "first_loss", "last_loss", "loss_before", "loss_after"):
            value = stats[key]
            self.note(prefix + key, round(value, 6) if isinstance(value, float) else value)
        self.note(prefix + "feature_layers", stats["feature_layers"])


def _count(feed: Feed) -> int:
    return len(next(iter(feed.values())))


@register
class Distill(TrainingPass):
    """Fine-tune the model against the pipeline's original (KD, features, labels)."""

    name = "distill"
    kind = "surgery"

    def call(self, model: ir.Model) -> PassResult:
        teacher = self.teacher(model, fallback=False)
        feeds, labels = self.training_data(model)
        stats = self.train(model, teacher, feeds, labels)
        self.note_training(stats)
        self.note("weights_changed", len(stats["changed"]))
        return PassResult(model, bool(stats["changed"]))

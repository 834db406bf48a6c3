"""Short distillation loops: a student GraphModule against a teacher run in onnxruntime.

The teacher never trains, so it runs in onnxruntime (faster than the torch interpreter, and it
may use ops the bridge lacks), with the matched intermediate values exposed as extra outputs.
Samples: when the feeds' first axis is the model's batch axis and every feed has the same
per-sample shapes, they are pooled and each step draws a random minibatch (a model with a
fixed batch dim gets batches of that size); otherwise (sentences of different lengths, inputs
without a batch axis) each step takes one whole feed. Adam with linear warmup and cosine
decay; the loss is evaluated on fixed batches before and after training so that the reported
improvement is not minibatch noise.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from graphsurgeon import execution
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.layers import LAYER_ID_KEY, find_layers
from graphsurgeon.shapes import ShapeInferencePass
from graphsurgeon.training.bridge import GraphModule, feeds_from, to_torch
from graphsurgeon.training.losses import is_logits, kd_loss, label_loss, relative_mse

Feed = dict[str, np.ndarray]
EVAL_BATCHES = 4
AUTO_FEATURE_LAYERS = 4

__all__ = ["StepHook", "distill_model", "feature_pairs", "lr_factor"]


class StepHook:
    """Called by the loop around each optimizer step (RigL's drop and grow lives in one)."""

    def wants_gradients(self, step: int) -> bool:
        """Whether ``after_backward`` at ``step`` needs the dense (pre-mask) gradients."""
        return False

    def after_backward(
        self,
        step: int,
        module: GraphModule,
        dense: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """After backward, before the optimizer step."""


@dataclass
class _Data:
    """Training units: a pooled sample set (minibatches) or a list of whole feeds."""

    pool: Feed | None
    pool_labels: np.ndarray | None
    feeds: list[Feed]
    labels: list[np.ndarray | None]
    batch_size: int

    def batch(self, rng: np.random.Generator) -> tuple[Feed, np.ndarray | None]:
        if self.pool is not None:
            n = len(next(iter(self.pool.values())))
            index = np.sort(rng.choice(n, size=min(self.batch_size, n), replace=False))
            labels = None if self.pool_labels is None else self.pool_labels[index]
            return {k: a[index] for k, a in self.pool.items()}, labels
        i = int(rng.integers(len(self.feeds)))
        return self.feeds[i], self.labels[i]

    def fixed(self) -> list[tuple[Feed, np.ndarray | None]]:
        """The first few batches, in order, for the before/after loss."""
        if self.pool is None:
            return list(zip(self.feeds, self.labels, strict=True))[:EVAL_BATCHES]
        n = len(next(iter(self.pool.values())))
        out = []
        for start in range(0, min(n, EVAL_BATCHES * self.batch_size), self.batch_size):
            stop = min(start + self.batch_size, n)
            if stop - start < self.batch_size and out:
                break
            labels = None if self.pool_labels is None else self.pool_labels[start:stop]
            out.append(({k: a[start:stop] for k, a in self.pool.items()}, labels))
        return out


def _data(
    feeds: Sequence[Feed],
    labels: Sequence[np.ndarray] | np.ndarray | None,
    batch_size: int,
    fixed_batch: int | None,
    batched: bool,
) -> _Data:
    if not feeds:
        raise GraphSurgeonError("distillation needs at least one input feed")
    per_feed: list[np.ndarray | None] = [None] * len(feeds)
    if labels is not None:
        if isinstance(labels, np.ndarray):
            sizes = [len(next(iter(f.values()))) for f in feeds]
            if sum(sizes) != len(labels):
                raise GraphSurgeonError(
                    f"distillation: {len(labels)} labels for {sum(sizes)} samples"
                )
            per_feed = list(np.split(labels, np.cumsum(sizes)[:-1]))
        else:
            per_feed = [np.asarray(a) for a in labels]
    keys = set(feeds[0])
    poolable = (
        batched
        and all(set(f) == keys for f in feeds)
        and all(
            f[k].ndim >= 1 and f[k].shape[1:] == feeds[0][k].shape[1:] for f in feeds for k in keys
        )
    )
    if poolable:
        pool = {k: np.concatenate([f[k] for f in feeds], axis=0) for k in keys}
        pool_labels = None
        if labels is not None:
            pool_labels = np.concatenate([np.asarray(x) for x in per_feed], axis=0)
        size = fixed_batch or batch_size
        n = len(next(iter(pool.values())))
        if fixed_batch and n < fixed_batch:
            raise GraphSurgeonError(
                f"distillation: {n} samples; the model's fixed batch is {fixed_batch}"
            )
        return _Data(pool, pool_labels, [], [], size)
    return _Data(None, None, list(feeds), per_feed, batch_size)


def feature_pairs(
    student: ir.Model, teacher: ir.Model, layers: str | Sequence[str]
) -> list[tuple[str, str, str]]:
    """(layer id, student value, teacher value) for the feature-matching layers.

    Layers are matched by id (ids survive rewrites; the teacher gets ids if it has none).
    ``auto`` picks up to four layers spread evenly over depth among those whose output has
    the same shape in both models (a pruned channel count cannot be matched elementwise),
    ``all`` takes all of those, ``none`` none; a list names layer ids.
    """
    if layers == "none" or (not isinstance(layers, str) and not layers):
        return []
    s_out = _layer_outputs(student)
    if not any(LAYER_ID_KEY in n.metadata_props for n in teacher.graph):
        find_layers(teacher)
    t_out = _layer_outputs(teacher)
    names = {v.name for v in student.graph.outputs}
    if isinstance(layers, str) and layers in ("auto", "all"):
        candidates = [
            lid
            for lid in s_out
            if lid in t_out and s_out[lid].name not in names and _same_shape(s_out[lid], t_out[lid])
        ]
        if layers == "auto" and len(candidates) > AUTO_FEATURE_LAYERS:
            picks = np.linspace(0, len(candidates) - 1, AUTO_FEATURE_LAYERS).round()
            candidates = [candidates[int(p)] for p in picks]
        chosen = candidates
    else:
        chosen = [layers] if isinstance(layers, str) else list(layers)
        for lid in chosen:
            where = "student" if lid not in s_out else "teacher" if lid not in t_out else None
            if where:
                raise GraphSurgeonError(f"feature_layers: no layer {lid!r} in the {where} model")
    return [(lid, s_out[lid].name, t_out[lid].name) for lid in chosen]


def _layer_outputs(model: ir.Model) -> dict[str, ir.Value]:
    out = {}
    for node in model.graph:
        lid = node.metadata_props.get(LAYER_ID_KEY)
        if lid and node.outputs and node.outputs[0].name:
            out[lid] = node.outputs[0]
    return out


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None:
        return True  # unknown: compared at run time (skipped there if they differ)
    return [d if isinstance(d, int) else None for d in a.shape] == [
        d if isinstance(d, int) else None for d in b.shape
    ]


class _Teacher:
    """The teacher in onnxruntime, with the feature values as extra outputs."""

    def __init__(self, model: ir.Model, features: list[str]) -> None:
        lookup = {v.name: v for node in model.graph for v in node.outputs}
        extra = [lookup[n] for n in features if not lookup[n].is_graph_output()]
        if any(v.type is None for v in extra):
            ShapeInferencePass()(model)
        model.graph.outputs.extend(extra)
        try:
            # onnxruntime's graph optimizations on: the teacher only has to be fast
            self.session = execution.make_session(model, optimize=True)
        finally:
            for _ in extra:
                model.graph.outputs.pop()

    def __call__(self, feed: Feed) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in execution.run(self.session, feed).items()}


def _symbolic_batch(model: ir.Model) -> bool:
    """Whether every input's first dim is a free (batch) dim: then samples can be pooled."""
    return all(
        v.shape is not None and len(v.shape) > 0 and not isinstance(v.shape[0], int)
        for v in model.graph.inputs
    )


def _fixed_batch(model: ir.Model) -> int | None:
    for value in model.graph.inputs:
        if value.shape is not None and len(value.shape) and isinstance(value.shape[0], int):
            return int(value.shape[0])
    return None


def distill_model(
    student: ir.Model,
    teacher: ir.Model,
    feeds: Sequence[Feed],
    *,
    steps: int = 200,
    lr: float = 1e-3,
    temperature: float = 4.0,
    feature_layers: str | Sequence[str] = "none",
    feature_weight: float = 1.0,
    labels: Sequence[np.ndarray] | np.ndarray | None = None,
    label_weight: float = 0.5,
    trainable: Sequence[str] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    hook: StepHook | None = None,
    module: GraphModule | None = None,
    label: str = "distill",
    batched: bool | None = None,
) -> dict[str, Any]:
    """Fine-tune ``student`` in place to match ``teacher`` on ``feeds``; the loss history.

    Loss = output KD (logits: softened KL at ``temperature``; other outputs: relative MSE)
    + ``feature_weight`` x relative MSE on ``feature_layers`` + ``label_weight`` x
    cross-entropy when ``labels`` are given. ``trainable``: initializer names to train
    (None: every float initializer). ``batched``: the feeds' first axis is the model's batch
    axis, so samples are pooled into random minibatches (None: when every model input's
    first dim is symbolic); otherwise each step takes one whole feed. Returns first/last training loss, the loss on fixed
    batches before and after, steps, seconds, and the initializers that changed.
    """
    if steps <= 0:
        raise GraphSurgeonError(f"distillation: steps must be positive (got {steps})")
    if lr <= 0 or temperature <= 0:
        raise GraphSurgeonError("distillation: lr and temperature must be positive")
    start = time.perf_counter()
    if batched is None:
        batched = _symbolic_batch(student)
    data = _data(feeds, labels, batch_size, _fixed_batch(student), batched)
    pairs = feature_pairs(student, teacher, feature_layers)
    teacher_run = _Teacher(teacher, [t for _, _, t in pairs])
    module = module if module is not None else to_torch(student)
    module.set_trainable(trainable)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise GraphSurgeonError("distillation: nothing to train (no trainable float weights)")
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, steps))
    outputs = [v.name for v in student.graph.outputs]
    skipped: set[str] = set()

    def loss_of(feed: Feed, y: np.ndarray | None) -> torch.Tensor:
        target = teacher_run(feed)
        got = module(capture=[s for _, s, _ in pairs], **feeds_from(feed))
        terms = []
        for name in outputs:
            s, t = got[name], target.get(name)
            if t is None or not s.is_floating_point() or s.shape != t.shape:
                continue
            terms.append(kd_loss(s, t, temperature) if is_logits(s) else relative_mse(s, t))
        loss = torch.stack(terms).sum() if terms else torch.zeros(())
        matched = []
        for lid, s_name, t_name in pairs:
            s, t = got[s_name], target[t_name]
            if s.shape != t.shape:
                skipped.add(lid)
                continue
            matched.append(relative_mse(s, t))
        if matched:
            loss = loss + feature_weight * torch.stack(matched).mean()
        if y is not None and label_weight > 0:
            logits = next((got[n] for n in outputs if is_logits(got[n])), None)
            if logits is not None and len(logits) == len(y):
                loss = loss + label_weight * label_loss(logits, torch.from_numpy(np.asarray(y)))
        if not terms and not matched:
            raise GraphSurgeonError(
                "distillation: no output or feature of the student matches the teacher's shape"
            )
        return loss

    def evaluate() -> float:
        with torch.no_grad():
            return float(np.mean([loss_of(f, y).item() for f, y in data.fixed()]))

    before = evaluate()
    rng = np.random.default_rng(seed)
    history: list[float] = []
    with _progress(progress, steps, label) as advance:
        for step in range(steps):
            feed, y = data.batch(rng)
            optimizer.zero_grad(set_to_none=True)
            dense = hook is not None and hook.wants_gradients(step)
            if dense:
                with module.dense_gradients() as grads:
                    loss = loss_of(feed, y)
                    loss.backward()
                hook.after_backward(step, module, grads, optimizer)
            else:
                loss = loss_of(feed, y)
                loss.backward()
            optimizer.step()
            schedule.step()
            module.apply_masks()
            history.append(float(loss.item()))
            advance(history[-1])
    after = evaluate()
    changed = module.write_back(student)
    return {
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 3),
        "first_loss": history[0],
        "last_loss": history[-1],
        "loss_before": before,
        "loss_after": after,
        "history": _thin(history, 50),
        "changed": changed,
        "feature_layers": [lid for lid, _, _ in pairs if lid not in skipped],
    }


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to zero. Adam's first
    updates move every weight by about ``lr`` whatever its gradient (m / sqrt(v) ~ sign(g));
    the warmup keeps them from knocking a trained network off its minimum."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(step - warm, steps - warm) / max(1, steps - warm)))


def _thin(values: list[float], n: int) -> list[float]:
    if len(values) <= n:
        return [round(v, 6) for v in values]
    index = np.linspace(0, len(values) - 1, n).round().astype(int)
    return [round(values[i], 6) for i in index]


class _progress:
    """A rich progress bar on a terminal's stderr (nothing when piped or disabled)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(label),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4g}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.task = self.bar.add_task(label, total=total, loss=float("nan"))

    def __enter__(self):
        if self.bar is None:
            return lambda loss: None
        self.bar.__enter__()
        return lambda loss: self.bar.update(self.task, advance=1, loss=loss)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

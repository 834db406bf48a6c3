"""Sparse training steps on a GraphModule: RigL drop-and-grow and Lottery-Ticket rewinding.

See :mod:`graphsurgeon.passes.sparse_training` for the passes and the references. Kept apart
from the passes so that importing the pass registry does not import torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from graphsurgeon.training.bridge import GraphModule
from graphsurgeon.training.loop import StepHook

__all__ = ["RigL", "reset_moments", "rewind"]


def rewind(module: GraphModule, origin: dict[str, np.ndarray]) -> None:
    """Surviving weights back to their values at the start of the pass (masks re-applied)."""
    with torch.no_grad():
        for name, param in module.named_weights():
            if name in origin and name not in module.quant:
                param.copy_(torch.from_numpy(origin[name]).to(param.dtype))
    module.apply_masks()


class RigL(StepHook):
    """Drop the smallest active weights and grow where the dense gradient is largest."""

    def __init__(
        self,
        layers: dict[str, str],
        steps: int,
        *,
        interval: int,
        drop_fraction: float,
        end_fraction: float,
        criterion: str = "gradient",
        seed: int = 0,
    ) -> None:
        self.layers = layers  # layer id -> parameter name
        self.interval = interval
        self.drop_fraction = drop_fraction
        self.end = max(1, int(end_fraction * steps))
        self.random = criterion == "random"
        self.rng = torch.Generator().manual_seed(seed)
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
            reset_moments(optimizer, param, created | dropped)
            module.set_mask(name, new)
            self.created[lid] += int(created.sum())
            self.dropped[lid] += int(dropped.sum())


def reset_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor):
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][where] = 0.0

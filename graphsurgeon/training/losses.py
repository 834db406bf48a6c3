"""Distillation losses.

- Output KD (Hinton et al. 2015): ``T^2 * KL(softmax(t / T) || softmax(s / T))`` on logits
  (rank-2 outputs). The temperature softens the teacher's distribution so that the relative
  sizes of the wrong classes (its "dark knowledge") carry gradient; ``T^2`` keeps the gradient
  scale independent of ``T``.
- Feature matching (FitNets, Romero et al. 2015) and non-logit outputs (embeddings, hidden
  states): mean squared error divided by the teacher's mean square, so every matched tensor
  weighs the same whatever its scale (a relative error of 1 means "no better than zeros").
- Hard labels: cross-entropy, when the data has labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["is_logits", "kd_loss", "label_loss", "relative_mse"]


def is_logits(t: torch.Tensor) -> bool:
    """A [batch, classes] float tensor: KD on its softmax; anything else matches by MSE."""
    return t.is_floating_point() and t.dim() == 2 and t.shape[1] > 1


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    log_p = F.log_softmax(student.float() / t, dim=-1)
    q = F.softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * (t * t)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = student.float(), teacher.float()
    return (s - t).square().mean() / t.square().mean().clamp_min(1e-12)


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels.long())

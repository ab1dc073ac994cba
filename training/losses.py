"""The task loss: cross-entropy (optionally label-smoothed), plus distillation from a teacher's logits.

Distillation (Hinton et al.): the KL divergence between the teacher's and the student's softened output
distributions at temperature T, scaled by T^2 so its gradient keeps its size as T changes, mixed with the
cross-entropy as (1 - weight) * CE + weight * KD. The teacher is a finished dense run of the same network
and data (`distill_from`), in eval mode: it only answers, it never trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TaskLoss:
    label_smoothing: float = 0.0
    teacher: nn.Module | None = None
    weight: float = 0.5
    temperature: float = 4.0

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            target = self.teacher(images)
        t = self.temperature
        distill = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target / t, dim=1),
                           reduction="batchmean", log_target=True) * t * t
        return (1 - self.weight) * loss + self.weight * distill

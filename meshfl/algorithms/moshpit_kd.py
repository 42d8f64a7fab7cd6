"""Pure pieces of MAR-FL's Moshpit knowledge distillation (MKD, reference A.6): teacher scores, top-k teacher selection
and the distillation loss.

Why separate: the ``moshpit`` algorithm exchanges models inside its groups and then distils on the student's own data;
the selection rule and the loss are closed-form and are tested here on tiny tensors.

* score of teacher j = sum over the distillation batches of KL(softmax(t_j / T) || softmax(s / T)) (per batch the
  mean over samples, PyTorch's ``kl_div(..., reduction="batchmean")``);
* keep the k teachers with the *lowest* scores (most similar to the student), k = max(1, floor(ratio * candidates)),
  ties to the lower index;
* L = lambda KL(softmax(zbar / T) || softmax(s / T)) T^2 + (1 - lambda) CE(s, y), zbar the mean logits of the kept
  teachers, lambda = max(0, 1 - t / kd_iters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["average_logits", "kd_loss", "kd_weight", "kl_divergence", "select_teachers", "teacher_scores"]


def _temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over samples of KL(softmax(t / T) || softmax(s / T)) for logits [batch, classes]."""
    t = _temperature(temperature)
    if teacher_logits.shape != student_logits.shape or teacher_logits.ndim != 2:
        raise ValueError(f"logits must both be [batch, classes], got {tuple(teacher_logits.shape)} and "
                         f"{tuple(student_logits.shape)}")
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True)


def teacher_scores(teacher_logits: Sequence[Sequence[torch.Tensor]], student_logits: Sequence[torch.Tensor],
                   temperature: float) -> torch.Tensor:
    """Score of each teacher: sum over batches of :func:`kl_divergence` (teacher_logits[j][b] against student_logits[b])."""
    if not teacher_logits:
        raise ValueError("teacher_logits must name at least one teacher")
    scores = []
    for j, batches in enumerate(teacher_logits):
        if len(batches) != len(student_logits):
            raise ValueError(f"teacher_logits[{j}] has {len(batches)} batches, student_logits {len(student_logits)}")
        scores.append(sum((kl_divergence(t, s, temperature) for t, s in zip(batches, student_logits, strict=True)),
                          torch.zeros(())))
    return torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in scores])


def select_teachers(scores: Sequence[float] | torch.Tensor, ratio: float) -> list[int]:
    """Indices of the k lowest scores, k = max(1, floor(ratio * len(scores))), lowest first (ties: lower index)."""
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("scores must not be empty")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    k = max(1, math.floor(ratio * len(values)))
    return sorted(range(len(values)), key=lambda j: (values[j], j))[:k]


def average_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """zbar: the mean of the selected teachers' logits."""
    if not logits:
        raise ValueError("logits must not be empty")
    return torch.stack(list(logits)).mean(dim=0)


def kd_weight(iteration: int, kd_iters: int) -> float:
    """lambda = max(0, 1 - t / kd_iters): the distillation weight decays linearly to 0 at t = kd_iters."""
    if kd_iters < 1:
        raise ValueError(f"kd_iters must be >= 1, got {kd_iters}")
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return max(0.0, 1.0 - iteration / kd_iters)


def kd_loss(student_logits: torch.Tensor, teacher_mean_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
            weight: float) -> torch.Tensor:
    """L = lambda KL(softmax(zbar / T) || softmax(s / T)) T^2 + (1 - lambda) CE(s, y)."""
    if not 0 <= weight <= 1:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    t = _temperature(temperature)
    kl = kl_divergence(teacher_mean_logits, student_logits, t)
    return weight * kl * t * t + (1 - weight) * F.cross_entropy(student_logits, labels)

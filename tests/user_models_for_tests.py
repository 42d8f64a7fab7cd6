"""Model factories a user would write, imported by tests as `user_models_for_tests:<name>`."""

from __future__ import annotations

import math

from torch import nn


class BatchNormNet(nn.Module):
    """A small CNN with batch norm and dropout for 1x8x8 digits."""

    def __init__(self, feature_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        channels = feature_shape[0]
        self.features = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(width * math.prod(feature_shape[1:]) // 4, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def bn_net(feature_shape, num_classes, width=8):
    return BatchNormNet(feature_shape, num_classes, width)


def tiny_mlp(**kwargs):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(kwargs["feature_shape"]), kwargs["num_classes"]))


def not_a_module(feature_shape, num_classes):
    return [feature_shape, num_classes]


NOT_CALLABLE = 42


def plain_cross_entropy(logits, labels):
    """A user loss that is cross-entropy, written by hand through torch."""
    import torch.nn.functional as F

    return F.cross_entropy(logits, labels)


def smoothed_loss(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits, labels, label_smoothing=0.1)


def macro_f1(logits, labels) -> float:
    """Macro-averaged F1 over the classes present in `labels`."""
    predicted = logits.argmax(1)
    scores = []
    for c in labels.unique():
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def adam_prox_step(module, batches, *, optimizer, loss, global_params, config):
    """A user training step: its own optimiser (Adam), a proximal term in the loss, and input noise
    drawn from torch's global generator (seeded by meshfl for determinism)."""
    import torch

    adam = torch.optim.Adam(module.parameters(), lr=0.01)
    total, steps = 0.0, 0
    for x, y in batches:
        adam.zero_grad()
        value = loss(module(x + 0.01 * torch.randn_like(x)), y)
        prox = sum(((p - global_params[name]) ** 2).sum() for name, p in module.named_parameters())
        (value + 0.05 * prox).backward()
        adam.step()
        total += float(value.detach())
        steps += 1
    return total / max(steps, 1)

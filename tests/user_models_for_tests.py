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

"""Model zoo: small, well-known shapes so results compare with other frameworks."""

from __future__ import annotations

import math

from torch import nn

MODELS = ("mlp", "cnn")


def mlp(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """784-256-128-10 on MNIST, the network of P2PFL's MNIST example."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(feature_shape), 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def cnn(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 convolutions with max-pooling, then a small classifier; needs [C, H, W] input."""
    if len(feature_shape) != 3:
        raise ValueError(f"train.model=cnn needs image data shaped [channels, height, width], got {list(feature_shape)}; use mlp")
    channels, height, width = feature_shape
    flat = 32 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def build_model(name: str, feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    builders = {"mlp": mlp, "cnn": cnn}
    if name not in builders:
        raise ValueError(f"train.model must be one of {', '.join(MODELS)}, got {name!r}")
    return builders[name](feature_shape, num_classes)

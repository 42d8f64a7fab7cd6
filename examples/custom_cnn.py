"""The user-defined model of examples/custom_model.py and examples/custom_model.yaml: one definition.

`python examples/custom_model.py` imports it as `custom_cnn` (the script's own folder is on the import
path, and `meshfl.launch` hands that path to the peer processes); the YAML names it
`examples.custom_cnn:SmallCNN`, found from the repository root (meshfl imports a factory from the
current folder and PYTHONPATH, on each peer's machine).
"""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-pool twice, then a linear classifier.

    Parameters
    ----------
    feature_shape : tuple of int
        (channels, height, width) of one sample, e.g. (1, 8, 8).
    num_classes : int
        Number of classes.
    width : int
        Channels of the first convolution (the second has twice as many).
    """

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, width: int = 16) -> None:
        super().__init__()
        channels, height, width_px = feature_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(2 * width * (height // 4) * (width_px // 4), num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

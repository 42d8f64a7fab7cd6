"""Bring your own model and data: a small CNN with batch norm on a pandas DataFrame, 8 peers.

    python examples/custom_model.py                  # 8 peers, Dirichlet 0.5 label skew, gossip, simulator
    python examples/custom_model.py --rounds 3 --peers 4 --out /tmp/run

The DataFrame is built here from scikit-learn's digits (64 pixel columns + a `digit` column);
any DataFrame with one row per sample works. The model's batch-norm running statistics travel
with its parameters and are averaged with them.
"""

from __future__ import annotations

import argparse

import pandas as pd
from sklearn.datasets import load_digits
from torch import nn

import meshfl


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-pool twice, then a linear classifier."""

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, width: int = 16) -> None:
        super().__init__()
        channels, height, width_px = feature_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(2 * width * (height // 4) * (width_px // 4), num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def digits_frame() -> pd.DataFrame:
    digits = load_digits()
    frame = pd.DataFrame(digits.data / 16.0, columns=[f"px{i}" for i in range(64)])
    frame["digit"] = digits.target
    return frame


def main(argv: list[str] | None = None) -> meshfl.Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="run folder (default runs/<time>-custom_model)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = {
        "name": "custom_model", "peers": args.peers, "rounds": args.rounds,
        "data": {"label_column": "digit", "feature_shape": [1, 8, 8], "partition": "dirichlet", "dirichlet_alpha": 0.5},
        "train": {"optimizer": "adam", "learning_rate": 0.01, "local_epochs": 2},
    }
    result = meshfl.run(config, model=SmallCNN, dataset=digits_frame(), seed=args.seed, out=args.out,
                        progress=not args.quiet)
    summary = result.summary
    print(f"{args.peers} peers, {args.rounds} rounds, Dirichlet 0.5: mean final accuracy "
          f"{summary['mean_final_accuracy']:.4f}, min {summary['min_final_accuracy']:.4f}; run folder {result.run_dir}")
    return result


if __name__ == "__main__":
    main()

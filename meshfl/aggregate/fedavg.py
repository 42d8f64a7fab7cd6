"""Weighted FedAvg over flat parameter vectors, as one tensor operation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshfl.core.params import Params


def weighted_average(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i as one matrix-vector product (float32: it is memory-bound, and
    float64 would move twice the bytes for agreement between peers that float32 already gives, ~1e-7)."""
    if not vectors:
        raise ValueError("weighted_average: no vectors")
    if len(vectors) == 1 and len(weights) == 1:
        _normalised(weights)  # still refuses a bad weight
        return vectors[0].clone()
    return weighted_rows(torch.stack(list(vectors)), weights)


def weighted_rows(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """weighted_average of the rows of an already stacked (K x P) tensor."""
    if stacked.shape[0] != len(weights):
        raise ValueError(f"weighted_average: {stacked.shape[0]} vectors but {len(weights)} weights")
    return _normalised(weights).to(device=stacked.device, dtype=stacked.dtype) @ stacked


def _normalised(weights: Sequence[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weighted_average: weights must be >= 0 with a positive sum, got {list(weights)}")
    return w / w.sum()


def fedavg(models: Sequence[Params], weights: Sequence[float]) -> Params:
    """FedAvg of Params sharing one layout; weights are usually sample counts."""
    layouts = {m.layout.fingerprint for m in models}
    if len(layouts) > 1:
        raise ValueError("fedavg: models have different layouts")
    return Params(weighted_average([m.flat for m in models], weights), models[0].layout)

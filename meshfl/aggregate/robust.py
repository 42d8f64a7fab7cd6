"""Robust aggregation: how a peer combines individual models when some senders may lie.

One config section (`RobustConfig`, `rule:`) and one function (`robust_aggregate`) shared by every
algorithm that holds individual models (the coordinator; gossip's robust mode, Moshpit and MPLS
later). All rules work on the stacked flat vectors (K x P) as tensor operations.

- `fedavg`: sum_i w_i x_i / sum_i w_i (weights = claimed samples, capped by `max_weight`).
- `clip`: FedAvg of the updates x_i - reference with each update's L2 norm clipped to `clip_norm`
  (default: the median update norm), so one scaled update moves the result by at most that much.
- `median`: coordinate-wise median (mean of the two middle values for an even K).
- `trimmed_mean`: per coordinate, drop the `trim_fraction` largest and smallest values, average the rest.
- `krum` / `multi_krum` (Blanchard et al. 2017): score_i = sum of the squared distances from x_i to
  its K - f - 2 nearest others (f = `byzantine`); Krum takes the best-scored model, Multi-Krum
  averages the K - f best.
- `geometric_median`: Weiszfeld iterations (weighted), a few dozen at most.

Rules other than `fedavg` and `clip` ignore the claimed weights: a liar's weight is its lie.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from meshfl.aggregate.fedavg import weighted_average, weighted_rows
from meshfl.core.params import Params
from meshfl.core.section import Section

Rule = Literal["fedavg", "clip", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median"]
WEISZFELD_ITERATIONS = 50
WEISZFELD_TOLERANCE = 1e-7


class RobustConfig(Section):
    rule: Rule = Field("fedavg", description="how individual models are combined: fedavg, clip, median, trimmed_mean, krum, multi_krum, geometric_median")
    byzantine: int = Field(1, ge=0, description="krum, multi_krum: f, the number of lying senders to tolerate (needs K > 2f + 2 models)")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed_mean: fraction dropped at each end, per coordinate")
    clip_norm: float | None = Field(None, gt=0, description="clip: largest L2 norm of one update (model - reference); default the median update norm")
    max_weight: float | None = Field(None, gt=0, description="fedavg, clip: a claimed weight (samples) above this counts as this")


def robust_aggregate(models: Sequence[Params], weights: Sequence[float], config: RobustConfig,
                     reference: Params | None = None) -> Params:
    """Combine `models` (one layout) by `config.rule`; `reference` (the model they started from) is needed by `clip`."""
    if not models:
        raise ValueError("robust_aggregate: no models")
    if len({m.layout.fingerprint for m in models}) > 1:
        raise ValueError("robust_aggregate: models have different layouts")
    if len(weights) != len(models):
        raise ValueError(f"robust_aggregate: {len(models)} models but {len(weights)} weights")
    layout = models[0].layout
    capped = [min(float(w), config.max_weight) if config.max_weight is not None else float(w) for w in weights]
    vectors = [m.flat for m in models]
    rule = config.rule
    if rule == "fedavg":
        return Params(weighted_average(vectors, capped), layout)
    if rule == "clip":
        if reference is None:
            raise ValueError("robust_aggregate: rule clip needs the reference model the updates started from")
        return Params(reference.flat + clipped_mean(torch.stack(vectors) - reference.flat, capped, config.clip_norm), layout)
    stacked = torch.stack(vectors)
    if rule == "median":
        return Params(coordinate_median(stacked), layout)
    if rule == "trimmed_mean":
        return Params(trimmed_mean(stacked, config.trim_fraction), layout)
    if rule in ("krum", "multi_krum"):
        chosen = krum_select(stacked, config.byzantine, multi=rule == "multi_krum")
        return Params(stacked[chosen].mean(dim=0), layout)
    return Params(geometric_median(stacked), layout)


def clipped_mean(updates: torch.Tensor, weights: Sequence[float], clip_norm: float | None) -> torch.Tensor:
    """Weighted mean of the rows of `updates` after scaling each row to norm <= clip_norm (default: median norm)."""
    norms = updates.norm(dim=1)
    bound = float(norms.median()) if clip_norm is None else clip_norm
    scale = torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)
    return weighted_rows(updates * scale[:, None], weights)


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    ordered = stacked.sort(dim=0).values
    k = ordered.shape[0]
    if k % 2:
        return ordered[k // 2].clone()
    return (ordered[k // 2 - 1] + ordered[k // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, fraction: float) -> torch.Tensor:
    k = stacked.shape[0]
    cut = int(fraction * k)
    if k - 2 * cut < 1:
        raise ValueError(f"trim_fraction {fraction} leaves no model of {k}")
    return stacked.sort(dim=0).values[cut:k - cut].mean(dim=0)


def krum_select(stacked: torch.Tensor, byzantine: int, multi: bool) -> torch.Tensor:
    """Indices Krum keeps: the best-scored model (or the K - f best for Multi-Krum)."""
    k = stacked.shape[0]
    if k <= 2 * byzantine + 2:
        raise ValueError(f"byzantine: krum needs more than 2f + 2 = {2 * byzantine + 2} models, got {k}")
    distances = torch.cdist(stacked[None].double(), stacked[None].double())[0] ** 2
    closest = k - byzantine - 2
    nearest = distances.sort(dim=1).values[:, 1:closest + 1]  # column 0 is the model itself
    scores = nearest.sum(dim=1)
    order = torch.argsort(scores, stable=True)
    return order[:k - byzantine] if multi else order[:1]


def geometric_median(stacked: torch.Tensor) -> torch.Tensor:
    """The point minimising the sum of distances to the rows (Weiszfeld)."""
    point = stacked.mean(dim=0)
    for _ in range(WEISZFELD_ITERATIONS):
        distances = (stacked - point).norm(dim=1).clamp_min(1e-12)
        inverse = 1.0 / distances
        moved = (inverse[:, None] * stacked).sum(dim=0) / inverse.sum()
        if float((moved - point).norm()) <= WEISZFELD_TOLERANCE * max(1.0, float(point.norm())):
            return moved
        point = moved
    return point

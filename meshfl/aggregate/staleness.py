"""Staleness weights: how much an update computed `s` rounds ago counts, as one pluggable decay.

Shared by every algorithm that folds in late updates (the coordinator's `late_policy: stale`,
gossip's versioned updates), so one config section and one name mean the same thing
everywhere. Decays, for staleness s >= 0 (a negative s counts as 0):

- `inverse`:     1 / (1 + s)                      (the smart-gossip paper's)
- `exponential`: exp(-rate * s)
- `polynomial`:  (1 + s) ** -exponent              (FedAsync's polynomial)
- `hinge`:       1 if s <= b, else 1 / (a (s - b) + 1)   (FedAsync's hinge, a = rate, b = grace)
- `constant`:    1                                 (stale updates count fully)
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from meshfl.core.section import Section

Decay = Literal["inverse", "exponential", "polynomial", "hinge", "constant"]


class StalenessConfig(Section):
    decay: Decay = Field("inverse", description="weight of an update s rounds old: inverse 1/(1+s), exponential exp(-rate s), polynomial (1+s)^-exponent, hinge (1 up to grace rounds, then 1/(rate (s-grace)+1)), constant 1")
    rate: float = Field(0.5, gt=0, description="exponential: lambda; hinge: a")
    exponent: float = Field(0.5, gt=0, description="polynomial: a in (1+s)^-a")
    grace: int = Field(4, ge=0, description="hinge: rounds of staleness that still count fully (b)")


def staleness_weight(staleness: int, config: StalenessConfig | None = None) -> float:
    """The decay's weight in (0, 1] for an update `staleness` rounds old."""
    s = max(int(staleness), 0)
    config = config or StalenessConfig()
    if config.decay == "inverse":
        return 1.0 / (1.0 + s)
    if config.decay == "exponential":
        return math.exp(-config.rate * s)
    if config.decay == "polynomial":
        return (1.0 + s) ** -config.exponent
    if config.decay == "hinge":
        return 1.0 if s <= config.grace else 1.0 / (config.rate * (s - config.grace) + 1.0)
    return 1.0

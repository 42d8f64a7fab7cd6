"""Simulated compute: each peer's speed factor, a pure function of (config, peers, seed)."""

from __future__ import annotations

import numpy as np

from meshfl.config import ComputeConfig

SPEED_SEED_TAG = 0x7370656564  # "speed"


def peer_speeds(config: ComputeConfig, peers: int, seed: int) -> np.ndarray:
    """Speed factor of every peer (float64, length `peers`).

    Base: uniform in [speed_min, speed_max] from default_rng([seed, 0x7370656564]) (unchanged, so
    runs without tiers are bit-identical to earlier versions). Then each tier, in order, sets the
    speed of its peers: `peers` as listed; `count`/`fraction` (rounded half up, at least one)
    drawn without replacement from default_rng([seed, 0x7370656564, 1]) among peers that no tier
    has taken (peers listed by any tier are never drawn).
    """
    speeds = np.random.default_rng([seed, SPEED_SEED_TAG]).uniform(config.speed_min, config.speed_max, peers)
    if not config.tiers:
        return speeds
    taken = np.zeros(peers, dtype=bool)
    for i, tier in enumerate(config.tiers):
        for p in tier.peers or ():
            if not 0 <= p < peers:
                raise ValueError(f"compute.tiers.{i}.peers: peer {p} does not exist (peers are 0..{peers - 1})")
            taken[p] = True
    rng = np.random.default_rng([seed, SPEED_SEED_TAG, 1])
    for i, tier in enumerate(config.tiers):
        if tier.peers is not None:
            speeds[list(tier.peers)] = tier.speed
            continue
        k = tier.count if tier.count is not None else max(1, min(peers, int((tier.fraction or 0.0) * peers + 0.5)))
        free = np.flatnonzero(~taken)
        if k > len(free):
            raise ValueError(f"compute.tiers.{i}: needs {k} peers but only {len(free)} are free (listed by a tier or drawn by an earlier one)")
        chosen = rng.choice(free, size=k, replace=False)
        taken[chosen] = True
        speeds[chosen] = tier.speed
    return speeds

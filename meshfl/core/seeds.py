"""The seeding contract every runtime follows, so one (config, seed) means one run anywhere.

A simulated peer and a real peer process with the same id draw the same algorithm
randomness, the same batch order and start from the same initial model; the gRPC runtime
matches the simulator because both call these functions, not copies of them.
"""

from __future__ import annotations

import numpy as np
import torch


def peer_seed(seed: int, peer: int, stream: int) -> int:
    """A 63-bit seed for one peer's stream, independent of hashing and process."""
    return int(np.random.SeedSequence([seed, peer, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def algorithm_rng(seed: int, peer: int, incarnation: int = 0) -> np.random.Generator:
    """`ctx.rng`: the randomness an algorithm may use (e.g. random choices of peers); a restart draws anew."""
    return np.random.default_rng([seed, peer] if incarnation == 0 else [seed, peer, incarnation])


def batch_generator(seed: int, peer: int, incarnation: int = 0) -> torch.Generator:
    """The order in which a peer's training batches are drawn."""
    stream = 1 if incarnation == 0 else 1 + (incarnation << 8)
    return torch.Generator().manual_seed(peer_seed(seed, peer, stream))


def initial_model_seed(seed: int) -> int:
    """The seed of `ctx.initial_params()`: one model for every peer of a run."""
    return peer_seed(seed, 0, 2)


BYZANTINE_TAG = 0x62797A  # "byz"


def byzantine_generator(seed: int, peer: int, incarnation: int = 0) -> torch.Generator:
    """The randomness of a Byzantine peer's lies (noise, a random model): never `ctx.rng` nor the batch
    order, so an honest run draws exactly what it drew before Byzantine faults existed."""
    return torch.Generator().manual_seed(peer_seed(seed, peer, BYZANTINE_TAG + (incarnation << 24)))

"""Peer algorithms, registered by name. A new algorithm is one module plus one entry here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from meshfl.config import ExperimentConfig
from meshfl.core.context import NodeContext

PeerMain = Callable[[NodeContext], Awaitable[None]]
AlgorithmFactory = Callable[[ExperimentConfig], Callable[[int], PeerMain]]


def _gossip(config: ExperimentConfig) -> Callable[[int], PeerMain]:
    from meshfl.algorithms.gossip import build_gossip
    return build_gossip(config.gossip, config.rounds)


ALGORITHMS: dict[str, AlgorithmFactory] = {"gossip": _gossip}


def build_algorithm(config: ExperimentConfig) -> Callable[[int], PeerMain]:
    """Per-peer coroutine factory for `config.algorithm`."""
    try:
        factory = ALGORITHMS[config.algorithm]
    except KeyError:
        raise ValueError(f"algorithm must be one of {', '.join(sorted(ALGORITHMS))}, got {config.algorithm!r}") from None
    return factory(config)

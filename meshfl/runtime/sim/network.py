"""Modelled links: when a message arrives, or whether it arrives at all.

Each directed link serialises its messages (a message starts when the previous one on
the same link has left), takes size / bandwidth to transmit, then `latency_s` to arrive.
Loss is drawn from the network's own generator, so it is reproducible per seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from meshfl.config import NetworkConfig
from meshfl.core.messages import Message


@dataclass
class TrafficCounters:
    messages_sent: list[int]
    bytes_sent: list[int]
    messages_dropped: list[int]
    messages_received: list[int] = field(default_factory=list)
    messages_by_type: dict[str, int] = field(default_factory=dict)
    bytes_by_type: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_peers(cls, n: int) -> TrafficCounters:
        return cls([0] * n, [0] * n, [0] * n, [0] * n)


class SimNetwork:
    def __init__(self, config: NetworkConfig, peers: int, seed: int,
                 schedule: Callable[[float, int, Message], None]) -> None:
        self.config = config
        self._rng = np.random.default_rng([seed, 0x6E6574])
        self._link_free_at: dict[tuple[int, int], float] = {}
        self._schedule = schedule
        self._bytes_per_second = config.bandwidth_mbps * 1e6 / 8
        self.traffic = TrafficCounters.for_peers(peers)

    def send(self, now: float, source: int, target: int, message: Message, size: int) -> None:
        self.traffic.messages_sent[source] += 1
        self.traffic.bytes_sent[source] += size
        kind = type(message).__name__
        self.traffic.messages_by_type[kind] = self.traffic.messages_by_type.get(kind, 0) + 1
        self.traffic.bytes_by_type[kind] = self.traffic.bytes_by_type.get(kind, 0) + size
        link = (source, target)
        start = max(now, self._link_free_at.get(link, 0.0))
        leaves = start + size / self._bytes_per_second
        self._link_free_at[link] = leaves
        if self.config.loss > 0 and self._rng.random() < self.config.loss:
            self.traffic.messages_dropped[source] += 1
            return
        self._schedule(leaves + self.config.latency_s, target, message)

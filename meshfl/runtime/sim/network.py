"""Modelled network: when a message arrives, or whether it arrives at all.

Every pair of peers can talk (the overlay is the algorithm's choice, not the network's).
Every link has `network.bandwidth_mbps` and every peer `network.latency_s`; a peer may have
an access link of its own (`network.peers`: uplink_mbps, downlink_mbps, latency_s) and a
pair may override bandwidth, latency and loss (`network.links`, both directions). A message
of `size` bytes from s to t:

- bandwidth = min(link bandwidth, uplink of s, downlink of t, pair cap, active slow_link caps); with
  `network.bandwidth_range_mbps` the link bandwidth of a pair is its own draw from the run seed
  (`pair_bandwidth_mbps`, both directions), and a pair cap replaces the draw instead of capping it;
- it is serialised on its link (it starts when the previous message from s to t has left)
  and, when s has an uplink of its own, on that uplink too (shared by all of s's messages:
  a slow peer's fan-out queues behind itself); it takes size / bandwidth;
- then it takes latency = the pair's override, else max(latency of s, latency of t), raised
  to any active slow_link latency on the link;
- it is dropped with probability 1 - prod(1 - p) over the base loss, the pair's loss and every
  active loss fault on the link (drawn from the network's own seeded generator), or always when
  an active partition separates s and t. A dropped message still used the sender's uplink.

Faults change the network through a mutation API keyed by the fault's index, so overlapping
faults stack and end independently. Effective per-pair parameters are computed on first use
and cached until a fault changes. Messages already in flight when a fault starts or ends are
delivered as planned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshfl.config import NetworkConfig

NETWORK_SEED_TAG = 0x6E6574  # "net"
BANDWIDTH_SEED_TAG = 0x627764  # "bwd"


@dataclass
class TrafficCounters:
    messages_sent: list[int]
    bytes_sent: list[int]
    messages_dropped: list[int]
    messages_received: list[int] = field(default_factory=list)
    messages_by_type: dict[str, int] = field(default_factory=dict)
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    dropped_by_reason: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_peers(cls, n: int) -> TrafficCounters:
        return cls([0] * n, [0] * n, [0] * n, [0] * n)


def _bytes_per_second(mbps: float) -> float:
    return mbps * 1e6 / 8


@dataclass(frozen=True)
class _LinkFault:
    """The links a fault touches: `links` (both directions), else links touching `peers`, else every link."""

    peers: frozenset[int] | None
    links: frozenset[tuple[int, int]] | None

    @classmethod
    def of(cls, peers: Iterable[int] | None, links: Iterable[Sequence[int]] | None) -> _LinkFault:
        if links is not None:
            pairs = {(int(a), int(b)) for a, b in links}
            return cls(None, frozenset(pairs | {(b, a) for a, b in pairs}))
        return cls(frozenset(int(p) for p in peers) if peers is not None else None, None)

    def covers(self, s: int, t: int) -> bool:
        if self.links is not None:
            return (s, t) in self.links
        if self.peers is not None:
            return s in self.peers or t in self.peers
        return True


def pair_bandwidth_mbps(seed: int, a: int, b: int, low: float, high: float) -> float:
    """The bandwidth of the link between peers a and b under `network.bandwidth_range_mbps: [low, high]`.

    Uniform in [low, high) (exactly `low` when low == high), drawn from (run seed, the unordered pair)
    alone: the same in both directions, in every process and whatever the number of peers.

    Parameters
    ----------
    seed : int
        The run seed.
    a, b : int
        The two peers, in either order.
    low, high : float
        The range, megabits per second.

    Returns
    -------
    float
        Megabits per second.
    """
    first, second = (a, b) if a <= b else (b, a)
    return float(np.random.default_rng([seed, BANDWIDTH_SEED_TAG, first, second]).uniform(low, high))


class SimNetwork:
    def __init__(self, config: NetworkConfig, peers: int, seed: int,
                 schedule: Callable[[float, int, Any], None]) -> None:
        self.config = config
        self.num_peers = peers
        self._seed = seed
        self._rng = np.random.default_rng([seed, NETWORK_SEED_TAG])
        self._schedule = schedule
        self.traffic = TrafficCounters.for_peers(peers)
        up = [float("inf")] * peers  # no access link of its own: only the link's bandwidth applies
        down = [float("inf")] * peers
        lat = [config.latency_s] * peers
        for p, override in config.peers.items():
            self._check_peer(p, "network.peers")
            if override.uplink_mbps is not None:
                up[p] = override.uplink_mbps
            if override.downlink_mbps is not None:
                down[p] = override.downlink_mbps
            if override.latency_s is not None:
                lat[p] = override.latency_s
        self._link_bps = _bytes_per_second(config.bandwidth_mbps)
        self._uplink = [_bytes_per_second(m) for m in up]
        self._downlink = [_bytes_per_second(m) for m in down]
        self._shared_uplink = [u != float("inf") for u in self._uplink]
        self._latency = lat
        # pair overrides, both directions: (bytes/s cap or None, latency or None, loss)
        self._pairs: dict[tuple[int, int], tuple[float | None, float | None, float]] = {}
        for link in config.links:
            a, b = link.peers
            self._check_peer(a, "network.links")
            self._check_peer(b, "network.links")
            cap = _bytes_per_second(link.bandwidth_mbps) if link.bandwidth_mbps is not None else None
            self._pairs[(a, b)] = self._pairs[(b, a)] = (cap, link.latency_s, link.loss)
        self._sender_free_at = [0.0] * peers
        self._link_free_at: dict[tuple[int, int], float] = {}
        self._losses: dict[Any, tuple[float, _LinkFault]] = {}
        self._slow: dict[Any, tuple[float | None, float | None, _LinkFault]] = {}
        self._partitions: dict[Any, list[int]] = {}  # key -> group id of every peer
        # (s, t) -> (bytes per second, latency, loss probability, reachable)
        self._cache: dict[tuple[int, int], tuple[float, float, float, bool]] = {}

    def _check_peer(self, p: int, what: str) -> None:
        if not 0 <= p < self.num_peers:
            raise ValueError(f"{what}: peer {p} does not exist (peers are 0..{self.num_peers - 1})")

    # --- effective parameters -------------------------------------------------------------

    def _link(self, s: int, t: int) -> tuple[float, float, float, bool]:
        cached = self._cache.get((s, t))
        if cached is not None:
            return cached
        self._check_peer(s, "send")
        self._check_peer(t, "send")
        latency = max(self._latency[s], self._latency[t])
        keep = 1.0 - self.config.loss
        pair = self._pairs.get((s, t))
        cap = pair[0] if pair is not None else None
        drawn = self.config.bandwidth_range_mbps
        if drawn is None:
            link_bps = self._link_bps if cap is None else min(self._link_bps, cap)
        else:  # heterogeneous links: the pair's own draw, unless network.links gives this pair a bandwidth
            link_bps = cap if cap is not None else _bytes_per_second(pair_bandwidth_mbps(self._seed, s, t, *drawn))
        bps = min(link_bps, self._uplink[s], self._downlink[t])
        if pair is not None:
            _cap, pair_latency, pair_loss = pair
            if pair_latency is not None:
                latency = pair_latency
            keep *= 1.0 - pair_loss
        for cap_mbps, slow_latency, where in self._slow.values():
            if where.covers(s, t):
                if cap_mbps is not None:
                    bps = min(bps, _bytes_per_second(cap_mbps))
                if slow_latency is not None:
                    latency = max(latency, slow_latency)
        for probability, where in self._losses.values():
            if where.covers(s, t):
                keep *= 1.0 - probability
        reachable = all(groups[s] == groups[t] for groups in self._partitions.values())
        result = (bps, latency, 1.0 - keep, reachable)
        self._cache[(s, t)] = result
        return result

    def reachable(self, a: int, b: int) -> bool:
        """False while an active partition separates a and b.

        Not cached: the failure detector asks it for every pair at a partition, and a peers x peers
        cache is what the simulator must not hold at scale."""
        cached = self._cache.get((a, b))
        if cached is not None:
            return cached[3]
        self._check_peer(a, "send")
        self._check_peer(b, "send")
        return all(groups[a] == groups[b] for groups in self._partitions.values())

    @property
    def partitioned(self) -> bool:
        """Whether some partition is active (else every pair is reachable)."""
        return bool(self._partitions)

    def latency(self, a: int, b: int) -> float:
        """One-way latency from a to b now, seconds (without serialisation)."""
        return self._link(a, b)[1]

    def bandwidth_mbps(self, a: int, b: int) -> float:
        """Effective bandwidth from a to b now, megabits per second."""
        return self._link(a, b)[0] * 8 / 1e6

    def loss(self, a: int, b: int) -> float:
        """Probability that a message from a to b is dropped now (partitions aside)."""
        return self._link(a, b)[2]

    # --- sending --------------------------------------------------------------------------

    def send(self, now: float, source: int, target: int, message: Any, size: int) -> None:
        bps, latency, loss, reachable = self._link(source, target)
        traffic = self.traffic
        traffic.messages_sent[source] += 1
        traffic.bytes_sent[source] += size
        kind = type(message).__name__
        traffic.messages_by_type[kind] = traffic.messages_by_type.get(kind, 0) + 1
        traffic.bytes_by_type[kind] = traffic.bytes_by_type.get(kind, 0) + size
        link = (source, target)
        start = max(now, self._link_free_at.get(link, 0.0))
        shared = self._shared_uplink[source]
        if shared:
            start = max(start, self._sender_free_at[source])
        leaves = start + size / bps
        self._link_free_at[link] = leaves
        if shared:
            self._sender_free_at[source] = leaves
        if not reachable:
            self._drop(source, "partition")
            return
        if loss > 0 and self._rng.random() < loss:
            self._drop(source, "loss")
            return
        self._schedule(leaves + latency, target, message)

    def _drop(self, source: int, reason: str) -> None:
        self.traffic.messages_dropped[source] += 1
        self.traffic.dropped_by_reason[reason] = self.traffic.dropped_by_reason.get(reason, 0) + 1

    # --- faults ---------------------------------------------------------------------------

    def add_loss(self, key: Any, probability: float, peers: Iterable[int] | None = None,
                 links: Iterable[Sequence[int]] | None = None) -> None:
        """Fault `key` drops messages with `probability` on `links` (both directions), else on links
        touching `peers`, else on every link. Stacks with other losses: 1 - prod(1 - p)."""
        if not 0 <= probability <= 1:
            raise ValueError(f"loss probability must be in [0, 1], got {probability}")
        self._losses[key] = (float(probability), _LinkFault.of(peers, links))
        self._cache.clear()

    def remove_loss(self, key: Any) -> None:
        if self._losses.pop(key, None) is not None:
            self._cache.clear()

    def partition(self, key: Any, groups: Iterable[Iterable[int]]) -> None:
        """Fault `key` splits the peers into `groups`; unlisted peers form one more group."""
        group_of = [-1] * self.num_peers
        for g, members in enumerate(groups):
            for p in members:
                self._check_peer(int(p), "partition")
                group_of[int(p)] = g
        self._partitions[key] = group_of
        self._cache.clear()

    def heal(self, key: Any = None) -> None:
        """End partition `key`; key None ends every partition."""
        if key is None:
            if self._partitions:
                self._partitions.clear()
                self._cache.clear()
        elif self._partitions.pop(key, None) is not None:
            self._cache.clear()

    def slow_links(self, key: Any, links_or_peers: Iterable[Any] | None = None,
                   bandwidth_mbps: float | None = None, latency_s: float | None = None) -> None:
        """Fault `key` caps bandwidth at `bandwidth_mbps` and raises latency to at least `latency_s`
        on the given links ([a, b] pairs, both directions), or on links touching the given peer ids,
        or (None) on every link."""
        if links_or_peers is None:
            where = _LinkFault(None, None)
        else:
            items = list(links_or_peers)
            if items and all(isinstance(x, (int, np.integer)) for x in items):
                where = _LinkFault.of(items, None)
            else:
                where = _LinkFault.of(None, items)
        self._slow[key] = (bandwidth_mbps, latency_s, where)
        self._cache.clear()

    def restore_links(self, key: Any) -> None:
        if self._slow.pop(key, None) is not None:
            self._cache.clear()

    def apply(self, action: Any) -> bool:
        """Apply a network `FaultAction` (set_loss, clear_loss, partition, heal, slow_link,
        restore_link); False for kinds the network does not handle (crash, straggle, ...)."""
        kind, key = action.kind, action.key
        if kind == "set_loss":
            self.add_loss(key, action.probability, peers=action.peers or None, links=action.links or None)
        elif kind == "clear_loss":
            self.remove_loss(key)
        elif kind == "partition":
            self.partition(key, action.groups)
        elif kind == "heal":
            self.heal(key)
        elif kind == "slow_link":
            self.slow_links(key, action.links or action.peers or None, action.bandwidth_mbps, action.latency_s)
        elif kind == "restore_link":
            self.restore_links(key)
        else:
            return False
        return True

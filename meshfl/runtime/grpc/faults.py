"""Fault injection for real peers: the same `faults:` YAML the simulator applies.

The launcher (`meshfl launch --local`) decides when each action of the resolved schedule
fires (time since the algorithm started, or a round a peer reached) and does what needs a
process: crash = SIGKILL, restart/join = start the process again on the same store and
metrics file, wipe = delete the store folder, leave = SIGTERM. Network, compute and Byzantine
actions (loss, partition, slow links, stragglers, byzantine on/off) are injected at each peer:
the launcher appends the fired action numbers to every peer's `faults.json`, and each peer
applies them, in order, to its own copy of the simulator's network model (and its compute
speed and Byzantine behaviour, which the shared `PeerContext.train` reads) — so a partition,
a 10% loss or a sign-flipping peer means the same thing in both runtimes. Heterogeneous link
bandwidths (`network.bandwidth_range_mbps`) are config, not faults: the same model holds them from
the start, so a message waits size / its pair's bandwidth before it is sent, as in the simulator.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from meshfl.config import ExperimentConfig, LinkConfig, NetworkConfig
from meshfl.faults import Byzantine, FaultAction, resolve_faults
from meshfl.runtime.sim.compute import peer_speeds
from meshfl.runtime.sim.network import SimNetwork

CONTROL_FILE = "faults.json"
UNLIMITED_MBPS = 1e12  # the real link's own speed is what it is: only a fault's cap applies


def write_fired(folder: Path, fired: list[int]) -> None:
    """Atomically replace a peer's control file with the list of fired action numbers."""
    tmp = folder / (CONTROL_FILE + ".tmp")
    tmp.write_text(json.dumps({"fired": fired}))
    os.replace(tmp, folder / CONTROL_FILE)


def shaping_config(network: NetworkConfig) -> NetworkConfig:
    """The network model a real peer applies to its own sends: faults only, plus heterogeneous link bandwidths.

    The real link's latency, loss and bandwidth are what they are, so the model has none of its
    own (`UNLIMITED_MBPS`), except that `network.bandwidth_range_mbps`, when given, is emulated
    as in the simulator: each pair's drawn bandwidth, or the bandwidth its `network.links` entry
    gives instead (only then: without a range, configured bandwidths stay the simulator's).
    """
    if network.bandwidth_range_mbps is None:
        return NetworkConfig(latency_s=0.0, bandwidth_mbps=UNLIMITED_MBPS, loss=0.0)
    links = [LinkConfig(peers=link.peers, bandwidth_mbps=link.bandwidth_mbps)
             for link in network.links if link.bandwidth_mbps is not None]
    return NetworkConfig(latency_s=0.0, bandwidth_mbps=UNLIMITED_MBPS, loss=0.0,
                         bandwidth_range_mbps=network.bandwidth_range_mbps, links=links)


class TransportFaults:
    """One peer's view of the injected network and compute faults."""

    def __init__(self, config: ExperimentConfig, peer: int, folder: Path) -> None:
        self.peer = peer
        self.path = folder / CONTROL_FILE
        self.actions: list[FaultAction] = resolve_faults(list(config.faults), config.peers, config.seed)
        self.model = SimNetwork(shaping_config(config.network), config.peers, config.seed, lambda *args: None)
        # compute.tiers / speed_min..max as in the simulator; real compute is speed 1, so only
        # slower peers can be emulated (they sleep (1/speed - 1) x their real training time)
        self.base_speed = float(peer_speeds(config.compute, config.peers, config.seed)[peer])
        self.speed = self.base_speed
        self._applied = 0
        self._mtime: tuple[int, int] = (0, 0)
        self._rng = np.random.default_rng([config.seed, peer, 0x696E6A])
        self._byzantine: dict[int | None, Byzantine] = {}  # fault key -> behaviour, in start order
        self.shaped = config.network.bandwidth_range_mbps is not None
        """Whether links are shaped without any fault (heterogeneous link bandwidths)."""
        self.active = bool(self.actions) or self.shaped

    def refresh(self) -> None:
        """Apply actions the launcher fired since the last look (cheap when nothing changed)."""
        if not self.actions:
            return
        try:
            stat = self.path.stat()
            mtime = (stat.st_mtime_ns, stat.st_ino)  # the file is replaced, not rewritten: a new inode each time
            if mtime == self._mtime:
                return
            fired = json.loads(self.path.read_text())["fired"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        self._mtime = mtime
        for number in fired[self._applied:]:
            if isinstance(number, int) and 0 <= number < len(self.actions):
                self._apply(self.actions[number])
        self._applied = len(fired)

    def _apply(self, action: FaultAction) -> None:
        if self.model.apply(action):
            return
        if self.peer in action.peers and action.kind == "straggle":
            self.speed = self.base_speed * float(action.speed or 1.0)
        elif self.peer in action.peers and action.kind == "restore_speed":
            self.speed = self.base_speed
        elif self.peer in action.peers and action.kind == "byzantine_on" and action.byzantine is not None:
            self._byzantine[action.key] = action.byzantine
        elif self.peer in action.peers and action.kind == "byzantine_off":
            self._byzantine.pop(action.key, None)

    @property
    def byzantine(self) -> Byzantine | None:
        """The behaviour of the latest Byzantine fault on for this peer (as in the simulator), or None."""
        return next(reversed(self._byzantine.values())) if self._byzantine else None

    def reachable(self, source: int, target: int) -> bool:
        return self.model.reachable(source, target)

    def drops(self, target: int) -> bool:
        """Whether a message to `target` is lost now (partition or a loss draw)."""
        if not self.model.reachable(self.peer, target):
            return True
        loss = self.model.loss(self.peer, target)
        return loss > 0 and self._rng.random() < loss

    def delay(self, target: int, size: int) -> float:
        """Extra seconds a slow link (or a link's drawn bandwidth) adds to a message of `size` bytes."""
        bandwidth = self.model.bandwidth_mbps(self.peer, target)
        extra = self.model.latency(self.peer, target)
        if bandwidth < UNLIMITED_MBPS:
            extra += size * 8 / (bandwidth * 1e6)
        return extra

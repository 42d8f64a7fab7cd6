"""The registry of peer algorithms. Importing this package registers the built-in ones.

A new algorithm is one module that calls `register(Algorithm(...))`, imported here (or by
the user before the config is built); see ARCHITECTURE.md, "Adding an algorithm".
"""

from __future__ import annotations

from meshfl.algorithms import coordinator, dht_probe, dpsgd, gossip, moshpit, mpls, smart_gossip  # noqa: F401 - each registers itself
from meshfl.algorithms.base import ALGORITHMS, Algorithm, PeerMain, get_algorithm, register

__all__ = ["ALGORITHMS", "Algorithm", "PeerMain", "get_algorithm", "register"]

"""Disjoint partial aggregates, as P2PFL's gossip aggregator keeps them.

A peer holds parts; each part is the weighted average of the models of a set of
contributors plus their total weight. A part is accepted only if its contributors are
disjoint from every part already held, so no model is ever counted twice. For a
neighbour that already holds some contributors, the peer sends the average of the parts
disjoint from those.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshfl.aggregate.fedavg import weighted_average
from meshfl.core.params import Layout, Params


@dataclass(frozen=True)
class Part:
    params: Params
    contributors: frozenset[int]
    weight: float


class PartialAggregates:
    def __init__(self) -> None:
        self._parts: list[Part] = []
        self._covered: frozenset[int] = frozenset()
        self._combined: dict[tuple[int, ...], Part] = {}  # parts only grow, so a combination never goes stale

    @property
    def covered(self) -> frozenset[int]:
        return self._covered

    def add(self, part: Part) -> bool:
        """Keep `part` if it brings only new contributors; return whether it was kept."""
        if self._covered & part.contributors:
            return False
        if self._parts and part.params.layout.fingerprint != self._parts[0].params.layout.fingerprint:
            raise ValueError(f"partial model from contributors {sorted(part.contributors)} has a different layout")
        self._parts.append(part)
        self._covered = self._covered | part.contributors
        return True

    def within(self, allowed: frozenset[int]) -> PartialAggregates:
        """The parts whose contributors are all in `allowed`, as a new set of aggregates."""
        kept = PartialAggregates()
        for part in self._parts:
            if allowed.issuperset(part.contributors):
                kept.add(part)
        return kept

    def covers(self, peers: Iterable[int]) -> bool:
        return self._covered.issuperset(peers)

    def missing(self, peers: Iterable[int]) -> list[int]:
        return sorted(set(peers) - self._covered)

    def has_part_for(self, already_held: frozenset[int]) -> bool:
        """Whether some held part is entirely new to a neighbour holding `already_held` (cheap)."""
        return any(not (p.contributors & already_held) for p in self._parts)

    def for_neighbour(self, already_held: frozenset[int]) -> Part | None:
        """Average of the parts the neighbour lacks entirely, or None if there are none."""
        chosen = tuple(i for i, p in enumerate(self._parts) if not (p.contributors & already_held))
        return self._combination(chosen) if chosen else None

    def result(self) -> Part | None:
        return self._combination(tuple(range(len(self._parts)))) if self._parts else None

    def _combination(self, indices: tuple[int, ...]) -> Part:
        if indices not in self._combined:
            self._combined[indices] = _combine([self._parts[i] for i in indices])
        return self._combined[indices]


def _combine(parts: list[Part]) -> Part:
    if len(parts) == 1:
        return parts[0]
    ordered = sorted(parts, key=lambda p: min(p.contributors))
    layout: Layout = ordered[0].params.layout
    flat = weighted_average([p.params.flat for p in ordered], [p.weight for p in ordered])
    return Part(Params(flat, layout), frozenset().union(*(p.contributors for p in ordered)),
                sum(p.weight for p in ordered))

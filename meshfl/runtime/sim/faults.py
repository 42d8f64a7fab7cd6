"""Applies a run's fault schedule to the simulator, exactly.

Time triggers become timers on the virtual clock; round triggers fire on the first metric
event that carries that round (from `trigger_peer`, or from any peer). Each fired action is
logged as a `fault` event, so the report can mark it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from meshfl.core.metrics import FAULT, METRIC
from meshfl.faults import Byzantine, FaultAction, resolve_faults

if TYPE_CHECKING:
    from meshfl.runtime.sim.runtime import Simulation

STARTS = ("restart", "join")


class FaultInjector:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.actions = resolve_faults(list(sim.config.faults), sim.config.peers, sim.config.seed)
        self._by_round = [a for a in self.actions if a.trigger[0] == "round"]
        self.pending_starts = 0
        self._base_speeds = sim.speeds.copy()
        self._byzantine: dict[int, dict[int | None, Byzantine]] = {}  # peer -> fault key -> behaviour, in start order

    def byzantine(self, peer: int) -> Byzantine | None:
        """The behaviour of the latest Byzantine fault still on for `peer` (it outlasts a crash), or None."""
        active = self._byzantine.get(peer)
        return next(reversed(active.values())) if active else None

    @property
    def joining(self) -> set[int]:
        """Peers that join later: they are not started with the others."""
        return {p for a in self.actions if a.kind == "join" for p in a.peers}

    def arm(self) -> None:
        """Schedule the time-triggered actions; listen for rounds."""
        loop = asyncio.get_running_loop()
        for action in self.actions:
            if action.trigger[0] == "time":
                if action.kind in STARTS:
                    self.pending_starts += 1
                loop.call_at(float(action.trigger[1]), self._fire_timed, action)
        if self._by_round:
            self.sim.metrics.subscribe(self._on_event)

    def _fire_timed(self, action: FaultAction) -> None:
        if action.kind in STARTS:
            self.pending_starts -= 1
        self.fire(action)
        self.sim.wake()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != METRIC or "round" not in event or not self._by_round:
            return
        due = [a for a in self._by_round
               if event["round"] >= a.trigger[1] and (a.trigger[2] is None or a.trigger[2] == event["peer"])]
        if not due:
            return
        self._by_round = [a for a in self._by_round if a not in due]
        for action in due:  # fired from a call_soon, not inside the peer that logged
            asyncio.get_running_loop().call_soon(self.fire, action)

    def fire(self, action: FaultAction) -> None:
        sim = self.sim
        sim.metrics.record(FAULT, kind=action.kind, index=action.index, peers=list(action.peers),
                           **({"probability": action.probability} if action.probability is not None else {}),
                           **({"behaviour": action.byzantine.behaviour} if action.byzantine is not None else {}))
        kind = action.kind
        if sim.network.apply(action):
            sim.detector.network_changed()
            return
        for peer in action.peers:
            slot = sim.slots[peer]
            if kind == "crash":
                sim.crash(peer)
                if action.wipe:
                    slot.store.wipe()
            elif kind in STARTS:
                sim.start(peer)
            elif kind == "wipe":
                slot.store.wipe()
            elif kind == "leave":
                sim.leave(peer)
            elif kind == "straggle":
                sim.speeds[peer] = self._base_speeds[peer] * float(action.speed or 1.0)
            elif kind == "restore_speed":
                sim.speeds[peer] = self._base_speeds[peer]
            elif kind == "byzantine_on" and action.byzantine is not None:
                self._byzantine.setdefault(peer, {})[action.key] = action.byzantine
            elif kind == "byzantine_off":
                self._byzantine.get(peer, {}).pop(action.key, None)

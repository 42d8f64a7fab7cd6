"""What each peer did, read from a run's events: final accuracy, lives, crashes, restarts, status.

Shared by `build_summary` (summary.json) and the report, so both tell one story. Nothing here
assumes rounds: a peer's final accuracy is its last `global_accuracy` event in event order,
whatever its round (or none), and its status comes from its last lifecycle event.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meshfl.core.metrics import (
    GLOBAL_ACCURACY,
    METRIC,
    PEER_CRASHED,
    PEER_EXITED,
    PEER_FINISHED,
    PEER_STARTED,
    STATUS_CRASHED,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_RUNNING,
)

LEGACY_PEER_FAILED = "peer_failed"  # older gRPC peers: written after peer_finished(status=failed)


@dataclass
class Moment:
    """Where on a plot something happened: the round then (if known; the peer's own for a crash,
    the run's highest for a restart) and both clocks."""

    round: int | None
    virtual_time: float | None
    wall_time: float | None
    detail: str = ""


@dataclass
class PeerHistory:
    peer: int
    final_accuracy: float | None = None
    final_round: int | None = None
    reported: bool = False  # any event at all names this peer
    incarnations: int = 0  # peer_started events
    last_lifecycle: str | None = None  # peer_started | peer_crashed | peer_finished
    finished_status: str | None = None  # status of the last peer_finished
    crashes: list[Moment] = field(default_factory=list)
    restarts: list[Moment] = field(default_factory=list)

    @property
    def lives(self) -> int:
        """Incarnations as the summary reports them: at least 1 if the peer reported anything."""
        return max(self.incarnations, 1 if self.reported else 0)

    @property
    def crashed(self) -> bool:
        """Its last lifecycle event is a crash: it crashed and did not come back."""
        return self.last_lifecycle == PEER_CRASHED

    def status(self, *, named_dead: bool = False, interrupted: bool = False) -> str:
        """finished | stopped | crashed | failed | left | running.

        A peer with no lifecycle events (a runtime that does not write them) finished if
        the run completed, and was running if the run was interrupted.
        """
        if self.last_lifecycle == PEER_CRASHED:
            status = STATUS_CRASHED
        elif self.last_lifecycle == PEER_FINISHED:
            status = self.finished_status or STATUS_FINISHED
        elif self.last_lifecycle == PEER_STARTED:
            status = STATUS_RUNNING
        else:
            status = STATUS_RUNNING if interrupted else STATUS_FINISHED
        if named_dead and status not in (STATUS_CRASHED, STATUS_FAILED):
            status = STATUS_CRASHED  # the runtime saw it die (e.g. killed by a signal)
        return status


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def peer_histories(events: Iterable[Any], peers: int = 0) -> dict[int, PeerHistory]:
    """One PeerHistory per peer 0..peers-1 and per peer id any event names, sorted by id."""
    histories: dict[int, PeerHistory] = {p: PeerHistory(p) for p in range(peers)}
    current_round: dict[int, int] = {}
    run_round: int | None = None  # the highest round any peer has reached
    for event in events:
        if not isinstance(event, dict):
            continue
        peer = _int(event.get("peer"))
        if peer is None:
            continue
        history = histories.setdefault(peer, PeerHistory(peer))
        kind = event.get("event")
        if kind == PEER_EXITED:  # the launcher's record, not the peer's: says nothing of what the peer did
            continue
        history.reported = True
        rnd = _int(event.get("round"))
        if rnd is not None:
            current_round[peer] = rnd
            run_round = rnd if run_round is None else max(run_round, rnd)
        if kind == METRIC and event.get("metric") == GLOBAL_ACCURACY and "value" in event:
            history.final_accuracy = _finite(event["value"])  # NaN (a diverged model) reads as null
            history.final_round = rnd
            continue
        if kind not in (PEER_STARTED, PEER_CRASHED, PEER_FINISHED, LEGACY_PEER_FAILED):
            continue
        moment = Moment(current_round.get(peer), _finite(event.get("virtual_time")), _finite(event.get("wall_time")))
        if kind == PEER_STARTED:
            if history.incarnations > 0 or history.crashes:
                moment.round = run_round  # its own last round is from before it died: where the run is now
                history.restarts.append(moment)
            history.incarnations += 1
            history.last_lifecycle = PEER_STARTED
            history.finished_status = None
        elif kind == PEER_CRASHED:
            moment.detail = str(event.get("reason") or "") + (f": {event['error']}" if event.get("error") else "")
            history.crashes.append(moment)
            history.last_lifecycle = PEER_CRASHED
        elif kind == PEER_FINISHED:
            history.last_lifecycle = PEER_FINISHED
            history.finished_status = str(event.get("status") or STATUS_FINISHED)
        else:  # legacy peer_failed: the peer ended with an exception
            history.last_lifecycle = PEER_FINISHED
            history.finished_status = STATUS_FAILED
    return dict(sorted(histories.items()))

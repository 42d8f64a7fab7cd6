"""Run events, one dict per event, in the order they happen.

Every event carries `virtual_time` (the runtime's clock: deterministic in the simulator)
and `wall_time` (seconds since the run started: never deterministic, so comparisons of
runs drop it). Listeners (a progress bar, a dashboard) see each event as it is recorded.

Event and metric names are defined here once; runtimes, the run folder, the report and the
CLI use these constants, never the strings.

- `metric`: {peer, metric, value} plus optional `round` (round-based algorithms),
  `incarnation` (which life of a restarted peer reported it) and `about` (the peer the value
  describes, when it is not the reporting peer: the round trip of a peer as another peer measured it).
- `peer_started`: {peer, incarnation} (0 first, +1 at each restart).
- `peer_crashed`: {peer, incarnation, reason ("fault" | "exception" | "killed"), error?}.
- `peer_finished`: {peer, incarnation, status ("finished" | "stopped" | "failed" | "left")}.
- `fault`: {kind, peers, ...} when a scheduled fault fires.

Files of events are strict JSON (one object per line): a non-finite value is written null.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WALL_CLOCK_FIELDS = ("wall_time",)

# event names
METRIC = "metric"
PEER_STARTED = "peer_started"
PROCESS_STARTED = "process_started"  # gRPC: the very first line of a peer process (counts incarnations)
PEER_CRASHED = "peer_crashed"
PEER_FINISHED = "peer_finished"
FAULT = "fault"
LIVENESS = "liveness"  # a peer's failure detector changed its mind about another peer
RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"
RUN_INTERRUPTED = "run_interrupted"  # Ctrl-C stopped the run; what precedes it is all there is
PEER_EXITED = "peer_exited"  # the launcher's record of a peer process's exit code
LIFECYCLE_EVENTS = (PEER_STARTED, PEER_CRASHED, PEER_FINISHED)

# metric names
GLOBAL_ACCURACY = "global_accuracy"
LOCAL_ACCURACY = "local_accuracy"
GLOBAL_LOSS = "global_loss"
LOCAL_LOSS = "local_loss"
TRAIN_LOSS = "train_loss"
GLOBAL_METRIC = "global_metric_"  # + name: a `train.metrics` function on the global test set
LOCAL_METRIC = "local_metric_"  # + name: on the peer's own test split

# peer_crashed reasons and peer_finished statuses
CRASH_FAULT = "fault"
CRASH_EXCEPTION = "exception"
CRASH_KILLED = "killed"
STATUS_FINISHED = "finished"
STATUS_STOPPED = "stopped"
STATUS_FAILED = "failed"
STATUS_LEFT = "left"
STATUS_CRASHED = "crashed"  # summary's peer_status only: last lifecycle event is a crash
STATUS_RUNNING = "running"  # summary's peer_status only: started and neither finished nor crashed

Listener = Callable[[dict[str, Any]], None]


class MetricsLog:
    def __init__(self, virtual_clock: Callable[[], float] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self._virtual_clock = virtual_clock or (lambda: 0.0)
        self._wall_start = time.perf_counter()
        self._listeners: list[Listener] = []

    def set_virtual_clock(self, clock: Callable[[], float]) -> None:
        self._virtual_clock = clock

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"event": event, **fields,
                 "virtual_time": round(self._virtual_clock(), 9),
                 "wall_time": round(time.perf_counter() - self._wall_start, 6)}
        self.events.append(entry)
        for listener in self._listeners:
            listener(entry)
        return entry

    def metric(self, peer: int, round: int | None, metric: str, value: float, *,
               incarnation: int | None = None) -> None:
        """A metric event; `round` and `incarnation` are left out when None."""
        fields: dict[str, Any] = {} if round is None else {"round": round}
        fields.update(peer=peer, metric=metric, value=value)
        if incarnation is not None:
            fields["incarnation"] = incarnation
        self.record(METRIC, **fields)

    def write_jsonl(self, path: Path) -> None:
        with path.open("w") as handle:
            for entry in self.events:
                handle.write(event_line(entry))


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, +-Infinity) replaced by None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """json.dumps that never writes NaN/Infinity (non-finite floats become null)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def event_line(entry: dict[str, Any]) -> str:
    """One metrics.jsonl line: strict JSON and a newline."""
    return strict_json(entry) + "\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_wall_clock(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in WALL_CLOCK_FIELDS} for e in events]

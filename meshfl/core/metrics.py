"""Run events, one dict per event, in the order they happen.

Every event carries `virtual_time` (the runtime's clock: deterministic in the simulator)
and `wall_time` (seconds since the run started: never deterministic, so comparisons of
runs drop it). Listeners (a progress bar, a dashboard) see each event as it is recorded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WALL_CLOCK_FIELDS = ("wall_time",)

# Metric names (the `metric` of a metric event), defined once.
GLOBAL_ACCURACY = "global_accuracy"
GLOBAL_LOSS = "global_loss"
LOCAL_ACCURACY = "local_accuracy"
LOCAL_LOSS = "local_loss"
TRAIN_LOSS = "train_loss"

# Event names (the `event` of every line of metrics.jsonl), defined once.
METRIC = "metric"
RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"
PEER_STARTED = "peer_started"
PEER_CRASHED = "peer_crashed"
PEER_FINISHED = "peer_finished"
FAULT = "fault"
LIVENESS = "liveness"

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

    def metric(self, peer: int, metric: str, value: float, round: int | None = None) -> None:
        fields: dict[str, Any] = {"peer": peer, "metric": metric, "value": value}
        if round is not None:
            fields["round"] = round
        self.record(METRIC, **fields)

    def write_jsonl(self, path: Path) -> None:
        with path.open("w") as handle:
            for entry in self.events:
                handle.write(json.dumps(entry, allow_nan=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_wall_clock(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in WALL_CLOCK_FIELDS} for e in events]

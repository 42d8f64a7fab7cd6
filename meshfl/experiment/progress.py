"""The progress bar of a simulated run, shared by `meshfl run` and `meshfl.run`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meshfl.config import ExperimentConfig
from meshfl.core.metrics import GLOBAL_ACCURACY, METRIC

if TYPE_CHECKING:
    from meshfl.experiment.run import RunResult
    from meshfl.experiment.tracking import Tracking


def format_accuracy(value: object) -> str:
    """An accuracy for a one-line report: 4 decimals, or - when there is none (null/NaN)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


class RoundProgress:
    """A progress bar per round showing the mean and minimum global accuracy of the peers.

    Accuracy events without a round (asynchronous algorithms) update the figures from each
    peer's latest accuracy and show the virtual time instead of the round.
    """

    def __init__(self, progress: Progress, config: ExperimentConfig) -> None:
        self._progress = progress
        self._peers = config.peers
        self._task = progress.add_task("round 0", total=config.rounds, mean="-", min="-")
        self._accuracy: dict[int, dict[int, float]] = {}
        self._latest: dict[int, float] = {}
        self._done_rounds = 0

    def __call__(self, event: dict) -> None:
        if event.get("event") != METRIC or event.get("metric") != GLOBAL_ACCURACY:
            return
        if not isinstance(event.get("round"), int):
            self._latest[event["peer"]] = event["value"]
            values = [v for v in self._latest.values() if isinstance(v, (int, float)) and not math.isnan(v)]
            if values:
                self._progress.update(self._task, description=f"t={event.get('virtual_time', 0.0):.1f}s",
                                      mean=f"{sum(values) / len(values):.4f}", min=f"{min(values):.4f}")
            return
        per_round = self._accuracy.setdefault(event["round"], {})
        per_round[event["peer"]] = event["value"]
        if len(per_round) == self._peers and event["round"] > self._done_rounds:
            self._done_rounds = event["round"]
            values = [v for v in per_round.values() if isinstance(v, (int, float)) and not math.isnan(v)]
            self._progress.update(self._task, completed=self._done_rounds, description=f"round {self._done_rounds}",
                                  mean=format_accuracy(sum(values) / len(values)) if values else "-",
                                  min=format_accuracy(min(values)) if values else "-")


RUN_COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("mean acc {task.fields[mean]}  min acc {task.fields[min]}"), TimeElapsedColumn())


def simulate_with_progress(config: ExperimentConfig, run_dir: Path | None, *, console: Console | None = None,
                           show: bool = True, report: bool = True, tracking: Tracking | None = None) -> RunResult:
    """`run_experiment` under the round progress bar (what `meshfl run` shows); raises what it raises."""
    from meshfl.core.metrics import MetricsLog
    from meshfl.experiment.run import run_experiment

    metrics = MetricsLog()
    with Progress(*RUN_COLUMNS, console=console or Console(), disable=not show, transient=False) as progress:
        metrics.subscribe(RoundProgress(progress, config))
        return run_experiment(config, run_dir, metrics, report, tracking=tracking)

"""config -> data -> peers -> simulation -> metrics -> run folder."""

from __future__ import annotations

import itertools
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from meshfl.algorithms import get_algorithm
from meshfl.config import ExperimentConfig, dump_config
from meshfl.core.metrics import FAULT, METRIC, RUN_FINISHED, RUN_INTERRUPTED, RUN_STARTED, MetricsLog, strict_json
from meshfl.core.topology import make_topology
from meshfl.experiment.peers import peer_histories
from meshfl.experiment.tracking import Tracking
from meshfl.learn.saved import MODELS_DIR, write_final_models
from meshfl.runtime.peer import build_worlds
from meshfl.runtime.sim.runtime import SimResult, Simulation


@dataclass
class RunResult:
    run_dir: Path | None
    summary: dict[str, Any]
    metrics: MetricsLog
    sim: SimResult | None  # None when the simulation was interrupted

    @property
    def interrupted(self) -> bool:
        return bool(self.summary.get("interrupted"))


class RunDirError(ValueError):
    """A run folder that cannot be used; the message is one line and suggests another."""


class RunInterrupted(Exception):
    """Ctrl-C stopped a simulation; `result` holds what was recorded (its run folder is written)."""

    def __init__(self, result: RunResult) -> None:
        super().__init__("interrupted")
        self.result = result


def default_run_dir(config: ExperimentConfig, root: Path = Path("runs")) -> Path:
    """Create and return a new, empty runs/<time>-<name>[-<n>] folder.

    Creating is the claim (mkdir fails if the folder exists), so two runs started in the
    same second, in threads or processes, never share a folder.
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.name)
    root.mkdir(parents=True, exist_ok=True)
    for suffix in itertools.count(1):
        path = root / (f"{stamp}-{safe_name}" if suffix == 1 else f"{stamp}-{safe_name}-{suffix}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def claim_run_dir(out: Path | None, config: ExperimentConfig) -> Path:
    """The run folder to write: `out` if it is new or an empty folder, else a new default one.

    Raises RunDirError (one line) for an `out` that is a file or a non-empty folder, so a
    run never mixes its files with another's; call it before any work.
    """
    if out is None:
        return default_run_dir(config)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: is a file, not a folder; give a new folder (or leave --out out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    if any(out.iterdir()):
        raise RunDirError(f"--out {out}: folder is not empty; give a new or empty folder, e.g. --out {_free_sibling(out)}")
    return out


def _free_sibling(path: Path) -> Path:
    for n in itertools.count(2):
        candidate = path.with_name(f"{path.name}-{n}")
        if not candidate.exists():
            return candidate
    raise AssertionError("unreachable")


def discard_if_empty(run_dir: Path) -> None:
    """Remove a claimed run folder that nothing was written to (the run failed before starting)."""
    try:
        run_dir.rmdir()
    except OSError:
        pass


def device_error(config: ExperimentConfig) -> str | None:
    """One line if the config asks for a device this machine lacks, else None."""
    if config.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "train.device=cuda but no CUDA GPU is available here; use --set train.device=cpu"
    return None


@dataclass
class _Progress:
    """What `simulate` has built so far, so an interrupted run can still be written."""

    stats: list[dict] = field(default_factory=list)
    sim: Simulation | None = None
    data_shape: tuple[tuple[int, ...], int] = ((), 0)
    """(feature_shape, num_classes) the models were built for."""


def simulate(config: ExperimentConfig, metrics: MetricsLog | None = None, *, progress: _Progress | None = None,
             on_simulation: Callable[[Simulation], None] | None = None) -> tuple[SimResult, MetricsLog, list[dict]]:
    """Run one simulated experiment in memory; a pure function of (config, seed) but for wall times.

    `on_simulation` sees the Simulation before it runs (e.g. so a metrics listener can read its traffic counters).
    """
    metrics = metrics or MetricsLog()
    progress = progress if progress is not None else _Progress()
    worlds = build_worlds(config)
    progress.stats = worlds.partition
    progress.data_shape = (tuple(worlds.learner.feature_shape), worlds.learner.num_classes)
    topology = make_topology(config.topology, config.peers, config.seed)
    algorithm = get_algorithm(config.algorithm)
    section = config.section()
    sim = progress.sim = Simulation(config, topology, worlds, metrics, lambda: algorithm.peer(section, config))
    if on_simulation is not None:
        on_simulation(sim)
    layout = worlds.learner.layout
    metrics.record(RUN_STARTED, peers=config.peers, rounds=config.rounds, algorithm=config.algorithm,
                   parameters=layout.numel, layout=layout.fingerprint)
    result = sim.run()
    metrics.record(RUN_FINISHED)
    return result, metrics, worlds.partition


def summarise(config: ExperimentConfig, result: SimResult, metrics: MetricsLog, wall_time_s: float,
              *, interrupted: bool = False) -> dict[str, Any]:
    return _summarise_traffic(config, result.traffic, metrics, result.virtual_time_s, wall_time_s, interrupted)


def _summarise_traffic(config: ExperimentConfig, traffic: Any, metrics: MetricsLog, virtual_time_s: float,
                       wall_time_s: float, interrupted: bool) -> dict[str, Any]:
    def per_peer(name: str) -> dict[int, int]:
        return dict(enumerate(getattr(traffic, name, None) or []))

    return build_summary(config, metrics.events, messages_sent=per_peer("messages_sent"),
                         bytes_sent=per_peer("bytes_sent"), messages_dropped=per_peer("messages_dropped"),
                         messages_by_type=dict(getattr(traffic, "messages_by_type", None) or {}),
                         bytes_by_type=dict(getattr(traffic, "bytes_by_type", None) or {}),
                         virtual_time_s=virtual_time_s, wall_time_s=wall_time_s, interrupted=interrupted)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_summary(config: ExperimentConfig, events: list[dict[str, Any]], *, messages_sent: dict[int, int],
                  bytes_sent: dict[int, int], messages_dropped: dict[int, int], messages_by_type: dict[str, int],
                  bytes_by_type: dict[str, int], virtual_time_s: float, wall_time_s: float,
                  dead_peers: Iterable[int] = (), interrupted: bool = False) -> dict[str, Any]:
    """summary.json of any runtime: per-peer outcomes from the events, per-peer traffic counters.

    Nothing assumes rounds. A peer's final accuracy is its last `global_accuracy` event
    (null if it reported none, or NaN); `final_round` is that event's round (null without
    one). A peer is dead when its last lifecycle event is a crash (it crashed and did not
    come back) or the runtime names it in `dead_peers`. Mean and min final accuracy are
    over the peers that are not dead and have a final accuracy (null when there are none);
    the `honest_` ones also leave out `byzantine_peers` (any peer a byzantine fault targeted).
    Every value is JSON-safe except that non-finite floats still need `strict_json`.
    """
    histories = peer_histories(events, config.peers)
    named_dead = {int(p) for p in dead_peers}
    status = {p: h.status(named_dead=p in named_dead, interrupted=interrupted) for p, h in histories.items()}
    dead = {p for p, h in histories.items() if h.crashed or p in named_dead}
    alive = [h.final_accuracy for p, h in histories.items() if p not in dead and h.final_accuracy is not None]
    byzantine = byzantine_peers(events)
    honest = [h.final_accuracy for p, h in histories.items()
              if p not in dead and p not in byzantine and h.final_accuracy is not None]
    return {
        "name": config.name,
        "algorithm": config.algorithm,
        "peers": config.peers,
        "rounds": config.rounds,
        "seed": config.seed,
        "interrupted": bool(interrupted),
        "final_global_accuracy": {str(p): h.final_accuracy for p, h in histories.items()},
        "final_round": {str(p): h.final_round for p, h in histories.items()},
        "mean_final_accuracy": _mean(alive),
        "min_final_accuracy": min(alive) if alive else None,
        "byzantine_peers": sorted(byzantine),
        "honest_mean_final_accuracy": _mean(honest),
        "honest_min_final_accuracy": min(honest) if honest else None,
        "peer_status": {str(p): s for p, s in status.items()},
        "incarnations": {str(p): h.lives for p, h in histories.items()},
        "crashes": {str(p): len(h.crashes) for p, h in histories.items()},
        "messages_sent": {str(p): n for p, n in sorted(messages_sent.items())},
        "bytes_sent": {str(p): n for p, n in sorted(bytes_sent.items())},
        "messages_dropped": {str(p): n for p, n in sorted(messages_dropped.items())},
        "total_messages": sum(messages_sent.values()),
        "total_bytes": sum(bytes_sent.values()),
        "messages_by_type": dict(sorted(messages_by_type.items())),
        "bytes_by_type": dict(sorted(bytes_by_type.items())),
        "dead_peers": sorted(dead),
        "timeline": timeline(config, events),
        "virtual_time_s": virtual_time_s,
        "wall_time_s": wall_time_s,
    }


def byzantine_peers(events: Iterable[dict[str, Any]]) -> set[int]:
    """Peers a `byzantine` fault turned on at some point of the run (the resolved targets of its `fault` events)."""
    return {int(p) for e in events if e.get("event") == FAULT and e.get("kind") == "byzantine_on" for p in e.get("peers", ())}


def timeline(config: ExperimentConfig, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of the metrics the algorithm names in `Algorithm.timeline`, in order, without wall time."""
    names = set(get_algorithm(config.algorithm).timeline)
    keep = ("peer", "metric", "value", "round", "about", "incarnation", "virtual_time")
    return [{k: e[k] for k in keep if k in e} for e in events
            if e.get("event") == METRIC and e.get("metric") in names]


def run_experiment(config: ExperimentConfig, run_dir: Path | None, metrics: MetricsLog | None = None,
                   report: bool = True, *, on_simulation: Callable[[Simulation], None] | None = None,
                   tracking: Tracking | None = None) -> RunResult:
    """Simulate `config` and, if `run_dir` is given, write the run folder there (and what `tracking` asks).

    On Ctrl-C the simulation stops, the run folder is written from what the MetricsLog
    holds (summary marked `interrupted`), and RunInterrupted carries the result.
    """
    if tracking:
        from meshfl.experiment.tracking import TrackingError, check_tracking

        check_tracking(tracking)
        if run_dir is None:
            raise TrackingError("tensorboard/mlflow tracking needs a run folder (out=False writes none)")
    started = time.perf_counter()
    metrics = metrics or MetricsLog()
    progress = _Progress()
    try:
        result, metrics, stats = simulate(config, metrics, progress=progress, on_simulation=on_simulation)
    except KeyboardInterrupt:
        with handle_signals(signal.SIG_IGN, (signal.SIGINT,)):  # a second Ctrl-C must not lose the run folder half-written
            sim = progress.sim
            network = getattr(sim, "network", None)
            clock = getattr(sim, "clock", None)
            virtual = float(getattr(clock, "now", 0.0) or 0.0)
            metrics.record(RUN_INTERRUPTED)
            summary = _summarise_traffic(config, getattr(network, "traffic", None), metrics, virtual,
                                         time.perf_counter() - started, interrupted=True)
            if run_dir is not None:
                write_run_folder(run_dir, config, metrics, summary, progress.stats, report, tracking=tracking)
        raise RunInterrupted(RunResult(run_dir, summary, metrics, None)) from None
    summary = summarise(config, result, metrics, time.perf_counter() - started)
    if run_dir is not None:
        write_run_folder(run_dir, config, metrics, summary, stats, report, tracking=tracking)
        feature_shape, num_classes = progress.data_shape
        rounds = {int(p): r for p, r in summary["final_round"].items()}
        write_final_models(run_dir / MODELS_DIR, config, result.final_params, rounds,
                           {p: n - 1 for p, n in result.incarnations.items()},
                           runtime="sim", feature_shape=feature_shape, num_classes=num_classes)
    return RunResult(run_dir, summary, metrics, result)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def handle_signals(handler: Any, signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Install `handler` for `signals` while the block runs (main thread only; elsewhere signals are left alone)."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def write_run_folder(run_dir: Path, config: ExperimentConfig, metrics: MetricsLog, summary: dict[str, Any],
                     stats: list[dict], report: bool, *, tracking: Tracking | None = None, runtime: str = "sim") -> None:
    """config.yaml, metrics.jsonl, summary.json, partition.json (all strict JSON) and the report; then, if
    `tracking` asks, the TensorBoard event files and MLflow run of these metrics (see experiment/tracking.py).

    A tracking backend that fails (a tracking server that does not answer) costs one warning line on
    stderr, not the run: the run folder is complete by then."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = dump_config(config)
    (run_dir / "config.yaml").write_text(config_text)
    metrics.write_jsonl(run_dir / "metrics.jsonl")
    (run_dir / "summary.json").write_text(strict_json(summary, indent=2) + "\n")
    (run_dir / "partition.json").write_text(strict_json(stats) + "\n")
    if report:
        from meshfl.experiment.report import write_report
        title = f"meshfl: {config.name}" + (" (interrupted)" if summary.get("interrupted") else "")
        write_report(run_dir, metrics.events, summary, config_text, title=title)
    if tracking:
        from meshfl.experiment.tracking import TrackingError, write_tracking

        try:
            write_tracking(tracking, run_dir, config, metrics.events, summary, runtime=runtime)
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001 - the run is written; a tracking backend's failure is a warning
            print(f"warning: experiment tracking failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                  f"the run folder {run_dir} is complete", file=sys.stderr)

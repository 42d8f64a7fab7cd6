"""`meshfl sweep` and `meshfl compare`: many runs, one table, plots that put them side by side.

A sweep is the cartesian product of `--grid KEY=v1,v2,...` axes (values parsed like `--set`
values), each point run for seeds `config.seed + 0..N-1`. Every point's config (and its
topology, for every seed) is checked before anything runs. Runs go through `run_experiment`
into `<out>/runs/<label>/`, in spawned worker processes (or in this process with one worker),
each with one torch thread so results do not depend on the number of workers.

Per run, from its events: the final accuracies, virtual time and bytes of its summary; per
round r the mean `global_accuracy` over the peers that reported it, t(r) = virtual time of
the first `global_accuracy` event of round r (t(0) = 0), duration(r) = t(r) - t(r-1), and
the cumulative bytes sent at t(r) (read from the simulator's counters during a sweep and
written to the run folder as `round_bytes.json`; `compare` on folders without it spreads the
run's total bytes evenly over its rounds and says so on the axis).

Writes `sweep.json` (or `compare.json`), `table.csv`, the plots and a self-contained
`sweep.html` (`compare.html`). Aggregates over seeds are the mean and the sample standard
deviation (null with one seed) of the runs that finished.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from meshfl.core.metrics import GLOBAL_ACCURACY, METRIC, strict_json

MB = 1e6
STATS = ("mean_final_accuracy", "min_final_accuracy", "virtual_time_s", "total_mb")
ROUND_BYTES_FILE = "round_bytes.json"

OK = "ok"
FAILED = "failed"
INTERRUPTED = "interrupted"
NOT_RUN = "not run"


class SweepError(ValueError):
    """A sweep that cannot start; the message is one line naming the key or value."""


# ---- the grid ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One `--grid KEY=v1,v2,...` axis: a config key and its raw values, each parsed like a --set value."""

    key: str
    values: tuple[str, ...]  # as given, each parsed like a --set value


@dataclass(frozen=True)
class Point:
    """One point of the grid: its label, `key -> raw value`, and the same as --set overrides."""

    label: str  # "key=value,key=value" ("base" without a grid)
    values: dict[str, str]  # key -> raw value
    overrides: tuple[str, ...]  # the --set form of values


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets, braces and quotes: `1,2` -> [1, 2]; `[0,1],[1,2]` -> two lists."""
    parts: list[str] = []
    depth, quote, start = 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_grid(items: Iterable[str]) -> list[Axis]:
    """Parse `KEY=v1,v2,...` strings into axes.

    Parameters
    ----------
    items : iterable of str
        The `--grid` items.

    Returns
    -------
    list[Axis]
        One per item, in order.

    Raises
    ------
    SweepError
        One line, for a malformed item, an empty value, or a repeated key or value.
    """
    axes: list[Axis] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid {item!r}: expected KEY=v1,v2,..., e.g. --grid topology.kind=full,ring")
        if any(a.key == key for a in axes):
            raise SweepError(f"--grid {key}: given twice; list every value in one --grid {key}=v1,v2,...")
        values = split_values(raw)
        if any(v == "" for v in values):
            raise SweepError(f"--grid {item!r}: empty value; give {key}=v1,v2,... without empty entries")
        if len(set(values)) != len(values):
            raise SweepError(f"--grid {key}: a value is listed twice ({raw})")
        axes.append(Axis(key, tuple(values)))
    return axes


def grid_points(axes: list[Axis]) -> list[Point]:
    """List the cartesian product of the axes, first axis slowest (one point `base` without axes)."""
    points = []
    for combo in itertools.product(*(a.values for a in axes)):
        values = {a.key: v for a, v in zip(axes, combo, strict=True)}
        label = ",".join(f"{k}={v}" for k, v in values.items()) or "base"
        points.append(Point(label, values, tuple(f"{k}={v}" for k, v in values.items())))
    return points


def parse_value(raw: str) -> Any:
    """Parse a grid value as --set reads it (a YAML scalar or flow collection; the raw text if it is not YAML)."""
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        return raw


def is_number(value: Any) -> bool:
    """Whether `value` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.,=+-]+")


def safe_label(label: str, taken: set[str]) -> str:
    """Make a folder name for a run label: unusual characters -> _, long labels shortened with a hash.

    The name is unique in `taken` (a `-2`, `-3`, ... suffix if needed), and is added to it.
    """
    import hashlib

    name = _UNSAFE.sub("_", label).strip(".") or "run"
    if len(name) > 120:
        name = f"{name[:110]}-{hashlib.sha1(label.encode()).hexdigest()[:8]}"
    candidate = name
    for n in itertools.count(2):
        if candidate not in taken:
            break
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


# ---- the plan (everything checked before any run) ----------------------------------------


@dataclass(frozen=True)
class Task:
    """One run of a sweep: the point's index, the seed, the folder name under runs/ and the resolved config."""

    point: int
    seed: int
    label: str  # folder name under runs/
    config: dict[str, Any]  # resolved config, JSON-safe


@dataclass
class Plan:
    """A checked sweep: the base config's name, path and overrides, the axes and points, the seeds and the tasks."""

    name: str
    config_path: str | None
    overrides: list[str]
    axes: list[Axis]
    points: list[Point]
    seeds: list[int]
    tasks: list[Task]


def plan_sweep(config_path: Path | None, overrides: Iterable[str], grid: Iterable[str], seeds: int = 1) -> Plan:
    """Resolve and check every (point, seed) config (fields, cross-checks, topology) before anything runs.

    Parameters
    ----------
    config_path : Path or None
        The base config file (None: defaults).
    overrides : iterable of str
        `--set` overrides applied to every point.
    grid : iterable of str
        The `--grid KEY=v1,v2,...` items.
    seeds : int, default 1
        Seeds per point: `config.seed + 0..seeds-1`.

    Returns
    -------
    Plan
        The points and one task per (point, seed), in order.

    Raises
    ------
    SweepError
        One line, for bad seeds, a bad grid, or a point whose config or topology does not check.
    ConfigError
        One line, if the base config or an override does not load.
    """
    from meshfl.config import ConfigError, load_config
    from meshfl.core.topology import TopologyError, make_topology

    if seeds < 1:
        raise SweepError(f"--seeds: must be >= 1 (got {seeds})")
    overrides = list(overrides)
    base = load_config(config_path, overrides)  # ConfigError: a --set or the file itself
    axes = parse_grid(grid)
    points = grid_points(axes)
    tasks: list[Task] = []
    taken: set[str] = set()
    seed_list: list[int] = []
    for index, point in enumerate(points):
        try:
            config = load_config(config_path, [*overrides, *point.overrides])
        except ConfigError as exc:
            raise SweepError(f"--grid {_point_text(point)}: {exc}") from None
        point_seeds = [config.seed + i for i in range(seeds)]
        if index == 0:
            seed_list = [base.seed + i for i in range(seeds)]
        for seed in point_seeds:
            run_config = config.model_copy(update={"seed": seed})
            try:
                make_topology(run_config.topology, run_config.peers, seed)
            except TopologyError as exc:
                raise SweepError(f"--grid {_point_text(point)}, seed {seed}: {str(exc).splitlines()[0]}") from None
            label = safe_label(f"{point.label},seed={seed}" if point.values else f"seed={seed}", taken)
            tasks.append(Task(index, seed, label, run_config.model_dump(mode="json")))
    return Plan(base.name, None if config_path is None else str(config_path), overrides, axes, points, seed_list, tasks)


def _point_text(point: Point) -> str:
    return " ".join(point.overrides) or "(no grid)"


# ---- one run ------------------------------------------------------------------------------


class _RoundBytes:
    """A metrics listener: cumulative bytes sent by all peers when round r's first global_accuracy is logged."""

    def __init__(self) -> None:
        self.sim: Any = None
        self.at: dict[int, int] = {}

    def attach(self, sim: Any) -> None:
        self.sim = sim

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") != METRIC or event.get("metric") != GLOBAL_ACCURACY:
            return
        rnd = event.get("round")
        if isinstance(rnd, int) and rnd not in self.at and self.sim is not None:
            self.at[rnd] = int(sum(self.sim.network.traffic.bytes_sent))


def run_task(task: Task, out: str, stop: Any = None) -> dict[str, Any]:
    """Run one (point, seed) into <out>/runs/<label>, with one torch thread.

    Parameters
    ----------
    task : Task
        The run.
    out : str
        The sweep's output folder.
    stop : Event, optional
        When set before the run starts, the task is not run.

    Returns
    -------
    dict[str, Any]
        The run's record: point, seed, run_dir and status (ok, failed, interrupted or not run),
        with `run_record`'s figures when ok and the error when failed. Never raises for a failed run.
    """
    import torch

    from meshfl.config import ExperimentConfig
    from meshfl.core.metrics import MetricsLog
    from meshfl.experiment.run import RunInterrupted, run_experiment

    head = {"point": task.point, "seed": task.seed, "run_dir": f"runs/{task.label}"}
    if stop is not None and stop.is_set():
        return {**head, "status": NOT_RUN}
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # results must not depend on the workers beside it
    run_dir = Path(out) / "runs" / task.label
    try:
        config = ExperimentConfig.model_validate(task.config)
        metrics = MetricsLog()
        probe = _RoundBytes()
        metrics.subscribe(probe)
        result = run_experiment(config, run_dir, metrics, on_simulation=probe.attach)
        rounds = sorted(probe.at)
        (run_dir / ROUND_BYTES_FILE).write_text(
            json.dumps({"rounds": rounds, "cumulative_bytes": [probe.at[r] for r in rounds]}) + "\n")
        record = run_record(result.metrics.events, result.summary, probe.at)
        return {**head, "status": OK, **record, "wall_time_s": time.perf_counter() - started}
    except (RunInterrupted, KeyboardInterrupt):
        return {**head, "status": INTERRUPTED}
    except Exception as exc:  # noqa: BLE001 - one run's failure is reported, the others go on
        return {**head, "status": FAILED, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        torch.set_num_threads(threads)


def run_record(events: list[dict[str, Any]], summary: dict[str, Any], round_bytes: dict[int, int] | None) -> dict[str, Any]:
    """Extract what a sweep keeps of a run: summary figures and per-round curves (see the module docstring).

    Parameters
    ----------
    events : list[dict[str, Any]]
        The run's events (metrics.jsonl).
    summary : dict[str, Any]
        The run's summary.json.
    round_bytes : dict[int, int] or None
        Cumulative bytes sent by round, if recorded; `cumulative_bytes` is None unless it covers every round.

    Returns
    -------
    dict[str, Any]
        The record's figures.
    """
    accuracy: dict[int, dict[int, float]] = {}  # round -> peer -> last value
    first_time: dict[int, float] = {}
    latest: dict[int, float] = {}
    time_curve: list[tuple[float, float]] = []  # runs without rounds: mean of every peer's latest accuracy
    for event in events:
        if event.get("event") != METRIC or event.get("metric") != GLOBAL_ACCURACY:
            continue
        value = event.get("value")
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan
        rnd = event.get("round")
        if isinstance(rnd, int) and not isinstance(rnd, bool):
            first_time.setdefault(rnd, float(event.get("virtual_time") or 0.0))
            accuracy.setdefault(rnd, {})[int(event["peer"])] = value
        else:
            latest[int(event["peer"])] = value
            finite = [v for v in latest.values() if math.isfinite(v)]
            if finite:
                time_curve.append((float(event.get("virtual_time") or 0.0), sum(finite) / len(finite)))
    rounds = [r for r in sorted(accuracy) if r >= 1]
    times = [first_time[r] for r in rounds]
    durations = [t - prev for t, prev in zip(times, [0.0, *times][:len(times)], strict=True)]
    mean_acc = []
    for r in rounds:
        finite = [v for v in accuracy[r].values() if math.isfinite(v)]
        mean_acc.append(sum(finite) / len(finite) if finite else None)
    exact = round_bytes is not None and all(r in round_bytes for r in rounds)
    return {
        "mean_final_accuracy": summary.get("mean_final_accuracy"),
        "min_final_accuracy": summary.get("min_final_accuracy"),
        "virtual_time_s": summary.get("virtual_time_s"),
        "total_bytes": summary.get("total_bytes"),
        "interrupted": bool(summary.get("interrupted")),
        "rounds": rounds,
        "accuracy_per_round": mean_acc,
        "round_time_s": times,
        "round_durations_s": durations,
        "cumulative_bytes": [int(round_bytes[r]) for r in rounds] if exact and round_bytes is not None else None,
        "accuracy_over_time": [] if rounds else [list(p) for p in time_curve],
    }


# ---- running many -------------------------------------------------------------------------


_STOP: Any = None


def _init_worker(stop: Any) -> None:
    global _STOP
    _STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # idle: the parent decides; a run re-enables Ctrl-C
    import torch

    import meshfl.algorithms  # noqa: F401 - registers the built-in algorithms

    torch.set_num_threads(1)


def _worker_task(task: Task, out: str) -> dict[str, Any]:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_task(task, out, _STOP)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_tasks(tasks: list[Task], out: Path, workers: int,
              on_result: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Run every task, in `workers` processes (in this process with one worker).

    Ctrl-C stops the runs (each writes its folder, marked interrupted) and returns what finished;
    tasks not started are recorded as `not run`.

    Parameters
    ----------
    tasks : list[Task]
        The runs.
    out : Path
        The sweep's output folder.
    workers : int
        Worker processes.
    on_result : callable, optional
        Called with each record as it comes in.

    Returns
    -------
    tuple[list[dict[str, Any]], bool]
        The records in task order, and whether the sweep was interrupted.
    """
    records: dict[int, dict[str, Any]] = {}
    interrupted = False

    def done(i: int, record: dict[str, Any]) -> None:
        records[i] = record
        if on_result is not None:
            on_result(record)

    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        try:
            for i, task in enumerate(tasks):
                done(i, run_task(task, str(out)))
                if records[i]["status"] == INTERRUPTED:
                    break
        except KeyboardInterrupt:
            interrupted = True
    else:
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(stop,))
        futures: dict[Future, int] = {}
        try:
            futures = {executor.submit(_worker_task, task, str(out)): i for i, task in enumerate(tasks)}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done(futures[future], _outcome(future, tasks[futures[future]]))
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            for future in futures:
                future.cancel()
            for child in multiprocessing.active_children():  # a Ctrl-C sent to this process alone
                try:
                    os.kill(child.pid, signal.SIGINT)
                except (OSError, TypeError):
                    pass
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                executor.shutdown(wait=True, cancel_futures=True)
            finally:
                signal.signal(signal.SIGINT, previous)
            for future, i in futures.items():
                if i not in records and future.done() and not future.cancelled():
                    done(i, _outcome(future, tasks[i]))
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    ordered = []
    for i, task in enumerate(tasks):
        record = records.get(i) or {"point": task.point, "seed": task.seed, "run_dir": f"runs/{task.label}", "status": NOT_RUN}
        interrupted = interrupted or record["status"] == INTERRUPTED
        ordered.append(record)
    return ordered, interrupted


def _outcome(future: Future, task: Task) -> dict[str, Any]:
    head = {"point": task.point, "seed": task.seed, "run_dir": f"runs/{task.label}"}
    try:
        return future.result()
    except KeyboardInterrupt:  # Ctrl-C landed in the worker outside the run
        return {**head, "status": INTERRUPTED}
    except Exception as exc:  # noqa: BLE001 - a worker that died (BrokenProcessPool) fails its run only
        return {**head, "status": FAILED, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


# ---- results ------------------------------------------------------------------------------


@dataclass
class Results:
    """Points with their runs, ready to write: a sweep's or a comparison's."""

    kind: str  # "sweep" or "compare"
    keys: list[str]  # grid keys (compare: ["run"])
    points: list[dict[str, Any]]  # label, values, overrides, runs, aggregate
    meta: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def runs(self) -> list[dict[str, Any]]:
        """Every point's runs, in point order."""
        return [run for point in self.points for run in point["runs"]]


def _stat(values: list[Any]) -> dict[str, Any]:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else None
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"mean": mean, "std": std, "min": min(finite) if finite else None, "max": max(finite) if finite else None,
            "n": len(finite)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the runs that finished: mean, sample std, min and max per figure; per round for durations.

    Returns
    -------
    dict[str, Any]
        `seeds` (runs that finished), one stat per figure of `STATS`, `rounds` and `round_durations_s`.
    """
    ok = [r for r in runs if r.get("status") == OK]
    out: dict[str, Any] = {"seeds": len(ok)}
    for name in STATS:
        if name == "total_mb":
            out[name] = _stat([r["total_bytes"] / MB if isinstance(r.get("total_bytes"), (int, float)) else None for r in ok])
        else:
            out[name] = _stat([r.get(name) for r in ok])
    rounds = sorted({rnd for r in ok for rnd in r.get("rounds", [])})
    per_round = [[_at_round(r, rnd, "round_durations_s") for r in ok] for rnd in rounds]
    out["rounds"] = rounds
    out["round_durations_s"] = {"mean": [_stat(v)["mean"] for v in per_round], "std": [_stat(v)["std"] for v in per_round]}
    return out


def _at_round(run: dict[str, Any], rnd: int, key: str) -> Any:
    rounds = run.get("rounds") or []
    values = run.get(key) or []
    return values[rounds.index(rnd)] if rnd in rounds and rounds.index(rnd) < len(values) else None


def sweep_results(plan: Plan, records: list[dict[str, Any]], interrupted: bool, meta: dict[str, Any]) -> Results:
    """Group a sweep's run records by point, each with its parsed values and `aggregate` over seeds.

    Parameters
    ----------
    plan : Plan
        The sweep's plan.
    records : list[dict[str, Any]]
        The records of `run_tasks`.
    interrupted : bool
        Whether the sweep was interrupted.
    meta : dict[str, Any]
        Extra fields for sweep.json.

    Returns
    -------
    Results
        Kind "sweep", keyed by the grid keys.
    """
    points = []
    for index, point in enumerate(plan.points):
        runs = [{k: v for k, v in r.items() if k != "point"} for r in records if r["point"] == index]
        points.append({"label": point.label, "values": {k: parse_value(v) for k, v in point.values.items()},
                       "raw_values": dict(point.values), "overrides": list(point.overrides),
                       "seeds": [r["seed"] for r in runs], "runs": runs, "aggregate": aggregate(runs)})
    return Results("sweep", [a.key for a in plan.axes], points, meta, interrupted)


def compare_results(run_dirs: list[Path], labels: list[str] | None = None) -> Results:
    """Read existing run folders as points of one seed each, for `meshfl compare`.

    Parameters
    ----------
    run_dirs : list[Path]
        Run folders (each with summary.json and metrics.jsonl).
    labels : list[str], optional
        One label per folder; default the folders' names.

    Returns
    -------
    Results
        Kind "compare", keyed by "run".

    Raises
    ------
    SweepError
        One line, for a folder that is not a readable run folder, or labels that are too few,
        too many or not distinct.
    """
    if labels is not None and len(labels) != len(run_dirs):
        raise SweepError(f"--labels: {len(labels)} labels for {len(run_dirs)} run folders")
    names = labels if labels is not None else [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})[0]
        raise SweepError(f"two run folders are labelled {twice!r}; give distinct --labels a,b,...")
    points = []
    for run_dir, name in zip(run_dirs, names, strict=True):
        run_dir = Path(run_dir)
        summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
        if not summary_path.is_file() or not metrics_path.is_file():
            raise SweepError(f"{run_dir}: not a run folder (needs summary.json and metrics.jsonl)")
        try:
            summary = json.loads(summary_path.read_text())
            events = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, OSError) as exc:
            raise SweepError(f"{run_dir}: cannot read its summary or metrics ({str(exc).splitlines()[0]})") from None
        round_bytes = None
        if (run_dir / ROUND_BYTES_FILE).is_file():
            try:
                saved = json.loads((run_dir / ROUND_BYTES_FILE).read_text())
                round_bytes = dict(zip(saved["rounds"], saved["cumulative_bytes"], strict=True))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                round_bytes = None
        record = {"seed": summary.get("seed"), "run_dir": str(run_dir), "status": OK,
                  **run_record(events, summary, round_bytes), "wall_time_s": summary.get("wall_time_s")}
        points.append({"label": name, "values": {"run": name}, "raw_values": {"run": name}, "overrides": [],
                       "seeds": [record["seed"]], "runs": [record], "aggregate": aggregate([record])})
    return Results("compare", ["run"], points, {"run_dirs": [str(d) for d in run_dirs]})


def results_json(results: Results) -> dict[str, Any]:
    """Build what `<kind>.json` holds: kind, meta, interrupted, the grid's keys and values, and the points."""
    return {
        "kind": results.kind,
        **results.meta,
        "interrupted": results.interrupted,
        "grid": {"keys": results.keys,
                 "values": {k: list(dict.fromkeys(p["raw_values"][k] for p in results.points)) for k in results.keys}},
        "points": [{k: v for k, v in p.items() if k != "raw_values"} for p in results.points],
    }


def table_rows(results: Results) -> tuple[list[str], list[list[Any]]]:
    """Build table.csv: the grid values, then mean and std over seeds of each figure.

    Returns
    -------
    tuple[list[str], list[list[Any]]]
        The header and one row per point.
    """
    header = [*results.keys]
    for name in STATS:
        header += [f"{name}_mean", f"{name}_std"]
    rows = []
    for point in results.points:
        row: list[Any] = [point["raw_values"][k] for k in results.keys]
        for name in STATS:
            stat = point["aggregate"][name]
            row += [stat["mean"], stat["std"]]
        rows.append(row)
    return header, rows


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def write_results(results: Results, out: Path) -> list[Path]:
    """Write <kind>.json, table.csv, the plots and <kind>.html in `out` (created if missing).

    Returns
    -------
    list[Path]
        The paths written.
    """
    from meshfl.experiment import sweep_plots

    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{results.kind}.json"
    data.write_text(strict_json(results_json(results), indent=2) + "\n")
    header, rows = table_rows(results)
    table = out / "table.csv"
    table.write_text(_csv_text(header, rows))
    pngs = sweep_plots.write_plots(results, out)
    page = out / f"{results.kind}.html"
    page.write_text(sweep_plots.render_page(results, header, rows, pngs), encoding="utf-8")
    return [data, table, *pngs, page]


def fmt(value: Any, name: str, like: Any = None) -> str:
    """Format a table cell: accuracies 4 decimals, other figures 3 decimals below 100, else 1; - for none.

    Parameters
    ----------
    value : Any
        The value; anything but a finite number gives "-".
    name : str
        The figure's name (one holding "accuracy" gets 4 decimals).
    like : Any, optional
        Format as that value would be (a std as its mean).
    """
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    if "accuracy" in name:
        return f"{value:.4f}"
    scale = like if isinstance(like, (int, float)) and math.isfinite(like) else value
    return f"{value:.3f}" if abs(scale) < 100 else f"{value:.1f}"

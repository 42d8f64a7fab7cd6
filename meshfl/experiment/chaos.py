"""`meshfl chaos`: run an algorithm under many random fault schedules and judge every run.

Schedule i of a chaos run with `--seed S` has the schedule seed S + i. That one number is
all a schedule is: it is the experiment's seed (data partition, initial model, ballots,
message loss) and it seeds the draw of the fault list
(`random_schedule(np.random.default_rng([schedule_seed, CHAOS_SEED_TAG]), ...)`). So
`meshfl chaos --schedules 1 --seed S+i` (same algorithm, peers, rounds and --set) re-runs
schedule i alone, and a schedule's outcome depends on nothing else (no wall clock, not the
number of workers: every simulation runs with one torch thread).

Judging one run (`judge_run`, a pure function of its events, its final models and the error
the simulation ended with, if any):
- hang: the simulation raised `SimulationStalled`: a deadlock (every peer waits, no timer is
  pending) or virtual time passed `max_virtual_time_s`;
- nan: a peer's final model (`SimResult.final_params`) holds NaN/Inf, or a peer that finished
  reported a NaN/Inf final `global_accuracy`;
- exception: a `peer_crashed` event with reason "exception", or any other exception out of
  the simulation;
- unfinished: the run completed, yet a peer whose last lifecycle event is not a crash did not
  end with `peer_finished` status finished or left.

Time scales (`chaos_config`), for the default experiment (digits, MLP, 5 local steps, short
timeouts from the algorithm's declared `quick` overrides; a healthy run of 6 peers
and 4 rounds takes ~1 virtual second):
- faults fall in a horizon of `horizon_s = rounds x liveness.timeout_s` (starts in the first
  70%, lasting faults end by the horizon);
- `max_virtual_time_s = 2 x (horizon_s + worst_run_s)`, where `worst_run_s` is the longest a
  correct run may take once the last fault is over, as the algorithm declares it
  (`Algorithm.worst_case_s`); without a declaration `(rounds + 1) x 10 x liveness.timeout_s`. A
  `--set max_virtual_time_s=...` replaces the bound. Defaults: 6 s horizon, 126 s bound.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshfl.core.metrics import (
    CRASH_EXCEPTION,
    GLOBAL_ACCURACY,
    LIFECYCLE_EVENTS,
    METRIC,
    PEER_CRASHED,
    PEER_FINISHED,
    STATUS_FINISHED,
    STATUS_LEFT,
    MetricsLog,
)
from meshfl.faults import FaultEvent, random_schedule

CHAOS_SEED_TAG = 0x6368616F73  # "chaos"

BASE_OVERRIDES = ("data.dataset=digits", "train.model=mlp", "train.local_steps=5", "liveness.timeout_s=1.5")
"""Every chaos experiment starts from these (then the algorithm's, then the user's --set)."""

RESERVED_KEYS = {"seed": "--seed", "peers": "--peers", "rounds": "--rounds", "algorithm": "--algorithm"}

PROBLEMS = ("hang", "nan", "exception", "unfinished")


# ---- configuration ----------------------------------------------------------------------

def schedule_seed(seed: int, index: int) -> int:
    """The seed of schedule `index` of a chaos run with `seed`: re-run it alone with --schedules 1 --seed <it>."""
    return seed + index


def check_overrides(overrides: Iterable[str]) -> None:
    """ValueError (one line) for a --set that chaos decides itself."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key == "faults" or key.startswith("faults."):
            raise ValueError(f"--set {key}: chaos draws every schedule's faults itself")
        if key in RESERVED_KEYS:
            raise ValueError(f"--set {key}: chaos sets it itself; use {RESERVED_KEYS[key]}")


def base_overrides(algorithm: str, peers: int, rounds: int, overrides: Iterable[str]) -> list[str]:
    from meshfl.algorithms import ALGORITHMS

    quick = ALGORITHMS[algorithm].quick if algorithm in ALGORITHMS else ()
    return [*BASE_OVERRIDES, *quick, *overrides,
            f"algorithm={algorithm}", f"peers={peers}", f"rounds={rounds}"]


def horizon_s(config: Any) -> float:
    """Where random faults fall: [0, horizon_s)."""
    return config.rounds * config.liveness.timeout_s


def worst_run_s(config: Any) -> float:
    """The longest a correct run may take after the last fault (see the module docstring)."""
    from meshfl.algorithms import ALGORITHMS

    algorithm = ALGORITHMS.get(config.algorithm)
    if algorithm is not None and algorithm.worst_case_s is not None:
        return algorithm.worst_case_s(config.section(), config)
    return (config.rounds + 1) * 10 * config.liveness.timeout_s


def virtual_time_bound(config: Any) -> float:
    return 2 * (horizon_s(config) + worst_run_s(config))


def chaos_config(algorithm: str, peers: int, rounds: int, overrides: Iterable[str] = ()) -> Any:
    """The experiment every schedule of a chaos run varies (seed and faults); ConfigError/ValueError on bad input."""
    from meshfl.config import load_config

    overrides = list(overrides)
    check_overrides(overrides)
    config = load_config(None, base_overrides(algorithm, peers, rounds, overrides))
    if not any(item.split("=", 1)[0].strip() == "max_virtual_time_s" for item in overrides):
        config = config.model_copy(update={"max_virtual_time_s": virtual_time_bound(config)})
    return config


def draw_schedule(seed: int, peers: int, horizon: float, rounds: int) -> list[FaultEvent]:
    """The fault list of the schedule with this seed."""
    return random_schedule(np.random.default_rng([seed, CHAOS_SEED_TAG]), peers, horizon, rounds)


def faults_as_data(faults: list[FaultEvent]) -> list[dict[str, Any]]:
    """The faults as a config's `faults:` list holds them."""
    return [event.model_dump(mode="json", exclude_none=True, exclude_defaults=False) for event in faults]


# ---- judging one run --------------------------------------------------------------------

@dataclass
class Verdict:
    hang: str | None
    nan: list[str]
    exceptions: list[str]
    unfinished: list[int]

    @property
    def problems(self) -> list[str]:
        found = {"hang": self.hang is not None, "nan": bool(self.nan), "exception": bool(self.exceptions),
                 "unfinished": bool(self.unfinished)}
        return [p for p in PROBLEMS if found[p]]

    @property
    def ok(self) -> bool:
        return not self.problems

    def first_error(self) -> str | None:
        if self.hang is not None:
            return f"hang: {self.hang}"
        if self.exceptions:
            return f"exception: {self.exceptions[0]}"
        if self.nan:
            return f"nan: {self.nan[0]}"
        if self.unfinished:
            return f"unfinished: peer {self.unfinished[0]} is not crashed and did not finish"
        return None


def _where(traceback_text: str | None) -> str:
    """`file:line in function` of the innermost frame of a traceback, or ''."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', traceback_text or "")
    if not frames:
        return ""
    path, line, function = frames[-1]
    path = path.split("/meshfl/", 1)[-1] if "/meshfl/" in path else path
    return f" (at {path}:{line} in {function})"


def _finite(params: Any) -> tuple[bool, int]:
    flat = getattr(params, "flat", params)
    try:
        import torch

        if isinstance(flat, torch.Tensor):
            bad = int((~torch.isfinite(flat)).sum())
            return bad == 0, bad
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    array = np.asarray(flat, dtype=np.float64)
    bad = int((~np.isfinite(array)).sum())
    return bad == 0, bad


def judge_run(events: list[dict[str, Any]], final_params: dict[int, Any], peers: int,
              error: BaseException | None = None) -> Verdict:
    """Judge one simulated run from its events, its peers' final models and the error it ended with (if any)."""
    from meshfl.runtime.sim.loop import SimulationStalled

    hang = None
    exceptions: list[str] = []
    if isinstance(error, SimulationStalled):
        hang = str(error)
    elif error is not None:
        exceptions.append(f"simulation: {type(error).__name__}: {error}")
    last: dict[int, dict[str, Any]] = {}
    accuracy: dict[int, float] = {}
    for event in events:
        kind = event.get("event")
        peer = event.get("peer")
        if kind in LIFECYCLE_EVENTS and isinstance(peer, int):
            last[peer] = event
            if kind == PEER_CRASHED and event.get("reason") == CRASH_EXCEPTION:
                exceptions.append(f"peer {peer} (incarnation {event.get('incarnation')}): "
                                  f"{event.get('error', 'exception')}{_where(event.get('traceback'))}")
        elif kind == METRIC and event.get("metric") == GLOBAL_ACCURACY and isinstance(peer, int):
            value = event.get("value")
            accuracy[peer] = float("nan") if value is None else float(value)
    nan: list[str] = []
    for peer, params in sorted(final_params.items()):
        finite, bad = _finite(params)
        if not finite:
            nan.append(f"peer {peer}: final model has {bad} NaN/Inf values")
    finished = {p for p, e in last.items() if e["event"] == PEER_FINISHED and e.get("status") in (STATUS_FINISHED, STATUS_LEFT)}
    for peer in sorted(finished):
        if peer in accuracy and not math.isfinite(accuracy[peer]):
            nan.append(f"peer {peer}: final {GLOBAL_ACCURACY} is {accuracy[peer]}")
    unfinished: list[int] = []
    if error is None:
        unfinished = [p for p in range(peers)
                      if (p not in last or last[p]["event"] != PEER_CRASHED) and p not in finished]
    return Verdict(hang, nan, exceptions, unfinished)


def restarts(events: list[dict[str, Any]]) -> dict[str, int]:
    """How restarted incarnations came back: `restarts` (incarnations > 0 started), `rejoined` (their
    `rejoined` metric named a round >= 1, or `resumed` did: they joined the network's round), `rejoined_fresh`
    (they found no live neighbour and started at round 1), and `never_rejoined` (a restarted incarnation of an
    algorithm that logs `rejoined`/`resumed` finished without logging either)."""
    started = {(e["peer"], e.get("incarnation", 0)) for e in events
               if e.get("event") == "peer_started" and (e.get("incarnation") or 0) > 0}
    finished = {(e["peer"], e.get("incarnation", 0)) for e in events
                if e.get("event") == PEER_FINISHED and e.get("status") == STATUS_FINISHED}
    said: dict[tuple[int, int], float] = {}
    logs_it = False
    for e in events:
        if e.get("event") == METRIC and e.get("metric") in ("rejoined", "resumed"):
            logs_it = True
            said[(e["peer"], e.get("incarnation", 0))] = float(e["value"])
    return {"restarts": len(started),
            "rejoined": sum(1 for key in started if said.get(key, 0) >= 1),
            "rejoined_fresh": sum(1 for key in started if key in said and said[key] < 1),
            "never_rejoined": sum(1 for key in started & finished if logs_it and key not in said)}


# ---- running one schedule ---------------------------------------------------------------

def run_schedule(base: dict[str, Any], index: int, seed: int) -> dict[str, Any]:
    """Simulate schedule `index` (seed `seed`) of the experiment `base` (a config as data); its outcome as JSON data.

    Deterministic for (base, seed) but for `wall_time_s`.
    """
    import torch

    from meshfl.config import ExperimentConfig
    from meshfl.experiment.run import simulate

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # results and speed must not depend on the workers beside it
    try:
        probe = ExperimentConfig.model_validate(base)
        faults = draw_schedule(seed, probe.peers, horizon_s(probe), probe.rounds)
        config = ExperimentConfig.model_validate({**base, "seed": seed, "faults": faults_as_data(faults)})
        metrics = MetricsLog()
        error: BaseException | None = None
        final_params: dict[int, Any] = {}
        virtual = None
        try:
            result, _, _ = simulate(config, metrics)
            final_params, virtual = result.final_params, result.virtual_time_s
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - judged: a stall is a hang, anything else an exception
            error = exc
        verdict = judge_run(metrics.events, final_params, config.peers, error)
    finally:
        torch.set_num_threads(threads)
    accuracies = _final_accuracies(metrics.events)
    return {
        "schedule": index,
        "seed": seed,
        "ok": verdict.ok,
        "problems": verdict.problems,
        "error": verdict.first_error(),
        "hang": verdict.hang,
        "exceptions": verdict.exceptions,
        "nan": verdict.nan,
        "unfinished": verdict.unfinished,
        **restarts(metrics.events),
        "virtual_time_s": virtual if virtual is not None else metrics.events[-1].get("virtual_time") if metrics.events else None,
        "min_final_accuracy": min(accuracies) if accuracies else None,
        "faults": faults_as_data(faults),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }


def _final_accuracies(events: list[dict[str, Any]]) -> list[float]:
    last: dict[int, float] = {}
    for event in events:
        if event.get("event") == METRIC and event.get("metric") == GLOBAL_ACCURACY and event.get("value") is not None:
            last[event["peer"]] = float(event["value"])
    return [v for v in last.values() if math.isfinite(v)]


def _run_task(task: tuple[dict[str, Any], int, int]) -> dict[str, Any]:
    return run_schedule(*task)


def _init_worker() -> None:
    import torch

    import meshfl.algorithms  # noqa: F401 - registers the built-in algorithms

    torch.set_num_threads(1)


def run_schedules(base: dict[str, Any], seed: int, schedules: int, workers: int,
                  on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every schedule's outcome, in schedule order. One worker runs them in this process; more use spawned processes."""
    tasks = [(base, i, schedule_seed(seed, i)) for i in range(schedules)]
    results: list[dict[str, Any]] = []

    def collect(outcomes: Iterator[dict[str, Any]]) -> None:
        for outcome in outcomes:
            results.append(outcome)
            if on_result is not None:
                on_result(outcome)

    workers = max(1, min(workers, schedules))
    if workers == 1:
        collect(_run_task(task) for task in tasks)
    else:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, maxtasksperchild=200) as pool:
            collect(pool.imap_unordered(_run_task, tasks, chunksize=1))
    return sorted(results, key=lambda r: r["schedule"])


# ---- the report -------------------------------------------------------------------------

def reproduce_command(algorithm: str, seed: int, peers: int, rounds: int, overrides: Iterable[str]) -> str:
    parts = ["meshfl", "chaos", "--algorithm", algorithm, "--schedules", "1", "--seed", str(seed)]
    if peers != DEFAULT_PEERS:
        parts += ["--peers", str(peers)]
    if rounds != DEFAULT_ROUNDS:
        parts += ["--rounds", str(rounds)]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)


DEFAULT_PEERS = 6
DEFAULT_ROUNDS = 4
DEFAULT_SCHEDULES = 50


def summarise_chaos(results: list[dict[str, Any]], *, algorithm: str, seed: int, peers: int, rounds: int,
                    overrides: list[str], config: Any, workers: int, wall_time_s: float,
                    verbose: bool = False) -> dict[str, Any]:
    """The one JSON object `meshfl chaos` prints."""
    failed = [r for r in results if not r["ok"]]
    counts = {
        "hangs": sum("hang" in r["problems"] for r in results),
        "nan": sum("nan" in r["problems"] for r in results),
        "exceptions": sum("exception" in r["problems"] for r in results),
        "unfinished": sum("unfinished" in r["problems"] for r in results),
        "failed": len(failed),
        "passed": len(results) - len(failed),
        **{key: sum(r.get(key, 0) for r in results) for key in ("restarts", "rejoined", "rejoined_fresh", "never_rejoined")},
    }
    summary: dict[str, Any] = {
        "algorithm": algorithm,
        "schedules": len(results),
        "seed": seed,
        "schedule_seeds": [schedule_seed(seed, 0), schedule_seed(seed, len(results) - 1)] if results else [],
        "peers": peers,
        "rounds": rounds,
        "overrides": list(overrides),
        "horizon_s": horizon_s(config),
        "max_virtual_time_s": config.max_virtual_time_s,
        "workers": workers,
        "ok": not failed,
        "counts": counts,
        "failed": [{**r, "reproduce": reproduce_command(algorithm, r["seed"], peers, rounds, overrides)} for r in failed],
        "wall_time_s": round(wall_time_s, 3),
    }
    if verbose:
        summary["results"] = results
    return summary


def without_wall_times(value: Any) -> Any:
    """`value` with every `wall_time_s` (and `workers`) removed: what must be equal for equal seeds."""
    if isinstance(value, dict):
        return {k: without_wall_times(v) for k, v in value.items() if k not in ("wall_time_s", "workers")}
    if isinstance(value, list):
        return [without_wall_times(v) for v in value]
    return value

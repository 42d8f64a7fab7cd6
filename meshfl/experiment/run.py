"""config -> data -> peers -> simulation -> metrics -> run folder."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from meshfl.algorithms import get_algorithm
from meshfl.config import ExperimentConfig, dump_config
from meshfl.core.metrics import RUN_FINISHED, RUN_STARTED, MetricsLog
from meshfl.core.topology import make_topology
from meshfl.runtime.peer import build_worlds
from meshfl.runtime.sim.runtime import SimResult, Simulation


@dataclass
class RunResult:
    run_dir: Path | None
    summary: dict[str, Any]
    metrics: MetricsLog
    sim: SimResult


def default_run_dir(config: ExperimentConfig, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.name)
    path = root / f"{stamp}-{safe_name}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{stamp}-{safe_name}-{suffix}"
    return path


def simulate(config: ExperimentConfig, metrics: MetricsLog | None = None) -> tuple[SimResult, MetricsLog, list[dict]]:
    """Run one simulated experiment in memory; a pure function of (config, seed) but for wall times."""
    metrics = metrics or MetricsLog()
    worlds = build_worlds(config)
    topology = make_topology(config.topology, config.peers, config.seed)
    algorithm = get_algorithm(config.algorithm)
    section = config.section()
    sim = Simulation(config, topology, worlds, metrics, lambda peer, incarnation: algorithm.peer(section, config))
    layout = worlds.learner.layout
    metrics.record(RUN_STARTED, peers=config.peers, rounds=config.rounds, algorithm=config.algorithm,
                   parameters=layout.numel, layout=layout.fingerprint)
    result = sim.run()
    metrics.record(RUN_FINISHED)
    return result, metrics, worlds.partition


def summarise(config: ExperimentConfig, result: SimResult, metrics: MetricsLog, wall_time_s: float) -> dict[str, Any]:
    traffic = result.traffic
    return build_summary(config, metrics.events, messages_sent=dict(enumerate(traffic.messages_sent)),
                         bytes_sent=dict(enumerate(traffic.bytes_sent)),
                         messages_dropped=dict(enumerate(traffic.messages_dropped)),
                         messages_by_type=traffic.messages_by_type, bytes_by_type=traffic.bytes_by_type,
                         virtual_time_s=result.virtual_time_s, wall_time_s=wall_time_s)


def build_summary(config: ExperimentConfig, events: list[dict[str, Any]], *, messages_sent: dict[int, int],
                  bytes_sent: dict[int, int], messages_dropped: dict[int, int], messages_by_type: dict[str, int],
                  bytes_by_type: dict[str, int], virtual_time_s: float, wall_time_s: float,
                  dead_peers: Iterable[int] = ()) -> dict[str, Any]:
    """summary.json of any runtime: final accuracies from the events, per-peer traffic counters.

    A peer is dead when it is named in `dead_peers` (the runtime saw it die) or never
    reported its final-round accuracy.
    """
    final: dict[str, float] = {}
    for event in events:
        if event["event"] == "metric" and event["metric"] == "global_accuracy" and event["round"] == config.rounds:
            final[str(event["peer"])] = event["value"]
    values = [v for v in final.values() if not math.isnan(v)]
    dead = {int(p) for p in dead_peers} | {p for p in range(config.peers) if str(p) not in final}
    return {
        "name": config.name,
        "algorithm": config.algorithm,
        "peers": config.peers,
        "rounds": config.rounds,
        "seed": config.seed,
        "final_global_accuracy": final,
        "mean_final_accuracy": sum(values) / len(values) if values else float("nan"),
        "min_final_accuracy": min(values) if values else float("nan"),
        "messages_sent": {str(p): n for p, n in sorted(messages_sent.items())},
        "bytes_sent": {str(p): n for p, n in sorted(bytes_sent.items())},
        "messages_dropped": {str(p): n for p, n in sorted(messages_dropped.items())},
        "total_messages": sum(messages_sent.values()),
        "total_bytes": sum(bytes_sent.values()),
        "messages_by_type": dict(sorted(messages_by_type.items())),
        "bytes_by_type": dict(sorted(bytes_by_type.items())),
        "dead_peers": sorted(dead),
        "virtual_time_s": virtual_time_s,
        "wall_time_s": wall_time_s,
    }


def run_experiment(config: ExperimentConfig, run_dir: Path | None, metrics: MetricsLog | None = None,
                   report: bool = True) -> RunResult:
    """Simulate `config` and, if `run_dir` is given, write the run folder there."""
    started = time.perf_counter()
    result, metrics, stats = simulate(config, metrics)
    summary = summarise(config, result, metrics, time.perf_counter() - started)
    if run_dir is not None:
        write_run_folder(run_dir, config, metrics, summary, stats, report)
    return RunResult(run_dir, summary, metrics, result)


def write_run_folder(run_dir: Path, config: ExperimentConfig, metrics: MetricsLog, summary: dict[str, Any],
                     stats: list[dict], report: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = dump_config(config)
    (run_dir / "config.yaml").write_text(config_text)
    metrics.write_jsonl(run_dir / "metrics.jsonl")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "partition.json").write_text(json.dumps(stats) + "\n")
    if report:
        from meshfl.experiment.report import write_report
        write_report(run_dir, metrics.events, summary, config_text, title=f"meshfl: {config.name}")

"""What the real network costs: bytes on the wire vs the algorithm's own count, and round times.

Runs one experiment twice, in the simulator and as real peer processes on 127.0.0.1
(`launch_local`), then prints JSON:

- bytes per round: the encoded envelopes actually sent (plus an estimate of gRPC/HTTP2
  framing) against the algorithm's own count (sum of `encoded_size(message)`) for the same
  delivered messages; `ratio` should stay <= 1.05. Heartbeats are reported apart.
- seconds per round: the gRPC runtime's wall time per round (every peer done) against the
  simulator's wall time per round, which is pure compute (its clock is virtual).

    python benchmarks/grpc_overhead.py                     # digits, 4 peers, 3 rounds
    MESHFL_DATA=../shared/data python benchmarks/grpc_overhead.py examples/mnist_gossip.yaml --set peers=4 --set rounds=3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from meshfl.config import load_config
from meshfl.experiment.launch import launch_local
from meshfl.experiment.run import simulate, summarise


def round_ends(events: list[dict], rounds: int) -> dict[int, float]:
    """Wall time at which the last peer logged its accuracy for each round."""
    ends: dict[int, float] = {}
    for event in events:
        if event.get("event") == "metric" and event.get("metric") == "global_accuracy" and 1 <= event["round"] <= rounds:
            ends[event["round"]] = max(ends.get(event["round"], 0.0), event["wall_time"])
    return ends


def per_round(ends: dict[int, float], start: float) -> list[float]:
    times, previous = [], start
    for r in sorted(ends):
        times.append(round(ends[r] - previous, 4))
        previous = ends[r]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="experiment YAML (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="keep the gRPC run folder here")
    args = parser.parse_args()
    defaults = [] if args.config else ["data.dataset=digits", "peers=4", "rounds=3"]
    config = load_config(args.config, [*defaults, *args.overrides])

    started = time.perf_counter()
    result, metrics, _ = simulate(config)
    sim_wall = time.perf_counter() - started
    sim_summary = summarise(config, result, metrics, sim_wall)
    sim_start = next(e["wall_time"] for e in metrics.events if e["event"] == "run_started")
    sim_rounds = per_round(round_ends(metrics.events, config.rounds), sim_start)

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.out or Path(scratch) / "run"
        launched = launch_local(config, run_dir, timeout_s=600, report=False)
        summary, events = launched.summary, launched.events
    algorithm_started = max(e["wall_time"] for e in events if e.get("event") == "algorithm_started")
    grpc_rounds = per_round(round_ends(events, config.rounds), algorithm_started)

    delivered = sum(summary["algorithm_bytes_delivered"].values())
    wire = sum(summary["wire_bytes_sent"].values())
    framing = sum(summary["framing_bytes_estimate"].values())
    heartbeats = sum(summary["heartbeat_bytes"].values())
    report = {
        "config": {"name": config.name, "dataset": config.data.dataset, "model": config.train.model,
                   "peers": config.peers, "rounds": config.rounds, "topology": config.topology.kind,
                   "algorithm": config.algorithm},
        "bytes": {
            "algorithm_bytes_per_round": round(delivered / config.rounds),
            "wire_bytes_per_round": round(wire / config.rounds),
            "framing_bytes_estimate_per_round": round(framing / config.rounds),
            "heartbeat_bytes_per_round": round(heartbeats / config.rounds),
            "ratio_envelopes": round(wire / delivered, 4) if delivered else None,
            "ratio_with_framing": round((wire + framing) / delivered, 4) if delivered else None,
            "ratio_with_framing_and_heartbeats": round((wire + framing + heartbeats) / delivered, 4) if delivered else None,
            "sim_algorithm_bytes_per_round": round(sim_summary["total_bytes"] / config.rounds),
        },
        "seconds": {
            "grpc_per_round": grpc_rounds,
            "grpc_mean_per_round": round(sum(grpc_rounds) / len(grpc_rounds), 4) if grpc_rounds else None,
            "sim_compute_per_round": sim_rounds,
            "sim_compute_mean_per_round": round(sum(sim_rounds) / len(sim_rounds), 4) if sim_rounds else None,
            "grpc_startup": round(algorithm_started, 3),
            "grpc_total_wall": round(summary["wall_time_s"], 3),
            "sim_total_wall": round(sim_wall, 3),
        },
        "accuracy": {
            "grpc_mean_final": summary["mean_final_accuracy"],
            "sim_mean_final": sim_summary["mean_final_accuracy"],
            "grpc_dead_peers": summary["dead_peers"],
        },
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

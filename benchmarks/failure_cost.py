"""What one crashed peer costs each later round: failure-free vs one peer killed, per round.

    MESHFL_DATA=../shared/data python benchmarks/failure_cost.py                 # both runtimes
    MESHFL_DATA=../shared/data python benchmarks/failure_cost.py --runtime sim --peers 4 --rounds 10

Runs the config twice per runtime: as it is, and with `faults: [{kind: crash, peers: [K],
at_round: R}]` (over gRPC the launcher SIGKILLs the process). A round's time is from the
previous round's last evaluation to this round's last evaluation among the surviving
peers (virtual seconds in the simulator, wall seconds over gRPC). Prints JSON with the
per-round times, the failure-free median and how far above it each round with the
crash went, next to `liveness.timeout_s`: the issue's bar is "at most the failure-free
round time plus one detector timeout".
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from meshfl.config import load_config
from meshfl.core.metrics import GLOBAL_ACCURACY, METRIC
from meshfl.experiment.launch import launch_local
from meshfl.experiment.run import simulate


def round_times(events: list[dict[str, Any]], rounds: int, survivors: set[int], clock: str) -> list[float]:
    ends = {}
    for event in events:
        if event.get("event") == METRIC and event.get("metric") == GLOBAL_ACCURACY and event.get("peer") in survivors:
            r = event.get("round")
            if isinstance(r, int):
                ends[r] = max(ends.get(r, 0.0), float(event[clock]))
    start = min((float(e[clock]) for e in events if e.get("event") == "algorithm_started"), default=0.0)
    times, previous = [], start
    for r in range(1, rounds + 1):
        if r not in ends:
            break
        times.append(round(ends[r] - previous, 3))
        previous = ends[r]
    return times


def run(runtime: str, config: Any, scratch: Path) -> list[dict[str, Any]]:
    if runtime == "sim":
        _, metrics, _ = simulate(config)
        return metrics.events
    return launch_local(config, scratch / f"run-{len(list(scratch.iterdir()))}", timeout_s=3000, report=False).events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/mnist_gossip.yaml")
    parser.add_argument("--runtime", choices=["sim", "grpc", "both"], default="both")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kill-peer", type=int, default=3)
    parser.add_argument("--kill-round", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = [f"peers={args.peers}", f"rounds={args.rounds}", *args.set]
    crash = f"faults=[{{kind: crash, peers: [{args.kill_peer}], at_round: {args.kill_round}}}]"
    survivors = set(range(args.peers)) - {args.kill_peer}
    report: dict[str, Any] = {"peers": args.peers, "rounds": args.rounds, "killed": args.kill_peer,
                              "at_round": args.kill_round}
    runtimes = ["sim", "grpc"] if args.runtime == "both" else [args.runtime]
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in runtimes:
            clock = "virtual_time" if runtime == "sim" else "wall_time"
            clean_config = load_config(args.config, base)
            clean = round_times(run(runtime, clean_config, Path(tmp)), args.rounds, survivors, clock)
            faulty = round_times(run(runtime, load_config(args.config, [*base, crash]), Path(tmp)), args.rounds,
                                 survivors, clock)
            median = statistics.median(clean[1:] or clean)
            after = faulty[args.kill_round - 1:]
            report[runtime] = {
                "clock": clock, "failure_free_round_s": clean, "with_crash_round_s": faulty,
                "failure_free_median_s": round(median, 3), "detector_timeout_s": clean_config.liveness.timeout_s,
                "worst_extra_after_crash_s": round(max(t - median for t in after), 3) if after else None,
                "later_rounds_extra_s": [round(t - median, 3) for t in faulty[args.kill_round:]],
                "rounds_completed_with_crash": len(faulty),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

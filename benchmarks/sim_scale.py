"""How far does the simulator scale? Many peers on one machine, with and without batched vote relays.

Runs the same experiment (digits, random topology, short local training so the protocol
dominates) twice in one process: once with P2PFL's per-ballot vote flooding
(`gossip.vote_batch_s=0`) and once with meshfl's batched relays (the default), and prints
JSON with wall seconds, messages and bytes (by type), virtual time and missed votes/models
for each, plus the ratios.

    python benchmarks/sim_scale.py                                   # 200 peers, p=0.05, 2 rounds
    python benchmarks/sim_scale.py --peers 1000 --edge-probability 0.01 --only batched
    python benchmarks/sim_scale.py --peers 2000 --edge-probability 0.005 --only batched --profile

`--profile` runs under cProfile and adds `time_split`: the share of profiled time spent in
training and evaluation (torch, meshfl.learn), the protocol (meshfl.algorithms), the simulator and
its event loop (meshfl.runtime, asyncio), and everything else (wire coding, metrics, data, ...).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import time

from meshfl.config import load_config
from meshfl.experiment.run import simulate

VARIANTS = {"flooded": "gossip.vote_batch_s=0", "batched": None}


AREAS = (("training", ("torch", "meshfl/learn")), ("protocol", ("meshfl/algorithms",)),
         ("simulator", ("meshfl/runtime", "asyncio")))


def time_split(profile: cProfile.Profile) -> dict[str, float]:
    """Share of the profiled time (own time of each function) by area, in percent."""
    totals = dict.fromkeys([name for name, _ in AREAS] + ["other"], 0.0)
    for (filename, _, function), (_, _, own, _, _) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        where = filename + function  # C functions have no file: "<built-in method torch.stack>"
        area = next((name for name, marks in AREAS if any(m in where for m in marks)), "other")
        totals[area] += own
    whole = sum(totals.values()) or 1.0
    return {name: round(100 * t / whole, 1) for name, t in totals.items()}


def run(overrides: list[str], profile: bool = False) -> dict:
    config = load_config(None, overrides)
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    result, metrics, _ = simulate(config)
    if profiler is not None:
        profiler.disable()
    wall = time.perf_counter() - started
    missed = {}
    for event in metrics.events:
        name = event.get("metric", "")
        if name.startswith("missed_"):
            missed[name] = missed.get(name, 0) + int(event["value"])
    traffic = result.traffic
    finished = sum(1 for e in metrics.events if e["event"] == "peer_finished")
    out = {
        "wall_s": round(wall, 2),
        "messages": sum(traffic.messages_sent),
        "bytes": sum(traffic.bytes_sent),
        "messages_by_type": dict(sorted(traffic.messages_by_type.items())),
        "bytes_by_type": dict(sorted(traffic.bytes_by_type.items())),
        "virtual_time_s": round(result.virtual_time_s, 3),
        "missed": missed,
        "peers_finished": finished,
    }
    if profiler is not None:
        out["time_split"] = time_split(profiler)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=200)
    parser.add_argument("--edge-probability", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=sorted(VARIANTS), help="run one variant only")
    parser.add_argument("--profile", action="store_true", help="profile, and report where the time goes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = [f"peers={args.peers}", f"rounds={args.rounds}", "topology.kind=random",
            f"topology.edge_probability={args.edge_probability}", "train.local_steps=2", *args.overrides]
    out: dict = {"peers": args.peers, "edge_probability": args.edge_probability, "rounds": args.rounds}
    for name, extra in VARIANTS.items():
        if args.only in (None, name):
            out[name] = run(base + ([extra] if extra else []), args.profile)
    if "flooded" in out and "batched" in out:
        out["messages_ratio"] = round(out["batched"]["messages"] / out["flooded"]["messages"], 4)
        out["wall_ratio"] = round(out["batched"]["wall_s"] / out["flooded"]["wall_s"], 4)
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Lookup rounds and referral hops of meshfl's Kademlia DHT at several network sizes, in the simulator.

Why: the DHT must find the k closest peers in O(log N) hops; this measures it. Every peer joins
(staggered), bootstraps from the lowest live peer and then runs `--lookups` lookups of random keys
(`meshfl.algorithms.dht_probe`); each is checked against the true k closest by XOR.

    python benchmarks/dht_hops.py --peers 100 1000

prints JSON: per size the lookups, mean and max rounds (sequential request rounds) and hops
(referral depth of the result), the fraction of exact results, messages and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from meshfl.config import load_config
from meshfl.experiment.run import simulate


def measure(peers: int, lookups: int, seed: int, extra: list[str]) -> dict:
    config = load_config(None, [f"peers={peers}", "algorithm=dht_probe", "data.dataset=digits", "rounds=1", f"seed={seed}",
                                f"dht_probe.lookups={lookups}", "dht_probe.dht.ttl_s=30", *extra])
    start = time.perf_counter()
    result, metrics, _ = simulate(config)
    wall = time.perf_counter() - start
    values: dict[str, list[float]] = {}
    for event in metrics.events:
        if event["event"] == "metric":
            values.setdefault(event["metric"], []).append(event["value"])
    rounds, hops, exact = values["dht_lookup_rounds"], values["dht_lookup_hops"], values["dht_lookup_exact"]
    return {"peers": peers, "log2_peers": round(math.log2(peers), 3), "lookups": len(rounds),
            "rounds_mean": round(sum(rounds) / len(rounds), 3), "rounds_max": max(rounds),
            "hops_mean": round(sum(hops) / len(hops), 3), "hops_max": max(hops),
            "exact_fraction": sum(exact) / len(exact),
            "contacts_mean": round(sum(values["dht_contacts"]) / peers, 1),
            "get_correct_fraction": sum(values["dht_get_correct"]) / peers,
            "messages": int(sum(result.traffic.messages_sent)), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--lookups", type=int, default=4, help="lookups of random keys per peer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="extra config override, e.g. dht_probe.dht.alpha=1")
    args = parser.parse_args()
    print(json.dumps([measure(n, args.lookups, args.seed, args.set) for n in args.peers], indent=2))


if __name__ == "__main__":
    main()

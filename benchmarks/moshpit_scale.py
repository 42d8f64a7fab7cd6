"""Moshpit all-reduce at scale in the simulator: exactness on perfect grids, bytes per aggregation against N log N,
and the error when 10% of the peers fail in the middle of the averaging. Prints one JSON object.

    python benchmarks/moshpit_scale.py                      # 16, 64, 125 and 256 peers (a few minutes on 2 cores)
    python benchmarks/moshpit_scale.py --grpc               # also 16 real peer processes on 127.0.0.1

One iteration per run (digits, the MLP, 3 local steps, unweighted means): the trained models differ, and a second
run with `moshpit.averaging_rounds=0` gives those trained models, whose mean every peer should hold after d rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from meshfl.config import load_config
from meshfl.experiment.run import simulate, summarise
from meshfl.learn.saved import MODELS_DIR, model_paths, read_model

BASE = ["algorithm=moshpit", "data.dataset=digits", "rounds=1", "moshpit.weighting=uniform", "compute.batching=off",
        "train.local_steps=3"]
AVERAGING_TYPES = ("Part", "Reduced")


def trained_mean(overrides: list[str]) -> torch.Tensor:
    trained, _, _ = simulate(load_config(None, [*overrides, "moshpit.averaging_rounds=0"]))
    return torch.stack([p.flat.double() for p in trained.final_params.values()]).mean(0)


def errors(mean: torch.Tensor, models: dict) -> list[float]:
    return [float((p.flat.double() - mean).norm() / mean.norm()) for p in models.values()]


def exact_run(peers: int, group_size: int) -> dict:
    overrides = [*BASE, f"peers={peers}", f"moshpit.group_size={group_size}"]
    mean = trained_mean(overrides)
    started = time.perf_counter()
    config = load_config(None, overrides)
    result, metrics, _ = simulate(config)
    wall = time.perf_counter() - started
    summary = summarise(config, result, metrics, wall)
    d = round(math.log(peers, group_size))
    model_bytes = 4 * next(iter(result.final_params.values())).layout.numel
    averaging_bytes = sum(summary["bytes_by_type"].get(t, 0) for t in AVERAGING_TYPES)
    sizes = [e["value"] / d for e in metrics.events if e.get("metric") == "model_sizes_sent"]
    return {"peers": peers, "group_size": group_size, "rounds": d,
            "max_relative_error": max(errors(mean, result.final_params)),
            "model_sizes_sent_per_peer_per_round": float(np.mean(sizes)), "ideal": 2 * (group_size - 1) / group_size,
            "averaging_bytes_per_aggregation": averaging_bytes, "model_bytes": model_bytes,
            "dht_bytes_per_aggregation": summary["total_bytes"] - averaging_bytes,
            "virtual_time_s": result.virtual_time_s, "wall_time_s": round(wall, 2)}


def failure_run(peers: int, group_size: int, extra_rounds: int, seed: int = 0) -> dict:
    """10% of the peers crash mid-averaging (after their first round); error of the survivors against their mean."""
    d = round(math.log(peers, group_size))
    failing = sorted(np.random.default_rng(seed).choice(peers, size=max(1, peers // 10), replace=False).tolist())
    overrides = [*BASE, f"peers={peers}", f"moshpit.group_size={group_size}", f"seed={seed}"]
    trained, _, _ = simulate(load_config(None, [*overrides, "moshpit.averaging_rounds=0"]))
    survivors = [p for p in range(peers) if p not in failing]
    mean = torch.stack([trained.final_params[p].flat.double() for p in survivors]).mean(0)
    probe, probe_metrics, _ = simulate(load_config(None, overrides))  # when does round 1 of the averaging start?
    first = min(e["virtual_time"] for e in probe_metrics.events if e.get("metric") == "group_size")
    crash = f"faults=[{{kind: crash, peers: {failing}, at_s: {first + 0.01}}}]"
    result, metrics, _ = simulate(load_config(None, [*overrides, crash, f"moshpit.averaging_rounds={d + extra_rounds}"]))
    models = {p: m for p, m in result.final_params.items() if p in survivors}
    finished = sum(1 for e in metrics.events if e.get("event") == "peer_finished" and e.get("status") == "finished")
    return {"peers": peers, "group_size": group_size, "failed": failing, "rounds": d + extra_rounds,
            "survivors_finished": finished, "max_relative_error_vs_survivors_mean": max(errors(mean, models))}


def grpc_run(peers: int, group_size: int) -> dict:
    overrides = [*BASE, f"peers={peers}", f"moshpit.group_size={group_size}"]
    mean = trained_mean(overrides)
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        args = [arg for item in [*overrides, "grpc.base_port=51800"] for arg in ("--set", item)]
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "meshfl.cli", "launch", "--local", "--quiet", "--timeout", "300",
                               "--out", str(run), *args], capture_output=True, text=True, timeout=400)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            return {"peers": peers, "error": (done.stdout + done.stderr)[-2000:]}
        models = {p: read_model(model_paths(run / MODELS_DIR, p)[0])[0] for p in range(peers)}
        summary = json.loads((run / "summary.json").read_text())
    return {"peers": peers, "group_size": group_size, "runtime": "grpc", "max_relative_error": max(errors(mean, models)),
            "dead_peers": summary["dead_peers"], "wall_time_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", action="store_true", help="also run 16 real peer processes")
    args = parser.parse_args(argv)
    exact = [exact_run(n, m) for n, m in ((16, 4), (64, 4), (125, 5), (256, 4))]
    same_m = [r for r in exact if r["group_size"] == 4]
    n = np.array([r["peers"] for r in same_m], dtype=float)
    total = np.array([r["averaging_bytes_per_aggregation"] for r in same_m], dtype=float)
    nlogn = n * np.log(n) / math.log(4)  # N log_M N: rounds x peers
    scale = float(total @ nlogn / (nlogn @ nlogn))
    out = {
        "exact": exact,
        "bytes_fit": {"model": "total averaging bytes = c * N * log_M(N)", "c_model_sizes": scale / same_m[0]["model_bytes"],
                      "ideal_c_model_sizes": 2 * 3 / 4, "max_relative_residual": float(np.max(np.abs(total - scale * nlogn) / total)),
                      "points": [{"peers": int(a), "bytes": int(b)} for a, b in zip(n, total, strict=True)]},
        "failures": [failure_run(64, 4, 0), failure_run(64, 4, 2)],
    }
    if args.grpc:
        out["grpc"] = grpc_run(16, 4)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""The smart gossip paper's experiments: convergence of both protocols, and an asynchronous ablation.

    MESHFL_DATA=../shared/data python examples/smart_gossip_experiment.py --out runs/smart_gossip
    python examples/smart_gossip_experiment.py --part ablation --seeds 5 --workers 8

1. convergence (examples/smart_gossip_10x20.yaml: 10 peers, 20 rounds, 1 local epoch, MNIST, full
   topology): P2PFL's gossip (examples/mnist_gossip.yaml, the same data, model and seed) against
   smart gossip with degree-aware targets and with uniform targets. Writes per-peer accuracy
   curves side by side (the paper's Figures 1 and 2), messages per peer, and the distribution of
   interactions over peers (histogram and Gini coefficient) for both target policies.
2. ablation: the same in asynchronous mode on a random topology (p = 0.3) with three stragglers at
   0.2x speed: baseline gossip (late models dropped, no cache, uniform targets), staleness
   weighting alone, cache alone, degree-aware targets alone, and all together, over `--seeds`
   seeds. Writes a table (mean and spread of the mean and minimum final accuracy, virtual time and
   accuracy per virtual second) and the sweep plots (accuracy against round, time and bytes).

Every run's own folder (report, metrics, summary) is under <out>/<part>/runs/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from meshfl.algorithms.smart_gossip import gini  # noqa: E402
from meshfl.config import load_config  # noqa: E402
from meshfl.experiment.sweep import Axis, Plan, Point, Task, run_tasks, sweep_results, write_results  # noqa: E402
from meshfl.experiment.sweep_plots import write_plots  # noqa: E402

HERE = Path(__file__).resolve().parent
SMART = HERE / "smart_gossip_10x20.yaml"
GOSSIP = HERE / "mnist_gossip.yaml"

CONVERGENCE = {  # label -> (config file, overrides)
    "gossip (P2PFL)": (GOSSIP, []),
    "smart gossip, degree targets": (SMART, []),
    "smart gossip, uniform targets": (SMART, ["smart_gossip.targets=uniform"]),
}

ASYNC = ["smart_gossip.mode=async", "topology.kind=random", "topology.edge_probability=0.3",
         "faults=[{kind: straggler, count: 3, speed: 0.2, at_s: 0}]"]
ABLATION = {  # label -> overrides on top of ASYNC
    "baseline": ["smart_gossip.staleness=none", "smart_gossip.cache=false", "smart_gossip.targets=uniform"],
    "staleness only": ["smart_gossip.staleness=inverse", "smart_gossip.cache=false", "smart_gossip.targets=uniform"],
    "cache only": ["smart_gossip.staleness=none", "smart_gossip.cache=true", "smart_gossip.targets=uniform"],
    "degree only": ["smart_gossip.staleness=none", "smart_gossip.cache=false", "smart_gossip.targets=degree"],
    "all": ["smart_gossip.staleness=inverse", "smart_gossip.cache=true", "smart_gossip.targets=degree"],
}


def plan(name: str, variants: dict[str, tuple[Path, list[str]]], seeds: int, extra: list[str]) -> Plan:
    """One point per variant, `seeds` runs each (seed 0..seeds-1), as a sweep plan over a `variant` axis."""
    points, tasks = [], []
    for index, (label, (path, overrides)) in enumerate(variants.items()):
        points.append(Point(f"variant={label}", {"variant": label}, tuple(overrides)))
        for seed in range(seeds):
            config = load_config(path, [*overrides, *extra, f"seed={seed}"])
            safe = label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            tasks.append(Task(index, seed, f"{safe},seed={seed}", config.model_dump(mode="json")))
    return Plan(name, None, extra, [Axis("variant", tuple(variants))], points, list(range(seeds)), tasks)


def run_plan(the_plan: Plan, out: Path, workers: int):
    out.mkdir(parents=True, exist_ok=True)
    records, interrupted = run_tasks(the_plan.tasks, out, workers,
                                     on_result=lambda r: print(f"  {r['run_dir']}: {r['status']} "
                                                               f"mean final accuracy {r.get('mean_final_accuracy')}",
                                                               flush=True))
    results = sweep_results(the_plan, records, interrupted, {"experiment": the_plan.name})
    write_results(results, out)
    write_plots(results, out)
    return results, records


def read_run(out: Path, record: dict) -> tuple[list[dict], dict]:
    folder = out / record["run_dir"]
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return events, json.loads((folder / "summary.json").read_text())


def per_peer_accuracy(events: list[dict]) -> dict[int, list[tuple[int, float]]]:
    curves: dict[int, list[tuple[int, float]]] = {}
    for e in events:
        if e.get("event") == "metric" and e.get("metric") == "global_accuracy" and isinstance(e.get("round"), int):
            curves.setdefault(int(e["peer"]), []).append((e["round"], e["value"]))
    return curves


def interactions_per_peer(events: list[dict], peers: int) -> np.ndarray:
    """How often the others interacted with each peer (sum of their counters about it)."""
    totals = np.zeros(peers)
    for e in events:
        if e.get("event") == "metric" and e.get("metric") == "interactions" and e.get("about") is not None:
            totals[int(e["about"])] += e["value"]
    return totals


def convergence(out: Path, workers: int, extra: list[str]) -> dict:
    the_plan = plan("smart_gossip_convergence", CONVERGENCE, 1, extra)
    results, records = run_plan(the_plan, out, workers)
    runs = {label: read_run(out, r) for label, r in zip(CONVERGENCE, records, strict=True) if r["status"] == "ok"}
    labels = list(runs)
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 4), sharey=True)
    for ax, label in zip(np.atleast_1d(axes), labels, strict=True):
        for peer, curve in sorted(per_peer_accuracy(runs[label][0]).items()):
            rounds, values = zip(*sorted(curve), strict=True)
            ax.plot(rounds, values, lw=1, label=f"peer {peer}")
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("global test accuracy (per peer; sync rounds: lines coincide)")
    np.atleast_1d(axes)[-1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_peer.png", dpi=120)
    plt.close(fig)

    figures: dict = {}
    fig, (hist_ax, msg_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        events, summary = runs[label]
        peers = len(summary["messages_sent"])
        messages = [summary["messages_sent"][str(p)] for p in range(peers)]
        entry = {"mean_final_accuracy": summary["mean_final_accuracy"], "min_final_accuracy": summary["min_final_accuracy"],
                 "messages_per_peer": messages, "total_mb": summary["total_bytes"] / 1e6}
        counts = interactions_per_peer(events, peers)
        if counts.sum() > 0:
            entry["interactions_per_peer"] = counts.tolist()
            entry["interactions_gini"] = gini(counts)
            hist_ax.hist(counts, bins=10, alpha=0.6, label=f"{label} (Gini {entry['interactions_gini']:.3f})")
        figures[label] = entry
    hist_ax.set_xlabel("interactions with a peer (confirmed sends + new models, over the run)")
    hist_ax.set_ylabel("peers")
    hist_ax.yaxis.get_major_locator().set_params(integer=True)
    hist_ax.legend(fontsize=8)
    hist_ax.set_title("distribution of interactions over peers")
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        messages = figures[label]["messages_per_peer"]
        msg_ax.bar(np.arange(len(messages)) + i * width, messages, width, label=label)
    msg_ax.set_xlabel("peer")
    msg_ax.set_ylabel("messages sent (count)")
    msg_ax.set_title("messages per peer")
    msg_ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "interactions_and_messages.png", dpi=120)
    plt.close(fig)
    (out / "convergence.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def ablation(out: Path, seeds: int, workers: int, extra: list[str]) -> list[dict]:
    variants = {label: (SMART, [*ASYNC, *overrides]) for label, overrides in ABLATION.items()}
    the_plan = plan("smart_gossip_ablation", variants, seeds, extra)
    results, _ = run_plan(the_plan, out, workers)
    rows = []
    for point in results.points:
        ok = [r for r in point["runs"] if r.get("status") == "ok"]
        def stat(values):
            values = [v for v in values if v is not None and math.isfinite(v)]
            return (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0) if values else (None, None)
        rows.append({"variant": point["values"]["variant"], "seeds": len(ok),
                     "mean_final_accuracy": stat([r["mean_final_accuracy"] for r in ok]),
                     "min_final_accuracy": stat([r["min_final_accuracy"] for r in ok]),
                     "virtual_time_s": stat([r["virtual_time_s"] for r in ok]),
                     "accuracy_per_virtual_s": stat([r["mean_final_accuracy"] / r["virtual_time_s"] for r in ok])})
    lines = ["| variant | seeds | mean final accuracy | min final accuracy | virtual time (s) | accuracy per virtual s |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[k][0]:.4f} ± {row[k][1]:.4f}" if row[k][0] is not None else "-"
                 for k in ("mean_final_accuracy", "min_final_accuracy")]
        cells += [f"{row['virtual_time_s'][0]:.1f} ± {row['virtual_time_s'][1]:.1f}",
                  f"{row['accuracy_per_virtual_s'][0]:.5f} ± {row['accuracy_per_virtual_s'][1]:.5f}"]
        lines.append(f"| {row['variant']} | {row['seeds']} | " + " | ".join(cells) + " |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/smart_gossip"))
    parser.add_argument("--part", choices=["convergence", "ablation", "all"], default="all")
    parser.add_argument("--seeds", type=int, default=5, help="ablation: seeds per variant")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="runs in parallel processes")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="KEY=VALUE for every run (e.g. rounds=5 for a quick look)")
    args = parser.parse_args(argv)
    if args.part in ("convergence", "all"):
        figures = convergence(args.out / "convergence", args.workers, args.overrides)
        for label, entry in figures.items():
            gini_text = f", interactions Gini {entry['interactions_gini']:.3f}" if "interactions_gini" in entry else ""
            print(f"{label}: mean final accuracy {entry['mean_final_accuracy']:.4f}, min {entry['min_final_accuracy']:.4f}, "
                  f"{sum(entry['messages_per_peer'])} messages, {entry['total_mb']:.0f} MB{gini_text}")
    if args.part in ("ablation", "all"):
        ablation(args.out / "ablation", args.seeds, args.workers, args.overrides)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()

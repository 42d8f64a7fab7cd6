"""The smart gossip paper's recovery experiment, all three recovery tiers, in the simulator and as real processes.

    MESHFL_DATA=../shared/data python examples/recovery_experiment.py --out runs/recovery
    python examples/recovery_experiment.py --runtime sim      # simulator only (a minute)

examples/recovery_4x6.yaml (4 peers on a line, 6 rounds, MNIST, gossip.checkpoints on): peer 0
crashes as round 3 begins and restarts at round 4 (real processes: restarted right after the crash, back by round 4 or 5; see RESTART_ROUND). Variants: no failure (the baseline), a process
crash (its store survives: tier 1), a crash that wipes its store (tier 2: replicas held by the
farthest peers, 3 and 2), and the store wiped with its holders' stores wiped too (tier 3: it takes a
neighbour's model). With `--runtime launch` (or both) the same runs as real peer processes
(`meshfl launch --local`): SIGKILL, a real restart, a deleted store folder.

Writes <out>/recovery_<runtime>.png (per-peer accuracy per round, crash and restart marked, each
variant beside the baseline, the paper's Figures 3 and 4) and <out>/recovery.json (per run: the
tier peer 0 logged, the round it rejoined, final accuracies, models missed after the rejoin, replica
bytes full and delta). Every run's own folder (report, metrics) is under <out>/<runtime>/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import meshfl  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "recovery_4x6.yaml"
CRASH = "{kind: crash, peers: [0], at_round: 3%s}"
RESTART_ROUND = {"sim": 4, "launch": 3}
"""The round whose start fires the restart. A real peer process takes a few seconds to come back (Python,
torch, gRPC, a join timeout), while a round of this experiment takes about one: fired at round 4, the
others finish the run before peer 0 is back. Fired right after the crash, it is back at round 4 or 5."""


def variants(runtime: str) -> dict[str, str]:
    restart = f"{{kind: restart, peers: [0], at_round: {RESTART_ROUND[runtime]}}}"
    return {
        "no failure": "[]",
        "crash (tier 1)": f"[{CRASH % ''}, {restart}]",
        "store wiped (tier 2)": f"[{CRASH % ', wipe: true'}, {restart}]",
        "store and holders wiped (tier 3)": f"[{CRASH % ', wipe: true'}, {{kind: wipe, peers: [2, 3], at_round: 3}}, {restart}]",
    }


def facts(result: meshfl.Result) -> dict:
    """What the run shows about recovery, from its metric events and summary."""
    events = [e for e in result.events if e.get("event") == "metric"]
    of = lambda name, peer=None: [e for e in events if e["metric"] == name and (peer is None or e["peer"] == peer)]  # noqa: E731
    rejoined = [e["value"] for e in of("rejoined", 0)]
    after = int(rejoined[0]) + 1 if rejoined else None
    return {
        "recovery_tier": [e["value"] for e in of("recovery_tier", 0)],
        "rejoined_at_round": rejoined,
        "final_accuracy": result.summary["final_global_accuracy"],
        "min_final_accuracy": result.summary["min_final_accuracy"],
        "missed_models_after_rejoin": sum(e["value"] for e in of("missed_models") if after is not None and e["round"] >= after),
        "replica_bytes_full": [e["value"] for e in of("replica_bytes_full", 0)],
        "replica_bytes_delta": [e["value"] for e in of("replica_bytes_delta", 0)],
    }


def curves(result: meshfl.Result) -> tuple[dict[int, list[tuple[int, float]]], list[tuple[str, float]]]:
    """Per-peer accuracy per round, and the crash/restart marks as round positions: the crash after peer 0's
    last round of its first life, the restart before the first round it takes part in again (the round it
    rejoined + 1). Round positions, not clocks: a launch's peers and launcher each have their own clock."""
    acc: dict[int, list[tuple[int, float]]] = {}
    first_life: list[int] = []
    rejoined: list[float] = []
    for e in result.events:
        if e.get("event") != "metric":
            continue
        if e.get("metric") == "global_accuracy" and isinstance(e.get("round"), int):
            acc.setdefault(e["peer"], []).append((e["round"], e["value"]))
            if e["peer"] == 0 and not e.get("incarnation"):
                first_life.append(e["round"])
        elif e.get("metric") == "rejoined" and e["peer"] == 0:
            rejoined.append(e["value"])
    marks = []
    if rejoined:
        marks = [("crash", max(first_life, default=0) + 0.5), ("restart", rejoined[0] + 0.5)]
    return acc, marks


def plot(results: dict[str, meshfl.Result], path: Path, runtime: str) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(4.3 * len(results), 3.8), sharey=True)
    baseline = curves(results["no failure"])[0] if "no failure" in results else {}
    for ax, (label, result) in zip(axes, results.items(), strict=True):
        acc, marks = curves(result)
        last = max((r for points in acc.values() for r, _ in points), default=0)
        for peer, points in sorted(acc.items()):
            by_round = dict(points)  # a round the peer missed (it was down) is a gap in its line
            rounds = list(range(1, last + 1))
            ax.plot(rounds, [by_round.get(r, float("nan")) for r in rounds], marker="o", ms=3, lw=1.2, label=f"peer {peer}")
        if label != "no failure" and baseline:
            rounds, values = zip(*sorted(baseline[0]), strict=True)
            ax.plot(rounds, values, color="grey", ls=":", lw=1.5, label="peer 0, no failure")
        for kind, x in marks:
            ax.axvline(x, color="red" if kind == "crash" else "green", ls="--", lw=1)
            ax.text(x, 0.02 if kind == "crash" else 0.09, f" {kind}", color="red" if kind == "crash" else "green", fontsize=8,
                    transform=ax.get_xaxis_transform())
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"global test accuracy ({runtime})")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/recovery"))
    parser.add_argument("--runtime", choices=["sim", "launch", "both"], default="both")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every run")
    args = parser.parse_args(argv)
    runtimes = ["sim", "launch"] if args.runtime == "both" else [args.runtime]
    report: dict = {}
    for runtime in runtimes:
        results = {}
        for label, faults in variants(runtime).items():
            folder = args.out / runtime / label.split(" (")[0].replace(" ", "_")
            overrides = [*args.overrides, f"faults={faults}"]
            run = meshfl.run if runtime == "sim" else meshfl.launch
            results[label] = run(CONFIG, out=folder, overrides=overrides, progress=False)
            report.setdefault(runtime, {})[label] = facts(results[label])
            print(f"{runtime:6} {label:34} {json.dumps(report[runtime][label]['recovery_tier'])} "
                  f"min final accuracy {results[label].summary['min_final_accuracy']:.4f}", flush=True)
        plot(results, args.out / f"recovery_{runtime}.png", runtime)
    (args.out / "recovery.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"results in {args.out}")
    return report


if __name__ == "__main__":
    main()

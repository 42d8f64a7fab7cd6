"""MPLS against its baselines on the paper's MNIST setting, and the tau sweep under label skew.

    MESHFL_DATA=../shared/data python examples/mpls_experiment.py --out runs/mpls
    python examples/mpls_experiment.py --part modes --seeds 3 --workers 2
    python examples/mpls_experiment.py --part tau --set rounds=20      # a quick look

1. modes (examples/mpls_mnist.yaml: 30 workers, random graph p = 0.5, LeNet-5, six compute modes,
   5-25 Mbps links): MPLS, APPG, NetMax, Rand-MPLS, MPLS-Peer and MPLS-Layer with the same seeds.
   Prints and writes a table of virtual time to 90% mean test accuracy (the mean over workers of
   each one's latest evaluation, once every worker has one), MB of layers pulled until then, and
   MB sent in the whole run; plots mean accuracy against virtual time per mode.
2. tau: MPLS with (tau1, tau2) = (1, 0), (0.5, 0.5), (0, 1) on non-IID data (data.partition:
   dominant, chi = 0.7: 70% of each worker's samples share one label): accuracy against time.

Every run's own folder (report with the layers-pulled heat map, metrics, summary) is under
<out>/<part>/runs/.
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

from meshfl.config import load_config  # noqa: E402
from meshfl.experiment.report import mean_of_latest  # noqa: E402
from meshfl.experiment.sweep import Axis, Plan, Point, Task, run_tasks, sweep_results, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "mpls_mnist.yaml"
TARGET = 0.90

MODES = {  # label -> overrides
    "MPLS": ["mpls.mode=mpls"],
    "APPG": ["mpls.mode=appg"],
    "NetMax": ["mpls.mode=netmax"],
    "Rand-MPLS": ["mpls.mode=rand"],
    "MPLS-Peer": ["mpls.mode=peer"],
    "MPLS-Layer": ["mpls.mode=layer"],
}
SKEW = ["data.partition=dominant", "data.dominant_fraction=0.7"]
TAUS = {
    "tau=(1, 0)": [*SKEW, "mpls.tau1=1", "mpls.tau2=0"],
    "tau=(0.5, 0.5)": [*SKEW, "mpls.tau1=0.5", "mpls.tau2=0.5"],
    "tau=(0, 1)": [*SKEW, "mpls.tau1=0", "mpls.tau2=1"],
}


def plan(name: str, variants: dict[str, list[str]], seeds: int, extra: list[str]) -> Plan:
    """One point per variant, `seeds` runs each (seed 0..seeds-1): the same seeds, data and graph for every variant."""
    points, tasks = [], []
    for index, (label, overrides) in enumerate(variants.items()):
        points.append(Point(f"variant={label}", {"variant": label}, tuple(overrides)))
        for seed in range(seeds):
            config = load_config(CONFIG, [*overrides, *extra, f"seed={seed}"])
            safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in label)
            tasks.append(Task(index, seed, f"{safe},seed={seed}", config.model_dump(mode="json")))
    return Plan(name, None, extra, [Axis("variant", tuple(variants))], points, list(range(seeds)), tasks)


def read_run(out: Path, record: dict) -> tuple[list[dict], dict]:
    folder = out / record["run_dir"]
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return events, json.loads((folder / "summary.json").read_text())


def time_to(times: np.ndarray, means: np.ndarray, target: float) -> float | None:
    reached = np.flatnonzero(means >= target)
    return float(times[reached[0]]) if reached.size else None


def bytes_pulled_until(events: list[dict], until: float | None) -> float:
    return float(sum(e["value"] for e in events if e.get("event") == "metric" and e.get("metric") == "bytes_pulled"
                     and (until is None or e["virtual_time"] <= until)))


def run_part(name: str, variants: dict[str, list[str]], out: Path, seeds: int, workers: int, extra: list[str]) -> dict:
    the_plan = plan(name, variants, seeds, extra)
    out.mkdir(parents=True, exist_ok=True)
    records, interrupted = run_tasks(the_plan.tasks, out, workers,
                                     on_result=lambda r: print(f"  {r['run_dir']}: {r['status']}, mean final accuracy "
                                                               f"{r.get('mean_final_accuracy')}", flush=True))
    write_results(sweep_results(the_plan, records, interrupted, {"experiment": name}), out)
    rows: dict[str, list[dict]] = {label: [] for label in variants}
    labels = [label for label in variants for _ in range(seeds)]
    for label, record in zip(labels, records, strict=True):
        if record.get("status") != "ok":
            continue
        events, summary = read_run(out, record)
        times, means = map(np.array, mean_of_latest(events, "global_accuracy", summary["peers"]))
        t90 = time_to(times, means, TARGET)
        rows[label].append({
            "seed": record.get("seed"), "time_to_target_s": t90, "curve": [times.tolist(), means.tolist()],
            "mb_pulled_to_target": bytes_pulled_until(events, t90) / 1e6 if t90 is not None else None,
            "mb_pulled": bytes_pulled_until(events, None) / 1e6,
            "mb_sent": sum(summary.get("bytes_sent", {}).values()) / 1e6,
            "final_mean_accuracy": float(means[-1]) if means.size else None,
            "virtual_time_s": summary.get("virtual_time_s"),
        })
    return rows


def _stat(values: list[float | None]) -> str:
    got = [v for v in values if v is not None and math.isfinite(v)]
    if not got:
        return "not reached"
    text = f"{np.mean(got):.1f} ± {np.std(got, ddof=1):.1f}" if len(got) > 1 else f"{got[0]:.1f}"
    return text if len(got) == len(values) else f"{text} ({len(got)}/{len(values)} reached)"


def table(rows: dict[str, list[dict]]) -> str:
    lines = [f"| variant | seeds | virtual s to {TARGET:.0%} mean accuracy | MB pulled to {TARGET:.0%} | MB pulled (run) "
             "| MB sent (run) | final mean accuracy |", "|---|---|---|---|---|---|---|"]
    for label, runs in rows.items():
        lines.append(f"| {label} | {len(runs)} | {_stat([r['time_to_target_s'] for r in runs])} | "
                     f"{_stat([r['mb_pulled_to_target'] for r in runs])} | {_stat([r['mb_pulled'] for r in runs])} | "
                     f"{_stat([r['mb_sent'] for r in runs])} | "
                     f"{np.mean([r['final_mean_accuracy'] for r in runs if r['final_mean_accuracy'] is not None]):.4f} |")
    return "\n".join(lines)


def ordering(rows: dict[str, list[dict]]) -> list[tuple[str, float | None]]:
    """Variants by mean time to the target (those that never reached it last)."""
    def mean_time(runs: list[dict]) -> float | None:
        times = [r["time_to_target_s"] for r in runs]
        return float(np.mean(times)) if times and all(t is not None for t in times) else None
    found = [(label, mean_time(runs)) for label, runs in rows.items()]
    return sorted(found, key=lambda item: (item[1] is None, item[1] or 0.0))


def plot(rows: dict[str, list[dict]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, runs in rows.items():
        for i, run in enumerate(runs):
            times, means = run["curve"]
            ax.plot(times, means, lw=1.3 if i == 0 else 0.8, alpha=1.0 if i == 0 else 0.45,
                    color=f"C{list(rows).index(label)}", label=label if i == 0 else None)
    ax.axhline(TARGET, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("mean global test accuracy over workers")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(name: str, rows: dict[str, list[dict]], out: Path, title: str) -> None:
    text = table(rows)
    order = ordering(rows)
    order_text = " < ".join(f"{label} ({t:.1f} s)" if t is not None else f"{label} (not reached)" for label, t in order)
    (out / f"{name}.md").write_text(text + f"\n\nOrdering by mean time to {TARGET:.0%}: {order_text}\n")
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / f"{name}_accuracy_vs_time.png", title)
    print(text)
    print(f"ordering: {order_text}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mpls"))
    parser.add_argument("--part", choices=["modes", "tau", "all"], default="all")
    parser.add_argument("--seeds", type=int, default=3, help="modes: seeds per mode")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="runs in parallel processes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every run")
    args = parser.parse_args(argv)
    if args.part in ("modes", "all"):
        rows = run_part("mpls_modes", MODES, args.out / "modes", args.seeds, args.workers, args.overrides)
        report("modes", rows, args.out / "modes", "MPLS and baselines, MNIST LeNet-5, 30 workers")
    if args.part in ("tau", "all"):
        rows = run_part("mpls_tau", TAUS, args.out / "tau", 1, args.workers, args.overrides)
        report("tau", rows, args.out / "tau", "MPLS tau sweep, chi = 0.7")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()

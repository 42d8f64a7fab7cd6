"""Moshpit all-reduce on MAR-FL's MNIST setting: its variants, and the comparison with gossip FedAvg and all-to-all.

    MESHFL_DATA=../shared/data python examples/moshpit_experiment.py --out runs/moshpit
    python examples/moshpit_experiment.py --set rounds=5 --workers 2        # a quick look

Every run uses examples/moshpit_mnist.yaml (16 peers, the CNN, MNIST, the same seed, data and local training):
- Moshpit (groups of 4, d = 2 rounds per iteration), with differential privacy at two noise levels
  (z = 0.5 and z = 1.0: epsilon at the end against accuracy), and with 10% churn (each peer sits out an
  iteration's averaging with probability 0.1);
- gossip FedAvg (`algorithm: gossip`, every peer in the train set) and all-to-all exchange (`algorithm: dpsgd`
  on the full graph with uniform weights: every peer sends its model to every other, each round).
Writes a table (final accuracy, bytes and model sizes sent per peer per aggregation, epsilon), the mean
accuracy against virtual time, and bytes per peer per aggregation as bars; run folders under <out>/runs/.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from meshfl.config import load_config  # noqa: E402
from meshfl.experiment.report import mean_of_latest  # noqa: E402
from meshfl.experiment.sweep import Axis, Plan, Point, Task, run_tasks, sweep_results, write_results  # noqa: E402
from meshfl.learn.saved import MODELS_DIR, model_paths, read_model  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "moshpit_mnist.yaml"

VARIANTS = {  # label -> overrides
    "Moshpit": [],
    "Moshpit, DP z=0.5": ["moshpit.dp.enabled=true", "moshpit.dp.noise_multiplier=0.5"],
    "Moshpit, DP z=1.0": ["moshpit.dp.enabled=true", "moshpit.dp.noise_multiplier=1.0"],
    "Moshpit, 10% churn": ["moshpit.dropout=0.1"],
    "gossip FedAvg": ["algorithm=gossip", "gossip.train_set_size=16"],
    "all-to-all": ["algorithm=dpsgd", "topology.kind=full", "dpsgd.mixing=uniform"],
}


def plan(variants: dict[str, list[str]], extra: list[str]) -> Plan:
    points, tasks = [], []
    for index, (label, overrides) in enumerate(variants.items()):
        points.append(Point(f"variant={label}", {"variant": label}, tuple(overrides)))
        config = load_config(CONFIG, [*overrides, *extra])
        safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in label)
        tasks.append(Task(index, config.seed, safe, config.model_dump(mode="json")))
    return Plan("moshpit", None, extra, [Axis("variant", tuple(variants))], points, [0], tasks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/moshpit"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="runs in parallel processes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every run")
    args = parser.parse_args(argv)
    the_plan = plan(VARIANTS, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    records, interrupted = run_tasks(the_plan.tasks, args.out, args.workers,
                                     on_result=lambda r: print(f"  {r['run_dir']}: {r['status']}", flush=True))
    write_results(sweep_results(the_plan, records, interrupted, {"experiment": "moshpit"}), args.out)
    rows = []
    for label, record in zip(VARIANTS, records, strict=True):
        if record.get("status") != "ok":
            rows.append({"variant": label, "status": record.get("status")})
            continue
        folder = args.out / record["run_dir"]
        events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((folder / "summary.json").read_text())
        layout_bytes = 4 * read_model(model_paths(folder / MODELS_DIR, 0)[0])[0].layout.numel
        per_peer = summary["total_bytes"] / summary["peers"] / summary["rounds"]
        epsilons = [e["value"] for e in events if e.get("metric") == "epsilon"]
        times, means = mean_of_latest(events, "global_accuracy", summary["peers"])
        rows.append({"variant": label, "status": "ok", "mean_final_accuracy": summary["mean_final_accuracy"],
                     "min_final_accuracy": summary["min_final_accuracy"], "mb_per_peer_per_aggregation": per_peer / 1e6,
                     "model_sizes_per_peer_per_aggregation": per_peer / layout_bytes,
                     "epsilon": max(epsilons) if epsilons else None, "virtual_time_s": summary["virtual_time_s"],
                     "curve": [times, means]})
    lines = ["| variant | mean final accuracy | min | MB sent per peer per aggregation | model sizes | epsilon | virtual s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['variant']} | {row['status']} | | | | | |")
            continue
        sizes = f"{row['model_sizes_per_peer_per_aggregation']:.2f}"
        eps = f"{row['epsilon']:.1f}" if row["epsilon"] is not None else "-"
        lines.append(f"| {row['variant']} | {row['mean_final_accuracy']:.4f} | {row['min_final_accuracy']:.4f} | "
                     f"{row['mb_per_peer_per_aggregation']:.2f} | {sizes} | {eps} | {row['virtual_time_s']:.1f} |")
    text = "\n".join(lines)
    (args.out / "moshpit.md").write_text(text + "\n")
    (args.out / "moshpit.json").write_text(json.dumps(rows, indent=2) + "\n")
    ok = [r for r in rows if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, row in enumerate(ok):
        left.plot(*row["curve"], lw=1.3, color=f"C{i}", label=row["variant"])
    left.set_xlabel("virtual time (s)")
    left.set_ylabel("mean global test accuracy")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    right.barh([r["variant"] for r in ok], [r["mb_per_peer_per_aggregation"] for r in ok], color=[f"C{i}" for i in range(len(ok))])
    right.set_xscale("log")
    right.set_xlabel("MB sent per peer per aggregation (log)")
    right.invert_yaxis()
    fig.tight_layout()
    fig.savefig(args.out / "moshpit_comparison.png", dpi=120)
    plt.close(fig)
    print(text)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()

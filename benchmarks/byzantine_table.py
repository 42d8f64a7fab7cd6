"""The Byzantine table: honest peers' final accuracy under lying peers, per aggregation rule.

    MESHFL_DATA=../shared/data python benchmarks/byzantine_table.py -o byz-table            # the whole table
    python benchmarks/byzantine_table.py --set data.dataset=digits --rounds 3 --counts 0,1 \\
        --behaviours sign_flip --rules fedavg,median --splits iid -o /tmp/t               # a small one

Simulator, gossip with `exchange: individual` (every peer aggregates the train set's individual
models itself), 10 peers, full topology, every peer trains each round. For each data split
(IID, Dirichlet 0.5), rule (fedavg, clip, median, trimmed_mean, krum) and Byzantine behaviour
(sign_flip x10, noise sigma 1, scale x100), runs 0..3 Byzantine peers (`faults: [{kind:
byzantine, count: N, at_s: 0}]`, drawn from the run seed; 0 is one clean run per rule and
split). "Honest accuracy" = mean final global accuracy over the peers no byzantine fault
targeted (`honest_mean_final_accuracy` of summary.json). Krum tolerates f = max count (3),
the trimmed mean drops 30% at each end; both need no knowledge of the actual count.

Each finished run is appended to `<out>/runs.jsonl` (a re-run skips those done: resumable);
at the end `<out>/table.md`, `<out>/table.json` and `<out>/byzantine.png` (honest accuracy vs
Byzantine peers, one line per rule, one panel per behaviour x split) are written and the
JSON is printed. Runs use one torch thread each (`--workers` processes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

RULES = ("fedavg", "clip", "median", "trimmed_mean", "krum")
BEHAVIOURS = ("sign_flip", "noise", "scale")
SPLITS = ("iid", "dirichlet")
PARAMETERS = {"sign_flip": "scale: 10", "noise": "sigma: 1.0", "scale": "scale: 100"}
RULE_SETTINGS = {"krum": ["gossip.aggregation.byzantine=3"], "trimmed_mean": ["gossip.aggregation.trim_fraction=0.3"]}


def base_overrides(args: argparse.Namespace) -> list[str]:
    data = Path(args.data) / "mnist"
    return ["name=byzantine_table", "peers=10", f"rounds={args.rounds}", "algorithm=gossip", "data.dataset=mnist",
            f"data.path={data}", "data.dirichlet_alpha=0.5", f"train.local_epochs={args.epochs}", "topology.kind=full",
            "gossip.train_set_size=10", "gossip.gossip_fanout=3", "gossip.exchange=individual",
            *([f"data.train_samples={args.train_samples}"] if args.train_samples else []), *args.set]


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    cells = []
    for split in args.splits:
        for rule in args.rules:
            for count in args.counts:
                for behaviour in (args.behaviours[:1] if count == 0 else args.behaviours):
                    cells.append({"split": split, "rule": rule, "behaviour": None if count == 0 else behaviour,
                                  "count": count, "first_behaviour": behaviour})
    return cells


def key(cell: dict[str, Any]) -> str:
    return f"{cell['split']}/{cell['rule']}/{cell['behaviour'] or 'none'}/{cell['count']}"


def run_cell(cell: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    import torch

    from meshfl.config import load_config
    from meshfl.experiment.run import simulate, summarise

    torch.set_num_threads(1)
    behaviour = cell["behaviour"] or cell["first_behaviour"]
    fault = f"{{kind: byzantine, behaviour: {behaviour}, {PARAMETERS.get(behaviour, '')}, count: {cell['count']}, at_s: 0}}"
    config = load_config(None, [*overrides, f"data.partition={cell['split']}", f"gossip.aggregation.rule={cell['rule']}",
                                *RULE_SETTINGS.get(cell["rule"], []), f"faults=[{fault.replace(', ,', ',')}]"])
    started = time.perf_counter()
    result, metrics, _ = simulate(config)
    wall = time.perf_counter() - started
    summary = summarise(config, result, metrics, wall)
    fallbacks = sum(1 for e in metrics.events if e.get("metric") == "aggregation_fallback")
    return {**{k: cell[k] for k in ("split", "rule", "behaviour", "count")},
            "honest_accuracy": summary["honest_mean_final_accuracy"], "honest_min": summary["honest_min_final_accuracy"],
            "byzantine_peers": summary["byzantine_peers"], "bytes_per_round": summary["total_bytes"] / config.rounds,
            "virtual_time_s": summary["virtual_time_s"], "wall_s": round(wall, 1), "fallbacks": fallbacks}


def _accuracy(done: dict[str, dict[str, Any]], split: str, rule: str, behaviour: str, count: int) -> float | None:
    found = done.get(f"{split}/{rule}/{'none' if count == 0 else behaviour}/{count}")
    return None if found is None else found["honest_accuracy"]


def table_markdown(done: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = []
    for split in args.splits:
        title = "IID" if split == "iid" else "Dirichlet 0.5"
        lines += [f"### {title}", "", "| behaviour | rule | " + " | ".join(f"{c} Byzantine" for c in args.counts) + " |",
                  "|---|---|" + "---:|" * len(args.counts)]
        for behaviour in args.behaviours:
            for rule in args.rules:
                values = [_accuracy(done, split, rule, behaviour, c) for c in args.counts]
                lines.append(f"| {behaviour} | {rule} | " + " | ".join("" if v is None else f"{v:.4f}" for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(done: dict[str, dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(args.splits), len(args.behaviours)
    figure, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for i, split in enumerate(args.splits):
        for j, behaviour in enumerate(args.behaviours):
            ax = axes[i][j]
            for rule in args.rules:
                points = [(c, _accuracy(done, split, rule, behaviour, c)) for c in args.counts]
                points = [(c, v) for c, v in points if v is not None]
                if points:
                    ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=rule)
            ax.set_title(f"{behaviour}, {'IID' if split == 'iid' else 'Dirichlet 0.5'}")
            ax.set_xticks(list(args.counts))
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if i == rows - 1:
                ax.set_xlabel("Byzantine peers of 10")
            if j == 0:
                ax.set_ylabel("honest peers' final accuracy")
    axes[0][0].legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("byzantine-table"))
    parser.add_argument("--data", default=os.environ.get("MESHFL_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=10000, help="data.train_samples (0: all 60,000)")
    parser.add_argument("--counts", default="0,1,2,3")
    parser.add_argument("--behaviours", default=",".join(BEHAVIOURS))
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--set", action="append", default=[], help="one more config override (repeatable)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    args.counts = [int(c) for c in args.counts.split(",")]
    args.behaviours, args.rules, args.splits = (v.split(",") for v in (args.behaviours, args.rules, args.splits))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            done[key({**record, "behaviour": record["behaviour"]})] = record
    todo = [c for c in plan(args) if key(c) not in done]
    overrides = base_overrides(args)
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_cell, cell, overrides): cell for cell in todo}
        for future in as_completed(futures):
            record = future.result()
            done[key(record)] = record
            with log.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
    table = table_markdown(done, args)
    (args.out / "table.md").write_text(table)
    plot(done, args, args.out / "byzantine.png")
    result = {"overrides": overrides, "runs": len(done), "ran_now": len(todo), "wall_s": round(time.perf_counter() - started, 1),
              "honest_accuracy": {k: v["honest_accuracy"] for k, v in sorted(done.items())}}
    (args.out / "table.json").write_text(json.dumps({**result, "records": list(done.values())}, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

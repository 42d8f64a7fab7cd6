"""The `meshfl` command: run experiments, show config fields."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from meshfl.config import ConfigError, ExperimentConfig, describe_fields, load_config

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="meshfl: federated learning with no single point of failure.")
console = Console()
errors = Console(stderr=True)


def _fields_help() -> str:
    """Every config field as `name = default: description`, one per line, for --help."""
    lines = [f"{name} = {default}: {description}" for name, default, description in describe_fields()]
    return "Config fields (set with --set key=value; `meshfl config` shows them as a table):\n\n" + "\n\n".join(lines)


def _fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class RoundProgress:
    """A progress bar per round showing the mean and minimum global accuracy of the peers."""

    def __init__(self, progress: Progress, config: ExperimentConfig) -> None:
        self._progress = progress
        self._peers = config.peers
        self._task = progress.add_task("round 0", total=config.rounds, mean="-", min="-")
        self._accuracy: dict[int, dict[int, float]] = {}
        self._done_rounds = 0

    def __call__(self, event: dict) -> None:
        if event["event"] != "metric" or event["metric"] != "global_accuracy":
            return
        per_round = self._accuracy.setdefault(event["round"], {})
        per_round[event["peer"]] = event["value"]
        if len(per_round) == self._peers and event["round"] > self._done_rounds:
            self._done_rounds = event["round"]
            values = [v for v in per_round.values() if not math.isnan(v)]
            self._progress.update(self._task, completed=self._done_rounds, description=f"round {self._done_rounds}",
                                  mean=f"{sum(values) / len(values):.4f}", min=f"{min(values):.4f}")


@app.command(epilog=_fields_help())
def run(
    config_path: Annotated[Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="experiment config; defaults are used for missing fields")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", metavar="KEY=VALUE", help="override a config field, e.g. --set peers=4 --set train.model=cnn")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (default runs/<time>-<name>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Run a simulated experiment and write its run folder (config, metrics, summary, plots, report)."""
    from meshfl.core.metrics import MetricsLog
    from meshfl.core.topology import TopologyError
    from meshfl.data import DataError
    from meshfl.experiment.run import default_run_dir, run_experiment

    try:
        config = load_config(config_path, set_)
    except ConfigError as exc:
        _fail(str(exc))
    run_dir = out or default_run_dir(config)
    metrics = MetricsLog()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("mean acc {task.fields[mean]}  min acc {task.fields[min]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
            metrics.subscribe(RoundProgress(progress, config))
            result = run_experiment(config, run_dir, metrics)
    except (DataError, TopologyError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; no run folder was written", code=130)
    summary = result.summary
    console.print(f"[bold]{config.peers} peers, {config.rounds} rounds[/]: mean final accuracy "
                  f"{summary['mean_final_accuracy']:.4f}, min {summary['min_final_accuracy']:.4f}, "
                  f"{summary['total_messages']} messages, {summary['total_bytes'] / 1e6:.1f} MB, "
                  f"virtual {summary['virtual_time_s']:.1f}s, wall {summary['wall_time_s']:.1f}s")
    console.print(f"run folder: {run_dir}  (report: {run_dir / 'report.html'})")


@app.command("config")
def show_config(
    config_path: Annotated[Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="show this config resolved instead of the defaults")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", metavar="KEY=VALUE", help="override a config field")] = [],  # noqa: B006
    yaml_out: Annotated[bool, typer.Option("--yaml", help="print the resolved config as YAML")] = False,
) -> None:
    """Show every config field with its value, default and description."""
    from meshfl.config import dump_config

    try:
        config = load_config(config_path, set_)
    except ConfigError as exc:
        _fail(str(exc))
    if yaml_out:
        console.print(dump_config(config), highlight=False, end="")
        return
    resolved = config.model_dump()
    table = Table("field", "value", "default", "description", show_lines=False)
    for name, default, description in describe_fields():
        value = resolved
        for key in name.split("."):
            value = value[key]
        table.add_row(name, repr(value), default, description)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

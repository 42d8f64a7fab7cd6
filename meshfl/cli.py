"""The `meshfl` command: run experiments, show config fields."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from meshfl.config import ConfigError, ExperimentConfig, describe_fields, load_config
from meshfl.experiment.progress import format_accuracy, simulate_with_progress

if TYPE_CHECKING:
    from meshfl.experiment.tracking import Tracking

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="meshfl: federated learning with no single point of failure.")
console = Console()
errors = Console(stderr=True)


def _fields_help() -> str:
    """Every config field as `name = default: description`, one per line, for --help."""
    lines = [f"{name} = {default}: {description}" for name, default, description in describe_fields()]
    return "Config fields (set with --set key=value; `meshfl config` shows them as a table):\n\n" + "\n\n".join(lines)


def _fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # a message's [..] is text, not markup
    raise typer.Exit(code)


def _acc(value: object) -> str:
    """An accuracy for a one-line report: 4 decimals, or - when there is none (null/NaN)."""
    return format_accuracy(value)


def _claim_run_dir(out: Optional[Path], config: ExperimentConfig) -> Path:
    """Refuse a device this machine lacks and an unusable --out before any work; claim the run folder."""
    from meshfl.experiment.run import RunDirError, claim_run_dir, device_error

    problem = device_error(config)
    if problem:
        _fail(problem)
    try:
        return claim_run_dir(out, config)
    except RunDirError as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


TENSORBOARD_HELP = "also write TensorBoard event files to <run folder>/tensorboard (needs: pip install 'meshfl[tensorboard]')"
MLFLOW_HELP = "also record the run in MLflow at this tracking URI, e.g. file:./mlruns (needs: pip install 'meshfl[mlflow]')"
WANDB_HELP = "also record the run with Weights & Biases, offline into <run folder>/wandb unless WANDB_MODE=online (needs: pip install 'meshfl[wandb]')"


def _tracking(tensorboard: bool, mlflow: Optional[str], wandb: bool = False) -> Tracking:
    """The tracking asked for on the command line; a missing package is one line and exit code 2, before any work."""
    from meshfl.experiment.tracking import Tracking, TrackingError, check_tracking

    tracking = Tracking(tensorboard, mlflow, wandb)
    try:
        check_tracking(tracking)
    except TrackingError as exc:
        _fail(str(exc))
    return tracking


def _tracked(tracking: Tracking, run_dir: Path, name: str) -> None:
    """Where the run's tracking records went (one line each)."""
    if tracking.tensorboard:
        console.print(f"tensorboard: {run_dir / 'tensorboard'}  (view: tensorboard --logdir {run_dir / 'tensorboard'})",
                      highlight=False, soft_wrap=True)
    if tracking.mlflow is not None:
        console.print(f"mlflow: run {run_dir.name} in experiment {name} at {tracking.mlflow}", highlight=False, soft_wrap=True)


@app.command(epilog=_fields_help())
def run(
    config_path: Annotated[Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="experiment config; defaults are used for missing fields")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", metavar="KEY=VALUE", help="override a config field, e.g. --set peers=4 --set train.model=cnn")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder, new or empty (default runs/<time>-<name>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help=TENSORBOARD_HELP)] = False,
    mlflow: Annotated[Optional[str], typer.Option("--mlflow", metavar="URI", help=MLFLOW_HELP)] = None,
    wandb: Annotated[bool, typer.Option("--wandb", help=WANDB_HELP)] = False,
) -> None:
    """Run a simulated experiment and write its run folder (config, metrics, summary, plots, report).

    Ctrl-C stops the simulation and still writes the run folder, marked interrupted (exit 130).
    """
    from meshfl.core.topology import TopologyError
    from meshfl.data import DataError
    from meshfl.experiment.run import RunInterrupted, discard_if_empty
    from meshfl.learn.models import ModelError

    try:
        config = load_config(config_path, set_)
    except ConfigError as exc:
        _fail(str(exc))
    tracking = _tracking(tensorboard, mlflow, wandb)
    run_dir = _claim_run_dir(out, config)
    try:
        result = simulate_with_progress(config, run_dir, console=console, show=not quiet, tracking=tracking)
    except (DataError, TopologyError, ModelError) as exc:
        discard_if_empty(run_dir)
        _fail(str(exc))
    except RunInterrupted as exc:
        summary = exc.result.summary
        _fail(f"interrupted; wrote what was recorded (mean accuracy {_acc(summary['mean_final_accuracy'])}) to "
              f"{run_dir}  (report: {run_dir / 'report.html'})", code=130)
    summary = result.summary
    console.print(f"[bold]{config.peers} peers, {config.rounds} rounds[/]: mean final accuracy "
                  f"{_acc(summary['mean_final_accuracy'])}, min {_acc(summary['min_final_accuracy'])}, "
                  f"{summary['total_messages']} messages, {summary['total_bytes'] / 1e6:.1f} MB, "
                  f"virtual {summary['virtual_time_s']:.1f}s, wall {summary['wall_time_s']:.1f}s")
    console.print(f"run folder: {run_dir}  (report: {run_dir / 'report.html'})")
    _tracked(tracking, run_dir, config.name)


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
    fields = describe_fields()
    longest = max(len(name) for name, _, _ in fields)
    field_column = Column("field", no_wrap=True, min_width=longest)  # a field name is what users copy: never cut
    table = Table(field_column, "value", "default", "description", show_lines=False)
    for name, default, description in fields:
        value = resolved
        for key in name.split("."):
            value = value[key]
        table.add_row(name, repr(value), default, description)
    console.print(table)


@app.command()
def chaos(
    algorithm: Annotated[str, typer.Option("--algorithm", "-a", help="registered algorithm to test")] = "gossip",
    schedules: Annotated[int, typer.Option("--schedules", "-n", help="number of random fault schedules; schedule i has seed SEED+i")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="seed of the first schedule; `--schedules 1 --seed S` re-runs the schedule with seed S alone")] = 0,
    peers: Annotated[int, typer.Option("--peers", help="peers per run")] = 6,
    rounds: Annotated[int, typer.Option("--rounds", help="rounds per run")] = 4,
    set_: Annotated[list[str], typer.Option("--set", "-s", metavar="KEY=VALUE", help="override a config field of every run (not seed, peers, rounds, algorithm, faults)")] = [],  # noqa: B006
    workers: Annotated[Optional[int], typer.Option("--workers", "-w", help="processes running schedules (default: CPU count; 1 runs them in this process)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="also write the JSON summary to this file")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="list every schedule in the JSON, not only the failed ones")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Run an algorithm in the simulator under random fault schedules and report hangs, NaN/Inf, exceptions and unfinished peers.

    Faults: crash (with or without restart, with or without a wiped store), store wipes, message
    loss up to 30%, partitions that heal, slow links and stragglers; one peer is never crashed.
    Each run is a small digits/MLP experiment with short timeouts and a virtual-time bound far
    above a healthy run (see meshfl/experiment/chaos.py). Prints one JSON summary; exits 1 if
    any schedule failed, printing the command that re-runs it alone, 2 on bad options.
    """
    import time as _time

    from meshfl.core.metrics import strict_json
    from meshfl.experiment import chaos as ch

    if schedules < 1:
        _fail(f"--schedules: must be >= 1 (got {schedules})")
    if seed < 0:
        _fail(f"--seed: must be >= 0 (got {seed})")
    if workers is not None and workers < 1:
        _fail(f"--workers: must be >= 1 (got {workers})")
    if out is not None and out.is_dir():
        _fail(f"--out {out}: is a folder; give a file name for the JSON summary")
    try:
        config = ch.chaos_config(algorithm, peers, rounds, set_)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc).splitlines()[0])
    n_workers = max(1, min(workers or os.cpu_count() or 1, schedules))
    started = _time.perf_counter()
    columns = (TextColumn("chaos"), BarColumn(), MofNCompleteColumn(), TextColumn("failed {task.fields[failed]}"),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=errors, disable=quiet or not errors.is_terminal, transient=True) as progress:
            task = progress.add_task("chaos", total=schedules, failed=0)
            failed = 0

            def advance(outcome: dict) -> None:
                nonlocal failed
                failed += not outcome["ok"]
                progress.update(task, advance=1, failed=failed)

            results = ch.run_schedules(config.model_dump(mode="json"), seed, schedules, n_workers, on_result=advance)
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    summary = ch.summarise_chaos(results, algorithm=algorithm, seed=seed, peers=peers, rounds=rounds, overrides=list(set_),
                                 config=config, workers=n_workers, wall_time_s=_time.perf_counter() - started, verbose=verbose)
    text = strict_json(summary, indent=2)
    print(text)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        except OSError as exc:
            _fail(f"--out {out}: cannot write ({exc.strerror or exc})")
    if summary["failed"]:
        counts = summary["counts"]
        errors.print(f"chaos: {counts['failed']} of {schedules} schedules failed ({counts['hangs']} hangs, {counts['nan']} NaN, "
                     f"{counts['exceptions']} exceptions, {counts['unfinished']} unfinished)", highlight=False, soft_wrap=True)
        for entry in summary["failed"][:5]:
            errors.print(f"  seed {entry['seed']}: {entry['error'].splitlines()[0] if entry['error'] else ''}", highlight=False, soft_wrap=True)
            errors.print(f"  reproduce: {entry['reproduce']}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def sweep(
    config_path: Annotated[Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="experiment config; defaults are used for missing fields")] = None,
    grid: Annotated[list[str], typer.Option("--grid", "-g", metavar="KEY=v1,v2,...", help="a grid axis: the sweep runs every combination of the axes' values (parsed like --set values)")] = [],  # noqa: B006
    seeds: Annotated[int, typer.Option("--seeds", "-n", help="run every point with seeds seed+0 .. seed+N-1")] = 1,
    set_: Annotated[list[str], typer.Option("--set", "-s", metavar="KEY=VALUE", help="override a config field of every run")] = [],  # noqa: B006
    workers: Annotated[Optional[int], typer.Option("--workers", "-w", help="processes running the runs (default: CPU count, at most the number of runs; 1 runs them in this process)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="sweep folder, new or empty (default runs/<time>-sweep-<name>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Run a grid of experiments (every combination of the --grid values, each for --seeds seeds) and compare them.

    Every point's config is checked before anything runs. Writes each run's folder under
    <out>/runs/<label>/, then sweep.json, table.csv (mean and std over seeds per point), plots
    and a self-contained sweep.html. Ctrl-C stops the runs, writes what finished and exits 130.
    """
    import time as _time

    from meshfl.experiment import sweep as sw

    if workers is not None and workers < 1:
        _fail(f"--workers: must be >= 1 (got {workers})")
    try:
        plan = sw.plan_sweep(config_path, set_, grid, seeds)
    except (ConfigError, sw.SweepError) as exc:
        _fail(str(exc).splitlines()[0])
    base = load_config(config_path, set_)
    out_dir = _claim_run_dir(out, base.model_copy(update={"name": f"sweep-{base.name}"}))
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(plan.tasks)))
    started = _time.perf_counter()
    columns = (TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("runs  failed {task.fields[failed]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=errors, disable=quiet or not errors.is_terminal, transient=True) as progress:
        task = progress.add_task("sweep", total=len(plan.tasks), failed=0)
        failed = 0

        def advance(record: dict) -> None:
            nonlocal failed
            failed += record["status"] == sw.FAILED
            progress.update(task, advance=1, failed=failed)

        records, interrupted = sw.run_tasks(plan.tasks, out_dir, n_workers, on_result=advance)
    meta = {"name": plan.name, "config": plan.config_path, "overrides": plan.overrides, "seeds": plan.seeds,
            "workers": n_workers, "wall_time_s": _time.perf_counter() - started}
    results = sw.sweep_results(plan, records, interrupted, meta)
    _write_results(results, out_dir)
    _finish(results, out_dir, "sweep")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="run folders (of meshfl run, launch, merge or a sweep's runs/)")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="folder for the comparison, new or empty (default runs/<time>-compare)")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", "-l", metavar="a,b,...", help="one label per run folder (default: the folder names)")] = None,
) -> None:
    """Put existing run folders side by side: the same table, plots and page as `meshfl sweep` (compare.json, compare.html)."""
    from meshfl.experiment import sweep as sw

    names = [name.strip() for name in labels.split(",")] if labels is not None else None
    try:
        results = sw.compare_results(run_dirs, names)
    except sw.SweepError as exc:
        _fail(str(exc))
    out_dir = _claim_run_dir(out, ExperimentConfig(name="compare"))
    _write_results(results, out_dir)
    _finish(results, out_dir, "compare")


def _write_results(results: object, out_dir: Path) -> None:
    import signal

    from meshfl.experiment.run import handle_signals
    from meshfl.experiment.sweep import write_results

    with handle_signals(signal.SIG_IGN, (signal.SIGINT,)):  # a second Ctrl-C must not lose what finished
        write_results(results, out_dir)  # type: ignore[arg-type]


def _finish(results: object, out_dir: Path, kind: str) -> None:
    from meshfl.experiment import sweep as sw

    assert isinstance(results, sw.Results)
    header, rows = sw.table_rows(results)
    names = {"mean_final_accuracy": "mean acc", "min_final_accuracy": "min acc", "virtual_time_s": "virtual s",
             "total_mb": "MB sent"}
    several = any(p["aggregate"]["seeds"] > 1 for p in results.points)
    table = Table(*results.keys, *[names[name] for name in sw.STATS],
                  title=f"{kind}: mean ± sample std over seeds" if several else kind)
    for point, row in zip(results.points, rows, strict=True):
        cells = []
        for name in sw.STATS:
            stat = point["aggregate"][name]
            cells.append(sw.fmt(stat["mean"], name) + (f" ± {sw.fmt(stat['std'], name, like=stat['mean'])}" if stat["std"] is not None else ""))
        table.add_row(*[str(v) for v in row[:len(results.keys)]], *cells)
    console.print(table)
    bad = [r for r in results.runs if r.get("status") == sw.FAILED]
    for run in bad[:5]:
        errors.print(f"  {run['run_dir']}: {run.get('error')}", highlight=False, soft_wrap=True)
    console.print(f"{kind} folder: {out_dir}  (page: {out_dir / (kind + '.html')}, table: {out_dir / 'table.csv'})",
                  highlight=False, soft_wrap=True)
    if results.interrupted:
        done = sum(r.get("status") == sw.OK for r in results.runs)
        _fail(f"interrupted; wrote the {done} of {len(results.runs)} runs that finished to {out_dir}", code=130)
    if bad:
        _fail(f"{len(bad)} of {len(results.runs)} runs failed (see {out_dir / (kind + '.json')})", code=1)


@app.command()
def node(
    config_path: Annotated[Path, typer.Option("--config", "-c", metavar="PEER.yaml", help="peer config (see `meshfl configs`)")],
    insecure: Annotated[bool, typer.Option("--insecure", help="allow plaintext or tls (no client certificates) on a non-loopback listen address; warns at start")] = False,
) -> None:
    """Run one real peer: serve gRPC, talk to its neighbours, run the algorithm, write metrics; SIGTERM stops it cleanly.

    Off loopback a peer needs mTLS (grpc.tls.mode=mtls) unless --insecure or grpc.insecure is given."""
    from meshfl.core.topology import TopologyError
    from meshfl.data import DataError
    from meshfl.experiment.launch import pin_to_configured_cpu
    from meshfl.runtime.grpc.peer_config import load_peer_config

    pin_to_configured_cpu()  # first, so every thread torch starts stays on the core
    try:
        peer_config = load_peer_config(config_path)
        from meshfl.runtime.grpc.node import run_node
        status = run_node(peer_config, config_path.resolve().parent, insecure=insecure)
    except (ConfigError, DataError, TopologyError, OSError) as exc:
        _fail(str(exc))
    errors.print(f"peer {peer_config.peer_id}: {status}", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # metrics are flushed and closed; skip torch's slow interpreter teardown (~1-2 s a peer)


@app.command()
def configs(
    config_path: Annotated[Optional[Path], typer.Argument(metavar="[EXPERIMENT.yaml]", help="experiment config; defaults are used for missing fields")] = None,
    peers: Annotated[Optional[int], typer.Option("--peers", "-n", help="number of peers (overrides the experiment's)")] = None,
    topology: Annotated[Optional[str], typer.Option("--topology", "-t", help="full, ring, line, star, grid, random or small_world (overrides the experiment's)")] = None,
    hosts: Annotated[str, typer.Option("--hosts", help="comma-separated host:baseport; peers are assigned round-robin, the k-th on a host gets baseport+k")] = "127.0.0.1:50100",
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for peer-<i>.yaml")] = Path("peers"),
    certs: Annotated[Optional[Path], typer.Option("--certs", help="folder written by `meshfl certs`: peers use mTLS with its ca.pem and peer-<i>.pem/.key")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="hosts off loopback without mTLS: plaintext (or the experiment's grpc.tls), every peer warns at start")] = False,
    set_: Annotated[list[str], typer.Option("--set", "-s", metavar="KEY=VALUE", help="override a config field")] = [],  # noqa: B006
) -> None:
    """Write one peer config per peer (neighbours from the topology, addresses from --hosts) for `meshfl node`.

    With a host off loopback and no --certs (nor mtls in the experiment), a CA and one certificate
    per peer are made in <out>/certs and every peer uses mTLS; --insecure writes plaintext instead."""
    from meshfl.core.topology import TopologyError
    from meshfl.experiment.launch import write_peer_configs

    overrides = list(set_)
    if peers is not None:
        overrides.append(f"peers={peers}")
    if topology is not None:
        overrides.append(f"topology.kind={topology}")
    try:
        config = load_config(config_path, overrides)
        written = write_peer_configs(config, [h for h in hosts.split(",") if h.strip()], out,
                                     certs_dir=certs.resolve() if certs else None, insecure=insecure)
    except (ConfigError, TopologyError, OSError) as exc:
        _fail(str(exc))
    if written.security == "insecure":
        errors.print("SECURITY WARNING: peers listen off loopback without mTLS (--insecure): anyone who can reach them can "
                     "read their traffic and send them messages as any peer; every peer will warn at start", highlight=False)
    elif written.security == "mtls-generated":
        console.print(f"made a CA and {config.peers} peer certificates in {written.certs_dir} (mTLS); give each host its "
                      f"peer-<i>.yaml with certs/ca.pem and certs/peer-<i>.pem/.key; keep certs/ca.key off the peers",
                      highlight=False, soft_wrap=True)
    console.print(f"wrote {len(written.paths)} peer configs to {out}; start each with: meshfl node --config {out}/peer-<i>.yaml",
                  highlight=False, soft_wrap=True)


@app.command()
def launch(
    config_path: Annotated[Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="experiment config; defaults are used for missing fields")] = None,
    local: Annotated[bool, typer.Option("--local", help="run every peer as a process on this host (grpc.host, ports grpc.base_port+i)")] = False,
    set_: Annotated[list[str], typer.Option("--set", "-s", metavar="KEY=VALUE", help="override a config field; with TLS, {peer} in grpc.tls.cert/key is each peer's id")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder, new or empty (default runs/<time>-<name>)")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="stop every peer and fail after this many seconds")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="allow grpc.host off loopback without mTLS; every peer warns at start")] = False,
    pin_cpus: Annotated[bool, typer.Option("--pin-cpus", help="--local: pin peer i to core i mod cores (and GPU i mod GPUs), to emulate many peers on one host")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help=TENSORBOARD_HELP)] = False,
    mlflow: Annotated[Optional[str], typer.Option("--mlflow", metavar="URI", help=MLFLOW_HELP)] = None,
    wandb: Annotated[bool, typer.Option("--wandb", help=WANDB_HELP)] = False,
) -> None:
    """Run an experiment with real peer processes talking gRPC, then write the same run folder as `meshfl run`.

    Ctrl-C stops every peer and still writes the merged run folder, marked interrupted (exit 130).
    """
    from meshfl.core.topology import TopologyError
    from meshfl.experiment.launch import Interrupted, LaunchError, launch_local
    from meshfl.experiment.run import discard_if_empty

    if not local:
        _fail("launch: only --local is supported so far (every peer on this host); use `meshfl configs` + `meshfl node` + `meshfl merge` across hosts")
    try:
        config = load_config(config_path, set_)
    except ConfigError as exc:
        _fail(str(exc))
    tracking = _tracking(tensorboard, mlflow, wandb)
    run_dir = _claim_run_dir(out, config)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("peers running {task.fields[running]}  mean acc {task.fields[mean]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
            task = progress.add_task("round 0", total=config.rounds, running=config.peers, mean="-")

            def show(rounds: int, running: int, mean: float) -> None:
                progress.update(task, completed=rounds, description=f"round {rounds}", running=running,
                                mean="-" if math.isnan(mean) else f"{mean:.4f}")

            result = launch_local(config, run_dir, timeout_s=timeout, progress=show, insecure=insecure, tracking=tracking,
                                  pin_cpus=pin_cpus)
    except (ConfigError, TopologyError, LaunchError) as exc:
        if not isinstance(exc, LaunchError):
            discard_if_empty(run_dir)
        _fail(str(exc), code=1 if isinstance(exc, LaunchError) else 2)
    except Interrupted as exc:
        if exc.result is None:
            _fail(f"interrupted; every peer was stopped (peer logs in {run_dir / 'peers'})", code=130)
        mean = _acc(exc.result.summary["mean_final_accuracy"])
        _fail(f"interrupted; every peer was stopped and their metrics merged (mean accuracy {mean}) into "
              f"{run_dir}  (report: {run_dir / 'report.html'})", code=130)
    except KeyboardInterrupt:
        _fail(f"interrupted; every peer was stopped (peer logs in {run_dir / 'peers'})", code=130)
    summary = result.summary
    dead = summary["dead_peers"]
    console.print(f"[bold]{config.peers} peers, {config.rounds} rounds over gRPC[/]: mean final accuracy "
                  f"{_acc(summary['mean_final_accuracy'])}, min {_acc(summary['min_final_accuracy'])}, "
                  f"{summary['total_messages']} messages, {summary['total_wire_bytes'] / 1e6:.1f} MB on the wire, "
                  f"{summary['total_refused']} refused, dead peers {dead or 'none'}, wall {summary['wall_time_s']:.1f}s")
    console.print(f"run folder: {run_dir}  (report: {run_dir / 'report.html'})")
    _tracked(tracking, run_dir, config.name)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="run folder of meshfl run, launch or merge")],
    peer: Annotated[int, typer.Option("--peer", "-p", help="the peer whose final model to export")],
    output: Annotated[Path, typer.Option("--output", "-o", help="file to write (.safetensors; the JSON record goes beside it as .json)")],
) -> None:
    """Export one peer's final model (safetensors, named tensors, provenance in the header and a JSON beside it).

    Load it with `meshfl.load_model(RUN_DIR, PEER, module)`, or any safetensors reader
    (`module.load_state_dict(safetensors.torch.load_file(FILE), strict=False)`).
    """
    import shutil

    from meshfl.learn.saved import SavedModelError, read_model, saved_model_path

    try:
        source = saved_model_path(run_dir, peer)
        _, record = read_model(source)
    except SavedModelError as exc:
        _fail(str(exc))
    if output.is_dir():
        _fail(f"--output {output}: is a folder; give a file name, e.g. {output / f'peer-{peer}.safetensors'}")
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, output)
    shutil.copyfile(source.with_suffix(".json"), output.with_suffix(".json"))
    console.print(f"peer {peer}, round {record.get('round')}, layout {record['layout']['fingerprint']} "
                  f"({len(record['layout']['names'])} tensors) -> {output}", highlight=False, soft_wrap=True)


@app.command()
def merge(
    folders: Annotated[list[Path], typer.Argument(metavar="PEER_DIR...", help="out_dir of each `meshfl node` peer (metrics.jsonl + config.yaml)")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder, new or empty (default runs/<time>-<name>)")] = None,
) -> None:
    """Merge the output folders of `meshfl node` peers (e.g. copied from several hosts) into one run folder and report."""
    from meshfl.experiment.launch import merge_peer_folders
    from meshfl.experiment.run import RunDirError

    try:
        result = merge_peer_folders(folders, out)
    except (ConfigError, RunDirError) as exc:
        _fail(str(exc))
    summary = result.summary
    console.print(f"[bold]{len(folders)} of {summary['peers']} peers merged[/]"
                  f"{' (interrupted run)' if summary.get('interrupted') else ''}: mean final accuracy "
                  f"{_acc(summary['mean_final_accuracy'])}, min {_acc(summary['min_final_accuracy'])}, "
                  f"dead peers {summary['dead_peers'] or 'none'}")
    console.print(f"run folder: {result.run_dir}  (report: {result.run_dir / 'report.html'})")


@app.command()
def certs(
    peers: Annotated[int, typer.Option("--peers", "-n", help="make certificates peer-0 .. peer-<N-1>")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for ca.pem and peer-<i>.pem/.key")] = Path("certs"),
    hosts: Annotated[str, typer.Option("--hosts", help="comma-separated IPs or DNS names the certificates are valid for (host:port also accepted)")] = "127.0.0.1,localhost",
) -> None:
    """Make a private CA, one certificate and one Ed25519 signing key per peer, and the CA-signed keyring."""
    from meshfl.runtime.grpc.certs import generate_deployment

    if peers < 1:
        _fail(f"--peers: must be >= 1 (got {peers})")
    names = sorted({_host_only(h) for h in hosts.split(",") if h.strip()})
    if not names:
        _fail("--hosts: give at least one IP or DNS name")
    try:
        made = generate_deployment(out, peers, names)
    except (ValueError, OSError) as exc:
        _fail(f"certs: {exc}")
    console.print(f"wrote {made['ca']}, {peers} peer certificates and signing keys, and {made['keyring']} to {out}; use them with "
                  f"--set grpc.tls.mode=mtls --set grpc.tls.ca={made['ca']} "
                  f"--set grpc.tls.cert={out}/peer-{{peer}}.pem --set grpc.tls.key={out}/peer-{{peer}}.key "
                  f"--set keys.keyring={made['keyring']} --set keys.signing_key={out}/peer-{{peer}}.sign.key",
                  highlight=False, soft_wrap=True)


def _host_only(entry: str) -> str:
    entry = entry.strip()
    host, sep, port = entry.rpartition(":")
    return host if sep and port.isdigit() and host and not host.endswith(":") else entry


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""Experiment tracking: a run's metrics as TensorBoard event files and an MLflow run.

One writer for both runtimes: it reads the run's events (what `metrics.jsonl` holds) and its
summary once the run folder is written (`write_run_folder` calls `write_tracking` last), so the
simulator, `launch --local` and an interrupted run give the same records.

- TensorBoard (`--tensorboard`, package tensorboardX): event files in `<run>/tensorboard/`
  (`tensorboard --logdir runs` shows every run). Scalars: each metric event that has a round
  and describes its own peer (no `about`), tagged `<metric>/peer_<i>` at step = round, and
  `<metric>/mean`, the mean over the peers' values of that round; the summary's numbers as
  `summary/<key>` (per-peer ones as `summary/<key>/peer_<i>`) at step = rounds; the config as
  hyperparameters (dotted keys) with the summary's mean/min final accuracy as their metrics,
  and as text.
- MLflow (`--mlflow URI`, package mlflow-skinny): one run in the experiment named after
  `name`, run name = the run folder's name; params = the config (dotted keys), metrics = the
  same scalars as TensorBoard (same tags), final metrics = the summary's numbers under their
  own keys (`mean_final_accuracy`, `final_global_accuracy/peer_<i>`, ...), tags (runtime, algorithm, seed, run folder), artifacts = the run folder's
  config.yaml, summary.json, partition.json, report.html and plots. A `file:` URI (or a plain
  path) is a local file store; MLflow 3 keeps those behind `MLFLOW_ALLOW_FILE_STORE`, which is
  set for the write.

Non-finite values (null in metrics.jsonl) are left out. A missing package is one line naming
the extra to install (`check_tracking`, before the run starts).
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshfl.config import ConfigError, ExperimentConfig, dump_config
from meshfl.core.metrics import METRIC

TENSORBOARD_DIR = "tensorboard"
ARTIFACTS = ("config.yaml", "summary.json", "partition.json", "report.html")
MLFLOW_BATCH = 500  # MLflow takes at most 1000 metrics and 100 params per log_batch call


class TrackingError(ConfigError):
    """Tracking cannot be done as asked (a package is missing); one line naming the fix."""


@dataclass(frozen=True)
class Tracking:
    """Where a run's metrics go besides its run folder.

    Attributes
    ----------
    tensorboard : bool
        Write TensorBoard event files to `<run>/tensorboard/`.
    mlflow : str or None
        MLflow tracking URI (`file:/path/mlruns`, a plain path, or a tracking server's http(s) URL).
    wandb : bool
        Record the run with Weights & Biases: offline into `<run>/wandb` unless WANDB_MODE says otherwise
        (`wandb sync` uploads it later).
    """

    tensorboard: bool = False
    mlflow: str | None = None
    wandb: bool = False

    def __bool__(self) -> bool:
        return self.tensorboard or self.mlflow is not None or self.wandb


def check_tracking(tracking: Tracking | None) -> None:
    """Raise TrackingError (one line) when a package that `tracking` needs is not installed.

    Parameters
    ----------
    tracking : Tracking or None
        What the run was asked to record.

    Raises
    ------
    TrackingError
        ``--tensorboard needs the tensorboardX package: pip install 'meshfl[tensorboard]'`` (or the
        same for ``--mlflow``).
    """
    if not tracking:
        return
    if tracking.tensorboard:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise TrackingError("--tensorboard needs the tensorboardX package: pip install 'meshfl[tensorboard]'") from None
    if tracking.mlflow is not None:
        if not tracking.mlflow.strip():
            raise TrackingError("--mlflow: give a tracking URI, e.g. file:./mlruns")
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise TrackingError("--mlflow needs the mlflow package (mlflow-skinny is enough): pip install 'meshfl[mlflow]'") from None
    if tracking.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TrackingError("--wandb needs the wandb package: pip install 'meshfl[wandb]'") from None


@dataclass(frozen=True)
class Scalar:
    """One scalar point for TensorBoard and MLflow.

    Attributes
    ----------
    tag : str
        `<metric>/peer_<i>` or `<metric>/mean`.
    step : int
        The round.
    value : float
        The value.
    unix_time : float
        When it was recorded (Unix time).
    """

    tag: str
    step: int
    value: float
    unix_time: float


def scalars(events: Iterable[dict[str, Any]], started_unix: float) -> list[Scalar]:
    """Every per-peer scalar (`<metric>/peer_<i>`) and each round's mean over peers (`<metric>/mean`).

    Parameters
    ----------
    events : iterable of dict
        A run's events (metrics.jsonl).
    started_unix : float
        Unix time of the run's start (an event's wall time is counted from it).

    Returns
    -------
    list of Scalar
        Per-peer scalars in event order, then the means by metric and round.
    """
    out: list[Scalar] = []
    by_round: dict[tuple[str, int], dict[int, tuple[float, float]]] = defaultdict(dict)
    for e in events:
        if e.get("event") != METRIC or "about" in e or not isinstance(e.get("round"), int):
            continue
        value = e.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        when = started_unix + float(e.get("wall_time", 0.0))
        out.append(Scalar(f"{e['metric']}/peer_{e['peer']}", e["round"], float(value), when))
        by_round[(e["metric"], e["round"])][e["peer"]] = (float(value), when)  # a peer's last value of the round
    for (metric, round_), values in sorted(by_round.items()):
        mean = sum(v for v, _ in values.values()) / len(values)
        out.append(Scalar(f"{metric}/mean", round_, mean, max(t for _, t in values.values())))
    return out


def summary_numbers(summary: dict[str, Any]) -> dict[str, float]:
    """Collect the summary's finite numbers: top-level ones by key, per-peer ones as `<key>/peer_<i>`.

    `peers`, `rounds`, `seed` and booleans are left out.
    """
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, bool) or key in ("peers", "rounds", "seed"):
            continue
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[key] = float(value)
        elif isinstance(value, dict):
            for peer, v in value.items():
                if str(peer).isdigit() and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    out[f"{key}/peer_{peer}"] = float(v)
    return out


def flat_config(config: ExperimentConfig) -> dict[str, str | int | float | bool]:
    """Flatten the config to dotted keys; values that are not a number, a string or a bool become their text."""
    out: dict[str, str | int | float | bool] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = "null" if value is None else str(value)

    walk("", config.model_dump(mode="json"))
    return out


def write_tracking(tracking: Tracking | None, run_dir: Path, config: ExperimentConfig, events: list[dict[str, Any]],
                   summary: dict[str, Any], *, runtime: str) -> dict[str, str]:
    """Write the run's TensorBoard event files and/or MLflow run, as `tracking` asks.

    Parameters
    ----------
    tracking : Tracking or None
        What to write (nothing when None or empty).
    run_dir : Path
        The run folder (TensorBoard files go into `<run_dir>/tensorboard`; MLflow artifacts come from it).
    config : ExperimentConfig
        The run's config (hyperparameters / params).
    events : list of dict
        The run's events, as in metrics.jsonl.
    summary : dict
        summary.json (final metrics).
    runtime : str
        ``"sim"`` or ``"grpc"`` (an MLflow tag).

    Returns
    -------
    dict of str to str
        ``{"tensorboard": folder, "mlflow": run id}`` for what was written.

    Raises
    ------
    TrackingError
        If a package that `tracking` needs is not installed (see `check_tracking`).
    """
    if not tracking:
        return {}
    check_tracking(tracking)
    started_unix = time.time() - float(summary.get("wall_time_s") or 0.0)
    points = scalars(events, started_unix)
    finals = summary_numbers(summary)
    written: dict[str, str] = {}
    if tracking.tensorboard:
        written["tensorboard"] = str(_tensorboard(run_dir / TENSORBOARD_DIR, config, points, finals, summary))
    if tracking.mlflow is not None:
        written["mlflow"] = _mlflow(tracking.mlflow, run_dir, config, points, finals, summary, runtime)
    if tracking.wandb:
        written["wandb"] = _wandb(run_dir, config, points, finals, runtime)
    return written


WANDB_DIR = "wandb"


def _wandb(run_dir: Path, config: ExperimentConfig, points: list[Scalar], finals: dict[str, float], runtime: str) -> str:
    """One W&B run per meshfl run, offline into <run>/wandb unless WANDB_MODE is set (e.g. online); returns its folder."""
    import wandb

    folder = run_dir / WANDB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "meshfl"), name=f"{config.name}-{run_dir.name}",
                     dir=str(folder), mode=os.environ.get("WANDB_MODE", "offline"), config=flat_config(config),
                     tags=[config.algorithm, runtime], reinit="create_new", settings=wandb.Settings(silent=True))
    try:
        for step in sorted({p.step for p in points}):
            run.log({p.tag: p.value for p in points if p.step == step}, step=step)
        run.summary.update(finals)
    finally:
        run.finish()
    return str(folder)


def _tensorboard(folder: Path, config: ExperimentConfig, points: list[Scalar], finals: dict[str, float],
                 summary: dict[str, Any]) -> Path:
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    folder.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(logdir=str(folder))
    try:
        for p in points:
            writer.add_scalar(p.tag, p.value, p.step, walltime=p.unix_time)
        for key, value in finals.items():
            writer.add_scalar(f"summary/{key}", value, config.rounds)
        final_metrics = {f"summary/{k}": finals[k] for k in ("mean_final_accuracy", "min_final_accuracy") if k in finals}
        experiment, start, end = hparams(flat_config(config), final_metrics)
        for item in (experiment, start, end):  # into this event file, not a new timestamped folder as add_hparams does
            writer.file_writer.add_summary(item)
        writer.add_text("config", "```yaml\n" + dump_config(config) + "```", 0)
    finally:
        writer.close()
    return folder


@contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set: set it while we write one."""
    if not uri.startswith("file:") or os.environ.get("MLFLOW_ALLOW_FILE_STORE") is not None:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def mlflow_uri(uri: str) -> str:
    """Turn a tracking URI into what MLflow takes: a plain path becomes a `file:` URI of its absolute path."""
    if "://" in uri or uri.startswith("file:"):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def _mlflow(uri: str, run_dir: Path, config: ExperimentConfig, points: list[Scalar], finals: dict[str, float],
            summary: dict[str, Any], runtime: str) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(uri)
    with _file_store_allowed(uri):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(config.name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(config.name)
        tags = {"meshfl.runtime": runtime, "meshfl.algorithm": config.algorithm, "meshfl.seed": str(config.seed),
                "meshfl.run_dir": str(run_dir.resolve()), "meshfl.interrupted": str(bool(summary.get("interrupted"))).lower()}
        run = client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        run_id = run.info.run_id
        status = "KILLED" if summary.get("interrupted") else "FINISHED"
        try:
            params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
            now_ms = int(time.time() * 1000)
            metrics = [Metric(_mlflow_key(p.tag), p.value, int(p.unix_time * 1000), p.step) for p in points]
            metrics += [Metric(_mlflow_key(k), v, now_ms, config.rounds) for k, v in finals.items()]
            for start in range(0, len(params), 100):
                client.log_batch(run_id, params=params[start:start + 100], synchronous=True)
            for start in range(0, len(metrics), MLFLOW_BATCH):
                client.log_batch(run_id, metrics=metrics[start:start + MLFLOW_BATCH], synchronous=True)
            client.log_batch(run_id, tags=[RunTag("mlflow.note.content", f"meshfl run folder: {run_dir.resolve()}")],
                             synchronous=True)
            for name in ARTIFACTS:
                if (run_dir / name).is_file():
                    client.log_artifact(run_id, str(run_dir / name))
            for plot in sorted(run_dir.glob("*.png")):
                client.log_artifact(run_id, str(plot), artifact_path="plots")
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status=status)
    return run_id


def _mlflow_key(tag: str) -> str:
    """MLflow metric names take letters, digits, `_ - . / ` and spaces: anything else becomes `_`."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in tag)

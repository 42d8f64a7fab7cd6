"""The Python API: what `meshfl run` and `meshfl launch --local` do, from a notebook or a script.

    import meshfl
    result = meshfl.run({"peers": 8, "rounds": 5}, model=MyNet, seed=1)
    result.summary["mean_final_accuracy"], result.metrics, result.final_models[0]
    net = meshfl.load_model(result.run_dir, 0, MyNet(...))

Both write the same run folder as the CLI and show the same progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshfl.config import ConfigError, ExperimentConfig, read_yaml_mapping
from meshfl.core.params import Params

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

ConfigLike = Mapping[str, Any] | str | Path | ExperimentConfig | None


@dataclass
class Result:
    """What a run leaves: its summary, metric events, final models and run folder.

    Attributes
    ----------
    config : ExperimentConfig
        The resolved config the run used (`config.yaml` in the run folder).
    summary : dict
        `summary.json` (final accuracies, status per peer, traffic, times).
    events : list of dict
        Every event of `metrics.jsonl`.
    final_models : dict of int to Params
        Each finished peer's final model (the one it last evaluated), flat with its layout.
    run_dir : Path or None
        The run folder written (None when `out=False`).
    """

    config: ExperimentConfig
    summary: dict[str, Any]
    events: list[dict[str, Any]] = field(repr=False)
    final_models: dict[int, Params] = field(repr=False)
    run_dir: Path | None

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """The metric events as a DataFrame: peer, metric, value, round, virtual_time, wall_time, ...

        Columns an algorithm never fills (e.g. `about`) are left out; a round-less event has NaN round.
        """
        import pandas as pd

        rows = [{k: v for k, v in e.items() if k != "event"} for e in self.events if e.get("event") == "metric"]
        frame = pd.DataFrame(rows)
        if "round" in frame:
            frame["round"] = frame["round"].astype("Int64")
        return frame

    def model(self, peer: int, module: nn.Module | Callable[..., nn.Module] | None = None) -> nn.Module:
        """Load peer `peer`'s final model into `module` (or a fresh one of the run's `train.model`), in eval mode.

        Parameters
        ----------
        peer : int
            A peer that finished (a key of `final_models`).
        module : torch.nn.Module, callable or None
            Where to load it: a module whose layout matches, a factory, or None for the run's own model.

        Returns
        -------
        torch.nn.Module
            `module` (or the one built) holding the final model, in inference mode (`module.eval`).

        Raises
        ------
        SavedModelError
            If `peer` has no final model, or the module's layout differs from it (the first difference named).
        ModelError
            If the module cannot be built from the factory or `train.model`.
        """
        from torch import nn

        from meshfl.learn.adapters import layout_of, load_into
        from meshfl.learn.models import build_model, is_keras_model, register_factory
        from meshfl.learn.saved import SavedModelError, layout_difference

        if peer not in self.final_models:
            raise SavedModelError(f"peer {peer} has no final model (finished peers: {sorted(self.final_models)})")
        params = self.final_models[peer]
        if module is None or not (isinstance(module, nn.Module) or is_keras_model(module)):
            name = self.config.train.model if module is None else register_factory(module)
            shape = self._data_shape()
            module = build_model(name, shape[0], shape[1], self.config.train.model_options if module is None else None)
        mine = layout_of(module)
        if mine.fingerprint != params.layout.fingerprint:
            raise SavedModelError(f"peer {peer}'s final model does not fit this module: {layout_difference(params.layout, mine)}")
        load_into(module, params)
        return module.eval()  # safe: nn.Module.eval() (inference mode), not Python's eval

    def _data_shape(self) -> tuple[tuple[int, ...], int]:
        if self.run_dir is not None:
            from meshfl.learn.saved import read_model, saved_model_path

            for peer in self.final_models:
                _, record = read_model(saved_model_path(self.run_dir, peer))
                return tuple(record["feature_shape"]), int(record["num_classes"])
        from meshfl.data import load_dataset

        train, _ = load_dataset(self.config.data, self.config.seed)
        return train.feature_shape, train.num_classes


def resolve_config(config: ConfigLike = None, *, model: Any = None, seed: int | None = None,
                   overrides: list[str] | tuple[str, ...] = (), loss: Any = None,
                   metrics: Mapping[str, Any] | None = None, train_step: Any = None) -> ExperimentConfig:
    """Build an ExperimentConfig from a dict, a YAML path, an ExperimentConfig or None (the defaults).

    Parameters
    ----------
    config : mapping, str, Path, ExperimentConfig or None
        Fields as in the YAML (nested dicts, or dotted keys such as ``"train.model"``).
    model : callable or str, optional
        Sets `train.model`: a `package.module:factory` string or a factory object (a class or
        function returning a `torch.nn.Module`). An object that cannot be imported by name
        (a lambda, a local function, one defined in `__main__`) works in this process only.
    seed : int, optional
        Sets `seed`.
    overrides : sequence of str
        ``key=value`` strings, as `--set` on the command line.
    loss : callable or str, optional
        Sets `train.loss`: ``(logits, labels) -> scalar tensor``, or ``"package.module:function"``.
    metrics : mapping of str to callable or str, optional
        Sets `train.metrics`: name -> ``(logits, labels) -> float``, logged as
        ``local_metric_<name>`` and ``global_metric_<name>``.
    train_step : callable or str, optional
        Sets `train.step`, your own local training step (see `meshfl.learn.steps`).

    Returns
    -------
    ExperimentConfig
        The validated config.

    Raises
    ------
    ConfigError
        One line naming the field at fault.
    """
    if isinstance(config, ExperimentConfig):
        tree: dict[str, Any] = config.model_dump(mode="json")
    elif isinstance(config, (str, Path)):
        tree = read_yaml_mapping(Path(config))
    elif config is None:
        tree = {}
    elif isinstance(config, Mapping):
        tree = {}
        for key, value in config.items():
            _put(tree, str(key), value)
    else:
        raise ConfigError(f"config: must be a dict, a YAML path or an ExperimentConfig (got {type(config).__name__})")
    extra = list(overrides)
    if seed is not None:
        _put(tree, "seed", seed)
    if model is not None:
        from meshfl.learn.models import register_factory

        _put(tree, "train.model", model if isinstance(model, str) else register_factory(model))
    if loss is not None or metrics is not None or train_step is not None:
        from meshfl.learn.models import register_function

        def ref(fn: Any, field: str, name: str | None = None) -> str:
            return fn if isinstance(fn, str) else register_function(fn, field, name)

        if loss is not None:
            _put(tree, "train.loss", ref(loss, "loss"))
        if metrics is not None:
            if not isinstance(metrics, Mapping):
                raise ConfigError(f"metrics: must be a mapping name -> function (got {type(metrics).__name__})")
            train = tree.setdefault("train", {})
            train["metrics"] = {str(k): ref(v, f"metrics.{k}", str(k)) for k, v in metrics.items()}
        if train_step is not None:
            _put(tree, "train.step", ref(train_step, "train_step"))
    return _validate(tree, extra)


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
        node = child
    if isinstance(value, Mapping) and isinstance(node.get(last), dict):
        for k, v in value.items():
            _put(node[last], str(k), v)
    else:
        node[last] = dict(value) if isinstance(value, Mapping) else value


def _validate(tree: dict[str, Any], overrides: list[str]) -> ExperimentConfig:
    from meshfl.config import config_from_tree

    return config_from_tree(tree, overrides)


def _tracking(tensorboard: bool, mlflow: str | None, out: str | Path | bool | None, wandb: bool = False) -> Any:
    """The Tracking asked for, checked (missing package, no run folder) before any run folder is claimed."""
    from meshfl.experiment.tracking import Tracking, TrackingError, check_tracking

    tracking = Tracking(bool(tensorboard), None if mlflow is None else str(mlflow), bool(wandb))
    check_tracking(tracking)
    if tracking and out is False:
        raise TrackingError("tensorboard/mlflow/wandb tracking needs a run folder (out=False writes none)")
    return tracking


def _frame_for_peers(dataset: Any) -> Any:
    """The DataFrame `launch` hands its peers as a file (None without one); ConfigError for other objects."""
    if dataset is None:
        return None
    import pandas as pd

    if not isinstance(dataset, pd.DataFrame):
        raise ConfigError(f"dataset: meshfl.launch takes a pandas DataFrame (got {type(dataset).__name__}); for other data "
                          "write it to a file (save_to_disk folder, .npz) and set data.dataset and data.path")
    return dataset


def _write_frame(frame: Any, run_dir: Path) -> Path:
    """`frame` as `<run_dir>/data/dataset.parquet` (column names as text, as Parquet needs); its absolute path."""
    path = (run_dir / "data" / "dataset.parquet").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.rename(columns=str).to_parquet(path, index=False)
    return path


def _run_dir(out: str | Path | bool | None, config: ExperimentConfig) -> Path | None:
    from meshfl.experiment.run import claim_run_dir, device_error

    problem = device_error(config)
    if problem:
        raise ConfigError(problem)
    if out is False:
        return None
    return claim_run_dir(None if out is None or out is True else Path(out), config)


def run(config: ConfigLike = None, *, model: Any = None, dataset: Any = None, out: str | Path | bool | None = None,
        seed: int | None = None, progress: bool = True, overrides: list[str] | tuple[str, ...] = (),
        report: bool = True, loss: Any = None, metrics: Mapping[str, Any] | None = None,
        train_step: Any = None, tensorboard: bool = False, mlflow: str | None = None, wandb: bool = False) -> Result:
    """Run an experiment in the simulator, as `meshfl run` does, and return its results.

    Parameters
    ----------
    config : dict, str, Path, ExperimentConfig or None
        The experiment: fields as in the YAML (a dict, dotted keys allowed), a YAML file, a
        typed config, or None for the defaults.
    model : callable or str, optional
        Your model: a class or function returning a `torch.nn.Module` (called with the
        `feature_shape` and `num_classes` it names), or ``"package.module:factory"``.
    dataset : pandas.DataFrame, datasets.Dataset or torch.utils.data.Dataset, optional
        Your data, one row per sample (see `meshfl.data.frame`): for a DataFrame or a Hugging Face
        Dataset `data.label_column` names the label column, every other column is a feature
        (image columns flattened; `data.feature_shape` reshapes them, e.g. [1, 8, 8]); a torch
        Dataset yields (features, int label) items and is read once. Partitioned among peers like
        the built-in datasets (`data.partition`).
    out : str, Path, bool or None
        Run folder, new or empty; None: ``runs/<time>-<name>``; False: write nothing.
    seed : int, optional
        The run seed (overrides `seed` of the config).
    progress : bool
        Show the round progress bar of `meshfl run`.
    overrides : sequence of str
        ``key=value`` overrides, as `--set`.
    report : bool
        Write the plots and `report.html` too.
    loss : callable or str, optional
        Your loss, ``(logits, labels) -> scalar tensor`` (default cross-entropy), for training and evaluation.
    metrics : mapping of str to callable or str, optional
        Extra metrics, name -> ``(logits, labels) -> float``, logged at each evaluation as
        ``local_metric_<name>`` and ``global_metric_<name>``.
    train_step : callable or str, optional
        Your own local training step, ``fn(module, batches, *, optimizer, loss, global_params, config)``
        (see `meshfl.learn.steps`); default meshfl's own loop.
    tensorboard : bool
        Also write TensorBoard event files to ``<run folder>/tensorboard`` (needs ``meshfl[tensorboard]``).
    mlflow : str, optional
        Also record the run in MLflow at this tracking URI, e.g. ``"file:./mlruns"`` (needs ``meshfl[mlflow]``).
    wandb : bool
        Also record the run with Weights & Biases, offline into ``<run folder>/wandb`` unless WANDB_MODE says
        otherwise (needs ``meshfl[wandb]``).

    Returns
    -------
    Result
        `.summary`, `.metrics` (DataFrame), `.final_models` ({peer: Params}), `.run_dir`,
        `.model(peer, module)`.

    Raises
    ------
    ConfigError, DataError, TopologyError, ModelError, RunDirError
        One line naming the field or folder at fault (all are ValueError).
    RunInterrupted
        Ctrl-C; the run folder is written, marked interrupted, and the exception's `result` holds it.
    """
    from meshfl.experiment.progress import simulate_with_progress
    from meshfl.experiment.run import discard_if_empty

    if dataset is not None:
        from meshfl.data.frame import register_dataset

        kind, key = register_dataset(dataset)
        overrides = [f"data.dataset={kind}", f"data.path={key}", *overrides]
    resolved = resolve_config(config, model=model, seed=seed, overrides=overrides, loss=loss, metrics=metrics,
                              train_step=train_step)
    tracking = _tracking(tensorboard, mlflow, out, wandb)
    run_dir = _run_dir(out, resolved)
    try:
        outcome = simulate_with_progress(resolved, run_dir, show=progress, report=report, tracking=tracking)
    except Exception:
        if run_dir is not None:
            discard_if_empty(run_dir)
        raise
    final = dict(outcome.sim.final_params) if outcome.sim is not None else {}
    return Result(resolved, outcome.summary, outcome.metrics.events, final, run_dir)


def launch(config: ConfigLike = None, *, model: Any = None, dataset: Any = None, out: str | Path | None = None,
           seed: int | None = None, progress: bool = True, overrides: list[str] | tuple[str, ...] = (),
           timeout_s: float | None = None, report: bool = True, loss: str | None = None,
           metrics: Mapping[str, str] | None = None, train_step: str | None = None, tensorboard: bool = False,
           mlflow: str | None = None, wandb: bool = False) -> Result:
    """Run an experiment as real peer processes on this host (`meshfl launch --local`) and return its results.

    Parameters
    ----------
    config : dict, str, Path, ExperimentConfig or None
        As for `run`.
    model : str or callable, optional
        ``"package.module:factory"``, importable by the peer processes (they get this
        process's import path); a factory object works only if importable by that name.
    dataset : pandas.DataFrame, optional
        Your data, as for `run`: written to ``<run folder>/data/dataset.parquet``, which the config
        then names (``data.dataset: parquet``), so every peer process reads the same rows.
    out : str, Path or None
        Run folder, new or empty; None: ``runs/<time>-<name>``.
    seed : int, optional
        The run seed.
    progress : bool
        Show the progress bar of `meshfl launch`.
    overrides : sequence of str
        ``key=value`` overrides, as `--set`.
    timeout_s : float, optional
        Stop every peer and raise LaunchError after this many seconds.
    report : bool
        Write the plots and `report.html` too.
    loss, metrics, train_step : str or mapping of str, optional
        As for `run`, as ``"package.module:function"`` references the peer processes can import.
    tensorboard, mlflow, wandb : bool, str, bool
        As for `run`: the merged metrics of every peer go to TensorBoard / MLflow / Weights & Biases.

    Returns
    -------
    Result
        As for `run`; `final_models` are read back from the run folder's `models/`.

    Raises
    ------
    ConfigError
        One line naming the field at fault (tracking too: `TrackingError`).
    LaunchError
        A peer failed or the launch timed out; raised after the run folder is written.
    Interrupted
        Ctrl-C or SIGTERM; every peer is stopped, the run folder is written (marked interrupted)
        and the exception's `result` holds it.
    """
    import math

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from meshfl.experiment.launch import launch_local
    from meshfl.learn.saved import read_model, saved_model_path, saved_peers

    resolved = resolve_config(config, model=model, seed=seed, overrides=overrides, loss=loss, metrics=metrics,
                              train_step=train_step)
    tracking = _tracking(tensorboard, mlflow, out, wandb)
    frame = _frame_for_peers(dataset)
    run_dir = _run_dir(out, resolved)
    assert run_dir is not None
    if frame is not None:  # peer processes cannot see this process's objects: they read the rows from a file
        resolved = resolve_config(resolved, overrides=["data.dataset=parquet", f"data.path={_write_frame(frame, run_dir)}"])
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("peers running {task.fields[running]}  mean acc {task.fields[mean]}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(), disable=not progress, transient=False) as bar:
        task = bar.add_task("round 0", total=resolved.rounds, running=resolved.peers, mean="-")

        def show(rounds: int, running: int, mean: float) -> None:
            bar.update(task, completed=rounds, description=f"round {rounds}", running=running,
                       mean="-" if math.isnan(mean) else f"{mean:.4f}")

        outcome = launch_local(resolved, run_dir, timeout_s=timeout_s, progress=show, report=report, tracking=tracking)
    final = {p: read_model(saved_model_path(run_dir, p))[0] for p in saved_peers(run_dir)}
    return Result(resolved, outcome.summary, outcome.events, final, run_dir)

"""Final models on disk: safetensors (one tensor per name) + a JSON with layout and provenance.

`<run>/models/peer-<i>.safetensors` holds peer i's final model (the one it last evaluated) as
named tensors, readable by any safetensors reader; `peer-<i>.json` beside it holds the layout
(names, shapes, fingerprint), the data shape the model was built for, and where it came from
(config hash, seed, round, peer, incarnation, algorithm, runtime, train.model). The same
provenance is in the safetensors header (`meshfl` key). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from meshfl.core.params import Layout, Params

MODELS_DIR = "models"
FORMAT = "meshfl-model/1"


class SavedModelError(ValueError):
    """A saved model that is missing or does not fit; the message is one line."""


def config_hash(config_text: str) -> str:
    """SHA-256 (16 hex) of the resolved config YAML: which experiment a model came from."""
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


def model_paths(folder: Path, peer: int) -> tuple[Path, Path]:
    """Give the paths of peer `peer`'s saved model in `folder`: `peer-<i>.safetensors` and `peer-<i>.json`."""
    return folder / f"peer-{peer}.safetensors", folder / f"peer-{peer}.json"


def provenance(config: Any, peer: int, *, round: int | None, incarnation: int, runtime: str,
               feature_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """Describe where a saved model came from, as its JSON records it.

    Parameters
    ----------
    config : ExperimentConfig
        The run's config (its hash, seed, algorithm, name and train.model are recorded).
    peer : int
        The peer.
    round : int or None
        The round of the model.
    incarnation : int
        The peer's incarnation.
    runtime : str
        The runtime that ran it.
    feature_shape : tuple[int, ...]
        The data shape the model was built for.
    num_classes : int
        Output classes.

    Returns
    -------
    dict[str, Any]
        The provenance record (JSON-ready).
    """
    from meshfl.config import dump_config

    return {"peer": peer, "round": round, "incarnation": incarnation, "runtime": runtime, "seed": config.seed,
            "algorithm": config.algorithm, "experiment": config.name, "config_hash": config_hash(dump_config(config)),
            "model": config.train.model, "model_options": dict(config.train.model_options),
            "feature_shape": list(feature_shape), "num_classes": num_classes}


def save_model(path: Path, params: Params, info: dict[str, Any]) -> None:
    """Write `path` (.safetensors) and the JSON beside it (same stem), each atomically (temp file + rename).

    Parameters
    ----------
    path : Path
        The .safetensors file; its folder is created if missing.
    params : Params
        The model.
    info : dict[str, Any]
        Provenance (see `provenance`), recorded with the format and the layout in both files.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = params.layout
    record = {"format": FORMAT, **info, "layout": {"fingerprint": layout.fingerprint, "names": list(layout.names),
                                                   "shapes": [list(s) for s in layout.shapes]}}
    tensors = {name: params.tensor(name).detach().cpu().clone().contiguous() for name in layout.names}
    temp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temp), metadata={"meshfl": json.dumps(record)})
    os.replace(temp, path)
    json_path = path.with_suffix(".json")
    temp_json = json_path.with_name(f".{json_path.name}.tmp")
    temp_json.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temp_json, json_path)


def read_model(path: Path) -> tuple[Params, dict[str, Any]]:
    """Read the Params and record of a saved .safetensors file (the record from its header).

    Raises
    ------
    SavedModelError
        If the file is missing, unreadable, not a meshfl model, or its layout does not match the
        fingerprint it records.
    """
    path = Path(path)
    if not path.is_file():
        raise SavedModelError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            record = json.loads((handle.metadata() or {}).get("meshfl", "null"))
            if not isinstance(record, dict) or "layout" not in record:
                raise SavedModelError(f"{path}: not a meshfl model (no layout in its safetensors header)")
            layout = Layout(tuple(record["layout"]["names"]), tuple(tuple(s) for s in record["layout"]["shapes"]))
            flat = torch.cat([handle.get_tensor(n).to(torch.float32).reshape(-1) for n in layout.names])
    except SavedModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file, one line
        raise SavedModelError(f"{path}: cannot read it as a meshfl safetensors model ({type(exc).__name__}: {exc})") from None
    if layout.fingerprint != record["layout"].get("fingerprint"):
        raise SavedModelError(f"{path}: its layout does not match the fingerprint it records")
    return Params(flat, layout), record


def write_final_models(folder: Path, config: Any, final_params: dict[int, Params], final_rounds: dict[int, int | None],
                       incarnations: dict[int, int], *, runtime: str, feature_shape: tuple[int, ...], num_classes: int) -> None:
    """Write every peer's final model into `folder` (`peer-<i>.safetensors` + `.json`).

    Parameters
    ----------
    folder : Path
        The models folder.
    config : ExperimentConfig
        The run's config (for the provenance).
    final_params : dict[int, Params]
        Each peer's final model.
    final_rounds : dict[int, int or None]
        Each peer's round of it.
    incarnations : dict[int, int]
        Each peer's incarnation (0 if missing).
    runtime : str
        The runtime that ran it.
    feature_shape : tuple[int, ...]
        The data shape the models were built for.
    num_classes : int
        Output classes.
    """
    for peer, params in sorted(final_params.items()):
        info = provenance(config, peer, round=final_rounds.get(peer), incarnation=incarnations.get(peer, 0),
                          runtime=runtime, feature_shape=feature_shape, num_classes=num_classes)
        save_model(model_paths(folder, peer)[0], params, info)


PEER_MODEL = "final_model.safetensors"
"""A `meshfl node` peer's final model in its own folder; `meshfl merge` collects it."""


def collect_models(peer_folders: dict[int, Path], run_dir: Path) -> list[int]:
    """Copy each peer folder's `final_model.safetensors` (+ .json) to `<run_dir>/models/peer-<i>.*`.

    Parameters
    ----------
    peer_folders : dict[int, Path]
        Each peer's own folder; one without a final model is skipped.
    run_dir : Path
        The run folder.

    Returns
    -------
    list[int]
        The peers copied.
    """
    copied = []
    for peer, folder in sorted(peer_folders.items()):
        source = Path(folder) / PEER_MODEL
        if not source.is_file():
            continue
        target, target_json = model_paths(Path(run_dir) / MODELS_DIR, peer)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        if source.with_suffix(".json").is_file():
            shutil.copyfile(source.with_suffix(".json"), target_json)
        copied.append(peer)
    return copied


def saved_peers(run_dir: Path) -> list[int]:
    """List the peers with a saved final model in `<run_dir>/models`, sorted."""
    folder = Path(run_dir) / MODELS_DIR
    found = []
    for path in folder.glob("peer-*.safetensors") if folder.is_dir() else ():
        suffix = path.stem.removeprefix("peer-")
        if suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def saved_model_path(run_dir: Path, peer: int) -> Path:
    """Give the path `<run_dir>/models/peer-<peer>.safetensors`.

    Raises
    ------
    SavedModelError
        If that file is missing; the message names the peers that have one.
    """
    path = model_paths(Path(run_dir) / MODELS_DIR, peer)[0]
    if not path.is_file():
        peers = saved_peers(run_dir)
        have = f"saved peers: {', '.join(map(str, peers))}" if peers else f"{Path(run_dir) / MODELS_DIR} holds no model"
        raise SavedModelError(f"{run_dir}: no final model of peer {peer} ({have})")
    return path


def load_model(run_dir: str | Path, peer: int, module: nn.Module | Callable[..., nn.Module] | None = None) -> nn.Module:
    """Load peer `peer`'s final model of a run folder into a module, in evaluation mode.

    Parameters
    ----------
    run_dir : str or Path
        A run folder written by `meshfl run`, `meshfl launch`, `meshfl merge` or `meshfl.run`.
    peer : int
        The peer whose final model to load.
    module : torch.nn.Module, callable or None
        The module to load into (its layout must match the saved one), or a factory called
        with the saved feature_shape and num_classes, or None to build the run's own
        `train.model` (which must be importable here).

    Returns
    -------
    torch.nn.Module
        `module` (or the one built) holding the saved parameters and buffers, in inference mode (`module.eval`).

    Raises
    ------
    SavedModelError
        No saved model for that peer, or the module's layout (parameter and buffer names
        and shapes) differs from the saved one; the message names the first difference.
    """
    params, record = read_model(saved_model_path(run_dir, peer))
    from meshfl.learn.models import is_keras_model

    if module is None or not (isinstance(module, nn.Module) or is_keras_model(module)):
        from meshfl.learn.models import build_model, register_factory

        name = record["model"] if module is None else register_factory(module)
        module = build_model(name, tuple(record["feature_shape"]), int(record["num_classes"]),
                             record.get("model_options") if module is None else None)
    from meshfl.learn.adapters import layout_of, load_into

    mine = layout_of(module)
    if mine.fingerprint != params.layout.fingerprint:
        raise SavedModelError(f"{run_dir}: peer {peer}'s saved model does not fit this module "
                              f"(layout {params.layout.fingerprint} vs {mine.fingerprint}: {layout_difference(params.layout, mine)})")
    load_into(module, params)
    return module.eval()  # safe: nn.Module.eval() (inference mode), not Python's eval


def layout_difference(saved: Layout, module: Layout) -> str:
    """Describe the first difference between two layouts, in words."""
    for i, (a, b) in enumerate(zip(zip(saved.names, saved.shapes, strict=True), zip(module.names, module.shapes, strict=True), strict=False)):
        if a != b:
            return f"tensor {i} is {a[0]} {list(a[1])} saved, {b[0]} {list(b[1])} in the module"
    return f"{len(saved.names)} tensors saved, {len(module.names)} in the module"

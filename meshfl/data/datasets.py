"""Datasets as two plain tensors, and the loaders that build them from `DataConfig`.

Every loader returns (train, global_test) with x already normalised, so the learners never
need to know where the data came from. Splits are drawn from numpy Generators derived from
the run seed, never from a global RNG, so a run is a pure function of (config, seed).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from meshfl.config import DataConfig


class DataError(ValueError):
    """User-fixable data problem; message is ONE line naming the field/variable and the fix."""


@dataclass(frozen=True)
class Dataset:
    """Features x (float32 [N, *feature_shape]) and labels y (int64 [N]) in 0..num_classes-1.

    Parameters
    ----------
    x : torch.Tensor
        Features, one row per sample; converted to contiguous float32.
    y : torch.Tensor
        Labels; converted to contiguous int64.
    num_classes : int
        Classes, >= 1.
    name : str
        Where the data came from, for messages.

    Raises
    ------
    ValueError
        If x and y disagree on N, y is not 1-D, num_classes < 1 or a label is outside 0..num_classes-1.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        # Coerce once here so every consumer can rely on dtype and layout.
        object.__setattr__(self, "x", self.x.to(torch.float32).contiguous())
        object.__setattr__(self, "y", self.y.to(torch.int64).contiguous())
        if self.y.ndim != 1 or self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"Dataset {self.name}: x {tuple(self.x.shape)} and y {tuple(self.y.shape)} disagree on N")
        if self.num_classes < 1:
            raise ValueError(f"Dataset {self.name}: num_classes must be >= 1")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise ValueError(f"Dataset {self.name}: labels must lie in 0..{self.num_classes - 1}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        return tuple(self.x.shape[1:])

    def subset(self, indices: np.ndarray | torch.Tensor) -> Dataset:
        """A copy holding only `indices`; num_classes is kept so label vectors stay aligned."""
        if isinstance(indices, torch.Tensor):
            idx = indices.to(torch.int64)
        else:
            idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.name)


def load_dataset(config: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """Build (train, global_test) for `config.dataset`, features normalised.

    Parameters
    ----------
    config : DataConfig
        The data section: dataset, path and how to read it.
    seed : int
        The run seed; the held-out split draws from a generator derived from it.

    Returns
    -------
    tuple[Dataset, Dataset]
        The training set and the global test set.

    Raises
    ------
    DataError
        On user-fixable problems (one line naming the field and the fix).
    """
    if config.dataset == "mnist":
        from meshfl.data.mnist import load_mnist

        return load_mnist(config)
    rng = np.random.default_rng([seed, 0])
    if config.dataset == "digits":
        x, y = _digits_arrays()
        return _hold_out(x, y, 10, "digits", config.test_fraction, rng)
    if config.dataset == "dataframe":
        from meshfl.data.frame import registered

        frame, name = registered(config.path, "dataframe")
        return _table_datasets(frame, config, rng, name, "the DataFrame")
    if config.dataset == "sql":
        from meshfl.data.sources import read_sql_frame

        frame, name, where = read_sql_frame(config)
        return _table_datasets(frame, config, rng, name, where)
    if config.dataset == "huggingface":
        return _load_huggingface(config, rng)
    if config.dataset == "torch":
        from meshfl.data.frame import registered

        (x, y), name = registered(config.path, "torch")
        return _hold_out(_shaped(x, config, "the torch Dataset", flat=False), y, int(y.max()) + 1, name,
                         config.test_fraction, rng)
    path = _require_path(config)
    if config.dataset == "numpy":
        return _load_npz(path, config.test_fraction, rng)
    return _load_table(path, config, rng)


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices by class: each class gives ~`fraction` of its samples to the held-out part, keeping at least one.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        Sorted `(keep, held_out)` indices.
    """
    n = len(labels)
    order = np.lexsort((rng.random(n), labels))  # grouped by class, random within class
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, n])
    n_out = np.minimum(np.floor(fraction * sizes + 0.5).astype(np.int64), sizes - 1)
    rank = np.arange(n) - np.repeat(starts, sizes)
    held = rank < np.repeat(n_out, sizes)
    return np.sort(order[~held]), np.sort(order[held])


def _hold_out(
    x: np.ndarray, y: np.ndarray, num_classes: int, name: str, fraction: float, rng: np.random.Generator
) -> tuple[Dataset, Dataset]:
    keep, held = stratified_split(y, fraction, rng)
    if len(held) == 0:
        raise DataError(f"data.test_fraction: {fraction} of {len(y)} samples holds out nothing; raise it or use more data")
    # Fancy indexing copies, so the tensors never alias a cached read-only array.
    train = Dataset(torch.from_numpy(x[keep]), torch.from_numpy(y[keep]), num_classes, name)
    test = Dataset(torch.from_numpy(x[held]), torch.from_numpy(y[held]), num_classes, name)
    return train, test


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits of sklearn scaled to [0, 1]; cached because tests and sweeps reload it often."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _require_path(config: DataConfig) -> Path:
    if not config.path:
        raise DataError(f"data.path: required for dataset={config.dataset}; set it to the input file")
    path = Path(config.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path: file {path} does not exist (dataset={config.dataset})")
    return path


# ---------------------------------------------------------------- numpy .npz


def _load_npz(path: Path, fraction: float, rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    arrays = _read_npz(path)
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"data.path: {path} must contain arrays 'x' and 'y' (found {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"data.path: {path} has only one of 'x_test'/'y_test'; provide both or neither")
    x, y = _npz_pair(path, arrays["x"], arrays["y"], "x", "y")
    name = path.stem
    if "x_test" not in arrays:
        return _hold_out(x, y, int(y.max()) + 1, name, fraction, rng)
    xt, yt = _npz_pair(path, arrays["x_test"], arrays["y_test"], "x_test", "y_test")
    if xt.shape[1:] != x.shape[1:]:
        raise DataError(f"data.path: {path} x_test feature shape {xt.shape[1:]} differs from x {x.shape[1:]}")
    num_classes = int(max(y.max(), yt.max())) + 1
    return (Dataset(torch.from_numpy(x), torch.from_numpy(y), num_classes, name),
            Dataset(torch.from_numpy(xt), torch.from_numpy(yt), num_classes, name))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array eagerly with allow_pickle=False: an .npz must never execute code."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"data.path: {path} is not a readable .npz without pickled objects ({_first_line(exc)})") from None


def _npz_pair(path: Path, x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if y.ndim != 1 or x.shape[0] != y.shape[0] or len(y) == 0:
        raise DataError(f"data.path: {path} needs '{yname}' 1-D with one label per row of '{xname}' (got {x.shape}, {y.shape})")
    if not np.issubdtype(x.dtype, np.number) and x.dtype != np.bool_:
        raise DataError(f"data.path: {path} array '{xname}' must be numeric (got dtype {x.dtype})")
    labels = _integer_labels(y)
    if labels is None:
        raise DataError(f"data.path: {path} array '{yname}' must hold non-negative integer class labels")
    return np.ascontiguousarray(x, dtype=np.float32), labels


def _integer_labels(y: np.ndarray) -> np.ndarray | None:
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        labels = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        labels = y.astype(np.int64)
    else:
        return None
    return labels if labels.min() >= 0 else None


# ---------------------------------------------------------------- csv / parquet / json / jsonl (and DataFrame, SQL)


def _load_table(path: Path, config: DataConfig, rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    return _table_datasets(_read_table(path, config.dataset), config, rng, path.stem, path)


def _table_datasets(frame, config: DataConfig, rng: np.random.Generator, name: str,
                    where: object) -> tuple[Dataset, Dataset]:
    """(train, global_test) from a table: labels from data.label_column, every other column a feature."""
    column = config.label_column
    if len(frame) == 0:
        raise DataError(f"data: {where} has no rows")
    if column not in frame.columns:
        raise DataError(f"data.label_column: {column!r} is not a column of {where} (columns: {list(map(str, frame.columns))})")
    labels, num_classes = _encode_labels(frame[column], column, where)
    x = _numeric_features(frame.drop(columns=[column]), where)
    return _hold_out(_shaped(x, config, where), labels, num_classes, name, config.test_fraction, rng)


def _shaped(x: np.ndarray, config: DataConfig, where: object, flat: bool = True) -> np.ndarray:
    """Reshape x per sample to data.feature_shape when set (x is [N, features] when flat)."""
    if config.feature_shape is None:
        return x
    shape = tuple(config.feature_shape)
    have = int(np.prod(x.shape[1:]))
    if int(np.prod(shape)) != have:
        what = "feature columns" if flat else f"features per sample (shape {list(x.shape[1:])})"
        raise DataError(f"data.feature_shape: {list(shape)} holds {int(np.prod(shape))} values, but {where} has "
                        f"{have} {what}")
    return x.reshape(len(x), *shape)


def _load_huggingface(config: DataConfig, rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    from meshfl.data.sources import load_huggingface

    obj = None
    if config.path and config.path.startswith("python:"):
        from meshfl.data.frame import registered

        obj, _ = registered(config.path, "huggingface")
    x, y, num_classes, name, test = load_huggingface(config, obj)
    where = "the datasets.Dataset" if obj is not None else config.path
    x = _shaped(x, config, where)
    if test is None:
        return _hold_out(x, y, num_classes, name, config.test_fraction, rng)
    xt = _shaped(test[0], config, where)
    return (Dataset(torch.from_numpy(x), torch.from_numpy(y), num_classes, name),
            Dataset(torch.from_numpy(xt), torch.from_numpy(test[1]), num_classes, name))


def _read_table(path: Path, kind: str):  # -> pandas.DataFrame (pandas imported lazily)
    import pandas as pd

    try:
        if kind == "csv":
            frame = pd.read_csv(path)
        elif kind == "parquet":
            frame = pd.read_parquet(path)
        else:  # jsonl: one record per line; json: an array of records
            frame = pd.read_json(path, lines=kind == "jsonl", orient="records", dtype=False)
    except ImportError as exc:
        raise DataError(f"data.dataset=parquet needs pyarrow or fastparquet: pip install pyarrow ({_first_line(exc)})") from None
    except Exception as exc:  # pandas/pyarrow raise many types for a malformed file
        raise DataError(f"data.path: cannot read {path} as {kind} ({_first_line(exc)})") from None
    if len(frame) == 0:
        raise DataError(f"data.path: {path} has no rows")
    return frame


def _encode_labels(series, column: str, path: object) -> tuple[np.ndarray, int]:
    """Map the sorted unique label values to 0..K-1, so strings and sparse ints both work."""
    import pandas as pd

    try:
        codes, uniques = pd.factorize(series, sort=True)
    except TypeError:
        raise DataError(
            f"data.label_column: column {column!r} of {path} mixes label types; use all ints or all strings") from None
    if (codes < 0).any():
        raise DataError(f"data.label_column: column {column!r} of {path} has missing labels; drop or fill those rows")
    return codes.astype(np.int64), len(uniques)


def _numeric_features(frame, path: object) -> np.ndarray:
    import pandas as pd

    if frame.shape[1] == 0:
        raise DataError(f"data.path: {path} has no feature columns besides data.label_column")
    for name in frame.columns:
        col = frame[name]
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            raise DataError(f"data.path: column {str(name)!r} of {path} is not numeric (dtype {col.dtype}); encode or drop it")
        if col.isna().any():
            raise DataError(f"data.path: column {str(name)!r} of {path} has missing values; fill or drop them")
    return np.ascontiguousarray(frame.to_numpy(dtype=np.float32))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

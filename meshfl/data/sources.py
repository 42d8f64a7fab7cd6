"""Data sources beyond files of arrays and tables: SQL databases, Hugging Face datasets, torch Datasets.

Each turns its source into numpy arrays (or a DataFrame for the table path in datasets.py) once;
`datasets.load_dataset` then holds out the global test set and partitioning works as for every
other source. Optional packages (SQLAlchemy, datasets) are imported only here, lazily, and a
missing one is one line naming `pip install 'meshfl[data]'`. Nothing here downloads.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from meshfl.config import DataConfig
from meshfl.data.datasets import DataError, _encode_labels, _first_line

_INSTALL = "pip install 'meshfl[data]'"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_SELECT = re.compile(r"^\s*(select|with)\b", re.IGNORECASE)


def _need(module: str, kind: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"data.dataset={kind} needs the optional package {module}: {_INSTALL}") from None


# ---------------------------------------------------------------- sql


def read_sql_frame(config: DataConfig):  # -> (pandas.DataFrame, name, where)
    """Read the rows of table `data.query` (a name) or of the SELECT in `data.query`, from the database at `data.path`.

    Parameters
    ----------
    config : DataConfig
        `path` (a SQLAlchemy URL) and `query`.

    Returns
    -------
    tuple
        `(frame, name, where)`: the pandas DataFrame, a name for the data (the table, or "sql")
        and a description of where it came from, for messages.

    Raises
    ------
    DataError
        If sqlalchemy is missing, path or query is missing or malformed, a SQLite file does not
        exist, the read fails, or it returns no rows.
    """
    import pandas as pd

    sqlalchemy = _need("sqlalchemy", "sql")
    if not config.path:
        raise DataError("data.path: required for dataset=sql; set it to a SQLAlchemy URL, e.g. sqlite:////abs/data.db")
    if not config.query:
        raise DataError("data.query: required for dataset=sql; set it to a table name or a SELECT statement")
    try:
        url = sqlalchemy.engine.make_url(config.path)
    except Exception as exc:
        raise DataError(f"data.path: not a SQLAlchemy URL ({_first_line(exc)}); e.g. sqlite:////abs/data.db") from None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":  # sqlite would silently create an empty database
        if not url.database or url.database == ":memory:" or not Path(url.database).is_file():
            raise DataError(f"data.path: {shown} names no existing SQLite file")
    query = config.query.strip()
    is_table = bool(_IDENTIFIER.match(query))
    if not is_table and not _SELECT.match(query):
        raise DataError("data.query: must be a table name or a SELECT (or WITH ... SELECT) statement")
    where = f"table {query}" if is_table else "data.query"
    try:
        engine = sqlalchemy.create_engine(url)
    except Exception as exc:
        raise DataError(f"data.path: cannot use {shown} ({_first_line(exc)})") from None
    try:
        with engine.connect() as conn:
            if is_table:
                schema, _, table = query.rpartition(".")
                frame = pd.read_sql_table(table, conn, schema=schema or None)
            else:
                frame = pd.read_sql_query(sqlalchemy.text(query), conn)
    except ValueError as exc:
        raise DataError(f"data.query: {_first_line(exc)} in {shown}") from None
    except Exception as exc:  # driver errors: bad SQL, unreachable server, missing table
        raise DataError(f"data.query: cannot read {where} from {shown} ({_first_line(exc)})") from None
    finally:
        engine.dispose()
    if len(frame) == 0:
        raise DataError(f"data.query: {where} in {shown} returned no rows")
    return frame, (query if is_table else "sql"), where


# ---------------------------------------------------------------- huggingface


def huggingface_fingerprint(ds: Any) -> str:
    """Hash the content of a datasets.Dataset (its Arrow table and features), for a stable config.

    Returns
    -------
    str
        SHA-256, hex.
    """
    import pyarrow as pa

    table = ds.with_format(None).data.table
    if ds._indices is not None:  # a select()/shuffle() view: hash the rows it shows
        table = ds.flatten_indices().data.table
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    content = hashlib.sha256(sink.getvalue().to_pybytes())
    content.update(repr(ds.features).encode())
    return content.hexdigest()


def load_huggingface(config: DataConfig, obj: Any | None):
    """Read arrays from a Dataset object or a save_to_disk folder in data.path.

    Parameters
    ----------
    config : DataConfig
        `path` (used when `obj` is None) and `label_column`.
    obj : datasets.Dataset or None
        A Dataset given to `meshfl.run`, or None to load `data.path`.

    Returns
    -------
    tuple
        `(x, y, num_classes, name, test)`; test is None, or `(x, y)` from the folder's "test"
        split when it is a DatasetDict.

    Raises
    ------
    DataError
        If `datasets` is missing, the folder is missing or not a save_to_disk folder (or has no
        "train" split), or the columns cannot become numeric features and labels.
    """
    datasets = _need("datasets", "huggingface")
    test = None
    if obj is None:
        if not config.path:
            raise DataError("data.path: required for dataset=huggingface; set it to a folder written by save_to_disk")
        folder = Path(config.path).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.path: folder {folder} does not exist (dataset=huggingface, written by save_to_disk)")
        try:
            obj = datasets.load_from_disk(str(folder))
        except Exception as exc:
            raise DataError(f"data.path: {folder} is not a save_to_disk folder ({_first_line(exc)})") from None
        name, where = folder.name, str(folder)
        if isinstance(obj, datasets.DatasetDict):
            if "train" not in obj:
                raise DataError(f"data.path: {folder} holds splits {sorted(obj)}, none named 'train'")
            test = obj["test"] if "test" in obj else None
            obj = obj["train"]
    else:
        name, where = "huggingface", "the datasets.Dataset"
    x, y, num_classes = _hf_arrays(obj, config, where)
    if test is not None:
        xt, yt, kt = _hf_arrays(test, config, f"{where} (test split)")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"data.path: the test split of {where} has features {xt.shape[1:]}, train {x.shape[1:]}")
        num_classes = max(num_classes, kt)
        test = (xt, yt)
    return x, y, num_classes, name, test


def _hf_arrays(ds: Any, config: DataConfig, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    import pandas as pd
    from datasets import ClassLabel, Image

    column = config.label_column
    if len(ds) == 0:
        raise DataError(f"data: {where} has no rows")
    if column not in ds.column_names:
        raise DataError(f"data.label_column: {column!r} is not a column of {where} (columns: {ds.column_names})")
    label_feature = ds.features[column]
    raw = np.asarray(ds.with_format("numpy", columns=[column])[:][column])
    if isinstance(label_feature, ClassLabel):
        labels, num_classes = raw.astype(np.int64), int(label_feature.num_classes)
        if (labels < 0).any():
            raise DataError(f"data.label_column: column {column!r} of {where} has missing labels (-1)")
    else:
        labels, num_classes = _encode_labels(pd.Series(raw), column, where)
    parts = []
    for name in ds.column_names:
        if name == column:
            continue
        values = ds.with_format("numpy", columns=[name])[:][name]
        array = np.asarray(values) if not isinstance(values, list) else np.asarray(values, dtype=object)
        if array.dtype == object:
            raise DataError(f"data.path: column {name!r} of {where} has rows of different shapes (resize the images first)")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise DataError(f"data.path: column {name!r} of {where} is not numeric (dtype {array.dtype}); "
                            f"encode it or remove it with dataset.remove_columns")
        array = array.reshape(len(ds), -1).astype(np.float32)
        if isinstance(ds.features[name], Image):
            array /= 255.0  # 8-bit pixels to [0, 1], as the built-in image datasets
        if not np.isfinite(array).all():
            raise DataError(f"data.path: column {name!r} of {where} has missing or infinite values")
        parts.append(array)
    if not parts:
        raise DataError(f"data.path: {where} has no feature columns besides data.label_column")
    return np.ascontiguousarray(np.concatenate(parts, axis=1)), labels, num_classes


# ---------------------------------------------------------------- torch


def materialise_torch(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Read every (features, label) item of a map-style torch Dataset once into two arrays.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        Features (float32, one row per item) and int64 labels.

    Raises
    ------
    DataError
        If the Dataset has no length or is empty, an item is not (features, label), shapes differ,
        a label is not a non-negative class integer, or a feature is missing or infinite.
    """
    import torch

    try:
        n = len(ds)
    except TypeError:
        raise DataError("dataset: a torch Dataset must have a length (map-style, not an IterableDataset)") from None
    if n == 0:
        raise DataError("dataset: the torch Dataset is empty")
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"dataset: item {i} of the torch Dataset must be (features, label), got {type(item).__name__}")
        x = torch.as_tensor(item[0])
        label = torch.as_tensor(item[1])
        if label.numel() != 1 or label.is_floating_point() and float(label) != round(float(label)):
            raise DataError(f"dataset: item {i} of the torch Dataset has label {item[1]!r}; labels must be class integers")
        if xs and x.shape != xs[0].shape:
            raise DataError(f"dataset: item {i} of the torch Dataset has features {tuple(x.shape)}, item 0 {tuple(xs[0].shape)}")
        xs.append(x.detach().to(torch.float32))
        ys.append(int(label))
    y = np.asarray(ys, dtype=np.int64)
    if y.min() < 0:
        raise DataError("dataset: torch Dataset labels must be non-negative class integers")
    x = torch.stack(xs).numpy()
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if not np.isfinite(x).all():
        raise DataError("dataset: the torch Dataset's features have missing or infinite values")
    return np.ascontiguousarray(x), y

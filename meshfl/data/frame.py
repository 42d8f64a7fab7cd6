"""Data objects handed to `meshfl.run(dataset=...)`: DataFrame, Hugging Face or torch Dataset.

A pandas DataFrame, a Hugging Face `datasets.Dataset` or a `torch.utils.data.Dataset`.
The object is registered in this process under a content hash that the config carries
(`data.dataset: dataframe|huggingface|torch`, `data.path: python:<kind>-<sha>`), so the run's
config.yaml says where its data came from and the same data gives the same config hash; another
process (a `meshfl node` peer) cannot see it: write the data to a file (`frame.to_parquet(...)`,
`hf_dataset.save_to_disk(...)`, an `.npz`) and name that file in `data.path` there.
A torch Dataset is materialised once here, into one feature tensor and one label tensor.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

from meshfl.data.datasets import DataError

_OBJECTS: dict[str, Any] = {}
PREFIX = "python:"


def register_dataset(obj: Any) -> tuple[str, str]:
    """Register `obj` for this process under a hash of its content.

    Parameters
    ----------
    obj : pandas.DataFrame, datasets.Dataset or torch.utils.data.Dataset
        The data; a torch Dataset is materialised here into one feature and one label array.

    Returns
    -------
    tuple[str, str]
        `(data.dataset kind, data.path key)` that select it: kind `dataframe`, `huggingface` or `torch`.

    Raises
    ------
    DataError
        If `obj` is none of those (or is a `DatasetDict`), or a torch Dataset cannot be materialised.
    """
    import pandas as pd

    if isinstance(obj, pd.DataFrame):
        return "dataframe", register_frame(obj)
    if _is_huggingface(obj):
        from meshfl.data.sources import huggingface_fingerprint

        return "huggingface", _store("huggingface", huggingface_fingerprint(obj), obj)
    import torch.utils.data

    if isinstance(obj, torch.utils.data.Dataset):
        from meshfl.data.sources import materialise_torch

        x, y = materialise_torch(obj)
        content = hashlib.sha256(x.tobytes())
        content.update(repr(x.shape).encode())
        content.update(y.tobytes())
        return "torch", _store("torch", content.hexdigest(), (x, y))
    raise DataError(f"dataset: must be a pandas DataFrame, a datasets.Dataset or a torch.utils.data.Dataset "
                    f"(got {type(obj).__name__})")


def register_frame(frame: Any) -> str:
    """Register a DataFrame for this process under a hash of its content.

    Returns
    -------
    str
        The data.path key that selects it.

    Raises
    ------
    DataError
        If `frame` is not a pandas DataFrame.
    """
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"dataset: must be a pandas DataFrame (got {type(frame).__name__})")
    content = hashlib.sha256(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    content.update(repr(list(map(str, frame.columns))).encode())
    return _store("dataframe", content.hexdigest(), frame)


def registered(key: str | None, kind: str) -> tuple[Any, str]:
    """Look up the object registered under `key` (data.path) for `kind`.

    Returns
    -------
    tuple[Any, str]
        The object and a name for it (the kind).

    Raises
    ------
    DataError
        Naming data.path and how to use the data in another process, if no such object is
        registered in this one.
    """
    if key is None or not key.startswith(f"{PREFIX}{kind}-") or key not in _OBJECTS:
        hint = {"dataframe": "write it to a file and use data.dataset=parquet or csv",
                "huggingface": "save it with dataset.save_to_disk(folder) and set data.path to that folder",
                "torch": "write its tensors to an .npz (x, y) and use data.dataset=numpy"}[kind]
        raise DataError(f"data.path: data.dataset={kind} without a file is the object passed as meshfl.run(..., "
                        f"dataset=obj) in the same process; to use it elsewhere, {hint}")
    return _OBJECTS[key], kind


def registered_frame(key: str | None) -> tuple[Any, str]:
    """Look up the DataFrame registered under `key`: `registered(key, "dataframe")`."""
    return registered(key, "dataframe")


def _store(kind: str, digest: str, obj: Any) -> str:
    key = f"{PREFIX}{kind}-{digest[:16]}"
    _OBJECTS[key] = obj
    return key


def _is_huggingface(obj: Any) -> bool:
    module = sys.modules.get("datasets")  # an object of it exists only if the caller imported it
    if module is None or not hasattr(module, "Dataset"):
        return False
    if isinstance(obj, getattr(module, "DatasetDict", ())):
        raise DataError(f"dataset: a DatasetDict holds splits {sorted(obj)}; pass one, e.g. dataset=ds['train']")
    return isinstance(obj, module.Dataset)


"""A pandas DataFrame handed to `meshfl.run(dataset=...)`: one row per sample, labels in `data.label_column`.

The frame is registered in this process under a name that the config carries
(`data.dataset: dataframe`, `data.path: python:<name>`), so the run's config.yaml says where
its data came from; another process (a `meshfl node` peer) cannot see it: write the frame
to a file (`frame.to_parquet(...)`) and use `data.dataset: parquet` there.
"""

from __future__ import annotations

from typing import Any

from meshfl.data.datasets import DataError

_FRAMES: dict[str, Any] = {}
PREFIX = "python:"


def register_frame(frame: Any) -> str:
    """Register `frame` for this process; returns the `key=value` overrides that select it."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"dataset: must be a pandas DataFrame (got {type(frame).__name__})")
    import hashlib

    content = hashlib.sha256(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    content.update(repr(list(map(str, frame.columns))).encode())
    key = f"{PREFIX}dataframe-{content.hexdigest()[:16]}"  # the same frame gives the same config (and config hash)
    _FRAMES[key] = frame
    return key


def registered_frame(key: str | None) -> tuple[Any, str]:
    """The frame registered under `key` (data.path) and a name for it; DataError naming the field otherwise."""
    if key is None or key not in _FRAMES:
        raise DataError("data.dataset=dataframe: the DataFrame is passed as meshfl.run(..., dataset=frame) in the same "
                        "process; to use it elsewhere, write it to a file and use data.dataset=parquet or csv")
    return _FRAMES[key], "dataframe"

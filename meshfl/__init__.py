"""meshfl: federated learning with no single point of failure.

The Python API (imported on first use, so `import meshfl` stays light):
`meshfl.run`, `meshfl.launch`, `meshfl.load_model`, `meshfl.Result`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Result", "launch", "load_model", "run"]

_API = {"run": "meshfl.api", "launch": "meshfl.api", "Result": "meshfl.api", "load_model": "meshfl.learn.saved"}


def __getattr__(name: str) -> Any:
    """Import `run`, `launch`, `Result` and `load_model` on first use, so `import meshfl` stays light."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'meshfl' has no attribute {name!r}")

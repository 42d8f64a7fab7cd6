"""The base of every typed config section: frozen, and unknown fields are errors.

It lives in core so algorithms can declare their own sections without importing the
experiment config (which is assembled from the algorithms' declarations).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

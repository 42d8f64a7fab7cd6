"""Local checkpoints in `ctx.store` and the configuration of checkpoints, replicas and recovery.

A checkpoint is the model (Params, safetensors in a `DirectoryStore`) under `ckpt.<round>.<kind>`
with JSON metadata: peer, experiment, incarnation, round, kind, virtual and wall time, contributors,
samples, the layout fingerprint and a SHA-256 of the float32 values (`checksum`), which restoring
verifies, so a damaged entry is skipped, never trusted. Only the newest `keep_rounds` rounds are kept.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from meshfl.algorithms.replica_codec import checksum
from meshfl.core.params import Layout, Params
from meshfl.core.section import Section
from meshfl.core.store import Store, StoreError

KINDS = ("local", "aggregated", "round_finished")
"""Checkpoint kinds in the order they happen within a round: a later kind of the same round is newer."""
CheckpointKind = Literal["local", "aggregated", "round_finished"]
CHECKPOINT_PREFIX = "ckpt."
_CHECKPOINT_NAME = re.compile(r"ckpt\.(\d{1,12})\.(local|aggregated|round_finished)")


class CheckpointConfig(Section):
    """An algorithm's `checkpoints` config section: local checkpoints, replicas to far peers, recovery.

    Each field's description says what it does; see `meshfl config` for the defaults.

    Raises
    ------
    ValueError
        If `replica_total_mb` is below `replica_quota_mb` (or a field is out of its range).
    """

    enabled: bool = Field(False, description="keep local checkpoints, send replicas to far peers and recover from them after a restart")
    keep_rounds: int = Field(2, ge=1, description="local checkpoints of this many most recent rounds are kept (older ones are deleted)")
    replicas: int = Field(2, ge=0, description="peers that hold a replica of this peer's model: the farthest from it in the overlay (0: no replicas)")
    replica_every: int = Field(2, ge=1, description="a replica is sent every this many rounds (rounds divisible by it)")
    replica_codec: Literal["float32", "float16", "int8"] = Field("float32", description="values of a replica: exact float32; float16 (half the bytes, rebuilt within float16 rounding); int8 (full replicas exact, deltas quantised to int8 per tensor: about a quarter of the bytes, rebuilt within half a quantisation step of the last delta)")
    replica_compression: Literal["zstd", "gzip"] = Field("zstd", description="byte compression of replica payloads")
    replica_quota_mb: float = Field(16.0, gt=0, description="MiB a holder keeps for one origin (full replica plus deltas); past it the holder asks for a full one")
    replica_total_mb: float = Field(256.0, gt=0, description="MiB a holder keeps for all origins together; past it a new origin is refused (it picks another holder)")
    replica_origins: int = Field(16, ge=1, description="origins one holder keeps replicas for at most")
    replica_chain: int = Field(8, ge=1, description="deltas a holder keeps after a full replica before it asks the origin for a full one")
    recovery_window: int = Field(10, ge=0, description="tier 2 accepts a replica at most this many rounds older than the network's current round (when the caller knows it)")
    fetch_timeout_s: float = Field(5.0, gt=0, description="how long a restarted peer waits for each peer it asks for its replicas")
    fetch_parallel: int = Field(8, ge=1, description="peers asked at once for replicas, after the neighbours")

    @model_validator(mode="after")
    def _quotas(self) -> CheckpointConfig:
        if self.replica_total_mb < self.replica_quota_mb:
            raise ValueError(f"replica_total_mb ({self.replica_total_mb:g}) must be >= replica_quota_mb "
                             f"({self.replica_quota_mb:g})")
        return self


def checkpoint_name(round: int, kind: str) -> str:
    """Name the store entry of the `kind` checkpoint of `round`: `ckpt.<round>.<kind>`."""
    return f"{CHECKPOINT_PREFIX}{round}.{kind}"


def save_checkpoint(store: Store, kind: str, round: int, params: Params, meta: dict, keep_rounds: int) -> str:
    """Store `params` as the `kind` checkpoint of `round`, and delete all but the `keep_rounds` newest rounds.

    Parameters
    ----------
    store : Store
        The peer's store.
    kind : str
        One of `KINDS`.
    round : int
        The round, >= 0.
    params : Params
        The model.
    meta : dict
        Metadata to keep; `round`, `kind`, `fingerprint` and `checksum` are added (and win).
    keep_rounds : int
        How many of the newest rounds keep their checkpoints.

    Returns
    -------
    str
        The entry's name.

    Raises
    ------
    ValueError
        If `kind` is not one of `KINDS` or `round` is negative.
    StoreError
        If the store refuses the entry.
    """
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if round < 0:
        raise ValueError(f"checkpoint round must be >= 0, got {round}")
    name = checkpoint_name(round, kind)
    store.put_params(name, params, {**meta, "round": round, "kind": kind, "fingerprint": params.layout.fingerprint,
                                    "checksum": checksum(params)})
    rounds = sorted({r for r, _, _ in checkpoints(store)}, reverse=True)
    for old, _, old_name in checkpoints(store):
        if old not in rounds[:keep_rounds]:
            store.delete(old_name)
    return name


def checkpoints(store: Store) -> list[tuple[int, str, str]]:
    """List `(round, kind, name)` of every checkpoint in the store, newest first (round, then kind order)."""
    found = []
    for name in store.names():
        match = _CHECKPOINT_NAME.fullmatch(name)
        if match:
            found.append((int(match[1]), match[2], name))
    return sorted(found, key=lambda c: (c[0], KINDS.index(c[1])), reverse=True)


def newest_valid_checkpoint(store: Store, layout: Layout, *, peer: int | None = None, experiment: str | None = None,
                            ) -> tuple[Params, dict, int]:
    """Find the newest checkpoint whose values match its checksum, its metadata and `layout`.

    Parameters
    ----------
    store : Store
        The peer's store.
    layout : Layout
        The model's layout; an entry of another layout is skipped.
    peer, experiment : optional
        When given, the metadata's `peer` / `experiment` must equal them.

    Returns
    -------
    (params, meta, skipped)
        `params` None when none is valid; `skipped` counts the entries passed over as unreadable,
        corrupt (checksum mismatch), of another layout, peer or experiment.
    """
    skipped = 0
    for round, kind, name in checkpoints(store):
        try:
            got = store.get_params(name, layout)
        except StoreError:
            got = None
        if got is None:
            skipped += 1
            continue
        params, meta = got
        if (meta.get("checksum") != checksum(params) or meta.get("round") != round or meta.get("kind") != kind
                or (peer is not None and meta.get("peer") != peer)
                or (experiment is not None and meta.get("experiment") != experiment)):
            skipped += 1
            continue
        return params, meta, skipped
    return None, {}, skipped



"""`ctx.store`: a peer's named blobs and model Params that outlive a crash.

Algorithms keep what they need to resume (the last model, a round counter, a replica held
for a neighbour) under short names. The simulator gives each peer a `MemoryStore` and keeps
the object when it "crashes" the peer; the gRPC runtime gives each peer a `DirectoryStore`,
one folder on disk, because there a crash is a killed process.

Both stores hand back values the caller owns: mutating a returned tensor, bytes or meta
never changes what is stored. Params given to `put_params` are treated as immutable (the
`Params` contract), so the memory store keeps them by reference and copies on the way out.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from meshfl.core.params import Layout, Params

DEFAULT_MAX_ENTRY_BYTES = 1 << 30
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_SUFFIX = ".safetensors"
_TMP_SUFFIX = ".tmp"
_MAX_META_DEPTH = 32


class StoreError(ValueError):
    """A refused or unreadable store entry; the message is one line naming the entry."""


@runtime_checkable
class Store(Protocol):
    """What `ctx.store` offers an algorithm. Synchronous: entries are small or written rarely."""

    def put_bytes(self, name: str, data: bytes, meta: dict | None = None) -> None:
        """Store `data` with a JSON `meta` dict under `name`, replacing any entry of that name.

        Parameters
        ----------
        name : str
            1-128 of `A-Z a-z 0-9 _ . -`, not starting with '.'.
        data : bytes
            The blob.
        meta : dict, optional
            Plain JSON: str keys, finite numbers, no tuples.

        Raises
        ------
        StoreError
            If the name or meta is refused, or the entry exceeds the store's `max_entry_bytes`.
        """
        ...

    def get_bytes(self, name: str) -> tuple[bytes, dict] | None:
        """Read the bytes entry `name`.

        Returns
        -------
        tuple[bytes, dict] or None
            The data and its meta, or None if there is no such entry.

        Raises
        ------
        StoreError
            If the name is bad, or the entry holds params or cannot be read.
        """
        ...

    def put_params(self, name: str, params: Params, meta: dict | None = None) -> None:
        """Store `params` with a JSON `meta` dict under `name`, replacing any entry of that name.

        Raises
        ------
        StoreError
            As `put_bytes`.
        """
        ...

    def get_params(self, name: str, layout: Layout) -> tuple[Params, dict] | None:
        """Read the params entry `name`, expected to have `layout`.

        Returns
        -------
        tuple[Params, dict] or None
            The params (the caller's own copy) and meta, or None if there is no such entry.

        Raises
        ------
        StoreError
            If the entry's layout fingerprint differs from `layout`, or it holds bytes or cannot be read.
        """
        ...

    def names(self) -> list[str]:
        """The entries' names, sorted."""
        ...

    def delete(self, name: str) -> None:
        """Remove entry `name`; no error if there is none."""
        ...

    def wipe(self) -> None:
        """Remove every entry."""
        ...

    def __contains__(self, name: object) -> bool: ...


def is_name(name: object) -> bool:
    """Whether `name` is a valid entry name: 1-128 of `A-Z a-z 0-9 _ . -`, not starting with '.'.

    Names become file names, so they are short, portable and never hidden or relative.
    """
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and not name.startswith(".")


def check_name(name: object) -> str:
    """Return `name` if it is a valid entry name (see `is_name`).

    Raises
    ------
    StoreError
        If it is not.
    """
    if not is_name(name):
        raise StoreError(f"store entry {name!r}: bad name (want 1-128 of A-Z a-z 0-9 _ . -, not starting with '.')")
    return name


def encode_meta(name: str, meta: dict | None) -> str:
    """Validate `meta` as plain JSON (finite numbers, str keys) and return its text.

    Checked field by field so the error names the field; tuples and non-str keys are refused
    because JSON would silently turn them into something else on the way back.

    Parameters
    ----------
    name : str
        The entry's name, for the error message.
    meta : dict or None
        The meta; None stands for `{}`.

    Returns
    -------
    str
        Compact JSON text.

    Raises
    ------
    StoreError
        Naming the first field that is not plain JSON (or nests deeper than 32).
    """
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise StoreError(f"store entry {name!r}: meta must be a dict, got {type(meta).__name__}")
    _check_json(name, meta, "meta", 0)
    return json.dumps(meta, allow_nan=False, separators=(",", ":"))


def _check_json(name: str, value: Any, path: str, depth: int) -> None:
    if depth > _MAX_META_DEPTH:
        raise StoreError(f"store entry {name!r}: meta field {path} nests deeper than {_MAX_META_DEPTH}")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StoreError(f"store entry {name!r}: meta field {path} is {value}, not a finite number")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(name, item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(f"store entry {name!r}: meta field {path} has non-str key {key!r}")
            _check_json(name, item, f"{path}.{key}", depth + 1)
        return
    raise StoreError(f"store entry {name!r}: meta field {path} is a {type(value).__name__}, not JSON")


def _check_size(name: str, nbytes: int, limit: int) -> None:
    if nbytes > limit:
        raise StoreError(f"store entry {name!r}: {nbytes} bytes exceeds max_entry_bytes={limit}")


class MemoryStore:
    """The simulator's store: a dict that survives a simulated crash because the simulator keeps it.

    Params are kept by reference (immutable by contract), so a put is free and a get is one
    clone; bytes are copied in (a bytearray could change under us) and are immutable out.

    Parameters
    ----------
    max_entry_bytes : int, default 1 GiB
        The largest entry (data plus meta text) a put accepts.
    """

    def __init__(self, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES) -> None:
        self.max_entry_bytes = max_entry_bytes
        self._entries: dict[str, tuple[bytes | Params, str]] = {}

    def put_bytes(self, name: str, data: bytes, meta: dict | None = None) -> None:
        """Store `data` and `meta` under `name` (see `Store.put_bytes`)."""
        check_name(name)
        text = encode_meta(name, meta)
        data = bytes(data)
        _check_size(name, len(data) + len(text), self.max_entry_bytes)
        self._entries[name] = (data, text)

    def get_bytes(self, name: str) -> tuple[bytes, dict] | None:
        """Read bytes entry `name`, or None if missing (see `Store.get_bytes`)."""
        entry = self._entries.get(check_name(name))
        if entry is None:
            return None
        value, text = entry
        if not isinstance(value, bytes):
            raise StoreError(f"store entry {name!r}: holds params, not bytes")
        return value, json.loads(text)

    def put_params(self, name: str, params: Params, meta: dict | None = None) -> None:
        """Store `params` and `meta` under `name` (see `Store.put_params`)."""
        check_name(name)
        text = encode_meta(name, meta)
        _check_size(name, params.nbytes + len(text), self.max_entry_bytes)
        self._entries[name] = (params, text)

    def get_params(self, name: str, layout: Layout) -> tuple[Params, dict] | None:
        """Read params entry `name` checked against `layout`, or None if missing (see `Store.get_params`)."""
        entry = self._entries.get(check_name(name))
        if entry is None:
            return None
        value, text = entry
        if not isinstance(value, Params):
            raise StoreError(f"store entry {name!r}: holds bytes, not params")
        _check_layout(name, value.layout.fingerprint, layout)
        return Params(value.flat.detach().clone(), value.layout), json.loads(text)

    def names(self) -> list[str]:
        """The entries' names, sorted."""
        return sorted(self._entries)

    def delete(self, name: str) -> None:
        """Remove entry `name`; no error if there is none."""
        self._entries.pop(check_name(name), None)

    def wipe(self) -> None:
        """Remove every entry."""
        self._entries.clear()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries


def _check_layout(name: str, stored: str, layout: Layout) -> None:
    if stored != layout.fingerprint:
        raise StoreError(f"store entry {name!r}: stored layout {stored} differs from requested {layout.fingerprint}")


class DirectoryStore:
    """The gRPC runtime's store: one folder per peer, one safetensors file per entry.

    A write goes to a temporary file in the same folder, is fsync'ed, renamed over the entry
    (atomic on POSIX) and the folder is fsync'ed, so a peer killed at any instant leaves the
    old entry or the new one, never a mix. Temporary names start with '.', which entry names
    cannot, so leftovers are never mistaken for entries; they are removed when a store opens
    the folder (one writing process per folder, as one peer owns it). A CRC32 of the tensor
    bytes in the metadata catches files damaged after the fact, which safetensors alone only
    catches when the length is wrong.

    Parameters
    ----------
    path : Path or str
        The folder; created if missing.
    max_entry_bytes : int, default 1 GiB
        The largest entry (data plus meta text) a put accepts.
    """

    def __init__(self, path: Path | str, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES) -> None:
        self.path = Path(path)
        self.max_entry_bytes = max_entry_bytes
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(f".*{_TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)

    def _file(self, name: str) -> Path:
        return self.path / f"{check_name(name)}{_SUFFIX}"

    def put_bytes(self, name: str, data: bytes, meta: dict | None = None) -> None:
        """Store `data` and `meta` under `name` (see `Store.put_bytes`)."""
        check_name(name)
        text = encode_meta(name, meta)
        _check_size(name, len(data) + len(text), self.max_entry_bytes)
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        self._write(name, tensor, {"kind": "bytes", "meta": text})

    def get_bytes(self, name: str) -> tuple[bytes, dict] | None:
        """Read bytes entry `name`, or None if missing (see `Store.get_bytes`)."""
        read = self._read(name, "bytes")
        if read is None:
            return None
        tensor, header = read
        return tensor.numpy().tobytes(), _loads(name, header["meta"])

    def put_params(self, name: str, params: Params, meta: dict | None = None) -> None:
        """Store `params` and `meta` under `name` (see `Store.put_params`)."""
        check_name(name)
        text = encode_meta(name, meta)
        _check_size(name, params.nbytes + len(text), self.max_entry_bytes)
        layout = params.layout
        self._write(name, params.flat.detach().cpu().contiguous(), {
            "kind": "params", "layout": layout.fingerprint, "names": json.dumps(list(layout.names)),
            "shapes": json.dumps([list(s) for s in layout.shapes]), "meta": text})

    def get_params(self, name: str, layout: Layout) -> tuple[Params, dict] | None:
        """Read params entry `name` checked against `layout`, or None if missing (see `Store.get_params`)."""
        read = self._read(name, "params", layout)
        if read is None:
            return None
        flat, header = read
        try:
            stored = Layout(tuple(json.loads(header["names"])), tuple(tuple(s) for s in json.loads(header["shapes"])))
            if stored.fingerprint != header["layout"]:
                raise ValueError("names/shapes do not match the layout fingerprint")
            params = Params(flat, stored)
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"store entry {name!r}: corrupt params entry ({exc})") from None
        return params, _loads(name, header["meta"])

    def names(self) -> list[str]:
        """The entries' names, sorted."""
        if not self.path.is_dir():
            return []  # deleted under us: empty, as after a wipe (the next write recreates it)
        found = (p.name[:-len(_SUFFIX)] for p in self.path.iterdir() if p.name.endswith(_SUFFIX))
        return sorted(n for n in found if is_name(n))

    def delete(self, name: str) -> None:
        """Remove entry `name`; no error if there is none."""
        self._file(name).unlink(missing_ok=True)
        self._sync_dir()

    def wipe(self) -> None:
        """Remove every entry."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if p.name.endswith(_SUFFIX) or (p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX)):
                p.unlink(missing_ok=True)
        self._sync_dir()

    def __contains__(self, name: object) -> bool:
        return is_name(name) and self._file(name).is_file()

    def _write(self, name: str, tensor: torch.Tensor, header: dict[str, str]) -> None:
        header["crc32"] = str(zlib.crc32(tensor.numpy()))
        blob = st_save({"flat": tensor}, metadata=header)
        self.path.mkdir(parents=True, exist_ok=True)  # the folder may have been deleted under us (a wipe, by hand)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._file(name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._sync_dir()

    def _read(self, name: str, kind: str, layout: Layout | None = None) -> tuple[torch.Tensor, dict[str, str]] | None:
        """Read and verify one entry in one read, so what is checked is what is returned."""
        try:
            data = self._file(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"store entry {name!r}: unreadable ({exc.strerror})") from None
        try:
            n = int.from_bytes(data[:8], "little")
            header = json.loads(memoryview(data)[8:8 + n].tobytes())["__metadata__"]
            tensor = st_load(data)["flat"]
            crc = int(header["crc32"])
            stored_kind = header["kind"]
        except Exception as exc:  # safetensors raises its own SafetensorError; all mean "damaged"
            raise StoreError(f"store entry {name!r}: corrupt file {self._file(name).name} ({exc})".replace("\n", " ")) from None
        if zlib.crc32(memoryview(data)[8 + n:]) != crc:
            raise StoreError(f"store entry {name!r}: corrupt file {self._file(name).name} (checksum mismatch)")
        if stored_kind != kind:
            raise StoreError(f"store entry {name!r}: holds {stored_kind}, not {kind}")
        if layout is not None:
            _check_layout(name, header.get("layout", "?"), layout)
        return tensor, header

    def _sync_dir(self) -> None:
        """Make renames and unlinks durable: without this a power cut could undo them."""
        if not self.path.is_dir():
            return  # deleted under us: nothing left to make durable
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _loads(name: str, text: str) -> dict:
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise StoreError(f"store entry {name!r}: corrupt meta")
    return meta

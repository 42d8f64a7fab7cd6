"""Messages: frozen, keyword-only dataclasses with typed fields, registered by name.

An algorithm declares its own message classes (in its own module); registration gives each
a stable wire type id and lets the generic encoder (`meshfl.wire.envelope`) read its
schema from the dataclass fields. Supported field types: int, bool, float, str, tuples of
them, frozenset[int], a nested record (a frozen dataclass of such fields) or a tuple of
records, `Params` (a whole model) and `ParamsSlice` (some layers, or a contiguous chunk).

A message that carries tensors may have a `codec: Codec` field: the algorithm chooses, per
message, how its tensors travel. Without one, tensors always travel as exact float32.

`Request` and `Reply` pair up by `request_id` / `in_reply_to` (`ctx.request`, `ctx.reply`).
`Heartbeat` and `Goodbye` belong to the runtimes; `PeerLiveness` is never sent: the runtime
puts it in a peer's inbox when its failure detector changes its mind about another peer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

CodecKind = Literal["float32", "float16", "int8", "topk"]
Compression = Literal["none", "gzip", "zstd"]


@dataclass(frozen=True)
class Codec:
    """How the tensors of one message travel: a value codec, then byte compression."""

    kind: CodecKind = "float32"
    topk_fraction: float = 0.1
    compression: Compression = "none"

    def __post_init__(self) -> None:
        if self.kind not in ("float32", "float16", "int8", "topk"):
            raise ValueError(f"Codec.kind must be float32, float16, int8 or topk, got {self.kind!r}")
        if self.compression not in ("none", "gzip", "zstd"):
            raise ValueError(f"Codec.compression must be none, gzip or zstd, got {self.compression!r}")
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"Codec.topk_fraction must be in (0, 1], got {self.topk_fraction}")

    @property
    def lossy(self) -> bool:
        return self.kind != "float32"


LOSSLESS = Codec()


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message: who sent it. Everything else is the algorithm's."""

    sender: int

    def __post_init__(self) -> None:
        if self.sender < 0:
            raise ValueError(f"{type(self).__name__}.sender must be >= 0, got {self.sender}")


@dataclass(frozen=True, kw_only=True)
class Request(Message):
    """A message that expects one `Reply`; `ctx.request` fills in `request_id`."""

    request_id: int = 0


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    """The answer to a `Request`; `ctx.reply` fills in `in_reply_to`."""

    in_reply_to: int = 0


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Liveness probe of the gRPC runtime's failure detector; carries nothing."""


@dataclass(frozen=True, kw_only=True)
class Goodbye(Message):
    """A peer leaves on purpose: the receiver's detector marks it gone at once, not after a timeout."""


@dataclass(frozen=True, kw_only=True)
class PeerLiveness(Message):
    """Local notice (never on the wire): the failure detector now believes `peer` alive or dead."""

    peer: int
    alive: bool


# ---- registry ------------------------------------------------------------------------------

MESSAGE_TYPES: dict[int, type[Message]] = {}
"""Wire type id -> message class, for every registered message."""
MESSAGE_NAMES: dict[type[Message], str] = {}
TYPE_IDS: dict[type[Message], int] = {}


def type_id(name: str) -> int:
    """A stable 32-bit id from the registered name, the same on every host and process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def register_message(cls: type[Message], name: str) -> type[Message]:
    """Give `cls` a wire type; its schema is checked now so a bad field type fails at import."""
    if not (isinstance(cls, type) and issubclass(cls, Message)):
        raise TypeError(f"register_message: {cls!r} is not a Message subclass")
    ident = type_id(name)
    known = MESSAGE_TYPES.get(ident)
    if known is not None and known is not cls:
        raise ValueError(f"message name {name!r} is already registered (or collides) with {known.__name__}")
    from meshfl.core.schema import schema_of  # not at the top: this module registers Heartbeat while it loads

    schema_of(cls)
    MESSAGE_TYPES[ident] = cls
    MESSAGE_NAMES[cls] = name
    TYPE_IDS[cls] = ident
    return cls


register_message(Heartbeat, "meshfl.Heartbeat")
register_message(Goodbye, "meshfl.Goodbye")

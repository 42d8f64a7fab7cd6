"""Wire format: meshfl Messages <-> serialized `meshfl.v1.Envelope` bytes.

One flat protobuf envelope per message keeps the overhead to a few dozen bytes over the
simulator's `wire_size`. Decoding is a pipeline of small checks, each raising `Refused`
with a reason, so the door can interleave its own checks (sender, round) in a fixed order:

    parse -> message_class -> [door: sender] -> decode_payload -> [door: round] -> build

`decode` runs the pipeline without the door's checks, for tools and tests.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from meshfl.config import WireConfig
from meshfl.core.messages import AggregatedModel, Ballot, HaveModels, Message, PartialModel, Votes
from meshfl.core.params import Layout, Params
from meshfl.runtime.grpc import codecs
from meshfl.runtime.grpc.meshfl_pb2 import Envelope

WIRE_VERSION = 2
"""Bumped on any incompatible envelope change; a peer refuses envelopes of another version."""

CODEC_IDS: dict[str, int] = {"float32": 0, "float16": 1, "int8": 2, "topk": 3}
COMPRESSION_IDS: dict[str, int] = {"none": 0, "gzip": 1, "zstd": 2}
MESSAGE_TYPES: dict[str, int] = {"Votes": 1, "PartialModel": 2, "AggregatedModel": 3, "HaveModels": 4, "Heartbeat": 5, "Goodbye": 6}
CODEC_NAMES: dict[int, str] = {v: k for k, v in CODEC_IDS.items()}
COMPRESSION_NAMES: dict[int, str] = {v: k for k, v in COMPRESSION_IDS.items()}

REASONS = ("malformed", "unknown_type", "unknown_sender", "layout_mismatch", "bad_shape", "bad_dtype",
           "non_finite", "too_large", "stale_round", "bad_codec")

_ZSTD_LEVEL = 3
_GZIP_LEVEL = 6


class Refused(Exception):
    """An incoming message the receiver will not hand to the algorithm.

    `reason` is one of REASONS (a stable label to count by); `detail` is one line for the log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"Refused: unknown reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Liveness signal between neighbours of the gRPC runtime; carries no payload.

    Defined here, not in core.messages, because only the real network needs it: the
    simulator knows who is alive.
    """


@dataclass(frozen=True, kw_only=True)
class Goodbye(Message):
    """A peer leaves on purpose (its run is over, or it was stopped): its neighbours stop
    expecting it rather than declaring it dead after a heartbeat timeout."""


MESSAGE_CLASSES: dict[int, type[Message]] = {
    1: Votes, 2: PartialModel, 3: AggregatedModel, 4: HaveModels, 5: Heartbeat, 6: Goodbye,
}
_TYPE_IDS: dict[type[Message], int] = {cls: i for i, cls in MESSAGE_CLASSES.items()}
_TENSOR_TYPES = (PartialModel, AggregatedModel)

_COMMON_FIELDS = frozenset({"type", "sender", "round", "version"})
_TENSOR_FIELDS = frozenset({"layout_fingerprint", "codec", "compression", "numel", "tensor"})
_ALLOWED_FIELDS: dict[type[Message], frozenset[str]] = {
    Votes: _COMMON_FIELDS | {"ints"},
    PartialModel: _COMMON_FIELDS | _TENSOR_FIELDS | {"ints", "weight"},
    AggregatedModel: _COMMON_FIELDS | _TENSOR_FIELDS | {"ints"},
    HaveModels: _COMMON_FIELDS | {"ints", "complete"},
    Heartbeat: _COMMON_FIELDS,
    Goodbye: _COMMON_FIELDS,
}


# ---------------------------------------------------------------------------------- encode


def encode(message: Message, wire: WireConfig) -> bytes:
    """Serialize `message` as an Envelope, tensors through `wire.codec` and `wire.compression`."""
    type_id = _TYPE_IDS.get(type(message))
    if type_id is None:
        raise ValueError(f"wire.encode: {type(message).__name__} has no wire type (known: {', '.join(MESSAGE_TYPES)})")
    env = Envelope(type=type_id, sender=message.sender, round=message.round, version=WIRE_VERSION)
    if isinstance(message, Votes):
        for ballot in message.ballots:
            env.ints.extend([ballot.origin, len(ballot.candidates), *ballot.candidates, *ballot.weights])
    elif isinstance(message, HaveModels):
        env.ints.extend(sorted(message.contributors))
        env.complete = message.complete
    elif isinstance(message, _TENSOR_TYPES):
        env.ints.extend(sorted(message.contributors))
        _put_params(env, message.params, wire)
        if isinstance(message, PartialModel):
            env.weight = message.weight
    return env.SerializeToString()


def _put_params(env: Envelope, params: Params, wire: WireConfig) -> None:
    env.layout_fingerprint = bytes.fromhex(params.layout.fingerprint)
    env.codec = CODEC_IDS[wire.codec]
    env.compression = COMPRESSION_IDS[wire.compression]
    env.numel = params.flat.numel()
    env.tensor = compress(codecs.encode_tensor(params.flat, wire.codec, wire.topk_fraction), wire.compression)


def compress(data: bytes, compression: str) -> bytes:
    """Byte compression after the codec; gzip without a timestamp so encoding is deterministic."""
    if compression == "none":
        return data
    if compression == "gzip":
        packer = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
        return packer.compress(data) + packer.flush()
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)
    raise ValueError(f"unknown compression {compression!r} (known: {', '.join(COMPRESSION_IDS)})")


def chunks(data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Split an encoded envelope for a gRPC stream; always at least one (possibly empty) chunk."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if not data:
        yield b""
        return
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        yield bytes(view[start:start + chunk_bytes])


# ---------------------------------------------------------------------------------- decode


def decode(data: bytes, layout: Layout, *, max_bytes: int | None = None) -> Message:
    """Parse and rebuild a message, checking everything but sender and round; raises Refused.

    `max_bytes` additionally bounds the decompressed tensor (the door passes max_message_mb).
    """
    env = parse(data)
    cls = message_class(env)
    params = decode_payload(env, cls, layout, max_bytes=max_bytes)
    return build(env, cls, params)


def parse(data: bytes) -> Envelope:
    """Protobuf parse; unknown fields and other wire versions are malformed, not ignored."""
    env = Envelope()
    try:
        env.ParseFromString(data)
    except DecodeError as exc:
        raise Refused("malformed", f"not an envelope ({exc})") from None
    if _has_unknown_fields(env):
        raise Refused("malformed", "envelope has fields this version does not know")
    if env.version != WIRE_VERSION:
        raise Refused("malformed", f"wire version {env.version}, this peer speaks {WIRE_VERSION}")
    return env


def _has_unknown_fields(env: Envelope) -> bool:
    """True when the bytes carried fields outside the schema (garbage that happened to parse)."""
    return len(unknown_fields.UnknownFieldSet(env)) > 0


def message_class(env: Envelope) -> type[Message]:
    cls = MESSAGE_CLASSES.get(env.type)
    if cls is None:
        raise Refused("unknown_type", f"message type {env.type} (known: {sorted(MESSAGE_CLASSES)})")
    return cls


def decode_payload(env: Envelope, cls: type[Message], layout: Layout, *, max_bytes: int | None = None) -> Params | None:
    """Check and decode the tensor (for model messages) and float fields; None for the others."""
    if cls is PartialModel and not math.isfinite(env.weight):
        raise Refused("non_finite", f"PartialModel weight is {env.weight}")
    if cls not in _TENSOR_TYPES:
        return None
    if env.layout_fingerprint != bytes.fromhex(layout.fingerprint):
        raise Refused("layout_mismatch", f"layout fingerprint {env.layout_fingerprint.hex() or '(none)'}, this peer has {layout.fingerprint}")
    if env.numel != layout.numel:
        raise Refused("bad_shape", f"numel {env.numel}, layout has {layout.numel}")
    codec, compression = _codec_names(env)
    limit = codecs.max_encoded_nbytes(codec, layout.numel)
    raw = decompress(env.tensor, compression, limit if max_bytes is None else min(limit, max_bytes))
    flat = _decode_tensor(raw, codec, layout.numel)
    finite = np.isfinite(flat.numpy())  # numpy: ~30x faster than torch.isfinite on small CPU tensors
    if not finite.all():
        raise Refused("non_finite", f"{int(finite.size - finite.sum())} NaN/Inf entries in the {codec} tensor")
    return Params(flat, layout)


def _codec_names(env: Envelope) -> tuple[str, str]:
    codec = CODEC_NAMES.get(env.codec)
    if codec is None:
        raise Refused("bad_codec", f"codec id {env.codec} (known: {CODEC_IDS})")
    compression = COMPRESSION_NAMES.get(env.compression)
    if compression is None:
        raise Refused("bad_codec", f"compression id {env.compression} (known: {COMPRESSION_IDS})")
    return codec, compression


def decompress(data: bytes, compression: str, limit: int) -> bytes:
    """Undo `compress`, never producing more than `limit` bytes (a bomb is too_large)."""
    if compression == "none":
        return data
    if compression == "gzip":
        return _gunzip(data, limit)
    if compression == "zstd":
        return _unzstd(data, limit)
    raise Refused("bad_codec", f"compression {compression!r}")


def _gunzip(data: bytes, limit: int) -> bytes:
    unpacker = zlib.decompressobj(31)
    try:
        out = unpacker.decompress(data, limit + 1)
    except zlib.error as exc:
        raise Refused("malformed", f"gzip: {exc}") from None
    if len(out) > limit:
        raise Refused("too_large", f"gzip tensor expands beyond {limit} bytes")
    if not unpacker.eof or unpacker.unused_data:
        raise Refused("malformed", "gzip stream is truncated or has trailing bytes")
    return out


def _unzstd(data: bytes, limit: int) -> bytes:
    """Two passes: a bounded read proves the first frame is small, then a strict full decode.

    `ZstdDecompressor.decompress` trusts the frame's declared size and ignores
    max_output_size, so it alone would let a bomb allocate whatever the header claims.
    """
    dctx = zstandard.ZstdDecompressor()
    try:
        probe = dctx.stream_reader(data, read_across_frames=False).read(limit + 1)
        if len(probe) > limit:
            raise Refused("too_large", f"zstd tensor expands beyond {limit} bytes")
        unpacker = dctx.decompressobj()
        out = unpacker.decompress(data)
    except zstandard.ZstdError as exc:
        raise Refused("malformed", f"zstd: {exc}") from None
    if not unpacker.eof or unpacker.unused_data or len(out) > limit:
        raise Refused("malformed", "zstd stream is truncated or has trailing bytes")
    return out


def _decode_tensor(raw: bytes, codec: str, numel: int) -> torch.Tensor:
    try:
        return codecs.decode_tensor(raw, codec, numel)
    except codecs.CodecError as exc:
        reason = {"dtype": "bad_dtype", "shape": "bad_shape"}.get(exc.kind, "malformed")
        raise Refused(reason, str(exc)) from None


def build(env: Envelope, cls: type[Message], params: Params | None) -> Message:
    """Construct the Message; stray fields or a constructor's ValueError are malformed."""
    stray = {f.name for f, _ in env.ListFields()} - _ALLOWED_FIELDS[cls]
    if stray:
        raise Refused("malformed", f"{cls.__name__} envelope carries {', '.join(sorted(stray))}")
    try:
        return _construct(env, cls, params)
    except (ValueError, TypeError) as exc:
        raise Refused("malformed", f"{cls.__name__}: {exc}") from None


def _construct(env: Envelope, cls: type[Message], params: Params | None) -> Message:
    head = {"sender": env.sender, "round": env.round}
    ints = tuple(env.ints)
    if cls is Votes:
        return Votes(**head, ballots=_ballots(ints))
    if cls in (Heartbeat, Goodbye):
        return cls(**head)
    contributors = _contributors(ints)
    if cls is HaveModels:
        return HaveModels(**head, contributors=contributors, complete=env.complete)
    if cls is PartialModel:
        return PartialModel(**head, params=params, contributors=contributors, weight=env.weight)
    return AggregatedModel(**head, params=params, contributors=contributors)


def _ballots(ints: tuple[int, ...]) -> tuple[Ballot, ...]:
    """Ballots written as origin, count, candidates, weights, one after another."""
    ballots, at = [], 0
    while at < len(ints):
        if at + 2 > len(ints):
            raise ValueError(f"ballot {len(ballots)} is cut short after its origin")
        origin, count = ints[at], ints[at + 1]
        end = at + 2 + 2 * count
        if end > len(ints):
            raise ValueError(f"ballot {len(ballots)} announces {count} candidates but the envelope ends first")
        ballots.append(Ballot(origin, ints[at + 2:at + 2 + count], ints[at + 2 + count:end]))
        at = end
    return tuple(ballots)


def _contributors(ints: tuple[int, ...]) -> frozenset[int]:
    """Senders write contributors sorted; anything else (duplicates included) is forged or broken."""
    if any(b <= a for a, b in zip(ints, ints[1:], strict=False)):
        raise ValueError("contributors are not strictly ascending")
    return frozenset(ints)

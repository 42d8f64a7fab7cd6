"""Any registered message <-> serialized `meshfl.v1.Envelope` bytes, and its exact size.

One generic encoder: the message's schema (meshfl.core.schema) says which typed column
each field goes to; nothing here names a particular algorithm or message. Decoding is a
pipeline of small checks, each raising `Refused` with a reason, so the door can put its own
check (who may send) in a fixed place:

    parse -> message_class -> [door: sender] -> build (tensors checked, fields read back)

`encoded_size` is what the simulator counts: the bytes `encode` produces, computed without
materialising float32 tensors (a test checks it against `len(encode(m))` for every
registered message type and codec). Lossy codecs apply only to messages with a `codec`
field that asks for one.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np
import torch
import zstandard
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from meshfl.core.messages import LOSSLESS, MESSAGE_TYPES, TYPE_IDS, Codec, Message
from meshfl.core.params import Layout, Params, ParamsSlice, check_ranges
from meshfl.core.schema import FieldSpec, Schema, schema_of
from meshfl.wire import codecs
from meshfl.wire.meshfl_pb2 import Envelope, Tensor

WIRE_VERSION = 3
"""Bumped on any incompatible envelope change; a peer refuses envelopes of another version."""

CODEC_IDS: dict[str, int] = {"float32": 0, "float16": 1, "int8": 2, "topk": 3}
COMPRESSION_IDS: dict[str, int] = {"none": 0, "gzip": 1, "zstd": 2}
CODEC_NAMES: dict[int, str] = {v: k for k, v in CODEC_IDS.items()}
COMPRESSION_NAMES: dict[int, str] = {v: k for k, v in COMPRESSION_IDS.items()}

REASONS = ("malformed", "unknown_type", "unknown_sender", "layout_mismatch", "bad_shape", "bad_dtype",
           "non_finite", "too_large", "bad_codec")

_ZSTD_LEVEL = 3
_GZIP_LEVEL = 6
_SIZE_ATTR = "_meshfl_wire_size"


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


@cache
def message_schema(cls: type[Message]) -> Schema:
    """The class's schema less `sender`, which has its own envelope field."""
    return Schema(cls, tuple(f for f in schema_of(cls).fields if f.name != "sender"))


def codec_of(message: Message) -> Codec:
    """The codec the message asked for; exact float32 for messages that did not ask."""
    codec = getattr(message, "codec", LOSSLESS)
    return codec if isinstance(codec, Codec) else LOSSLESS


# ---------------------------------------------------------------------------------- encode


def encode(message: Message) -> bytes:
    """Serialize any registered message as an Envelope."""
    env, tensors = _envelope(message)
    codec = codec_of(message)
    for value in tensors:
        tensor = _tensor_header(value, codec)
        tensor.data = compress(codecs.encode_tensor(_values(value), codec.kind, codec.topk_fraction), codec.compression)
        env.tensors.append(tensor)
    return env.SerializeToString()


def encoded_size(message: Message) -> int:
    """`len(encode(message))`, remembered on the message (one object sent to many peers is sized once).

    For exact float32 without compression the tensor bytes are computed, not produced;
    otherwise the message is encoded, since only that gives the length (and proves the codec
    can carry the values).
    """
    size = message.__dict__.get(_SIZE_ATTR)
    if size is None:
        size = _compute_size(message)
        object.__setattr__(message, _SIZE_ATTR, size)
    return size


def _compute_size(message: Message) -> int:
    codec = codec_of(message)
    env, tensors = _envelope(message)
    if (codec.compression != "none" or codec.lossy) and tensors:
        return len(encode(message))  # and a value the codec cannot carry fails here, at send, in both runtimes
    total = env.ByteSize()
    for value in tensors:
        header = _tensor_header(value, codec).ByteSize()
        data = codecs.encoded_nbytes(codec.kind, _numel(value), codec.topk_fraction)
        inner = header + (_field_size(1, data) if data else 0)
        total += _field_size(1, inner)
    return total


def _field_size(tag_bytes: int, length: int) -> int:
    """A length-delimited protobuf field: tag, varint length, bytes."""
    return tag_bytes + _varint_size(length) + length


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _envelope(message: Message) -> tuple[Envelope, list[Params | ParamsSlice]]:
    cls = type(message)
    ident = TYPE_IDS.get(cls)
    if ident is None:
        raise ValueError(f"wire: {cls.__name__} is not a registered message type (register it in its algorithm's declaration)")
    env = Envelope(wire_version=WIRE_VERSION, type=ident, sender=message.sender)
    tensors: list[Params | ParamsSlice] = []
    _write(message_schema(cls), message, env, tensors)
    return env, tensors


def _write(schema: Schema, obj: Any, env: Envelope, tensors: list) -> None:
    for spec in schema.fields:
        value = getattr(obj, spec.name)
        kind = spec.kind
        if kind in ("int", "bool"):
            env.ints.append(int(value))
        elif kind == "float":
            env.floats.append(value)
        elif kind == "str":
            env.strings.append(value)
        elif kind in ("ints", "intset"):
            env.lengths.append(len(value))
            env.ints.extend(sorted(value) if kind == "intset" else value)
        elif kind == "floats":
            env.lengths.append(len(value))
            env.floats.extend(value)
        elif kind == "strs":
            env.lengths.append(len(value))
            env.strings.extend(value)
        elif kind == "record":
            _write(spec.record, value, env, tensors)
        elif kind == "records":
            env.lengths.append(len(value))
            for record in value:
                _write(spec.record, record, env, tensors)
        elif kind in ("params", "slice"):
            tensors.append(value)


def _tensor_header(value: Params | ParamsSlice, codec: Codec) -> Tensor:
    tensor = Tensor(layout_fingerprint=bytes.fromhex(value.layout.fingerprint), codec=CODEC_IDS[codec.kind],
                    compression=COMPRESSION_IDS[codec.compression], numel=_numel(value))
    if isinstance(value, ParamsSlice):
        for start, stop in value.ranges:
            tensor.ranges.extend((start, stop))
    return tensor


def _values(value: Params | ParamsSlice) -> torch.Tensor:
    return value.flat if isinstance(value, Params) else value.values


def _numel(value: Params | ParamsSlice) -> int:
    return value.layout.numel if isinstance(value, Params) else value.numel


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


def decode(data: bytes, layout: Layout, *, max_bytes: int | None = None, device: torch.device | None = None) -> Message:
    """Parse and rebuild a message, checking everything but the sender; raises Refused.
    `device`: where its tensors go (the simulator keeps models on the GPU with train.device=cuda)."""
    env = parse(data)
    return build(env, message_class(env), layout, max_bytes=max_bytes, device=device)


def parse(data: bytes) -> Envelope:
    """Protobuf parse; unknown fields and other wire versions are malformed, not ignored."""
    env = Envelope()
    try:
        env.ParseFromString(data)
    except DecodeError as exc:
        raise Refused("malformed", f"not an envelope ({exc})") from None
    if len(unknown_fields.UnknownFieldSet(env)) or any(len(unknown_fields.UnknownFieldSet(t)) for t in env.tensors):
        raise Refused("malformed", "envelope has fields this version does not know")
    if env.wire_version != WIRE_VERSION:
        raise Refused("malformed", f"wire version {env.wire_version}, this peer speaks {WIRE_VERSION}")
    return env


def message_class(env: Envelope) -> type[Message]:
    cls = MESSAGE_TYPES.get(env.type)
    if cls is None:
        raise Refused("unknown_type", f"message type id {env.type:#010x} is not registered here")
    return cls


def build(env: Envelope, cls: type[Message], layout: Layout, *, max_bytes: int | None = None,
          device: torch.device | None = None) -> Message:
    """Read the fields back by the class's schema; every column must be used up exactly."""
    schema = message_schema(cls)
    reader = _Reader(env, layout, schema.has_codec, max_bytes)
    reader.device = device
    try:
        fields = reader.read(schema)
        reader.check_used_up(cls.__name__)
        if schema.has_codec:
            fields["codec"] = reader.codec
        return cls(sender=env.sender, **fields)
    except (ValueError, TypeError) as exc:
        raise Refused("malformed", f"{cls.__name__}: {exc}") from None


class _Reader:
    """Takes values off the envelope's columns in schema order, bounds-checked."""

    def __init__(self, env: Envelope, layout: Layout, accepts_codec: bool, max_bytes: int | None) -> None:
        self.env = env
        self.layout = layout
        self.accepts_codec = accepts_codec
        self.max_bytes = max_bytes
        self.at = {"ints": 0, "floats": 0, "strings": 0, "lengths": 0, "tensors": 0}
        self.codec = LOSSLESS
        self.device: torch.device | None = None

    def take(self, column: str, count: int) -> list:
        values = getattr(self.env, column)
        start = self.at[column]
        if count < 0 or start + count > len(values):
            raise ValueError(f"the envelope's {column} end before the fields do")
        self.at[column] = start + count
        return list(values[start:start + count])

    def read(self, schema: Schema) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec in schema.fields:
            if spec.kind == "codec":
                continue
            out[spec.name] = self.value(spec)
        return out

    def value(self, spec: FieldSpec) -> Any:
        kind = spec.kind
        if kind == "int":
            return self.take("ints", 1)[0]
        if kind == "bool":
            value = self.take("ints", 1)[0]
            if value not in (0, 1):
                raise ValueError(f"{spec.name} is {value}, not a bool")
            return bool(value)
        if kind == "float":
            return _finite(spec.name, self.take("floats", 1))[0]
        if kind == "str":
            return self.take("strings", 1)[0]
        if kind in ("ints", "intset", "floats", "strs"):
            count = self.take("lengths", 1)[0]
            column = {"ints": "ints", "intset": "ints", "floats": "floats", "strs": "strings"}[kind]
            values = self.take(column, count)
            if kind == "floats":
                _finite(spec.name, values)
            if kind == "intset":
                if any(b <= a for a, b in zip(values, values[1:], strict=False)):
                    raise ValueError(f"{spec.name} is not strictly ascending")
                return frozenset(values)
            return tuple(values)
        if kind == "record":
            return spec.record.cls(**self.read(spec.record))
        if kind == "records":
            count = self.take("lengths", 1)[0]
            remaining = len(self.env.ints) + len(self.env.floats) + len(self.env.strings) + len(self.env.lengths)
            if count > remaining:
                raise ValueError(f"{spec.name} announces {count} records, more than the envelope holds")
            return tuple(spec.record.cls(**self.read(spec.record)) for _ in range(count))
        tensor = self.take("tensors", 1)[0]
        return self.tensor(tensor, whole=kind == "params")

    def tensor(self, tensor: Tensor, whole: bool) -> Params | ParamsSlice:
        layout = self.layout
        if tensor.layout_fingerprint != bytes.fromhex(layout.fingerprint):
            raise Refused("layout_mismatch", f"layout fingerprint {tensor.layout_fingerprint.hex() or '(none)'}, "
                                             f"this peer has {layout.fingerprint}")
        ranges = self._ranges(tensor, whole)
        numel = layout.numel if whole else sum(b - a for a, b in ranges)
        if tensor.numel != numel:
            raise Refused("bad_shape", f"numel {tensor.numel}, the {'layout' if whole else 'ranges'} cover {numel}")
        codec = self._codec(tensor)
        limit = codecs.max_encoded_nbytes(codec.kind, numel)
        raw = decompress(tensor.data, codec.compression, limit if self.max_bytes is None else min(limit, self.max_bytes))
        flat = _decode_tensor(raw, codec.kind, numel)
        finite = np.isfinite(flat.numpy())  # numpy: ~30x faster than torch.isfinite on small CPU tensors
        if not finite.all():
            raise Refused("non_finite", f"{int(finite.size - finite.sum())} NaN/Inf entries in the {codec.kind} tensor")
        if self.device is not None:
            flat = flat.to(self.device)
        return Params(flat, layout) if whole else ParamsSlice(flat, layout, ranges)

    def _ranges(self, tensor: Tensor, whole: bool) -> tuple[tuple[int, int], ...]:
        values = list(tensor.ranges)
        if whole:
            if values:
                raise Refused("bad_shape", "a whole-model tensor carries ranges")
            return ()
        if len(values) % 2:
            raise Refused("bad_shape", "ranges are not (start, stop) pairs")
        ranges = tuple(zip(values[::2], values[1::2], strict=True))
        try:
            check_ranges(ranges, self.layout.numel)
        except ValueError as exc:
            raise Refused("bad_shape", str(exc)) from None
        return ranges

    def _codec(self, tensor: Tensor) -> Codec:
        kind = CODEC_NAMES.get(tensor.codec)
        compression = COMPRESSION_NAMES.get(tensor.compression)
        if kind is None or compression is None:
            raise Refused("bad_codec", f"codec id {tensor.codec} / compression id {tensor.compression} unknown")
        codec = Codec(kind=kind, compression=compression)
        if codec != LOSSLESS and not self.accepts_codec:
            raise Refused("bad_codec", f"{kind}+{compression} on a message type that only travels as exact float32")
        if self.at["tensors"] > 1 and codec != self.codec:
            raise Refused("bad_codec", "tensors of one message use different codecs")
        self.codec = codec
        return codec

    def check_used_up(self, name: str) -> None:
        for column, used in self.at.items():
            if used != len(getattr(self.env, column)):
                raise ValueError(f"the envelope carries {len(getattr(self.env, column)) - used} more {column} than {name} has")


def _finite(name: str, values: list[float]) -> list[float]:
    if not all(math.isfinite(v) for v in values):
        raise Refused("non_finite", f"field {name} holds NaN or Inf")
    return values


def decompress(data: bytes, compression: str, limit: int) -> bytes:
    """Undo `compress`, never producing more than `limit` bytes (a bomb is too_large)."""
    if compression == "none":
        if len(data) > limit:
            raise Refused("too_large", f"tensor of {len(data)} bytes, at most {limit} expected")
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

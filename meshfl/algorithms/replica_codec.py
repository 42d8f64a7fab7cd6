"""Pure pieces of checkpoint replication: checksums, replica payloads, wire packing, holder choice.

Model checksums, replica payloads (full and delta), the packing of payload bytes into wire
floats, and the choice of holders (`farthest_peers`).

A replica payload is the model's bit patterns (float32, or float16 when lossy); a delta replaces
them by their integer difference from those of a base model the holder already has (modulo 2^32 or
2^16, zigzagged so small changes of either sign are small numbers). Then the words are split into
byte planes (every value's lowest byte, then every value's next byte, ...) and compressed (zstd or
gzip). Integer arithmetic modulo 2^w is exact both ways, so a float32 delta rebuilds the model bit
for bit; the planes put the high bytes, which barely change between rounds, next to each other,
where they compress to almost nothing. (Measured on the MNIST MLP, `benchmarks/replica_bytes.py`:
the integer difference compresses 3-5% better than an XOR of the bit patterns, and both far better
than a float subtraction, which is not exact anyway.) A float16 payload carries the model rounded
to float16, and a float16 delta is taken against the float16 model the holder rebuilt, so errors
never accumulate.

The wire has no bytes field: payload bytes travel as `tuple[float, ...]` (the envelope's packed,
fixed-width double column), 63 bits per float64 with the exponent's top bit zero so every value is
finite: 1.6% more than the bytes themselves (7 bytes per sint64 varint would cost 14%, base64 33%).
"""

from __future__ import annotations

import hashlib
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch
import zstandard

from meshfl.core.params import Layout, Params

ValueCodec = Literal["float32", "float16", "int8"]
PayloadCompression = Literal["zstd", "gzip"]

VALUE_CODECS: dict[str, tuple[np.dtype, np.dtype]] = {
    "float32": (np.dtype("<f4"), np.dtype("<u4")),
    "float16": (np.dtype("<f2"), np.dtype("<u2")),
    "int8": (np.dtype("<f4"), np.dtype("<u4")),  # full replicas exact (float32); deltas quantised (see below)
}
"""Value codecs. int8: a full replica is the exact float32 model; a delta is each tensor's change
quantised to int8 with one float32 scale per tensor (max |change| / 127), so it costs about a quarter
of a float32 delta; the holder rebuilds base + q x scale, and the origin keeps exactly that as the next
base, so the error of a chain is one delta's rounding (at most scale / 2 per value), never a sum."""
COMPRESSIONS = ("zstd", "gzip")
PACK_BITS = 63
"""Payload bits per wire float64 (1.6% more than the payload; an int column's varints would cost 14%)."""

_ZSTD_LEVEL = 3
_GZIP_LEVEL = 6
_F16_MAX = float(np.finfo(np.float16).max)


class ReplicaError(ValueError):
    """A payload that cannot be decoded or does not fit the layout (one line, says what is wrong)."""


def checksum(params: Params) -> str:
    """SHA-256 (hex) of the model's float32 values, little-endian: what a checkpoint is verified against."""
    values = params.flat.detach().cpu().contiguous().numpy().astype("<f4", copy=False)
    return hashlib.sha256(values.tobytes()).hexdigest()


def max_payload_bytes(numel: int, codec: str) -> int:
    """Largest payload a valid replica of `numel` values can have: the raw bytes plus compression's worst case.

    Raises
    ------
    ReplicaError
        If the codec is unknown.
    """
    raw = numel * _dtypes(codec)[0].itemsize
    return raw + raw // 64 + 1024


def _dtypes(codec: str) -> tuple[np.dtype, np.dtype]:
    try:
        return VALUE_CODECS[codec]
    except KeyError:
        raise ReplicaError(f"unknown replica codec {codec!r} (known: {', '.join(VALUE_CODECS)})") from None


def _bits(params: Params, codec: str) -> np.ndarray:
    values = params.flat.detach().cpu().contiguous().numpy()
    floats, words = _dtypes(codec)
    if codec == "float16":
        finite = values[np.isfinite(values)]
        if finite.size and float(np.abs(finite).max()) > _F16_MAX:
            raise ReplicaError(f"float16 replica: |value| up to {float(np.abs(finite).max()):.3g} exceeds {_F16_MAX:g}")
    return values.astype(floats).view(words)


def _planes(words: np.ndarray) -> bytes:
    """Byte-plane shuffle: byte 0 of every value, then byte 1 of every value, ..."""
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, words.itemsize).T).tobytes()


def _unplanes(raw: bytes, words: np.dtype, numel: int) -> np.ndarray:
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(words.itemsize, numel)
    return np.ascontiguousarray(planes.T).view(words).reshape(numel)


def compress(data: bytes, compression: str) -> bytes:
    """Compress `data` with `compression` ("zstd" or "gzip"; gzip without a timestamp, so deterministic).

    Raises
    ------
    ReplicaError
        If the compression is unknown.
    """
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)
    if compression == "gzip":
        packer = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)  # no timestamp: deterministic bytes
        return packer.compress(data) + packer.flush()
    raise ReplicaError(f"unknown replica compression {compression!r} (known: {', '.join(COMPRESSIONS)})")


def decompress(data: bytes, compression: str, size: int) -> bytes:
    """Decompress `data` to exactly `size` bytes, never more.

    Raises
    ------
    ReplicaError
        If the compression is unknown, the stream is damaged, or it expands to more or fewer than
        `size` bytes (a bomb or a short stream).
    """
    try:
        if compression == "zstd":
            out = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False).read(size + 1)
        elif compression == "gzip":
            out = zlib.decompressobj(31).decompress(data, size + 1)
        else:
            raise ReplicaError(f"unknown replica compression {compression!r} (known: {', '.join(COMPRESSIONS)})")
    except (zstandard.ZstdError, zlib.error) as exc:
        raise ReplicaError(f"{compression}: {exc}") from None
    if len(out) != size:
        raise ReplicaError(f"{compression} payload expands to {'more than' if len(out) > size else 'only'} "
                           f"{min(len(out), size)} bytes, {size} expected")
    return out


def encode_payload(target: Params, base: Params | None, codec: str, compression: str) -> tuple[bytes, Params]:
    """Encode `target` as a replica payload: a delta against `base`, else full.

    The rebuilt model is `target` itself for float32, `target` rounded to float16 for float16; keep it
    as the base of the next delta (never `target`), so a lossy chain does not drift.

    Parameters
    ----------
    target : Params
        The model to replicate.
    base : Params or None
        The model the holder already rebuilt (for a delta), or None for a full payload.
    codec : str
        "float32" or "float16".
    compression : str
        "zstd" or "gzip".

    Returns
    -------
    tuple[bytes, Params]
        The payload and the model a holder rebuilds from it.

    Raises
    ------
    ReplicaError
        If the codec or compression is unknown, `base` has another layout, or a float16 payload
        would overflow float16.
    """
    if base is not None and base.layout.fingerprint != target.layout.fingerprint:
        raise ReplicaError("delta replica: base and target layouts differ")
    if codec == "int8" and base is not None:
        raw, rebuilt_values = _int8_delta(target, base)
        return compress(raw, compression), Params(torch.from_numpy(rebuilt_values), target.layout)
    words = _bits(target, codec)
    if base is not None:
        words = _zigzag(words - _bits(base, codec))  # unsigned arithmetic wraps: exact modulo 2^w
    payload = compress(_planes(words), compression)
    rebuilt = target if codec in ("float32", "int8") else Params(torch.from_numpy(
        target.flat.detach().cpu().numpy().astype(np.float16).astype(np.float32)), target.layout)
    return payload, rebuilt


def decode_payload(payload: bytes, layout: Layout, base: Params | None, codec: str, compression: str) -> Params:
    """Decode the model a payload carries (applied to `base` for a delta).

    Parameters
    ----------
    payload : bytes
        From `encode_payload`.
    layout : Layout
        The model's layout.
    base : Params or None
        The model the delta is against, or None for a full payload.
    codec, compression : str
        As given to `encode_payload`.

    Returns
    -------
    Params
        The rebuilt model (float32).

    Raises
    ------
    ReplicaError
        If the payload is too large, does not decompress to the layout's size, `base` has another
        layout, or it decodes to NaN/Inf values.
    """
    floats, words = _dtypes(codec)
    if len(payload) > max_payload_bytes(layout.numel, codec):
        raise ReplicaError(f"payload of {len(payload)} bytes is larger than any {codec} replica of this layout")
    if base is not None and base.layout.fingerprint != layout.fingerprint:
        raise ReplicaError("delta replica: base layout differs")
    if codec == "int8" and base is not None:
        raw = decompress(payload, compression, 4 * len(layout.names) + layout.numel)
        values = _int8_apply(raw, base)
        if not np.isfinite(values).all():
            raise ReplicaError("payload decodes to NaN/Inf values")
        return Params(torch.from_numpy(values), layout)
    bits = _unplanes(decompress(payload, compression, layout.numel * words.itemsize), words, layout.numel)
    if base is not None:
        if base.layout.fingerprint != layout.fingerprint:
            raise ReplicaError("delta replica: base layout differs")
        bits = _bits(base, codec) + _unzigzag(bits)
    values = bits.view(floats).astype(np.float32)
    if not np.isfinite(values).all():
        raise ReplicaError("payload decodes to NaN/Inf values")
    return Params(torch.from_numpy(values), layout)


def _int8_delta(target: Params, base: Params) -> tuple[bytes, np.ndarray]:
    """Quantise target - base to int8 per tensor.

    Returns the payload bytes (the float32 scales, then the int8 values) and the model `_int8_apply`
    rebuilds from them, computed the same way, so origin and holder agree bit for bit.
    """
    change = target.flat.detach().cpu().numpy().astype(np.float32) - base.flat.detach().cpu().numpy().astype(np.float32)
    scales = np.zeros(len(target.layout.names), dtype="<f4")
    quantised = np.zeros(change.size, dtype=np.int8)
    for i, (offset, size) in enumerate(zip(target.layout.offsets, target.layout.sizes, strict=True)):
        part = change[offset:offset + size]
        peak = float(np.abs(part).max()) if size else 0.0
        if peak > 0 and np.isfinite(peak):
            scales[i] = np.float32(peak / 127.0)
            quantised[offset:offset + size] = np.clip(np.rint(part / scales[i]), -127, 127).astype(np.int8)
    raw = scales.tobytes() + quantised.tobytes()
    return raw, _int8_apply(raw, base)


def _int8_apply(raw: bytes, base: Params) -> np.ndarray:
    layout = base.layout
    count = len(layout.names)
    scales = np.frombuffer(raw[:4 * count], dtype="<f4")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ReplicaError("int8 delta: a scale is negative or not finite")
    quantised = np.frombuffer(raw[4 * count:], dtype=np.int8)
    values = base.flat.detach().cpu().numpy().astype(np.float32).copy()
    for i, (offset, size) in enumerate(zip(layout.offsets, layout.sizes, strict=True)):
        values[offset:offset + size] += quantised[offset:offset + size].astype(np.float32) * scales[i]
    return values


def _zigzag(words: np.ndarray) -> np.ndarray:
    """Unsigned w-bit differences read as signed, then mapped 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    signed = words.view(words.dtype.str.replace("u", "i"))
    return ((signed << 1) ^ (signed >> (8 * words.itemsize - 1))).view(words.dtype)


def _unzigzag(words: np.ndarray) -> np.ndarray:
    signed_one = (words & 1).view(words.dtype.str.replace("u", "i"))
    return (words >> 1) ^ (-signed_one).view(words.dtype)


def pack(data: bytes) -> tuple[float, ...]:
    """Pack bytes into wire floats: 63 payload bits per float64.

    The exponent's top bit (bit 62) stays zero, so every value is finite (the wire refuses NaN/Inf)
    and travels bit for bit in the fixed-width float column. `unpack` undoes it.
    """
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    count = -(-bits.size // PACK_BITS)
    groups = np.zeros(count * PACK_BITS, dtype=np.uint8)
    groups[:bits.size] = bits
    groups = groups.reshape(count, PACK_BITS)
    words = np.zeros((count, 64), dtype=np.uint8)
    words[:, :62] = groups[:, :62]
    words[:, 63] = groups[:, 62]  # the sign bit carries payload; bit 62 is left zero
    return tuple(np.packbits(words, axis=-1, bitorder="little").view("<f8").reshape(-1).tolist())


def unpack(values: tuple[float, ...], length: int) -> bytes:
    """Undo `pack`, giving back `length` bytes.

    Raises
    ------
    ReplicaError
        If the floats are not what `pack` makes of that many bytes.
    """
    if length < 0 or len(values) != packed_count(length):
        raise ReplicaError(f"{len(values)} payload floats cannot hold {length} bytes")
    words = np.unpackbits(np.asarray(values, dtype="<f8").view(np.uint8).reshape(-1, 8), axis=-1, bitorder="little")
    if words.size and words[:, 62].any():
        raise ReplicaError("payload float with its exponent's top bit set")
    bits = np.concatenate([words[:, :62], words[:, 63:]], axis=1).reshape(-1)
    if bits[8 * length:].any():
        raise ReplicaError("payload padding is not zero")
    return np.packbits(bits[:8 * length], bitorder="little").tobytes()


def packed_count(length: int) -> int:
    """Floats `pack` makes of `length` bytes."""
    return -(-8 * length // PACK_BITS)


def payload_digest(data: bytes) -> str:
    """SHA-256 (hex) of payload bytes: what a replica's signature covers (see `recovery.entry_bytes`)."""
    return hashlib.sha256(data).hexdigest()


def farthest_peers(adjacency: Mapping[int, Iterable[int]], origin: int, n: int,
                   exclude: Iterable[int] = ()) -> tuple[int, ...]:
    """The `n` peers farthest from `origin` in the overlay, by BFS hop distance.

    Parameters
    ----------
    adjacency
        Each known peer's neighbours; links count both ways (a peer listed by either end is linked).
    origin
        The peer whose replicas are to be placed.
    n
        How many peers to return (fewer when fewer are reachable).
    exclude
        Peers never returned (e.g. believed dead, or refusing to hold).

    Returns
    -------
    tuple of int
        Farthest first; equal distances go to the ids after `origin` in increasing order, then to
        those before it (so in a symmetric overlay, e.g. full or a ring, peers pick different holders).
        Unreachable peers are never returned.
    """
    links: dict[int, set[int]] = {}
    for peer, neighbours in adjacency.items():
        for other in neighbours:
            if other != peer:
                links.setdefault(peer, set()).add(other)
                links.setdefault(other, set()).add(peer)
    distance = {origin: 0}
    queue = deque([origin])
    while queue:
        peer = queue.popleft()
        for other in sorted(links.get(peer, ())):
            if other not in distance:
                distance[other] = distance[peer] + 1
                queue.append(other)
    skipped = set(exclude) | {origin}
    ranked = sorted((p for p in distance if p not in skipped), key=lambda p: (-distance[p], p < origin, p))
    return tuple(ranked[:max(n, 0)])

"""Tensor codecs: how a flat float32 model vector becomes bytes on the wire and back.

Pure functions on 1-D float32 tensors with explicit little-endian layouts, so peers on any
host agree byte for byte. Decoding trusts nothing: every length is checked exactly against
`numel` before any buffer is interpreted, and the result is always a fresh tensor that owns
its memory (never a view on the received bytes).

    float32  numel little-endian float32
    float16  numel little-endian float16 (lossy; values beyond +-65504 are refused at encode)
    int8     float32 scale (max|x|/127) + numel int8, x ~ scale * q, round-to-nearest
    topk     uint32 k + k uint32 indices (strictly ascending) + k float32 values; others zero
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

CODECS = ("float32", "float16", "int8", "topk")

_F16_MAX = float(np.finfo(np.float16).max)
_HEADER = 4  # int8: the float32 scale; topk: the uint32 k


class CodecError(ValueError):
    """A decoding failure with a `kind` the door maps to a refusal reason.

    kind: "dtype" (byte length not a whole number of elements), "shape" (wrong element count
    or index out of range), "value" (structurally invalid content such as unsorted indices).
    """

    def __init__(self, kind: Literal["dtype", "shape", "value"], message: str) -> None:
        super().__init__(message)
        self.kind = kind


def max_encoded_nbytes(codec: str, numel: int) -> int:
    """Largest byte length a valid `codec` encoding of `numel` entries can have.

    The door bounds decompression by this, so a compressed bomb cannot expand past what the
    declared tensor could legitimately need.
    """
    if codec == "float32":
        return 4 * numel
    if codec == "float16":
        return 2 * numel
    if codec == "int8":
        return _HEADER + numel
    if codec == "topk":
        return _HEADER + 8 * numel
    raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def encoded_nbytes(codec: str, numel: int, topk_fraction: float) -> int:
    """Exact byte length `encode_tensor` produces for `numel` entries (before compression)."""
    if codec == "topk":
        return _HEADER + 8 * topk_count(numel, topk_fraction)
    return max_encoded_nbytes(codec, numel)


def topk_count(numel: int, fraction: float) -> int:
    """Entries topk keeps: ceil(fraction * numel), at least one for a non-empty tensor."""
    if not 0 < fraction <= 1:
        raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
    return min(numel, max(1, math.ceil(fraction * numel))) if numel else 0


def encode_tensor(flat: torch.Tensor, codec: str, topk_fraction: float) -> bytes:
    """Encode a 1-D float32 tensor; `topk_fraction` is only read by the topk codec."""
    values = _as_numpy(flat)
    if codec == "float32":
        return values.astype("<f4", copy=False).tobytes()
    if codec == "float16":
        return _encode_float16(values)
    if codec == "int8":
        return _encode_int8(values)
    if codec == "topk":
        return _encode_topk(values, topk_count(values.size, topk_fraction))
    raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def decode_tensor(data: bytes, codec: str, numel: int) -> torch.Tensor:
    """Decode `numel` float32 entries; raise CodecError (a ValueError) naming what is wrong."""
    if numel < 0:
        raise CodecError("shape", f"numel must be >= 0, got {numel}")
    if codec == "float32":
        return _from_numpy(_fixed_width(data, "<f4", numel, codec))
    if codec == "float16":
        return _from_numpy(_fixed_width(data, "<f2", numel, codec))
    if codec == "int8":
        return _decode_int8(data, numel)
    if codec == "topk":
        return _decode_topk(data, numel)
    raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def _as_numpy(flat: torch.Tensor) -> np.ndarray:
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.dtype != torch.float32:
        got = f"{tuple(flat.shape)} {flat.dtype}" if isinstance(flat, torch.Tensor) else type(flat).__name__
        raise ValueError(f"encode_tensor needs a 1-D float32 tensor, got {got}")
    return flat.detach().cpu().contiguous().numpy()


def _from_numpy(values: np.ndarray) -> torch.Tensor:
    """A float32 tensor that owns fresh native-endian memory (astype with copy=True always copies)."""
    return torch.from_numpy(values.astype(np.float32, copy=True))


def _encode_float16(values: np.ndarray) -> bytes:
    finite = values[np.isfinite(values)]
    if finite.size and float(np.abs(finite).max()) > _F16_MAX:
        raise ValueError(f"float16 codec: |value| up to {float(np.abs(finite).max()):.3g} exceeds {_F16_MAX:g}; use float32 or int8")
    return values.astype("<f2").tobytes()


def _encode_int8(values: np.ndarray) -> bytes:
    if values.size and not np.isfinite(values).all():
        raise ValueError("int8 codec: the tensor has NaN/Inf entries, which a per-tensor scale cannot represent")
    peak = float(np.abs(values).max()) if values.size else 0.0
    scale = np.float32(peak / 127.0)
    if scale > 0:
        q = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
    else:
        q = np.zeros(values.size, dtype=np.int8)
    return np.array([scale], dtype="<f4").tobytes() + q.tobytes()


def _encode_topk(values: np.ndarray, k: int) -> bytes:
    if k == 0:
        return np.array([0], dtype="<u4").tobytes()
    # argpartition picks the k largest magnitudes in O(n); sorting the picks keeps indices ascending.
    picked = np.sort(np.argpartition(np.abs(values), values.size - k)[values.size - k:])
    header = np.array([k], dtype="<u4").tobytes()
    return header + picked.astype("<u4").tobytes() + values[picked].astype("<f4").tobytes()


def _fixed_width(data: bytes, dtype: str, numel: int, codec: str) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    if len(data) % width:
        raise CodecError("dtype", f"{codec}: {len(data)} bytes is not a whole number of {width}-byte elements")
    if len(data) != width * numel:
        raise CodecError("shape", f"{codec}: {len(data) // width} entries, expected {numel}")
    return np.frombuffer(data, dtype=dtype, count=numel)


def _decode_int8(data: bytes, numel: int) -> torch.Tensor:
    if len(data) != _HEADER + numel:
        kind = "dtype" if len(data) < _HEADER else "shape"
        raise CodecError(kind, f"int8: {len(data)} bytes, expected {_HEADER} (scale) + {numel}")
    scale = np.frombuffer(data, dtype="<f4", count=1)[0]
    if scale < 0:
        raise CodecError("value", f"int8: negative scale {float(scale)}")
    q = np.frombuffer(data, dtype=np.int8, count=numel, offset=_HEADER)
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN/Inf scale is the door's non_finite, not a warning
        return torch.from_numpy(q.astype(np.float32) * np.float32(scale))


def _decode_topk(data: bytes, numel: int) -> torch.Tensor:
    if len(data) < _HEADER or (len(data) - _HEADER) % 8:
        raise CodecError("dtype", f"topk: {len(data)} bytes is not a 4-byte count plus whole (index, value) pairs")
    k = int(np.frombuffer(data, dtype="<u4", count=1)[0])
    if len(data) != _HEADER + 8 * k:
        raise CodecError("shape", f"topk: header says k={k} but {(len(data) - _HEADER) // 8} entries follow")
    if k > numel:
        raise CodecError("shape", f"topk: k={k} exceeds numel={numel}")
    indices = np.frombuffer(data, dtype="<u4", count=k, offset=_HEADER).astype(np.int64)
    if k and int(indices.max()) >= numel:
        raise CodecError("shape", f"topk: index {int(indices.max())} out of range for numel={numel}")
    if k > 1 and not (np.diff(indices) > 0).all():
        raise CodecError("value", "topk: indices are not strictly ascending")
    out = np.zeros(numel, dtype=np.float32)
    out[indices] = np.frombuffer(data, dtype="<f4", count=k, offset=_HEADER + 4 * k)
    return torch.from_numpy(out)

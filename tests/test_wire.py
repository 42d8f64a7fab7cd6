"""Tensor codecs and the envelope wire format: exact where lossless, bounded where lossy, small."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from meshfl.config import WireConfig
from meshfl.core.messages import AggregatedModel, Ballot, HaveModels, Message, PartialModel, Votes
from meshfl.core.params import Layout, Params
from meshfl.runtime.grpc import codecs, wire
from meshfl.runtime.grpc.wire import Goodbye, Heartbeat

CODECS = list(wire.CODEC_IDS)
COMPRESSIONS = list(wire.COMPRESSION_IDS)


def _normal(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _layout(numel_w: int = 40, numel_b: int = 7) -> Layout:
    return Layout(("fc.weight", "fc.bias"), ((numel_w // 4, 4), (numel_b,)))


# ---------------------------------------------------------------------------------- codecs


def test_float32_round_trip_is_exact():
    x = torch.cat([_normal(1000), torch.tensor([0.0, -0.0, 1e-45, 3.4e38, -3.4e38])])
    data = codecs.encode_tensor(x, "float32", 0.1)
    assert len(data) == 4 * x.numel()
    y = codecs.decode_tensor(data, "float32", x.numel())
    assert y.dtype == torch.float32 and torch.equal(x, y)


def test_float16_relative_error_is_small_on_normal_data():
    x = _normal(10_000, seed=1) * 3
    y = codecs.decode_tensor(codecs.encode_tensor(x, "float16", 0.1), "float16", x.numel())
    err = (y - x).abs()
    # 1e-3 relative; the 6e-8 absolute floor covers values in float16's subnormal range.
    assert bool((err <= 1e-3 * x.abs() + 6e-8).all()), float((err / x.abs()).max())
    assert float(err.max()) > 0  # it really is lossy: the bound is being tested, not equality


def test_float16_refuses_values_it_would_turn_into_inf():
    with pytest.raises(ValueError, match="float16"):
        codecs.encode_tensor(torch.tensor([1.0, 70_000.0]), "float16", 0.1)


def test_int8_error_is_at_most_half_a_step():
    x = _normal(10_000, seed=2)
    data = codecs.encode_tensor(x, "int8", 0.1)
    assert len(data) == 4 + x.numel()
    scale = float(x.abs().max()) / 127
    y = codecs.decode_tensor(data, "int8", x.numel())
    assert float((y - x).abs().max()) <= scale / 2 + 1e-6
    assert float(y.abs().max()) == pytest.approx(float(x.abs().max()), rel=1e-6)  # the peak is exact


def test_int8_zero_tensor_and_non_finite_input():
    zeros = codecs.decode_tensor(codecs.encode_tensor(torch.zeros(5), "int8", 0.1), "int8", 5)
    assert torch.equal(zeros, torch.zeros(5))
    with pytest.raises(ValueError, match="NaN/Inf"):
        codecs.encode_tensor(torch.tensor([1.0, float("nan")]), "int8", 0.1)


def test_topk_keeps_exactly_the_largest_magnitudes():
    n, fraction = 1000, 0.05
    g = torch.Generator().manual_seed(3)
    magnitudes = (torch.randperm(n, generator=g) + 1).float()  # distinct, so the top k is unique
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = magnitudes * signs
    data = codecs.encode_tensor(x, "topk", fraction)
    k = math.ceil(fraction * n)
    assert len(data) == 4 + 8 * k
    y = codecs.decode_tensor(data, "topk", n)
    expected = set(torch.topk(x.abs(), k).indices.tolist())
    kept = set(torch.nonzero(y).flatten().tolist())
    assert kept == expected
    idx = sorted(expected)
    assert torch.equal(y[idx], x[idx])
    assert int((y != 0).sum()) == k


def test_topk_count_rounds_up_and_keeps_at_least_one():
    assert codecs.topk_count(1000, 0.1) == 100
    assert codecs.topk_count(7, 0.01) == 1
    assert codecs.topk_count(5, 1.0) == 5
    assert codecs.topk_count(0, 0.5) == 0


@pytest.mark.parametrize("codec", CODECS)
def test_truncated_and_oversized_inputs_raise(codec):
    n = 64
    data = codecs.encode_tensor(_normal(n), codec, 0.25)
    for bad in (data[:-1], data[: len(data) // 2], b"", data + b"\x00", data + b"\x00" * 8):
        with pytest.raises(ValueError):
            codecs.decode_tensor(bad, codec, n)
    with pytest.raises(ValueError):
        codecs.decode_tensor(data, codec, n + 1 if codec != "topk" else 2)  # wrong numel (topk: k > numel)


def test_topk_rejects_out_of_range_and_unsorted_indices():
    def raw(indices, values):
        return (np.array([len(indices)], "<u4").tobytes() + np.array(indices, "<u4").tobytes()
                + np.array(values, "<f4").tobytes())

    assert torch.equal(codecs.decode_tensor(raw([1, 3], [5, 6]), "topk", 4), torch.tensor([0.0, 5, 0, 6]))
    with pytest.raises(codecs.CodecError) as out_of_range:
        codecs.decode_tensor(raw([1, 4], [5, 6]), "topk", 4)
    assert out_of_range.value.kind == "shape"
    with pytest.raises(codecs.CodecError) as unsorted:
        codecs.decode_tensor(raw([3, 1], [5, 6]), "topk", 4)
    assert unsorted.value.kind == "value"
    with pytest.raises(codecs.CodecError) as duplicate:
        codecs.decode_tensor(raw([1, 1], [5, 6]), "topk", 4)
    assert duplicate.value.kind == "value"


def test_byte_length_errors_say_dtype_or_shape():
    with pytest.raises(codecs.CodecError) as dtype:
        codecs.decode_tensor(b"\x00" * 7, "float32", 2)
    assert dtype.value.kind == "dtype"
    with pytest.raises(codecs.CodecError) as shape:
        codecs.decode_tensor(b"\x00" * 12, "float32", 2)
    assert shape.value.kind == "shape"


def test_decoded_tensor_does_not_alias_the_input_buffer():
    x = _normal(100)
    buffer = bytearray(codecs.encode_tensor(x, "float32", 0.1))
    y = codecs.decode_tensor(buffer, "float32", 100)
    buffer[:] = b"\xff" * len(buffer)
    assert torch.equal(x, y)


def test_encode_refuses_non_float32_or_non_flat_input():
    with pytest.raises(ValueError, match="1-D float32"):
        codecs.encode_tensor(torch.zeros(3, dtype=torch.float64), "float32", 0.1)
    with pytest.raises(ValueError, match="1-D float32"):
        codecs.encode_tensor(torch.zeros(2, 2), "float32", 0.1)
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.encode_tensor(torch.zeros(2), "bf16", 0.1)


# ---------------------------------------------------------------------------------- envelopes


def _messages(layout: Layout) -> list[Message]:
    params = Params(_normal(layout.numel, seed=7), layout)
    return [
        Votes(sender=3, round=2, ballots=(Ballot(5, (1, 4, 6), (7, 2, 1)),)),
        Votes(sender=0, round=0, ballots=(Ballot(0, (), ()),)),
        Votes(sender=2, round=3, ballots=(Ballot(2, (0,), (9,)), Ballot(7, (), ()), Ballot(4, (1, 3), (5, 5)))),
        PartialModel(sender=1, round=9, params=params, contributors=frozenset({6, 1, 3}), weight=123.5),
        AggregatedModel(sender=2, round=4, params=params, contributors=frozenset({0, 2})),
        AggregatedModel(sender=0, round=0, params=params),
        HaveModels(sender=4, round=4, contributors=frozenset({9, 2}), complete=True),
        HaveModels(sender=4, round=5, contributors=frozenset(), complete=False),
        Heartbeat(sender=7, round=11),
        Goodbye(sender=3, round=2),
    ]


def _assert_same(sent: Message, got: Message, wire_config: WireConfig) -> None:
    assert type(got) is type(sent)
    tensor_fields = {"params"}
    for name in sent.__dataclass_fields__:
        if name not in tensor_fields:
            assert getattr(got, name) == getattr(sent, name), name
    if isinstance(sent, (PartialModel, AggregatedModel)):
        assert got.params.layout == sent.params.layout
        codec, n = wire_config.codec, sent.params.layout.numel
        expected = codecs.decode_tensor(codecs.encode_tensor(sent.params.flat, codec, wire_config.topk_fraction), codec, n)
        assert torch.equal(got.params.flat, expected)  # compression is lossless: only the codec may change values
        if codec == "float32":
            assert torch.equal(got.params.flat, sent.params.flat)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("codec", CODECS)
def test_every_message_round_trips(codec, compression):
    layout = _layout()
    config = WireConfig(codec=codec, compression=compression, topk_fraction=0.2)
    for message in _messages(layout):
        got = wire.decode(wire.encode(message, config), layout)
        _assert_same(message, got, config)


def test_heartbeat_round_trip_and_size():
    beat = Heartbeat(sender=12, round=345)
    data = wire.encode(beat, WireConfig())
    assert wire.decode(data, _layout()) == beat
    assert beat.wire_size == 48
    assert len(data) <= beat.wire_size


@pytest.mark.parametrize("kind", ["partial", "aggregated"])
def test_float32_envelope_overhead_is_within_5_percent(kind):
    layout = Layout(("w", "b"), ((200, 1000), (100,)))  # ~200k params
    params = Params(_normal(layout.numel), layout)
    contributors = frozenset(range(0, 64, 3))
    if kind == "partial":
        message = PartialModel(sender=17, round=1234, params=params, contributors=contributors, weight=6000.0)
    else:
        message = AggregatedModel(sender=17, round=1234, params=params, contributors=contributors)
    data = wire.encode(message, WireConfig(codec="float32", compression="none"))
    ratio = len(data) / message.wire_size
    assert ratio <= 1.05, ratio
    assert len(data) >= params.nbytes  # and it really carries the whole tensor


def test_encoding_is_deterministic():
    layout = _layout()
    for compression in COMPRESSIONS:
        config = WireConfig(codec="float32", compression=compression)
        for message in _messages(layout):
            assert wire.encode(message, config) == wire.encode(message, config)


def test_decoded_params_are_fresh():
    layout = _layout()
    message = next(m for m in _messages(layout) if isinstance(m, PartialModel))
    buffer = bytearray(wire.encode(message, WireConfig()))
    got = wire.decode(bytes(buffer), layout)
    got.params.flat.add_(1.0)  # writable, and writing it must not touch the sender's tensor
    assert not torch.equal(got.params.flat, message.params.flat)


def test_encode_refuses_unknown_message_types():
    @dataclass(frozen=True, kw_only=True)
    class Gossip(Message):
        pass

    with pytest.raises(ValueError, match="no wire type"):
        wire.encode(Gossip(sender=0, round=0), WireConfig())


def test_chunks_split_and_join():
    data = bytes(range(256)) * 40
    parts = list(wire.chunks(data, 1000))
    assert b"".join(parts) == data
    assert all(len(p) <= 1000 for p in parts) and len(parts) == math.ceil(len(data) / 1000)
    assert list(wire.chunks(b"", 10)) == [b""]
    with pytest.raises(ValueError):
        list(wire.chunks(data, 0))


def test_id_maps_are_consistent():
    assert set(wire.CODEC_IDS) == set(codecs.CODECS)
    assert {wire.CODEC_NAMES[i] for i in wire.CODEC_IDS.values()} == set(wire.CODEC_IDS)
    assert {cls.__name__: i for i, cls in wire.MESSAGE_CLASSES.items()} == wire.MESSAGE_TYPES

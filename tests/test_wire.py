"""Tensor codecs and the envelope wire format: exact where lossless, bounded where lossy, sized exactly."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch

from meshfl.algorithms.coordinator import Done, Held, Update, Work
from meshfl.algorithms.dht import DhtRecord, FindNode, FindValue, FoundNodes, FoundValue, StoredValue, StoreValue
from meshfl.algorithms.dpsgd import Model as DpsgdModel
from meshfl.algorithms.gossip import (
    AggregatedModel,
    Ballot,
    Contribution,
    HaveModels,
    JoinReply,
    JoinRequest,
    PartialModel,
    Skip,
    Votes,
)
from meshfl.algorithms.moshpit import Begin, Join, Part, Reduced, State, StateReply
from meshfl.algorithms.mpls import Done as MplsDone
from meshfl.algorithms.mpls import Info, InfoReply, Layers, Pull
from meshfl.algorithms.recovery import (
    Adjacency,
    Announcement,
    Replica,
    ReplicaAck,
    ReplicaChain,
    ReplicaEntry,
    ReplicaFetch,
)
from meshfl.algorithms.smart_gossip import Holds as SmartHolds
from meshfl.algorithms.smart_gossip import RoundReply, RoundRequest
from meshfl.algorithms.smart_gossip import Update as SmartUpdate
from meshfl.core.messages import (
    LOSSLESS,
    MESSAGE_NAMES,
    MESSAGE_TYPES,
    TYPE_IDS,
    Codec,
    Goodbye,
    Heartbeat,
    Message,
    register_message,
    type_id,
)
from meshfl.core.params import Layout, Params, ParamsSlice
from meshfl.wire import codecs, envelope
from meshfl.wire.envelope import decode, encode, encoded_size

CODECS = list(envelope.CODEC_IDS)
COMPRESSIONS = list(envelope.COMPRESSION_IDS)
ALL_CODECS = [Codec(kind=k, topk_fraction=0.2, compression=c) for k in CODECS for c in COMPRESSIONS]

LAYOUT = Layout(("0.weight", "0.bias", "1.weight", "1.bias"), ((3, 4), (3,), (2, 3), (2,)))  # 23 params


def _normal(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _params(seed: int = 7, layout: Layout = LAYOUT) -> Params:
    return Params(_normal(layout.numel, seed=seed), layout)


# ---------------------------------------------------------------------------------- a test message


@dataclass(frozen=True, kw_only=True)
class SliceDelta(Message):
    """What a layer-pull or reduce-scatter algorithm would send: two slices of one model."""

    round: int
    part: ParamsSlice
    delta: ParamsSlice
    codec: Codec = LOSSLESS


register_message(SliceDelta, "test.SliceDelta")


def _delta_slice(old: Params, new: Params, ranges: tuple[tuple[int, int], ...]) -> ParamsSlice:
    return ParamsSlice.of(Params(new.flat - old.flat, old.layout), ranges)


# ---------------------------------------------------------------------------------- codecs


def test_float32_round_trip_is_exact():
    x = torch.cat([_normal(1000), torch.tensor([0.0, -0.0, 1e-45, 3.4e38, -3.4e38])])
    data = codecs.encode_tensor(x, "float32", 0.1)
    assert len(data) == 4 * x.numel() == codecs.encoded_nbytes("float32", x.numel(), 0.1)
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
    assert len(data) == 4 + x.numel() == codecs.encoded_nbytes("int8", x.numel(), 0.1)
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
    assert len(data) == 4 + 8 * k == codecs.encoded_nbytes("topk", n, fraction)
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
@pytest.mark.parametrize("n", [0, 1, 7, 64])
def test_encoded_nbytes_is_exact(codec, n):
    for fraction in (0.01, 0.2, 1.0):
        assert len(codecs.encode_tensor(_normal(n), codec, fraction)) == codecs.encoded_nbytes(codec, n, fraction)
        assert codecs.encoded_nbytes(codec, n, fraction) <= codecs.max_encoded_nbytes(codec, n)


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


# ---------------------------------------------------------------------------------- one example per message type
# Every registered message type needs a factory here: a new algorithm's messages must be sized and
# round-tripped like the built-in ones (test_every_registered_message_type_has_a_factory).


def _heartbeats(codec: Codec) -> list[Message]:
    return [Heartbeat(sender=12), Heartbeat(sender=0)]


def _goodbyes(codec: Codec) -> list[Message]:
    return [Goodbye(sender=3), Goodbye(sender=2**32 - 1)]


def _votes(codec: Codec) -> list[Message]:
    return [
        Votes(sender=3, round=2, ballots=(Ballot(5, (1, 4, 6), (7, 2, 1)),)),
        Votes(sender=0, round=0, ballots=(Ballot(0, (), ()),)),
        Votes(sender=2, round=3, ballots=(Ballot(2, (0,), (9,)), Ballot(7, (), ()), Ballot(4, (1, 3), (5, 5)))),
    ]


def _partial_models(codec: Codec) -> list[Message]:
    return [
        PartialModel(sender=1, round=9, params=_params(), contributors=frozenset({6, 1, 3}), weight=123.5, codec=codec),
        PartialModel(sender=0, round=0, params=_params(seed=8), contributors=frozenset({0}), weight=1e-3, codec=codec),
    ]


def _aggregated_models(codec: Codec) -> list[Message]:
    return [
        AggregatedModel(sender=2, round=4, params=_params(), contributors=frozenset({0, 2}), codec=codec),
        AggregatedModel(sender=0, round=0, params=_params(seed=9), codec=codec),
    ]


def _contributions(codec: Codec) -> list[Message]:
    return [
        Contribution(sender=3, round=5, origin=7, samples=5400, params=_params(seed=17), codec=codec, signature="ab" * 64),
        Contribution(sender=0, round=1, origin=0, samples=10**9, params=_params(seed=18), codec=codec),  # an inflated claim
    ]


def _have_models(codec: Codec) -> list[Message]:
    return [
        HaveModels(sender=4, round=4, contributors=frozenset({9, 2}), complete=True),
        HaveModels(sender=4, round=5, contributors=frozenset(), complete=False),
    ]


def _join_requests(codec: Codec) -> list[Message]:
    return [JoinRequest(sender=5), JoinRequest(sender=5, request_id=2**40)]


def _join_replies(codec: Codec) -> list[Message]:
    return [JoinReply(sender=1, in_reply_to=3, round=17, params=_params(seed=10))]


def _slice_deltas(codec: Codec) -> list[Message]:
    old, new = _params(seed=11), _params(seed=12)
    layer = ParamsSlice.layers(new, ("1.weight", "0.weight"))
    return [
        SliceDelta(sender=1, round=3, part=layer, delta=ParamsSlice.chunk(new, 1, 3), codec=codec),
        SliceDelta(sender=1, round=4, part=ParamsSlice.chunk(new, 2, 3), delta=_delta_slice(old, new, ((0, 5), (12, 15), (20, 23))),
                   codec=codec),
        SliceDelta(sender=1, round=5, part=ParamsSlice.chunk(new, 0, 30), delta=ParamsSlice.of(new, ()), codec=codec),  # empty slices
    ]


def _works(codec: Codec) -> list[Message]:
    return [Work(sender=0, round=3, term=1, workload=2, params=_params(seed=13), codec=codec)]


def _updates(codec: Codec) -> list[Message]:
    return [Update(sender=2, round=3, samples=180, trained=360, train_s=1.25, params=_params(seed=14),
                   codec=codec)]


def _dpsgd_models(codec: Codec) -> list[Message]:
    return [DpsgdModel(sender=3, round=4, degree=2, params=_params(seed=16), codec=codec)]


def _skips(codec: Codec) -> list[Message]:
    return [Skip(sender=1, round=3, origin=0, signature="ab" * 64)]


def _smart_updates(codec: Codec) -> list[Message]:
    return [SmartUpdate(sender=2, origin=5, version=7, samples=180, params=_params(seed=17), codec=codec,
                        signature="ab" * 64)]


def _smart_holds(codec: Codec) -> list[Message]:
    return [SmartHolds(sender=1, origins=(5,), versions=(7,)), SmartHolds(sender=1, origins=(), versions=())]


def _round_requests(codec: Codec) -> list[Message]:
    return [RoundRequest(sender=4, request_id=(4 << 32) + 2)]


def _round_replies(codec: Codec) -> list[Message]:
    return [RoundReply(sender=1, in_reply_to=(4 << 32) + 2, round=6, params=_params(seed=18))]


def _dones(codec: Codec) -> list[Message]:
    return [Done(sender=0, round=9, params=_params(seed=15))]


def _helds(codec: Codec) -> list[Held]:
    return [Held(sender=3, round=7, term=2, leader=1, params=_params(seed=16), codec=codec)]


def _replica_entry(round: int, base_round: int) -> ReplicaEntry:
    return ReplicaEntry(round=round, base_round=base_round, codec="float32", compression="zstd",
                        fingerprint=LAYOUT.fingerprint, checksum="ab" * 32, length=9, payload=(-0.0, 1.5e-310),
                        signature="cd" * 64)


def _adjacencies(codec: Codec) -> list[Message]:
    return [Adjacency(sender=2, announcements=(Announcement(2, 1, (0, 3), "ef" * 64), Announcement(4, 0, (), "")))]


def _replicas(codec: Codec) -> list[Message]:
    return [Replica(sender=1, origin=1, entry=_replica_entry(4, -1)), Replica(sender=1, origin=1, entry=_replica_entry(6, 4))]


def _replica_acks(codec: Codec) -> list[Message]:
    return [ReplicaAck(sender=3, round=6, accepted=True, need_full=False), ReplicaAck(sender=3, round=7, accepted=False, need_full=True)]


def _replica_fetches(codec: Codec) -> list[Message]:
    return [ReplicaFetch(sender=1, request_id=(3 << 32) + 1, min_round=0, max_round=2**62)]


def _replica_chains(codec: Codec) -> list[Message]:
    return [ReplicaChain(sender=3, in_reply_to=9, entries=()),
            ReplicaChain(sender=3, in_reply_to=9, entries=(_replica_entry(4, -1), _replica_entry(6, 4)))]


def _mpls_messages(cls: type[Message]) -> Callable[[Codec], list[Message]]:
    def make(codec: Codec) -> list[Message]:
        whole = Params(torch.arange(LAYOUT.numel, dtype=torch.float32), LAYOUT)
        return {
            Info: [Info(sender=1, request_id=(2 << 32) + 7)],
            InfoReply: [InfoReply(sender=2, in_reply_to=7, iteration=12, scores=(0.0, 1.5e-7, 3.25), label_counts=(0, 17, 2**40)),
                        InfoReply(sender=2, in_reply_to=7, iteration=0, scores=(), label_counts=(), done=True)],
            Pull: [Pull(sender=1, request_id=9, layers=(0, 2))],
            Layers: [Layers(sender=2, in_reply_to=9, iteration=3, slice=ParamsSlice.of(whole, ((0, 2), (5, LAYOUT.numel))),
                            scores=(1.0, 2.0))],
            MplsDone: [MplsDone(sender=4, iteration=30)],
        }[cls]
    return make


_RECORD = DhtRecord(writer=2, value='{"a": 1}', expiration=12.5, signature="ab" * 64)


FACTORIES: dict[type[Message], Callable[[Codec], list[Message]]] = {
    Heartbeat: _heartbeats,
    Goodbye: _goodbyes,
    Votes: _votes,
    PartialModel: _partial_models,
    AggregatedModel: _aggregated_models,
    Contribution: _contributions,
    HaveModels: _have_models,
    JoinRequest: _join_requests,
    JoinReply: _join_replies,
    SliceDelta: _slice_deltas,
    Work: _works,
    Update: _updates,
    Done: _dones,
    Held: _helds,
    DpsgdModel: _dpsgd_models,
    Skip: _skips,
    SmartUpdate: _smart_updates,
    SmartHolds: _smart_holds,
    RoundRequest: _round_requests,
    RoundReply: _round_replies,
    Info: _mpls_messages(Info),
    InfoReply: _mpls_messages(InfoReply),
    Pull: _mpls_messages(Pull),
    Layers: _mpls_messages(Layers),
    MplsDone: _mpls_messages(MplsDone),
    Join: lambda c: [Join(sender=1, request_id=11, group="moshpit/3/1/[2, 0]")],
    Begin: lambda c: [Begin(sender=2, in_reply_to=11, group="moshpit/3/1/[2, 0]", members=(1, 2, 7)),
                      Begin(sender=2, in_reply_to=11, group="g", members=(), leader=0)],
    Part: lambda c: [Part(sender=1, group="g", index=2, weight=1437.0,
                          values=ParamsSlice.of(Params(torch.arange(LAYOUT.numel, dtype=torch.float32), LAYOUT), ((7, 15),)))],
    Reduced: lambda c: [Reduced(sender=3, group="g", index=0, contributors=4,
                                values=ParamsSlice.of(Params(torch.full((LAYOUT.numel,), -2.5), LAYOUT), ((0, 8),)))],
    State: lambda c: [State(sender=4, request_id=1)],
    StateReply: lambda c: [StateReply(sender=2, in_reply_to=1, iteration=9, params=Params(torch.ones(LAYOUT.numel), LAYOUT))],
    FindNode: lambda c: [FindNode(sender=1, request_id=3, target="0" * 40, exclude=frozenset({4, 9}))],
    FoundNodes: lambda c: [FoundNodes(sender=2, in_reply_to=3, peers=(4, 5)), FoundNodes(sender=2, in_reply_to=3, peers=())],
    FindValue: lambda c: [FindValue(sender=1, request_id=4, key="group/3")],
    FoundValue: lambda c: [FoundValue(sender=2, in_reply_to=4, records=(_RECORD,), peers=(1,))],
    StoreValue: lambda c: [StoreValue(sender=1, request_id=5, key="g", records=(_RECORD, _RECORD))],
    StoredValue: lambda c: [StoredValue(sender=2, in_reply_to=5, accepted=2)],
    # meshfl.algorithms.recovery: registered by the algorithms that use it (under their names)
    Adjacency: _adjacencies,
    Replica: _replicas,
    ReplicaAck: _replica_acks,
    ReplicaFetch: _replica_fetches,
    ReplicaChain: _replica_chains,
}


def _registered() -> list[type[Message]]:
    # "test." names belong to other test modules' own message classes (e.g. test_door's); they test them there.
    return [cls for cls in MESSAGE_TYPES.values() if cls in FACTORIES or not MESSAGE_NAMES[cls].startswith("test.")]


def _has_codec(cls: type[Message]) -> bool:
    return any(f.name == "codec" for f in fields(cls))


def _examples(cls: type[Message]) -> list[tuple[Codec, Message]]:
    codecs_ = ALL_CODECS if _has_codec(cls) else [LOSSLESS]
    return [(codec, message) for codec in codecs_ for message in FACTORIES[cls](codec)]


def test_every_registered_message_type_has_a_factory():
    missing = sorted(MESSAGE_NAMES[cls] for cls in _registered() if cls not in FACTORIES)
    assert not missing, f"add a factory to tests/test_wire.py FACTORIES for {missing}"
    assert {Heartbeat, Goodbye, Votes, PartialModel, AggregatedModel, HaveModels, JoinRequest, JoinReply, SliceDelta} <= set(_registered())


def test_encoded_size_equals_the_encoding_for_every_message_type_and_codec():
    checked = 0
    for cls in _registered():
        for codec, message in _examples(cls):
            data = encode(message)
            assert encoded_size(message) == len(data), (MESSAGE_NAMES[cls], codec, message)
            assert encoded_size(message) == len(data)  # the remembered size too
            checked += 1
    assert checked >= 9 + 3 * len(ALL_CODECS)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_encoded_size_of_topk_follows_its_fraction(fraction):
    layout = Layout(("w",), ((1000,),))
    for compression in COMPRESSIONS:
        message = AggregatedModel(sender=1, round=2, params=_params(layout=layout),
                                  codec=Codec(kind="topk", topk_fraction=fraction, compression=compression))
        assert encoded_size(message) == len(encode(message))


def _same_fields(sent: Message, got: Message) -> None:
    assert type(got) is type(sent)
    for f in fields(sent):
        a, b = getattr(sent, f.name), getattr(got, f.name)
        if f.name == "codec":
            assert (b.kind, b.compression) == (a.kind, a.compression)  # topk_fraction is the sender's business
        elif isinstance(a, Params):
            assert b.layout == a.layout
            if not _has_codec(type(sent)) or sent.codec.kind == "float32":
                assert torch.equal(b.flat, a.flat), f.name
        elif isinstance(a, ParamsSlice):
            assert b.layout == a.layout and b.ranges == a.ranges, f.name
            if sent.codec.kind == "float32":
                assert torch.equal(b.values, a.values), f.name
        else:
            assert b == a, f.name


def _expected_values(values: torch.Tensor, codec: Codec) -> torch.Tensor:
    """What a lossy codec should give back: the codec's own round trip (compression is lossless)."""
    return codecs.decode_tensor(codecs.encode_tensor(values, codec.kind, codec.topk_fraction), codec.kind, values.numel())


@pytest.mark.parametrize("codec", ALL_CODECS, ids=lambda c: f"{c.kind}-{c.compression}")
def test_every_gossip_message_round_trips(codec):
    for cls in (Votes, PartialModel, AggregatedModel, Contribution, HaveModels, JoinRequest, JoinReply):
        for message in FACTORIES[cls](codec):
            got = decode(encode(message), LAYOUT)
            _same_fields(message, got)
            if isinstance(message, (PartialModel, AggregatedModel, Contribution)):
                assert torch.equal(got.params.flat, _expected_values(message.params.flat, codec))
            if not _has_codec(cls) and isinstance(got, Message):
                assert encode(got) == encode(message)  # nothing lossy without a codec field


def test_heartbeat_round_trip_and_size():
    beat = Heartbeat(sender=12)
    data = encode(beat)
    assert decode(data, LAYOUT) == beat
    assert encoded_size(beat) == len(data) <= 16


@pytest.mark.parametrize("codec", ALL_CODECS, ids=lambda c: f"{c.kind}-{c.compression}")
def test_slices_and_compressed_deltas_round_trip_exactly_or_within_codec_error(codec):
    old, new = _params(seed=11), _params(seed=12)
    for message in _slice_deltas(codec):
        data = encode(message)
        assert encoded_size(message) == len(data)
        got = decode(data, LAYOUT)
        _same_fields(message, got)
        for name in ("part", "delta"):
            sent, back = getattr(message, name), getattr(got, name)
            assert back.ranges == sent.ranges and back.layout == LAYOUT
            expected = _expected_values(sent.values, codec)
            assert torch.equal(back.values, expected), name
            if codec.kind == "float32":
                assert torch.equal(back.values, sent.values)
            elif codec.kind == "float16":
                assert bool(((back.values - sent.values).abs() <= 1e-3 * sent.values.abs() + 6e-8).all())
            elif codec.kind == "int8" and sent.numel:
                assert float((back.values - sent.values).abs().max()) <= float(sent.values.abs().max()) / 254 + 1e-6
            elif codec.kind == "topk" and sent.numel:
                kept = back.values != 0
                assert int(kept.sum()) <= codecs.topk_count(sent.numel, codec.topk_fraction)
                assert torch.equal(back.values[kept], sent.values[kept])  # kept entries are exact
                dropped = sent.values[~kept].abs()
                assert dropped.numel() == 0 or float(dropped.max()) <= float(sent.values[kept].abs().min())
    # The layer slice lands where it came from; an exact delta rebuilds the new model's entries.
    if codec.kind == "float32":
        layer_message, delta_message = _slice_deltas(codec)[:2]
        got_layer = decode(encode(layer_message), LAYOUT).part
        assert got_layer.ranges == ((0, 12), (15, 21))  # 0.weight and 1.weight, in layout order
        patched = got_layer.apply_to(old)
        assert torch.equal(patched.tensor("1.weight"), new.tensor("1.weight"))
        assert torch.equal(patched.tensor("0.weight"), new.tensor("0.weight"))
        assert torch.equal(patched.tensor("0.bias"), old.tensor("0.bias"))
        got_delta = decode(encode(delta_message), LAYOUT).delta
        base = ParamsSlice.of(old, got_delta.ranges)
        rebuilt = ParamsSlice(base.values + got_delta.values, LAYOUT, got_delta.ranges).apply_to(old)
        assert torch.allclose(rebuilt.flat, ParamsSlice.of(new, got_delta.ranges).apply_to(old).flat, atol=1e-6)
        chunk = decode(encode(delta_message), LAYOUT).part
        assert chunk.ranges == ((15, 23),) and torch.equal(chunk.values, new.flat[15:23])  # chunk 2 of 3 of 23 entries


def test_topk_zstd_delta_is_small_and_exact_where_kept():
    layout = Layout(("w",), ((10_000,),))
    old = _params(seed=1, layout=layout)
    new = Params(old.flat + 0.01 * _normal(layout.numel, seed=2), layout)
    ranges = ((1000, 6000),)
    delta = _delta_slice(old, new, ranges)
    message = SliceDelta(sender=2, round=1, part=ParamsSlice.chunk(new, 0, 100), delta=delta,
                         codec=Codec(kind="topk", topk_fraction=0.05, compression="zstd"))
    data = encode(message)
    assert encoded_size(message) == len(data)
    assert len(data) < 0.1 * 4 * (delta.numel + 100)  # ~5% of the entries, at 8 bytes each, zstd'd
    got = decode(data, layout).delta
    assert got.ranges == ranges
    kept = got.values != 0
    assert int(kept.sum()) == codecs.topk_count(delta.numel, 0.05)
    assert torch.equal(got.values[kept], delta.values[kept])


@pytest.mark.parametrize("kind", ["partial", "aggregated"])
def test_float32_envelope_overhead_is_within_5_percent(kind):
    layout = Layout(("w", "b"), ((200, 1000), (100,)))  # ~200k params
    params = Params(_normal(layout.numel), layout)
    contributors = frozenset(range(0, 64, 3))
    if kind == "partial":
        message = PartialModel(sender=17, round=1234, params=params, contributors=contributors, weight=6000.0)
    else:
        message = AggregatedModel(sender=17, round=1234, params=params, contributors=contributors)
    data = encode(message)
    assert len(data) == encoded_size(message)
    assert params.nbytes <= len(data) <= 1.05 * params.nbytes  # it carries the whole tensor, and little else


def test_encoding_is_deterministic():
    for cls in _registered():
        for _, message in _examples(cls):
            assert encode(message) == encode(message)


def test_decoded_params_are_fresh():
    message = _partial_models(LOSSLESS)[0]
    buffer = bytearray(encode(message))
    got = decode(bytes(buffer), LAYOUT)
    buffer[:] = bytes(len(buffer))
    got.params.flat.add_(1.0)  # writable, and writing it must not touch the sender's tensor
    assert not torch.equal(got.params.flat, message.params.flat)
    assert torch.equal(message.params.flat, _params().flat)


def test_encode_refuses_unregistered_message_types():
    @dataclass(frozen=True, kw_only=True)
    class Gossip(Message):
        round: int

    with pytest.raises(ValueError, match="not a registered message type"):
        encode(Gossip(sender=0, round=0))
    with pytest.raises(ValueError, match="not a registered message type"):
        encoded_size(Gossip(sender=0, round=0))


@pytest.mark.parametrize("hint", [dict[str, int], list[int], set[int], tuple[int, str], frozenset[str], bytes, torch.Tensor])
def test_a_field_the_wire_cannot_carry_fails_at_registration(hint):
    cls = dataclass(frozen=True, kw_only=True)(type("Unsendable", (Message,), {"__annotations__": {"round": int, "table": hint}}))
    with pytest.raises(TypeError, match=r"Unsendable\.table"):
        register_message(cls, f"test.Unsendable.{hint!r}")
    assert cls not in TYPE_IDS and type_id(f"test.Unsendable.{hint!r}") not in MESSAGE_TYPES


@dataclass(frozen=True)
class Holder:
    params: Params


@dataclass(frozen=True, kw_only=True)
class Carrier(Message):
    holder: Holder


def test_records_may_not_hold_tensors_and_names_must_be_unique():
    with pytest.raises(TypeError, match=r"Carrier\.holder"):
        register_message(Carrier, "test.Carrier")

    @dataclass(frozen=True, kw_only=True)
    class Impostor(Message):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_message(Impostor, "test.SliceDelta")
    with pytest.raises(TypeError, match="not a Message"):
        register_message(Holder, "test.Holder")
    assert register_message(SliceDelta, "test.SliceDelta") is SliceDelta  # registering again is harmless


def test_chunks_split_and_join():
    data = bytes(range(256)) * 40
    parts = list(envelope.chunks(data, 1000))
    assert b"".join(parts) == data
    assert all(len(p) <= 1000 for p in parts) and len(parts) == math.ceil(len(data) / 1000)
    assert list(envelope.chunks(b"", 10)) == [b""]
    with pytest.raises(ValueError):
        list(envelope.chunks(data, 0))


def test_id_maps_are_consistent():
    assert set(envelope.CODEC_IDS) == set(codecs.CODECS)
    assert {envelope.CODEC_NAMES[i] for i in envelope.CODEC_IDS.values()} == set(envelope.CODEC_IDS)
    assert {envelope.COMPRESSION_NAMES[i] for i in envelope.COMPRESSION_IDS.values()} == set(envelope.COMPRESSION_IDS)
    assert envelope.CODEC_IDS["float32"] == 0 and envelope.COMPRESSION_IDS["none"] == 0  # proto3 defaults: exact, uncompressed
    for ident, cls in MESSAGE_TYPES.items():
        assert TYPE_IDS[cls] == ident == type_id(MESSAGE_NAMES[cls])
    assert len(set(TYPE_IDS.values())) == len(TYPE_IDS)
    assert envelope.WIRE_VERSION == 3

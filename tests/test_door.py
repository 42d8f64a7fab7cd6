"""The door refuses every hostile input with the right reason, counts it, and still admits good messages."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import zstandard

from meshfl.algorithms.gossip import AggregatedModel, Ballot, HaveModels, JoinReply, JoinRequest, PartialModel, Votes
from meshfl.config import WireConfig
from meshfl.core.messages import LOSSLESS, Codec, Goodbye, Heartbeat, Message, register_message
from meshfl.core.params import Layout, Params, ParamsSlice
from meshfl.runtime.grpc.door import REASONS, Door, Refused
from meshfl.wire import envelope as wire
from meshfl.wire.meshfl_pb2 import Envelope, Tensor

LAYOUT = Layout(("conv.weight", "conv.bias", "fc.weight"), ((4, 1, 3, 3), (4,), (10, 26)))  # 300 params
PEERS = frozenset(range(6))
ROUND = 10
WIRE = WireConfig(max_message_mb=0.01)  # 10 KiB: room for the model, not for much more
MAX_BYTES = int(0.01 * (1 << 20))


@dataclass(frozen=True, kw_only=True)
class Snapshot(Message):
    """A message with a whole model but no codec field: it may only travel as exact float32."""

    round: int
    params: Params


@dataclass(frozen=True, kw_only=True)
class Layers(Message):
    """A message with model slices and a codec, like a layer-pull or reduce-scatter algorithm's."""

    round: int
    part: ParamsSlice
    rest: ParamsSlice
    codec: Codec = LOSSLESS


register_message(Snapshot, "test.door.Snapshot")
register_message(Layers, "test.door.Layers")


def _door(log: Callable[[str], None] | None = None) -> Door:
    return Door(layout=LAYOUT, known_peers=PEERS, wire=WIRE, log=log or (lambda line: None))


def _flat(seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(seed))


def _partial(seed: int = 0, sender: int = 1, round_: int = ROUND, codec: Codec = LOSSLESS) -> PartialModel:
    return PartialModel(sender=sender, round=round_, params=Params(_flat(seed), LAYOUT), contributors=frozenset({1, 4}),
                        weight=50.0, codec=codec)


def _layers(seed: int = 0, codec: Codec = LOSSLESS) -> Layers:
    params = Params(_flat(seed), LAYOUT)
    return Layers(sender=2, round=ROUND, part=ParamsSlice.layers(params, ("conv.weight", "fc.weight")),
                  rest=ParamsSlice.chunk(params, 1, 4), codec=codec)


def _envelope(message: Message | None = None) -> Envelope:
    return Envelope.FromString(wire.encode(message if message is not None else _partial()))


def _raw_tensor_envelope(tensor: bytes, codec: int = 0, compression: int = 0, numel: int = LAYOUT.numel) -> bytes:
    """A PartialModel whose one tensor carries these bytes, codec id and compression id."""
    env = _envelope()
    t = env.tensors[0]
    t.codec, t.compression, t.numel, t.data = codec, compression, numel, tensor
    return env.SerializeToString()


def _hand_built(type_: type[Message], *, sender: int = 1, ints=(), floats=(), strings=(), lengths=(),
                tensors: tuple[Tensor, ...] = ()) -> bytes:
    env = Envelope(wire_version=wire.WIRE_VERSION, type=wire.TYPE_IDS[type_], sender=sender)
    env.ints.extend(ints)
    env.floats.extend(floats)
    env.strings.extend(strings)
    env.lengths.extend(lengths)
    env.tensors.extend(tensors)
    return env.SerializeToString()


def _reason(door: Door, data: bytes, hint: int | None = None) -> str:
    with pytest.raises(Refused) as exc:
        door.admit(data, peer_hint=hint)
    return exc.value.reason


# ---------------------------------------------------------------------------------- hostile inputs


def _random_bytes(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    # Garbage rarely parses, and when it does it lacks version 3 or carries unknown fields.
    return rng.bytes(int(rng.integers(0, 300))), {"malformed"}


def _truncated(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    data = wire.encode(_partial(int(rng.integers(1000))))
    header = len(data) - 4 * LAYOUT.numel
    return data[: int(rng.integers(header, len(data)))], {"malformed"}  # cut inside the tensor field


def _tensor_dropped(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(_partial(int(rng.integers(1000))))
    env.ClearField("tensors")
    return env.SerializeToString(), {"malformed"}


def _wrong_fingerprint(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope()
    env.tensors[0].layout_fingerprint = rng.bytes(int(rng.choice([0, 7, 8, 16])))
    return env.SerializeToString(), {"layout_mismatch"}


def _wrong_numel(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(_partial(codec=Codec(kind=str(rng.choice(list(wire.CODEC_IDS))))))
    env.tensors[0].numel = int(rng.choice([0, LAYOUT.numel - 1, LAYOUT.numel + 1, 2**40]))
    return env.SerializeToString(), {"bad_shape"}


def _bad_ranges(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(_layers(int(rng.integers(1000))))
    n = LAYOUT.numel
    bad = [[5, 3], [0, 10, 5, 20], [0, n + 1], [10, 20, 20, 20], [0, 5, 7], [0, 2**63], [20, 30, 0, 10]][int(rng.integers(0, 7))]
    t = env.tensors[int(rng.integers(0, 2))]
    t.ClearField("ranges")
    t.ranges.extend(bad)
    return env.SerializeToString(), {"bad_shape"}


def _ranges_on_whole_model(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope()
    env.tensors[0].ranges.extend([0, LAYOUT.numel])
    return env.SerializeToString(), {"bad_shape"}


def _bad_dtype(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    codec = int(rng.choice([0, 1]))  # float32 / float16
    width = 4 if codec == 0 else 2
    return _raw_tensor_envelope(rng.bytes(width * LAYOUT.numel - int(rng.integers(1, width))), codec=codec), {"bad_dtype"}


def _non_finite(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    flat = _flat(int(rng.integers(1000))).numpy()
    positions = rng.choice(LAYOUT.numel, size=int(rng.integers(1, 5)), replace=False)
    flat[positions] = rng.choice([np.nan, np.inf, -np.inf], size=positions.size)
    codec = int(rng.integers(0, 3))
    if codec == 0:
        tensor = flat.astype("<f4").tobytes()
    elif codec == 1:
        tensor = flat.astype("<f2").tobytes()
    else:  # int8 with an Inf or NaN scale
        tensor = np.array([rng.choice([np.nan, np.inf])], "<f4").tobytes() + rng.bytes(LAYOUT.numel)
    compression = int(rng.integers(0, 3))
    tensor = wire.compress(tensor, wire.COMPRESSION_NAMES[compression])
    return _raw_tensor_envelope(tensor, codec=codec, compression=compression), {"non_finite"}


def _non_finite_weight(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    # Every float field is checked at the door, before any constructor sees it.
    env = _envelope()
    env.floats[0] = float(rng.choice([np.nan, np.inf, -np.inf]))
    return env.SerializeToString(), {"non_finite"}


def _oversized(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    return rng.bytes(MAX_BYTES + int(rng.integers(1, 5000))), {"too_large"}


def _forged_sender(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    return wire.encode(_partial(sender=int(rng.integers(6, 2**31)))), {"unknown_sender"}


def _bad_codec(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope()
    if rng.random() < 0.5:
        env.tensors[0].codec = int(rng.integers(4, 2**32))
    else:
        env.tensors[0].compression = int(rng.integers(3, 2**32))
    return env.SerializeToString(), {"bad_codec"}


def _lossy_without_codec_field(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    kind = str(rng.choice(["float16", "int8", "topk", "float32"]))
    compression = "none" if kind != "float32" else str(rng.choice(["gzip", "zstd"]))
    params = Params(_flat(int(rng.integers(1000))), LAYOUT)
    carrier = PartialModel(sender=3, round=ROUND, params=params, contributors=frozenset({3}), weight=1.0,
                           codec=Codec(kind=kind, compression=compression))
    tensor = _envelope(carrier).tensors[0]  # a valid lossy tensor, then put on a message that may not carry one
    message = Snapshot(sender=3, round=ROUND, params=params) if rng.random() < 0.5 else JoinReply(sender=3, round=ROUND, params=params)
    env = _envelope(message)
    env.tensors[0].CopyFrom(tensor)
    return env.SerializeToString(), {"bad_codec"}


def _mixed_codecs(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(_layers(int(rng.integers(1000)), codec=Codec(kind="float16")))
    other = _envelope(_layers(codec=Codec(kind="int8"))).tensors[1]
    env.tensors[1].CopyFrom(other)
    return env.SerializeToString(), {"bad_codec"}


def _unknown_type(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(Votes(sender=1, round=ROUND, ballots=(Ballot(1, (1,), (1,)),)))
    unknown = [t for t in (0, 1, 99, 2**32 - 1, int(rng.integers(0, 2**32))) if t not in wire.MESSAGE_TYPES]
    env.type = int(rng.choice(unknown))
    return env.SerializeToString(), {"unknown_type"}


_BOMB = bytes(4 << 20)  # 4 MiB of zeros: compresses to a few KiB, far beyond the 1200-byte tensor
_BOMBS = (wire.compress(_BOMB, "zstd"), wire.compress(_BOMB, "gzip"))


def _zip_bomb(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    which = int(rng.integers(0, 2))
    return _raw_tensor_envelope(_BOMBS[which], compression=2 if which == 0 else 1), {"too_large"}


def _corrupt_stream(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    compression = int(rng.integers(1, 3))
    packed = wire.compress(_flat(0).numpy().tobytes(), wire.COMPRESSION_NAMES[compression])
    choice = int(rng.integers(0, 3))
    if choice == 0:
        packed = packed[: int(rng.integers(0, len(packed)))]  # truncated
    elif choice == 1:
        packed = packed + rng.bytes(int(rng.integers(1, 20)))  # trailing garbage
    else:
        packed = rng.bytes(len(packed))  # not a stream at all
    return _raw_tensor_envelope(packed, compression=compression), {"malformed"}


def _bad_contributors(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    # HaveModels: ints = [round, *sorted contributors, complete], lengths = [len(contributors)]
    forged = [3, 1] if rng.random() < 0.5 else [2, 2]
    return _hand_built(HaveModels, sender=2, ints=[ROUND, *forged, 0], lengths=[2]), {"malformed"}


def _bad_bool(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    return _hand_built(HaveModels, sender=2, ints=[ROUND, 1, 2, int(rng.choice([2, -1, 2**40]))], lengths=[2]), {"malformed"}


def _columns_short(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    # lengths announce more than the columns hold, or a column ends before the fields do
    case = int(rng.integers(0, 3))
    if case == 0:
        return _hand_built(HaveModels, sender=2, ints=[ROUND, 1, 0], lengths=[int(rng.integers(2, 2**32))]), {"malformed"}
    if case == 1:
        return _hand_built(HaveModels, sender=2, ints=[ROUND], lengths=[0]), {"malformed"}
    return _hand_built(Votes, sender=2, ints=[ROUND, 1], lengths=[int(rng.integers(2, 2**32))]), {"malformed"}


def _stray_fields(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(Heartbeat(sender=1))
    column = int(rng.integers(0, 5))
    if column == 0:
        env.tensors.append(_envelope().tensors[0])
    elif column == 1:
        env.ints.append(int(rng.integers(0, 10)))
    elif column == 2:
        env.floats.append(1.0)
    elif column == 3:
        env.strings.append("x")
    else:
        env.lengths.append(0)
    return env.SerializeToString(), {"malformed"}


def _odd_vote(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(Votes(sender=1, round=ROUND, ballots=(Ballot(3, (1, 2), (3, 4)),)))
    env.ints.append(int(rng.integers(0, 10)))  # trailing ints: the columns are not used up
    return env.SerializeToString(), {"malformed"}


def _topk_out_of_range(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    indices = np.array([0, LAYOUT.numel + int(rng.integers(0, 1000))], "<u4")
    tensor = np.array([2], "<u4").tobytes() + indices.tobytes() + np.ones(2, "<f4").tobytes()
    return _raw_tensor_envelope(tensor, codec=3), {"bad_shape"}


def _wrong_version(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope()
    env.wire_version = int(rng.choice([0, 1, wire.WIRE_VERSION - 1, wire.WIRE_VERSION + 1, 2**40]))
    return env.SerializeToString(), {"malformed"}


def _unknown_field(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    extra = bytes([int(rng.integers(9, 16)) << 3, int(rng.integers(1, 100))])  # an unknown varint field (9..15)
    if rng.random() < 0.5:
        return wire.encode(_partial()) + extra, {"malformed"}
    env = _envelope()
    t = Tensor.FromString(env.tensors[0].SerializeToString() + extra)  # unknown field inside the tensor
    env.tensors[0].CopyFrom(t)
    return env.SerializeToString(), {"malformed"}


HOSTILE = [_random_bytes, _truncated, _tensor_dropped, _wrong_fingerprint, _wrong_numel, _bad_ranges, _ranges_on_whole_model,
           _bad_dtype, _non_finite, _non_finite_weight, _oversized, _forged_sender, _bad_codec, _lossy_without_codec_field,
           _mixed_codecs, _unknown_type, _zip_bomb, _corrupt_stream, _bad_contributors, _bad_bool, _columns_short,
           _stray_fields, _odd_vote, _topk_out_of_range, _wrong_version, _unknown_field]


def test_fuzz_every_hostile_input_is_refused_with_its_reason():
    rng = np.random.default_rng(20240611)
    logged: list[str] = []
    door = _door(log=logged.append)
    sent = 0
    for i in range(1300):
        make = HOSTILE[i % len(HOSTILE)]
        data, expected = make(rng)
        with pytest.raises(Refused) as refused:
            door.admit(data)
        assert refused.value.reason in expected, (make.__name__, refused.value.reason, refused.value.detail)
        sent += 1
    assert sum(door.refused.values()) == sent
    assert door.admitted == 0
    assert set(door.refused) <= set(REASONS)
    assert set(REASONS) - set(door.refused) == set()  # the corpus exercises every reason
    assert len(logged) == len(door.refused)  # each reason logged once, however often it recurs
    assert all(line.startswith("door: refused ") for line in logged)
    # ... and afterwards a good message still goes through, unchanged.
    good = _partial(seed=99)
    got = door.admit(wire.encode(good), peer_hint=1)
    assert isinstance(got, PartialModel) and torch.equal(got.params.flat, good.params.flat)
    assert (got.sender, got.round, got.contributors, got.weight, got.codec) == (good.sender, good.round, good.contributors, good.weight, LOSSLESS)
    assert door.admitted == 1


def test_fuzz_random_mutations_are_admitted_or_refused_never_crash():
    rng = np.random.default_rng(7)
    door = _door()
    base = [wire.encode(m) for c in ("float32", "int8", "topk") for z in ("none", "zstd")
            for m in (_partial(codec=Codec(kind=c, compression=z)), _layers(codec=Codec(kind=c, compression=z)))]
    base += [wire.encode(m) for m in (Votes(sender=2, round=ROUND, ballots=(Ballot(2, (1,), (2,)),)),
                                      HaveModels(sender=3, round=ROUND, contributors=frozenset({1, 2}), complete=True))]
    n = 400
    for _ in range(n):
        data = bytearray(base[int(rng.integers(len(base)))])
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        try:
            door.admit(bytes(data))
        except Refused as exc:
            assert exc.reason in REASONS
    assert door.admitted + sum(door.refused.values()) == n


# ---------------------------------------------------------------------------------- specific rules


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("codec", ["float32", "float16", "int8", "topk"])
def test_valid_messages_are_admitted(codec, compression):
    door = _door()
    chosen = Codec(kind=codec, compression=compression, topk_fraction=0.2)
    params = Params(_flat(3), LAYOUT)
    messages = [
        _partial(codec=chosen),
        AggregatedModel(sender=0, round=ROUND - 2, params=params, codec=chosen),
        _layers(codec=chosen),
        Votes(sender=5, round=ROUND + 3, ballots=(Ballot(2, (1, 2), (2, 1)),)),
        HaveModels(sender=3, round=ROUND, contributors=frozenset({0, 5}), complete=True),
        Heartbeat(sender=4),
        Goodbye(sender=4),
        JoinRequest(sender=2, request_id=7),
        JoinReply(sender=2, in_reply_to=7, round=ROUND, params=params),  # no codec field: always float32
        Snapshot(sender=1, round=ROUND, params=params),
    ]
    for message in messages:
        got = door.admit(wire.encode(message))
        assert type(got) is type(message) and got.sender == message.sender
        if hasattr(message, "codec"):
            assert (got.codec.kind, got.codec.compression) == (codec, compression)
    assert door.admitted == len(messages) and not door.refused


@pytest.mark.parametrize("round_", [0, 1, ROUND - 3, 2**40])
def test_old_and_future_rounds_are_admitted_staleness_is_the_algorithms_business(round_):
    door = _door()
    for message in (_partial(round_=round_), HaveModels(sender=3, round=round_, contributors=frozenset({1}))):
        got = door.admit(wire.encode(message))
        assert got.round == round_
    assert door.admitted == 2 and not door.refused


def test_checks_run_in_the_documented_order():
    door = _door()
    env = _envelope(_partial(sender=42))
    env.type = 0
    assert _reason(door, env.SerializeToString()) == "unknown_type"  # type before sender
    env = _envelope(_partial(sender=42))
    env.tensors[0].layout_fingerprint = b"\x00" * 8
    assert _reason(door, env.SerializeToString()) == "unknown_sender"  # sender before fingerprint
    env = _envelope(_layers())
    env.tensors[0].layout_fingerprint = b"\x00" * 8
    env.tensors[0].ranges[:] = [5, 3]
    assert _reason(door, env.SerializeToString()) == "layout_mismatch"  # fingerprint before shape
    env = _envelope(_layers())
    env.tensors[0].ranges[:] = [5, 3]
    env.tensors[0].codec = 9
    assert _reason(door, env.SerializeToString()) == "bad_shape"  # shape (ranges) before codec
    env = _envelope(_partial())
    env.tensors[0].codec, env.tensors[0].data = 9, _BOMBS[0]
    assert _reason(door, env.SerializeToString()) == "bad_codec"  # codec before decompression
    nan = np.full(LAYOUT.numel, np.nan, "<f4").tobytes()
    env = Envelope.FromString(_raw_tensor_envelope(nan))
    env.floats[0] = float("nan")  # and the weight is bad too
    assert _reason(door, env.SerializeToString()) == "non_finite"  # tensor content before constructing the message
    assert _reason(door, b"\x00" * (MAX_BYTES + 1)) == "too_large"  # size before parsing (this is not even protobuf)


def test_peer_hint_must_match_the_sender():
    door = _door()
    data = wire.encode(_partial(sender=1))
    assert door.admit(data, peer_hint=1).sender == 1
    with pytest.raises(Refused) as exc:
        door.admit(data, peer_hint=2)
    assert exc.value.reason == "unknown_sender" and "peer 2" in exc.value.detail
    unknown = wire.encode(Heartbeat(sender=7))
    assert _reason(door, unknown, hint=7) == "unknown_sender"  # a matching hint does not make a stranger known


def test_lossy_codec_only_on_messages_with_a_codec_field():
    door = _door()
    params = Params(_flat(1), LAYOUT)
    for kind, compression in [("float16", "none"), ("int8", "zstd"), ("topk", "gzip"), ("float32", "gzip")]:
        lossy = _envelope(_partial(codec=Codec(kind=kind, compression=compression))).tensors[0]
        for message in (Snapshot(sender=1, round=ROUND, params=params), JoinReply(sender=1, round=ROUND, params=params)):
            env = _envelope(message)
            env.tensors[0].CopyFrom(lossy)
            with pytest.raises(Refused) as exc:
                door.admit(env.SerializeToString())
            assert exc.value.reason == "bad_codec" and "exact float32" in exc.value.detail, (kind, compression)
    # HaveModels carries no tensors at all: a tensor on it is surplus, hence malformed.
    env = _envelope(HaveModels(sender=1, round=ROUND, contributors=frozenset({1})))
    env.tensors.append(_envelope(_partial(codec=Codec(kind="int8"))).tensors[0])
    assert _reason(door, env.SerializeToString()) == "malformed"
    assert door.refused == {"bad_codec": 8, "malformed": 1}


@pytest.mark.parametrize("ranges", [[5, 3], [0, 10, 5, 20], [0, 10, 10, 10], [20, 30, 0, 10], [0, LAYOUT.numel + 1],
                                    [LAYOUT.numel, LAYOUT.numel + 1], [0, 5, 7], [0, 2**64 - 1]])
def test_slice_ranges_that_overlap_or_leave_the_model_are_bad_shape(ranges):
    door = _door()
    env = _envelope(_layers())
    t = env.tensors[1]
    t.ClearField("ranges")
    t.ranges.extend(ranges)
    assert _reason(door, env.SerializeToString()) == "bad_shape"


def test_valid_slices_are_admitted_with_their_ranges():
    door = _door()
    sent = _layers(seed=4)
    got = door.admit(wire.encode(sent))
    assert got.part.ranges == ((0, 36), (40, 300)) and got.rest.ranges == ((75, 150),)
    assert torch.equal(got.part.values, sent.part.values) and torch.equal(got.rest.values, sent.rest.values)
    # the same ranges with the numel of the values (not the layout) are accepted; a numel that lies is not
    env = _envelope(sent)
    env.tensors[1].numel = LAYOUT.numel
    assert _reason(door, env.SerializeToString()) == "bad_shape"


def test_forged_intsets_and_trailing_columns_are_malformed():
    door = _door()
    good = _hand_built(HaveModels, sender=2, ints=[ROUND, 1, 2, 1], lengths=[2])
    got = door.admit(good)
    assert got == HaveModels(sender=2, round=ROUND, contributors=frozenset({1, 2}), complete=True)
    for ints in ([ROUND, 2, 1, 1], [ROUND, 2, 2, 1]):  # not strictly ascending: unsorted, duplicate
        with pytest.raises(Refused) as exc:
            door.admit(_hand_built(HaveModels, sender=2, ints=ints, lengths=[2]))
        assert exc.value.reason == "malformed" and "ascending" in exc.value.detail
    with pytest.raises(Refused) as exc:
        door.admit(_hand_built(HaveModels, sender=2, ints=[ROUND, 1, 2, 1, 99], lengths=[2]))  # one int too many
    assert exc.value.reason == "malformed" and "more ints" in exc.value.detail
    with pytest.raises(Refused) as exc:
        door.admit(_hand_built(HaveModels, sender=2, ints=[ROUND, 1, 2, 1], lengths=[2, 0]))
    assert exc.value.reason == "malformed" and "more lengths" in exc.value.detail
    assert door.refused == {"malformed": 4} and door.admitted == 1


def test_unexpected_errors_become_malformed(monkeypatch):
    door = _door()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(wire, "build", broken)
    with pytest.raises(Refused) as exc:
        door.admit(wire.encode(_partial()))
    assert exc.value.reason == "malformed" and "RuntimeError" in exc.value.detail
    assert door.refused["malformed"] == 1


def test_admitted_tensor_is_fresh_and_writable():
    door = _door()
    good = _partial(seed=5)
    buffer = bytearray(wire.encode(good))
    got = door.admit(buffer)
    buffer[:] = bytes(len(buffer))
    assert torch.equal(got.params.flat, good.params.flat)
    got.params.flat.mul_(0)
    assert not torch.equal(got.params.flat, good.params.flat)


def test_bomb_is_bounded_by_max_message_size_too():
    # A layout bigger than max_message_mb: the decompression bound is then the message limit.
    big = Layout(("w",), ((10_000,),))
    door = Door(layout=big, known_peers=PEERS, wire=WIRE, log=lambda line: None)
    message = AggregatedModel(sender=0, round=0, params=Params(torch.zeros(10_000), big), codec=Codec(compression="zstd"))
    env = Envelope.FromString(wire.encode(message))
    assert len(env.SerializeToString()) < MAX_BYTES  # zeros compress well: the envelope itself is small
    with pytest.raises(Refused) as exc:
        door.admit(env.SerializeToString())
    assert exc.value.reason == "too_large" and str(MAX_BYTES) in exc.value.detail
    assert zstandard.ZstdDecompressor().decompress(env.tensors[0].data) == bytes(40_000)


def test_reject_counts_transport_refusals():
    logged: list[str] = []
    door = _door(log=logged.append)
    exc = door.reject("too_large", "stream passed 10 KiB", peer_hint=3)
    assert isinstance(exc, Refused) and door.refused["too_large"] == 1
    assert "peer 3" in logged[0]
    door.reject("too_large", "again", peer_hint=3)
    assert door.refused["too_large"] == 2 and len(logged) == 1  # logged once per reason
    with pytest.raises(ValueError):
        Refused("no_such_reason", "x")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_decompression_never_allocates_the_bomb(compression):
    """The bound holds while decompressing, not just afterwards: peak memory stays near the limit."""
    bomb = wire.compress(bytes(16 << 20), compression)
    tracemalloc.start()
    try:
        with pytest.raises(Refused) as exc:
            wire.decompress(bomb, compression, 1200)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.reason == "too_large"
    assert peak < 2 << 20, peak  # a 16 MiB output would have shown up here

"""The door refuses every hostile input with the right reason, counts it, and still admits good messages."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch
import zstandard

from meshfl.config import WireConfig
from meshfl.core.messages import AggregatedModel, Ballot, HaveModels, PartialModel, Votes
from meshfl.core.params import Layout, Params
from meshfl.runtime.grpc import wire
from meshfl.runtime.grpc.door import REASONS, Door, Refused
from meshfl.runtime.grpc.meshfl_pb2 import Envelope
from meshfl.runtime.grpc.wire import Heartbeat

LAYOUT = Layout(("conv.weight", "conv.bias", "fc.weight"), ((4, 1, 3, 3), (4,), (10, 26)))  # 300 params
PEERS = frozenset(range(6))
CURRENT_ROUND = 10
WIRE = WireConfig(max_message_mb=0.01, max_round_lag=2)  # 10 KiB: room for the model, not for much more
MAX_BYTES = int(0.01 * (1 << 20))


def _door(log: Callable[[str], None] | None = None) -> Door:
    return Door(layout=LAYOUT, known_peers=PEERS, wire=WIRE, current_round=lambda: CURRENT_ROUND, log=log or (lambda line: None))


def _flat(seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(seed))


def _partial(seed: int = 0, sender: int = 1, round_: int = CURRENT_ROUND) -> PartialModel:
    return PartialModel(sender=sender, round=round_, params=Params(_flat(seed), LAYOUT), contributors=frozenset({1, 4}), weight=50.0)


def _envelope(message=None, codec: str = "float32", compression: str = "none") -> Envelope:
    env = Envelope()
    env.ParseFromString(wire.encode(message or _partial(), WireConfig(codec=codec, compression=compression)))
    return env


def _raw_tensor_envelope(tensor: bytes, codec: int = 0, compression: int = 0, numel: int = LAYOUT.numel) -> bytes:
    env = _envelope()
    env.codec, env.compression, env.numel, env.tensor = codec, compression, numel, tensor
    return env.SerializeToString()


# ---------------------------------------------------------------------------------- hostile inputs


def _random_bytes(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    # Garbage rarely parses, and when it does it lacks version 1 or carries unknown fields.
    return rng.bytes(int(rng.integers(0, 300))), {"malformed"}


def _truncated(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    data = wire.encode(_partial(int(rng.integers(1000))), WIRE)
    header = len(data) - 4 * LAYOUT.numel
    return data[: int(rng.integers(header, len(data)))], {"malformed"}  # cut inside the tensor field


def _tensor_dropped(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(_partial(int(rng.integers(1000))))
    env.ClearField("tensor")
    return env.SerializeToString(), {"bad_shape"}


def _wrong_fingerprint(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope()
    env.layout_fingerprint = rng.bytes(int(rng.choice([0, 7, 8, 16])))
    return env.SerializeToString(), {"layout_mismatch"}


def _wrong_numel(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(codec=str(rng.choice(list(wire.CODEC_IDS))))
    env.numel = int(rng.choice([0, LAYOUT.numel - 1, LAYOUT.numel + 1, 2**40]))
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
    env = _envelope()
    env.weight = float(rng.choice([np.nan, np.inf, -np.inf]))
    return env.SerializeToString(), {"non_finite"}


def _oversized(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    return rng.bytes(MAX_BYTES + int(rng.integers(1, 5000))), {"too_large"}


def _forged_sender(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    return wire.encode(_partial(sender=int(rng.integers(6, 2**31))), WIRE), {"unknown_sender"}


def _stale(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    return wire.encode(_partial(round_=int(rng.integers(0, CURRENT_ROUND - 2))), WIRE), {"stale_round"}


def _bad_codec(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope()
    if rng.random() < 0.5:
        env.codec = int(rng.integers(4, 2**32))
    else:
        env.compression = int(rng.integers(3, 2**32))
    return env.SerializeToString(), {"bad_codec"}


def _unknown_type(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(Votes(sender=1, round=CURRENT_ROUND, ballots=(Ballot(1, (1,), (1,)),)))
    env.type = int(rng.choice([0, max(wire.MESSAGE_CLASSES) + 1, 99, 2**32 - 1]))
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
    env = _envelope(HaveModels(sender=2, round=CURRENT_ROUND, contributors=frozenset({1, 2})))
    env.ClearField("ints")
    env.ints.extend([3, 1] if rng.random() < 0.5 else [2, 2])
    return env.SerializeToString(), {"malformed"}


def _stray_fields(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(Heartbeat(sender=1, round=CURRENT_ROUND))
    env.tensor = rng.bytes(8)
    return env.SerializeToString(), {"malformed"}


def _odd_vote(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope(Votes(sender=1, round=CURRENT_ROUND, ballots=(Ballot(3, (1, 2), (3, 4)),)))
    env.ints.append(int(rng.integers(0, 10)))
    return env.SerializeToString(), {"malformed"}


def _topk_out_of_range(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    indices = np.array([0, LAYOUT.numel + int(rng.integers(0, 1000))], "<u4")
    tensor = np.array([2], "<u4").tobytes() + indices.tobytes() + np.ones(2, "<f4").tobytes()
    return _raw_tensor_envelope(tensor, codec=3), {"bad_shape"}


def _wrong_version(rng: np.random.Generator) -> tuple[bytes, set[str]]:
    env = _envelope()
    env.version = int(rng.choice([0, wire.WIRE_VERSION - 1, wire.WIRE_VERSION + 1, 2**40]))
    return env.SerializeToString(), {"malformed"}


HOSTILE = [_random_bytes, _truncated, _tensor_dropped, _wrong_fingerprint, _wrong_numel, _bad_dtype, _non_finite,
           _non_finite_weight, _oversized, _forged_sender, _stale, _bad_codec, _unknown_type, _zip_bomb, _corrupt_stream,
           _bad_contributors, _stray_fields, _odd_vote, _topk_out_of_range, _wrong_version]


def test_fuzz_every_hostile_input_is_refused_with_its_reason():
    rng = np.random.default_rng(20240611)
    logged: list[str] = []
    door = _door(log=logged.append)
    sent = 0
    for i in range(1200):
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
    # ... and afterwards a good message still goes through, unchanged.
    good = _partial(seed=99)
    got = door.admit(wire.encode(good, WIRE), peer_hint=1)
    assert isinstance(got, PartialModel) and torch.equal(got.params.flat, good.params.flat)
    assert (got.sender, got.round, got.contributors, got.weight) == (good.sender, good.round, good.contributors, good.weight)
    assert door.admitted == 1


def test_fuzz_random_mutations_are_admitted_or_refused_never_crash():
    rng = np.random.default_rng(7)
    door = _door()
    base = [wire.encode(m, WireConfig(codec=c, compression=z)) for m in (_partial(), Votes(sender=2, round=CURRENT_ROUND, ballots=(Ballot(2, (1,), (2,)),)))
            for c in ("float32", "int8", "topk") for z in ("none", "zstd")]
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
    config = WireConfig(codec=codec, compression=compression, max_message_mb=WIRE.max_message_mb)
    messages = [
        _partial(),
        AggregatedModel(sender=0, round=CURRENT_ROUND - 2, params=Params(_flat(3), LAYOUT)),  # oldest round still admitted
        Votes(sender=5, round=CURRENT_ROUND + 3, ballots=(Ballot(2, (1, 2), (2, 1)),)),
        HaveModels(sender=3, round=CURRENT_ROUND, contributors=frozenset({0, 5}), complete=True),
        Heartbeat(sender=4, round=0),  # a lagging peer's heartbeat is never stale
    ]
    for message in messages:
        got = door.admit(wire.encode(message, config))
        assert type(got) is type(message) and got.sender == message.sender
    assert door.admitted == len(messages) and not door.refused


def test_checks_run_in_the_documented_order():
    door = _door()

    def reason(data: bytes, hint: int | None = None) -> str:
        with pytest.raises(Refused) as exc:
            door.admit(data, peer_hint=hint)
        return exc.value.reason

    env = _envelope(_partial(sender=42))
    env.layout_fingerprint = b"\x00" * 8
    assert reason(env.SerializeToString()) == "unknown_sender"  # sender before fingerprint
    env = _envelope()
    env.layout_fingerprint, env.numel = b"\x00" * 8, 3
    assert reason(env.SerializeToString()) == "layout_mismatch"  # fingerprint before shape
    env = _envelope()
    env.numel, env.codec = 3, 9
    assert reason(env.SerializeToString()) == "bad_shape"  # shape before codec
    nan = np.full(LAYOUT.numel, np.nan, "<f4").tobytes()
    stale = Envelope.FromString(_raw_tensor_envelope(nan))
    stale.round = 0
    assert reason(stale.SerializeToString()) == "non_finite"  # content before staleness
    assert reason(b"\x00" * (MAX_BYTES + 1)) == "too_large"  # size before parsing (this is not even protobuf)


def test_peer_hint_must_match_the_sender():
    door = _door()
    data = wire.encode(_partial(sender=1), WIRE)
    assert door.admit(data, peer_hint=1).sender == 1
    with pytest.raises(Refused) as exc:
        door.admit(data, peer_hint=2)
    assert exc.value.reason == "unknown_sender" and "peer 2" in exc.value.detail


def test_unexpected_errors_become_malformed(monkeypatch):
    door = _door()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(wire, "build", broken)
    with pytest.raises(Refused) as exc:
        door.admit(wire.encode(_partial(), WIRE))
    assert exc.value.reason == "malformed" and "RuntimeError" in exc.value.detail
    assert door.refused["malformed"] == 1


def test_admitted_tensor_is_fresh_and_writable():
    door = _door()
    good = _partial(seed=5)
    buffer = bytearray(wire.encode(good, WIRE))
    got = door.admit(buffer)
    buffer[:] = bytes(len(buffer))
    assert torch.equal(got.params.flat, good.params.flat)
    got.params.flat.mul_(0)
    assert not torch.equal(got.params.flat, good.params.flat)


def test_bomb_is_bounded_by_max_message_size_too():
    # A layout bigger than max_message_mb: the decompression bound is then the message limit.
    big = Layout(("w",), ((10_000,),))
    door = Door(layout=big, known_peers=PEERS, wire=WIRE, current_round=lambda: 0, log=lambda line: None)
    env = Envelope.FromString(wire.encode(AggregatedModel(sender=0, round=0, params=Params(torch.zeros(10_000), big)), WireConfig(compression="zstd")))
    assert len(env.SerializeToString()) < MAX_BYTES  # zeros compress well: the envelope itself is small
    with pytest.raises(Refused) as exc:
        door.admit(env.SerializeToString())
    assert exc.value.reason == "too_large" and str(MAX_BYTES) in exc.value.detail
    assert zstandard.ZstdDecompressor().decompress(env.tensor) == bytes(40_000)


def test_reject_counts_transport_refusals():
    logged: list[str] = []
    door = _door(log=logged.append)
    exc = door.reject("too_large", "stream passed 10 KiB", peer_hint=3)
    assert isinstance(exc, Refused) and door.refused["too_large"] == 1
    assert "peer 3" in logged[0]
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

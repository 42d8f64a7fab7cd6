"""Checkpoints, replicas and three-tier recovery (meshfl/algorithms/recovery.py, checkpoints.py, replica_codec.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from pydantic import Field, ValidationError

from meshfl.algorithms.base import ALGORITHMS, Algorithm, register
from meshfl.algorithms.checkpoints import CheckpointConfig, checkpoints, newest_valid_checkpoint, save_checkpoint
from meshfl.algorithms.recovery import (
    MESSAGES,
    Adjacency,
    Announcement,
    Recovery,
    ReplicaAck,
    ReplicaChain,
    ReplicaFetch,
    announcement_bytes,
)
from meshfl.algorithms.replica_codec import (
    ReplicaError,
    checksum,
    decode_payload,
    encode_payload,
    farthest_peers,
    pack,
    unpack,
)
from meshfl.config import load_config
from meshfl.core.messages import MESSAGE_NAMES, MESSAGE_TYPES, TYPE_IDS, Message
from meshfl.core.params import Layout, Params
from meshfl.core.section import Section
from meshfl.core.store import DirectoryStore, MemoryStore
from meshfl.testing import FakeContext

LAYOUT = Layout(("w", "b"), ((64, 32), (32,)))
EXPERIMENT = "exp"


def model(seed: int, scale: float = 0.1, layout: Layout = LAYOUT) -> Params:
    generator = torch.Generator().manual_seed(seed)
    return Params(torch.randn(layout.numel, generator=generator) * scale, layout)


def nudged(params: Params, seed: int, step: float = 1e-3) -> Params:
    """The next round's model: every value moves a little, as after training and averaging."""
    generator = torch.Generator().manual_seed(seed)
    return Params(params.flat + torch.randn(params.layout.numel, generator=generator) * step, params.layout)


def config(**overrides) -> CheckpointConfig:
    return CheckpointConfig(**{"enabled": True, "replica_every": 1, **overrides})


# ---- local checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["memory", "directory"])
def test_local_checkpoints_restore_bit_exact_newest_first_and_keep_the_last_n_rounds(kind, tmp_path):
    ctx = FakeContext(2, peers=4, params=model(0))
    if kind == "directory":
        ctx._store = DirectoryStore(tmp_path / "store")
    recovery = Recovery(config(keep_rounds=2), EXPERIMENT)
    saved = {}
    for round in range(1, 5):
        for i, kind_ in enumerate(("local", "aggregated", "round_finished")):
            saved[(round, kind_)] = model(10 * round + i)
            if (round, kind_) != (4, "round_finished"):
                recovery.checkpoint(ctx, kind_, round, saved[(round, kind_)], contributors=(1, 2), samples=50)
    assert [(r, k) for r, k, _ in checkpoints(ctx.store)] == [(4, "aggregated"), (4, "local"), (3, "round_finished"),
                                                              (3, "aggregated"), (3, "local")]
    result = asyncio.run(recovery.recover(ctx, LAYOUT))
    assert result.tier == 1 and result.round == 4 and result.meta["kind"] == "aggregated"
    assert recovery.newest_valid(ctx, LAYOUT)[1] == result.meta
    assert torch.equal(result.params.flat, saved[(4, "aggregated")].flat)  # bit-exact
    meta = result.meta
    assert meta["checksum"] == checksum(saved[(4, "aggregated")]) and meta["fingerprint"] == LAYOUT.fingerprint
    assert (meta["peer"], meta["experiment"], meta["contributors"], meta["samples"]) == (2, EXPERIMENT, [1, 2], 50)
    assert meta.keys() >= {"virtual_time", "wall_time", "incarnation"}
    assert ctx.logs("recovery_tier") == [(1, 4)]


def test_a_corrupt_checkpoint_is_skipped_not_trusted(tmp_path):
    store = MemoryStore()
    good, bad = model(1), model(2)
    save_checkpoint(store, "round_finished", 3, good, {"peer": 0}, keep_rounds=5)
    save_checkpoint(store, "local", 4, bad, {"peer": 0}, keep_rounds=5)
    _, meta = store.get_params("ckpt.4.local", LAYOUT)
    flipped = bad.flat.clone()
    flipped[7] = -flipped[7]  # bit rot under an intact metadata record
    store.put_params("ckpt.4.local", Params(flipped, LAYOUT), meta)
    params, meta, skipped = newest_valid_checkpoint(store, LAYOUT, peer=0)
    assert skipped == 1 and meta["round"] == 3 and params.equal(good)
    assert newest_valid_checkpoint(store, LAYOUT, peer=1)[0] is None  # another peer's checkpoints are not ours
    # a damaged file in a DirectoryStore: unreadable, skipped
    disk = DirectoryStore(tmp_path)
    save_checkpoint(disk, "round_finished", 3, good, {}, keep_rounds=5)
    save_checkpoint(disk, "round_finished", 5, bad, {}, keep_rounds=5)
    path = tmp_path / "ckpt.5.round_finished.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    params, meta, skipped = newest_valid_checkpoint(disk, LAYOUT)
    assert skipped == 1 and meta["round"] == 3 and params.equal(good)


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="keep_rounds"):
        CheckpointConfig(keep_rounds=0)
    with pytest.raises(ValidationError, match="replica_codec"):
        CheckpointConfig(replica_codec="int4")
    with pytest.raises(ValidationError, match="replica_total_mb"):
        CheckpointConfig(replica_quota_mb=10, replica_total_mb=5)
    assert all(f.description for f in CheckpointConfig.model_fields.values())


# ---- farthest peers -------------------------------------------------------------------------------

def test_farthest_peers_by_hop_distance_with_deterministic_ties():
    line = {i: [i - 1, i + 1] for i in range(1, 5)} | {0: [1], 5: [4]}
    assert farthest_peers(line, 0, 2) == (5, 4)
    assert farthest_peers(line, 2, 3) == (5, 4, 0)  # 5 at 3 hops; 0 and 4 at 2: ids after the origin first
    ring = {i: [(i - 1) % 6, (i + 1) % 6] for i in range(6)}
    assert farthest_peers(ring, 0, 3) == (3, 2, 4)
    assert farthest_peers(ring, 4, 3) == (1, 0, 2)  # ties: ids after 4, then from 0 (cyclic)
    star = {0: [1, 2, 3, 4]}  # links count both ways: the leaves list nobody
    assert farthest_peers(star, 0, 2) == (1, 2)
    assert farthest_peers(star, 3, 2) == (4, 1)  # the other leaves at 2 hops before the hub at 1
    assert farthest_peers(star, 3, 10) == (4, 1, 2, 0)  # fewer peers than asked for
    disconnected = {0: [1], 1: [0], 2: [3]}
    assert farthest_peers(disconnected, 0, 5) == (1,)  # unreachable peers never
    assert farthest_peers(line, 0, 2, exclude=(5,)) == (4, 3)
    assert farthest_peers({}, 0, 2) == ()


# ---- payloads -----------------------------------------------------------------------------------

def test_pack_round_trips_every_length_into_finite_floats_and_refuses_what_pack_never_makes():
    import math

    for n in (0, 1, 7, 8, 63, 64, 999):
        data = bytes((i * 37 + 255) % 256 for i in range(n))
        assert unpack(pack(data), n) == data and unpack(pack(b"\xff" * n), n) == b"\xff" * n
    floats = pack(b"\xff" * 700)
    assert all(math.isfinite(v) for v in floats) and len(floats) == 89  # 5600 bits / 63
    with pytest.raises(ReplicaError):
        unpack(pack(b"abc"), 10)
    with pytest.raises(ReplicaError):
        unpack((float("inf"),), 3)  # the exponent's top bit
    with pytest.raises(ReplicaError):
        unpack((-1.0e-300,), 1)  # bits beyond the length are not zero


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_lossless_chain_rebuilds_bit_exact_and_float16_stays_within_its_rounding(compression):
    target = model(0)
    bases = {"float32": None, "float16": None}
    holder = {"float32": None, "float16": None}
    for round in range(6):
        for codec in ("float32", "float16"):
            payload, rebuilt = encode_payload(target, bases[codec], codec, compression)
            holder[codec] = decode_payload(payload, LAYOUT, holder[codec], codec, compression)
            assert holder[codec].equal(rebuilt)  # the origin knows exactly what the holder has
            bases[codec] = rebuilt
        assert holder["float32"].equal(target)
        assert torch.equal(holder["float16"].flat, target.flat.half().float())  # no drift: each round's own rounding
        target = nudged(target, round)
    with pytest.raises(ReplicaError):
        decode_payload(b"\0" * 10, LAYOUT, None, "float32", compression)


def _trained_mlp_rounds(rounds: int = 3, steps: int = 20) -> list[Params]:
    """meshfl's MLP on digits, four IID peers, `steps` SGD steps each per round, then FedAvg: round models."""
    from meshfl.config import DataConfig
    from meshfl.data.datasets import load_dataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores took 10x longer
    try:
        return _train_rounds(load_dataset(DataConfig(dataset="digits"), 0)[0], rounds, steps)
    finally:
        torch.set_num_threads(threads)


def _train_rounds(train, rounds: int, steps: int) -> list[Params]:
    from meshfl.core.params import bind_flat
    from meshfl.learn.models import mlp

    torch.manual_seed(0)
    module = mlp(tuple(train.x.shape[1:]), train.num_classes)
    flat = bind_flat(module)
    layout = Params.from_module(module).layout
    shards = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0)).chunk(4)
    generator = torch.Generator().manual_seed(1)
    current, out = flat.clone(), []
    for _ in range(rounds):
        trained = []
        for shard in shards:
            flat.copy_(current)
            optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
            for _ in range(steps):
                batch = shard[torch.randint(len(shard), (32,), generator=generator)]
                optimiser.zero_grad()
                torch.nn.functional.cross_entropy(module(train.x[batch]), train.y[batch]).backward()
                optimiser.step()
            trained.append(flat.detach().clone())
        current = torch.stack(trained).mean(0)
        out.append(Params(current.clone(), layout))
    return out


def test_delta_replicas_of_a_trained_mlp_are_smaller_than_full_ones_and_rebuild_exactly():
    rounds = _trained_mlp_rounds()
    for codec, ratio in (("float32", 0.85), ("float16", 0.7)):  # measured 0.76 / 0.56-0.60 (benchmarks/replica_bytes.py)
        base = holder = None
        sizes = []
        for params in rounds:
            payload, rebuilt = encode_payload(params, base, codec, "zstd")
            holder = decode_payload(payload, params.layout, holder, codec, "zstd")
            assert holder.equal(rebuilt)
            sizes.append(len(payload))
            base = rebuilt
        assert holder.equal(rounds[-1]) == (codec == "float32")
        assert all(delta < ratio * sizes[0] for delta in sizes[1:]), (codec, sizes)
    assert sizes[0] < 0.6 * 4 * rounds[0].layout.numel  # float16 full: under half the raw float32 bytes


# ---- a little network of FakeContexts ---------------------------------------------------------------

class World:
    """Peers as (FakeContext, Recovery) pairs; `pump` hands every sent message of this module to its receiver."""

    def __init__(self, peers: int, neighbours: dict[int, tuple[int, ...]], cfg: CheckpointConfig, incarnation=0) -> None:
        self.cfg = cfg
        self.peers = {}
        for p in range(peers):
            self.add(p, neighbours, incarnation)

    def add(self, p, neighbours, incarnation=0) -> None:
        ctx = FakeContext(p, peers=len(neighbours), neighbours=neighbours[p], params=model(99), incarnation=incarnation)
        recovery = Recovery(self.cfg, EXPERIMENT)
        self.peers[p] = (ctx, recovery)
        for q, (other, other_recovery) in self.peers.items():
            if q != p:
                other.replies[(p, ReplicaFetch)] = self.answer(p)
                ctx.replies[(q, ReplicaFetch)] = self.answer(q)

    def answer(self, holder: int):
        def reply(request: ReplicaFetch):
            ctx, recovery = self.peers[holder]
            assert recovery.handle(ctx, request)
            to, message = ctx.sent.pop()
            assert to == request.sender and isinstance(message, ReplicaChain)
            return message
        return reply

    def pump(self) -> int:
        moved = 0
        while True:
            batch = [(p, to, m) for p, (ctx, _) in self.peers.items() for to, m in ctx.sent if isinstance(m, MESSAGES)]
            for ctx, _ in self.peers.values():
                ctx.sent.clear()
            if not batch:
                return moved
            for _, to, message in batch:
                ctx, recovery = self.peers[to]
                assert recovery.handle(ctx, message)
                moved += 1


def ring(n: int) -> dict[int, tuple[int, ...]]:
    return {i: tuple(sorted({(i - 1) % n, (i + 1) % n})) for i in range(n)}


def test_adjacency_floods_once_per_origin_and_holders_are_the_farthest_peers():
    world = World(6, ring(6), config(replicas=2))
    for ctx, recovery in world.peers.values():
        recovery.start(ctx, LAYOUT)
    moved = world.pump()
    assert all(r.topology_known(c) for c, r in world.peers.values())
    assert moved < 6 * 6 * 2 * 2  # relayed once per origin per link direction, plus start-up catch-ups
    ctx, recovery = world.peers[0]
    assert recovery.holders(ctx) == (3, 2)
    ctx.kill(3)
    assert recovery.holders(ctx) == (2, 4)  # a dead peer holds nothing
    # a forged announcement (peer 5 "announcing" peer 1 as its only neighbour) is refused, not relayed
    fake = Announcement(5, 9, (1,), ctx.sign(announcement_bytes(EXPERIMENT, Announcement(5, 9, (1,)))))
    recovery.handle(ctx, Adjacency(sender=1, announcements=(fake,)))
    assert recovery.refused == 1 and recovery.adjacency[5].version == 0 and not ctx.sent


def test_before_the_topology_is_known_replicas_go_beyond_what_is_known():
    ctx = FakeContext(0, peers=6, neighbours=(1, 5), params=model(99))
    recovery = Recovery(config(replicas=2), EXPERIMENT)
    recovery.start(ctx, LAYOUT)
    assert recovery.holders(ctx) == (2, 3)  # not reached by what it knows, in cyclic id order


def test_replicas_rebuild_full_plus_deltas_at_recovery_with_bytes_logged():
    world = World(6, ring(6), config(replicas=2))
    for ctx, recovery in world.peers.values():
        recovery.start(ctx, LAYOUT)
    world.pump()
    ctx, recovery = world.peers[0]
    params = model(1)
    for round in range(1, 5):
        assert recovery.replicate(ctx, round, params) == (3, 2)
        world.pump()
        last, params = params, nudged(params, round)
    full = [v for v, _ in ctx.logs("replica_bytes_full")]
    delta = [v for v, _ in ctx.logs("replica_bytes_delta")]
    assert len(full) == 1 and len(delta) == 3 and max(delta) < full[0]
    holder_names = world.peers[3][0].store.names()
    assert holder_names == ["replica.0.1", "replica.0.2", "replica.0.3", "replica.0.4"]
    # peer 0 loses everything and comes back: tier 2 from the farthest peers, exactly the replicated model
    world.add(0, ring(6), incarnation=1)
    ctx, recovery = world.peers[0]
    result = asyncio.run(recovery.recover(ctx, LAYOUT))
    assert result.tier == 2 and result.round == 4 and result.params.equal(last) and result.source in (2, 3)
    assert result.meta["checksum"] == checksum(last)
    assert ctx.logs("recovery_tier") == [(2, 4)]
    asked = [to for to, m in ctx.sent if isinstance(m, ReplicaFetch)]
    assert asked[:2] == [1, 5]  # neighbours first


def test_recovery_window_and_tier_3_when_nothing_is_left():
    world = World(4, ring(4), config(replicas=1, recovery_window=2))
    for ctx, recovery in world.peers.values():
        recovery.start(ctx, LAYOUT)
    world.pump()
    ctx, recovery = world.peers[0]
    recovery.replicate(ctx, 3, model(3))
    world.pump()
    world.add(0, ring(4), incarnation=1)
    ctx, recovery = world.peers[0]
    result = asyncio.run(recovery.recover(ctx, LAYOUT, current_round=9))  # round 3 is older than 9 - 2
    assert result.tier == 3 and result.params is None and ctx.logs("recovery_tier") == [(3, None)]
    assert asyncio.run(recovery.recover(ctx, LAYOUT, current_round=5)).tier == 2
    disabled = Recovery(CheckpointConfig(), EXPERIMENT)
    assert asyncio.run(disabled.recover(FakeContext(0, incarnation=1), LAYOUT)).tier == 3


def test_float16_replicas_restore_the_float16_model():
    world = World(4, ring(4), config(replicas=1, replica_codec="float16", replica_compression="gzip"))
    for ctx, recovery in world.peers.values():
        recovery.start(ctx, LAYOUT)
    world.pump()
    ctx, recovery = world.peers[0]
    params = model(5)
    for round in range(1, 4):
        recovery.replicate(ctx, round, params)
        world.pump()
        last, params = params, nudged(params, round)
    world.add(0, ring(4), incarnation=1)
    result = asyncio.run(world.peers[0][1].recover(world.peers[0][0], LAYOUT))
    assert result.tier == 2 and torch.equal(result.params.flat, last.flat.half().float())


def _origin_and_holder(cfg: CheckpointConfig, origins=(0,)):
    holder = FakeContext(3, peers=4, params=model(99))
    holding = Recovery(cfg, EXPERIMENT)
    holding.start(holder, LAYOUT)
    made = {}
    for o in origins:
        ctx = FakeContext(o, peers=4, neighbours=(), params=model(99))
        recovery = Recovery(cfg, EXPERIMENT)
        recovery.start(ctx, LAYOUT)
        made[o] = (ctx, recovery)
    return holder, holding, made


def _send(origin_ctx, origin, holder, holding, round, params):
    """`origin` replicates to peer 3 only; the ack goes back. Returns the ack."""
    origin.holders = lambda ctx: (3,)
    origin_ctx.sent.clear()
    assert origin.replicate(origin_ctx, round, params)[0] == 3
    message = next(m for to, m in origin_ctx.sent if to == 3)
    holder.sent.clear()
    holding.handle(holder, message)
    ack = holder.sent[-1][1]
    origin.handle(origin_ctx, ack)
    return ack


def test_holders_keep_origins_apart_within_their_quotas():
    params = model(1)
    full_mb = len(encode_payload(params, None, "float32", "zstd")[0]) / 2**20
    cfg = config(replicas=1, replica_quota_mb=full_mb * 1.5, replica_total_mb=full_mb * 2.5, replica_chain=2)
    holder, holding, origins = _origin_and_holder(cfg, origins=(0, 1, 2))
    (c0, r0), (c1, r1), (c2, r2) = origins[0], origins[1], origins[2]
    assert _send(c0, r0, holder, holding, 1, params).accepted
    assert _send(c1, r1, holder, holding, 1, model(2)).accepted  # same round, another origin: no collision
    assert sorted(holder.store.names()) == ["replica.0.1", "replica.1.1"]
    third = _send(c2, r2, holder, holding, 1, model(3))  # total quota: refused, and 2 will pick another holder
    assert not third.accepted and not third.need_full and 3 in r2._refusing
    small = nudged(params, 0, step=1e-7)  # a delta much smaller than a full one
    ack = _send(c0, r0, holder, holding, 2, small)
    assert ack.accepted and not ack.need_full and holder.store.names().count("replica.0.2") == 1
    ack = _send(c0, r0, holder, holding, 3, nudged(small, 1, step=1e-7))
    assert ack.accepted and ack.need_full  # replica_chain=2 deltas: the next one must be full
    assert c0.logs("replica_bytes_full") and len(c0.logs("replica_bytes_delta")) == 2
    _send(c0, r0, holder, holding, 4, model(4))
    assert c0.logs("replica_bytes_full")[-1][1] == 4  # it was full
    assert [n for n in holder.store.names() if n.startswith("replica.0.")] == ["replica.0.4"]  # the chain was replaced
    big_delta = _send(c0, r0, holder, holding, 5, model(5))  # an unrelated model: a delta as large as a full one
    assert not big_delta.accepted and big_delta.need_full  # per-origin quota: send a full one
    # each origin gets back its own model only
    fetch = replace(ReplicaFetch(sender=1, min_round=0, max_round=99), request_id=7)
    holding.handle(holder, fetch)
    chain = holder.sent[-1][1]
    assert [e.round for e in chain.entries] == [1]
    assert r1.rebuild(c1, LAYOUT, chain.entries)[1].equal(model(2))
    assert r0.rebuild(c0, LAYOUT, chain.entries) is None  # signed by 1, not by 0


def test_a_forged_or_altered_replica_is_refused():
    holder, holding, origins = _origin_and_holder(config(replicas=1))
    ctx, recovery = origins[0]
    recovery.holders = lambda ctx: (3,)
    recovery.replicate(ctx, 1, model(1))
    genuine = next(m for to, m in ctx.sent if to == 3)
    altered = replace(genuine, entry=replace(genuine.entry, checksum="0" * 64))
    holding.handle(holder, altered)
    assert holding.refused == 1 and holder.store.names() == [] and not holder.sent[-1][1].accepted
    relayed = replace(genuine, sender=2)  # someone else's state passed off by peer 2
    holding.handle(holder, relayed)
    assert holding.refused == 2 and holder.store.names() == []
    holding.handle(holder, genuine)
    assert holder.store.names() == ["replica.0.1"] and holder.sent[-1][1].accepted
    # at recovery a tampered chain (a holder changing a value) is not rebuilt
    entry = genuine.entry
    payload = bytearray(unpack(entry.payload, entry.length))
    payload[-1] ^= 1
    tampered = replace(entry, payload=pack(bytes(payload)))
    assert recovery.rebuild(ctx, LAYOUT, (tampered,)) is None
    assert recovery.rebuild(ctx, LAYOUT, (entry,))[1].equal(model(1))


def test_a_holder_whose_store_was_wiped_asks_for_a_full_replica():
    holder, holding, origins = _origin_and_holder(config(replicas=1))
    ctx, recovery = origins[0]
    assert _send(ctx, recovery, holder, holding, 1, model(1)).accepted
    holder.store.wipe()  # kind=wipe on a running peer
    ack = _send(ctx, recovery, holder, holding, 2, nudged(model(1), 2))
    assert not ack.accepted and ack.need_full
    assert _send(ctx, recovery, holder, holding, 3, model(3)).accepted
    assert ctx.logs("replica_bytes_full")[-1][1] == 3 and holder.store.names() == ["replica.0.3"]


def test_a_restarted_holder_reads_back_the_chain_that_leads_to_the_newest_replica():
    holder, holding, origins = _origin_and_holder(config(replicas=1))
    ctx, recovery = origins[0]
    params = model(1)
    for round in (1, 2, 3):
        assert _send(ctx, recovery, holder, holding, round, params).accepted
        last, params = params, nudged(params, round)
    stale, meta = holder.store.get_bytes("replica.0.3")
    holder.store.put_bytes("replica.0.9", stale, {**meta, "round": 9, "base_round": 7})  # no way back to a full one
    restarted = Recovery(config(replicas=1), EXPERIMENT)
    fetch = replace(ReplicaFetch(sender=0, min_round=0, max_round=99), request_id=1)
    restarted.handle(holder, fetch)
    chain = holder.sent[-1][1]
    assert [e.round for e in chain.entries] == [1, 2, 3] and "replica.0.9" not in holder.store
    assert recovery.rebuild(ctx, LAYOUT, chain.entries)[1].equal(last)


def test_a_model_float16_cannot_carry_skips_the_replica_instead_of_crashing():
    ctx = FakeContext(0, peers=4, params=model(99))
    recovery = Recovery(config(replicas=1, replica_codec="float16"), EXPERIMENT)
    recovery.start(ctx, LAYOUT)
    huge = Params(torch.full((LAYOUT.numel,), 1e6), LAYOUT)
    assert recovery.replicate(ctx, 1, huge) == () and ctx.logs("replica_failed") == [(1, 1)]


# ---- the wire and the simulator ----------------------------------------------------------------------

class RecoveryTestConfig(Section):
    checkpoint: CheckpointConfig = Field(default_factory=lambda: config(replicas=2), description="checkpoints")
    rounds: int = Field(6, ge=1, description="rounds, one per round_s")
    round_s: float = Field(1.0, gt=0, description="seconds per round")


def round_model(layout: Layout, peer: int, round: int) -> Params:
    return nudged(model(peer, layout=layout), round)


SIM = {"replicas": 2}
"""What a simulated test peer uses (a test algorithm's section cannot be set in the config: it registers after import)."""


def recovery_peer(section: RecoveryTestConfig, name: str):
    async def main(ctx) -> None:
        layout = ctx.initial_params().layout
        recovery = Recovery(section.checkpoint.model_copy(update=SIM), name)
        recovery.start(ctx, layout)
        if ctx.incarnation > 0:
            result = await recovery.recover(ctx, layout)
            if result.params is not None:
                exact = result.params.equal(round_model(layout, ctx.peer_id, result.round))
                ctx.log("restored_exact", float(exact), round=result.round)
        round = int(ctx.now() // section.round_s) + 1
        while round <= section.rounds:
            params = round_model(layout, ctx.peer_id, round)
            recovery.checkpoint(ctx, "round_finished", round, params, contributors=(ctx.peer_id,), samples=1)
            recovery.replicate(ctx, round, params)
            while ctx.now() < round * section.round_s:
                message = await ctx.recv(round * section.round_s - ctx.now())
                if message is not None:
                    recovery.handle(ctx, message)
            round += 1
    return main


@pytest.fixture
def recovery_algorithm():
    """A test algorithm around `Recovery`. Its message classes are gossip's too (registered when gossip is
    imported): only those not registered yet are registered here, and only those are taken back."""
    added = tuple(cls for cls in MESSAGES if cls not in MESSAGE_NAMES)
    algorithm = register(Algorithm(name="test_recovery", summary="test", config=RecoveryTestConfig, messages=added,
                                   peer=lambda section, experiment: recovery_peer(section, experiment.name)))
    yield algorithm
    ALGORITHMS.pop("test_recovery", None)
    for cls in added:
        MESSAGE_TYPES.pop(TYPE_IDS.pop(cls), None)
        MESSAGE_NAMES.pop(cls, None)


def test_every_message_travels_on_the_wire(recovery_algorithm):
    from meshfl.wire.envelope import decode, encode, encoded_size

    world = World(4, ring(4), config(replicas=1))
    for ctx, recovery in world.peers.values():
        recovery.start(ctx, LAYOUT)
    ctx, recovery = world.peers[0]
    recovery.replicate(ctx, 1, model(1))
    sent: list[Message] = [m for c, _ in world.peers.values() for _, m in c.sent]
    world.pump()
    sent += [ReplicaAck(sender=2, round=1, accepted=True, need_full=False),
             ReplicaFetch(sender=0, request_id=5, min_round=0, max_round=2**62)]
    holder_ctx, holder = world.peers[2]
    holder.handle(holder_ctx, sent[-1])
    sent.append(holder_ctx.sent[-1][1])
    assert {type(m) for m in sent} == set(MESSAGES)
    for message in sent:
        data = encode(message)
        assert decode(data, LAYOUT) == message and encoded_size(message) == len(data)


@pytest.mark.parametrize(("wipe", "replicas", "tier"), [(True, 2, 2), (False, 2, 1), (True, 0, 3)],
                         ids=["wiped-tier2", "crashed-tier1", "wiped-no-replicas-tier3"])
def test_a_restarted_peer_recovers_through_the_simulator(recovery_algorithm, monkeypatch, wipe, replicas, tier):
    from meshfl.experiment.run import simulate

    monkeypatch.setitem(SIM, "replicas", replicas)
    faults = (f"faults=[{{kind: crash, peers: [1], at_s: 3.5, wipe: {str(wipe).lower()}}}, "
              "{kind: restart, peers: [1], at_s: 4.2}]")
    cfg = load_config(None, ["peers=5", "data.dataset=digits", "algorithm=test_recovery", "topology.kind=ring",
                             "name=recovery", faults])
    _, metrics, _ = simulate(cfg)
    events = [e for e in metrics.events if e.get("peer") == 1 and e.get("metric") in ("recovery_tier", "restored_exact")]
    if tier == 3:
        assert [(e["metric"], e["value"]) for e in events] == [("recovery_tier", 3)]
        return
    assert [(e["metric"], e["value"], e["round"]) for e in events] == [("recovery_tier", tier, 4), ("restored_exact", 1.0, 4)]
    sizes = {m: [e["value"] for e in metrics.events if e.get("metric") == m and e.get("peer") == 0]
             for m in ("replica_bytes_full", "replica_bytes_delta")}
    assert len(sizes["replica_bytes_full"]) == 1 and len(sizes["replica_bytes_delta"]) == 5  # then deltas only
    assert max(sizes["replica_bytes_delta"]) < sizes["replica_bytes_full"][0]


def test_int8_delta_replicas_are_a_fraction_of_a_full_one_and_rebuild_within_half_a_step_without_drift():
    rounds = _trained_mlp_rounds(rounds=4)
    base = holder = None
    sizes, errors = [], []
    for params in rounds:
        payload, rebuilt = encode_payload(params, base, "int8", "zstd")
        holder = decode_payload(payload, params.layout, holder, "int8", "zstd")
        assert holder.equal(rebuilt)  # origin and holder agree bit for bit on what the holder has
        sizes.append(len(payload))
        if base is not None:
            change = (params.flat - base.flat).abs()
            steps = torch.cat([change[o:o + n].max().expand(n) / 127 for o, n in zip(params.layout.offsets, params.layout.sizes)])
            errors.append(float(((holder.flat - params.flat).abs() - steps / 2).max()))
        base = rebuilt
    assert rounds[0].equal(decode_payload(encode_payload(rounds[0], None, "int8", "zstd")[0], rounds[0].layout, None, "int8", "zstd"))
    assert all(delta < 0.35 * sizes[0] for delta in sizes[1:]), sizes  # the full one is exact float32
    assert max(errors) <= 1e-6  # each value within half a quantisation step of that round's change: no drift

"""The Kademlia DHT (`meshfl.algorithms.dht`): ids, buckets and storage alone; whole networks in the
simulator (exact k closest, O(log N) rounds, store/get, expiry, late joiner, crashes, determinism)
driven by `meshfl.algorithms.dht_probe`; forged records with a FakeContext; peers over real gRPC.

Hop counts at 100 and 1,000 peers: `python benchmarks/dht_hops.py --peers 100 1000`.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict

import pytest

from meshfl.algorithms.dht import (
    ID_BITS,
    Dht,
    DhtConfig,
    DhtRecord,
    FindNode,
    FindValue,
    FoundNodes,
    FoundValue,
    RecordStore,
    RoutingTable,
    StoredValue,
    StoreValue,
    bucket_index,
    closest_peers,
    id_hex,
    key_id,
    node_id,
    parse_id_hex,
    record_bytes,
)
from meshfl.algorithms.dht_probe import value_of
from meshfl.config import load_config
from meshfl.core.metrics import without_wall_clock
from meshfl.experiment.run import simulate
from meshfl.testing import DEFAULT_LAYOUT, FakeContext
from meshfl.wire.envelope import decode, encode, encoded_size

PROBE = ["algorithm=dht_probe", "data.dataset=digits", "rounds=1", "dht_probe.dht.ttl_s=30"]


# ---- ids, buckets, storage ------------------------------------------------------------------

def test_ids_are_160_bit_deterministic_and_spread():
    ids = [node_id(p) for p in range(1000)]
    assert len(set(ids)) == 1000 and all(0 <= i < 1 << ID_BITS for i in ids)
    assert node_id(7) == node_id(7) and key_id("a") != key_id("b")
    top_bits = [i >> (ID_BITS - 1) for i in ids]
    assert 400 < sum(top_bits) < 600  # uniform: about half have the top bit set
    assert parse_id_hex(id_hex(ids[3])) == ids[3]
    for bad in ("", "xyz", "A" * 40, "0" * 39, "0" * 41):
        assert parse_id_hex(bad) is None


def test_xor_distance_and_bucket_index():
    assert bucket_index(0b1000, 0b1000) == -1
    assert bucket_index(0b1000, 0b1001) == 0
    assert bucket_index(0b1000, 0b0000) == 3
    assert bucket_index(0, (1 << 159) + 5) == 159
    target = key_id("k")
    ordered = closest_peers(target, range(200), 200)
    distances = [node_id(p) ^ target for p in ordered]
    assert distances == sorted(distances) and closest_peers(target, range(200), 5) == ordered[:5]


def _peers_in_bucket(table: RoutingTable, index: int, count: int) -> list[int]:
    found = [p for p in range(1, 100_000) if bucket_index(table.own_id, node_id(p)) == index]
    return found[:count]


def test_a_full_bucket_keeps_its_old_live_contacts():
    table = RoutingTable(0, k=3)
    first, second, third, newcomer, later = _peers_in_bucket(table, 159, 5)
    for peer in (first, second, third):
        assert table.touch(peer, lambda p: True)
    assert not table.touch(newcomer, lambda p: True)  # old live contacts stay; the newcomer waits
    assert table.bucket(159) == [first, second, third]
    table.touch(first, lambda p: True)  # heard again: most recent
    assert table.bucket(159) == [second, third, first]
    assert table.touch(later, lambda p: p != second)  # a contact believed dead makes room
    assert table.bucket(159) == [third, first, later]
    table.remove(third, lambda p: True)  # failed to answer: the newest replacement takes its place
    assert table.bucket(159) == [first, later, newcomer]
    assert not table.touch(0, lambda p: True) and len(table) == 3


def test_replacements_are_bounded_and_dead_ones_are_not_promoted():
    table = RoutingTable(0, k=2)
    peers = _peers_in_bucket(table, 159, 8)
    for peer in peers:
        table.touch(peer, lambda p: True)
    assert table.bucket(159) == peers[:2] and table._replacements[159] == peers[-2:]
    table.remove(peers[0], lambda p: p != peers[-1])  # the newest replacement is dead: the one before it
    assert table.bucket(159) == [peers[1], peers[-2]]


def _signed(writer: int, key: str, value: str, expiration: float, seed: int = 0) -> DhtRecord:
    signer = FakeContext(writer, peers=8, seed=seed)
    return DhtRecord(writer=writer, value=value, expiration=expiration,
                     signature=signer.sign(record_bytes(key, writer, value, expiration)))


def test_storage_expires_bounds_writers_and_records_and_keeps_the_newest():
    store = RecordStore(DhtConfig(max_records=3, max_writers=2, max_ttl_s=100))
    assert store.put("a", _signed(1, "a", "x", 10.0), now=0.0)
    assert store.put("a", _signed(2, "a", "y", 20.0), now=0.0)
    assert not store.put("a", _signed(3, "a", "z", 20.0), now=0.0)  # a third writer of one key
    assert not store.put("a", _signed(1, "a", "old", 5.0), now=0.0)  # older than the held one
    assert store.put("a", _signed(1, "a", "new", 15.0), now=0.0) and store.size == 2
    assert store.put("b", _signed(1, "b", "x", 30.0), now=0.0)
    assert not store.put("c", _signed(1, "c", "x", 30.0), now=0.0)  # max_records
    assert [r.value for r in store.get("a", now=12.0)] == ["new", "y"]
    assert [r.value for r in store.get("a", now=15.0)] == ["y"]  # expired ones are dropped on read
    assert store.put("c", _signed(1, "c", "x", 30.0), now=16.0)  # room again
    assert store.prune(now=25.0) == 1 and store.size == 2
    assert not store.put("d", _signed(1, "d", "x", 25.0), now=25.0)  # expired on arrival
    capped = RecordStore(DhtConfig(max_ttl_s=5))
    capped.put("e", _signed(1, "e", "x", 1e9), now=0.0)  # a far-future expiration is capped at max_ttl_s
    assert capped.get("e", now=4.9) and not capped.get("e", now=5.0)


# ---- requests and forged records (FakeContext) -----------------------------------------------

def test_a_holder_refuses_forged_altered_and_oversized_records():
    ctx = FakeContext(0, peers=8)
    dht = Dht(ctx, DhtConfig(max_value_chars=16))
    good = _signed(3, "g", "hello", 50.0)
    forged = DhtRecord(writer=3, value="hello", expiration=50.0, signature=_signed(4, "g", "hello", 50.0).signature)
    altered = DhtRecord(writer=3, value="HELLO", expiration=50.0, signature=good.signature)
    extended = DhtRecord(writer=3, value="hello", expiration=500.0, signature=good.signature)
    other_key = _signed(3, "other", "hello", 50.0)
    too_long = _signed(3, "g", "x" * 17, 50.0)
    for record in (forged, altered, extended, other_key, too_long):
        dht.handle(StoreValue(sender=5, request_id=1, key="g", records=(record,)))
    dht.handle(StoreValue(sender=5, request_id=2, key="g", records=(good,)))
    answers = [m.accepted for _, m in ctx.sent if isinstance(m, StoredValue)]
    assert answers == [0, 0, 0, 0, 0, 1] and dht.refused == 5
    assert dht.records.get("g", ctx.now()) == [good]
    assert 5 in dht.table  # the asker became a contact


def test_a_reader_refuses_forged_records_from_a_lying_holder():
    ctx = FakeContext(0, peers=4)
    dht = Dht(ctx, DhtConfig(k=3))
    good = _signed(2, "g", "honest", 50.0)
    forged = DhtRecord(writer=1, value="lie", expiration=50.0, signature=_signed(3, "g", "lie", 50.0).signature)
    for peer in (1, 2, 3):
        ctx.replies[(peer, FindValue)] = FoundValue(sender=peer, records=(good, forged), peers=(1, 2, 3))
        dht.table.touch(peer, ctx.is_alive)
    assert asyncio.run(dht.get("g")) == {2: "honest"}
    assert dht.refused >= 1


def test_find_node_answers_the_nearest_live_contacts_but_not_the_asker():
    ctx = FakeContext(0, peers=40)
    dht = Dht(ctx, DhtConfig(k=4))
    for peer in range(1, 40):
        dht.table.touch(peer, ctx.is_alive)
    ctx.kill(closest_peers(key_id("t"), range(1, 40), 1)[0])
    asker = closest_peers(key_id("t"), range(1, 40), 2)[1]
    dht.handle(FindNode(sender=asker, request_id=9, target=id_hex(key_id("t"))))
    dht.handle(FindNode(sender=asker, request_id=10, target="not hex"))
    (to, reply), = [(to, m) for to, m in ctx.sent if isinstance(m, FoundNodes)]
    alive = [p for p in dht.table.contacts() if ctx.is_alive(p) and p != asker]
    assert to == asker and reply.in_reply_to == 9 and list(reply.peers) == closest_peers(key_id("t"), alive, 4)
    assert dht.refused == 1


def test_messages_round_trip_on_the_wire():
    record = _signed(2, "g", '{"a": 1}', 12.5)
    for message in (FindNode(sender=1, request_id=3, target=id_hex(key_id("x"))), FoundNodes(sender=2, in_reply_to=3, peers=(4, 5)),
                    FindValue(sender=1, request_id=4, key="g"), FoundValue(sender=2, in_reply_to=4, records=(record,), peers=()),
                    StoreValue(sender=1, request_id=5, key="g", records=(record, record)), StoredValue(sender=2, in_reply_to=5, accepted=2)):
        data = encode(message)
        assert decode(data, DEFAULT_LAYOUT) == message and encoded_size(message) == len(data)


# ---- whole networks in the simulator ----------------------------------------------------------

def probe(peers: int, *overrides: str):
    config = load_config(None, [f"peers={peers}", *PROBE, *overrides])
    result, metrics, _ = simulate(config)
    return config, result, metrics


def logged(metrics) -> dict[str, list[tuple[int, float, float]]]:
    """metric -> [(peer, value, virtual time)]."""
    found: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for event in metrics.events:
        if event["event"] == "metric" and event["metric"].startswith("dht_"):
            found[event["metric"]].append((event["peer"], event["value"], event["virtual_time"]))
    return found


def test_sixty_four_peers_find_exactly_the_k_closest_and_store_get_and_expire():
    peers = 64
    _, _, metrics = probe(peers, "dht_probe.dht.k=8")
    values = logged(metrics)
    rounds = [v for _, v, _ in values["dht_lookup_rounds"]]
    hops = [v for _, v, _ in values["dht_lookup_hops"]]
    print(f"\nDHT {peers} peers, k=8, alpha=3: rounds mean {sum(rounds) / len(rounds):.2f} max {max(rounds)}, "
          f"hops mean {sum(hops) / len(hops):.2f} max {max(hops)}")
    assert len(values["dht_lookup_exact"]) == 4 * peers
    assert all(v == 1.0 for _, v, _ in values["dht_lookup_exact"])  # exactly the true k closest by XOR
    assert max(rounds) <= 2 * math.log2(peers) and max(hops) <= math.log2(peers)  # O(log N), a correctness bound
    assert all(v == 8 for _, v, _ in values["dht_stored"])  # every value on k peers
    assert sorted(p for p, v, _ in values["dht_get_writers"] if v == 8) == list(range(peers))  # every group's 8 entries
    assert all(v == 1.0 for _, v, _ in values["dht_get_correct"])
    assert all(v == 0 for _, v, _ in values["dht_get_after_expiry"])  # gone after ttl_s of virtual time


def test_same_seed_same_lookups():
    overrides = ("dht_probe.dht.k=4", "dht_probe.lookups=3", "network.loss=0.05")
    _, first_result, first = probe(24, *overrides)
    _, again_result, again = probe(24, *overrides)
    assert without_wall_clock(first.events) == without_wall_clock(again.events)
    assert first_result.traffic.messages_sent == again_result.traffic.messages_sent


def test_a_peer_that_joins_late_finds_the_others_and_they_find_it():
    peers, late = 32, 13
    _, _, metrics = probe(peers, "dht_probe.dht.k=6", f"faults=[{{kind: join, peers: [{late}], at_s: 40}}]")
    values = logged(metrics)
    contacts = {p: v for p, v, _ in values["dht_contacts"]}
    assert contacts[late] >= 6
    exact = values["dht_lookup_exact"]
    assert [v for p, v, _ in exact if p == late] == [1.0] * 4  # its lookups return the true k closest of everyone
    assert len(exact) == 4 * peers and all(v == 1.0 for _, v, _ in exact)  # and the others' lookups include it
    writers = {p: v for p, v, _ in values["dht_get_writers"]}
    assert writers[late] == 8 and all(v == 1.0 for _, v, _ in values["dht_get_correct"])


def test_crashed_peers_lookups_terminate_with_live_peers_only():
    peers, crashed = 48, [3, 11, 19, 27, 35, 43]
    _, _, metrics = probe(peers, "dht_probe.dht.k=6", "liveness.timeout_s=5",
                          f"faults=[{{kind: crash, peers: {crashed}, at_s: 66}}]")
    values = logged(metrics)
    live = [p for p in range(peers) if p not in crashed]
    exact = values["dht_lookup_exact"]
    assert sorted(p for p, _, _ in exact) == sorted(live * 4)  # every live peer finished every lookup
    assert all(v == 1.0 for _, v, _ in exact)  # the true k closest of the live peers, no crashed one
    assert sorted(p for p, _, _ in values["dht_get_after_expiry"]) == live  # nobody hung
    writers = {p: v for p, v, _ in values["dht_get_writers"]}
    assert all(writers[p] == 8 for p in live)  # records of crashed writers live on until they expire
    assert all(v == 1.0 for _, v, _ in values["dht_get_correct"])


# ---- real gRPC peers ------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_five_grpc_peers_store_get_and_lookup(tmp_path):
    from meshfl.core.metrics import read_jsonl
    from meshfl.experiment.launch import build_peer_configs, choose_ports
    from meshfl.runtime.grpc.node import serve

    peers = 5
    config = load_config(None, [f"peers={peers}", *PROBE, "dht_probe.dht.k=3", "dht_probe.dht.alpha=2",
                                "dht_probe.dht.ttl_s=60", "dht_probe.from_start=true", "dht_probe.join_spacing_s=0.1",
                                "dht_probe.store_at_s=2", "dht_probe.lookup_at_s=3.5", "dht_probe.lookups=3",
                                "dht_probe.group_size=5", "dht_probe.expired_at_s=4.5", "dht_probe.duration_s=5.5",
                                "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=3"])
    ports = choose_ports("127.0.0.1", 51370, peers)
    peer_configs = build_peer_configs(config, [f"127.0.0.1:{p}" for p in ports], linger_s=0.2)

    async def everyone() -> list[str]:
        runs = [serve(p, config, tmp_path / f"peer-{p.peer_id}", asyncio.Event()) for p in peer_configs]
        async with asyncio.timeout(80):
            return list(await asyncio.gather(*runs))

    assert asyncio.run(everyone()) == ["finished"] * peers
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for peer in range(peers):
        for event in read_jsonl(tmp_path / f"peer-{peer}" / "metrics.jsonl"):
            if event["event"] == "metric":
                values[event["metric"]][peer].append(event["value"])
    assert all(values["dht_lookup_exact"][p] == [1.0] * 3 for p in range(peers))
    assert all(values["dht_stored"][p] == [3] for p in range(peers))
    assert all(values["dht_get_writers"][p] == [peers] for p in range(peers))  # every peer's entry, from anyone
    assert all(values["dht_get_correct"][p] == [1.0] for p in range(peers))
    # ttl_s is long: each process's clock starts at its own start, so expirations cross clocks seconds apart (see dht.py)
    assert all(values["dht_get_after_expiry"][p] == [peers] for p in range(peers))
    assert value_of(2) == '{"peer": 2, "endpoint": "peer-2"}'

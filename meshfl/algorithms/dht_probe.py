"""A test algorithm that exercises `meshfl.algorithms.dht` in both runtimes, and measures it.

Why: the DHT is a component (Moshpit will embed it), not an algorithm; to run it in the simulator
and over real gRPC peers something must drive it. This algorithm does, on a fixed schedule of
`ctx.now()` seconds, and logs what a test or benchmark checks:

1. at `peer * join_spacing_s` (or at once, for a peer that joins later): `bootstrap`; logs
   `dht_contacts`;
2. at `store_at_s`: store `value_of(peer)` under `group_key(peer)` with `dht.ttl_s`; logs
   `dht_stored` (peers that kept it);
3. at `lookup_at_s`: `lookups` lookups of random keys; for each logs `dht_lookup_rounds`,
   `dht_lookup_hops` and `dht_lookup_exact` (1 when the result is exactly the k closest peers this
   peer's failure detector believes alive, by XOR from the whole address book: the ground truth);
   then a get of its group's key: `dht_get_writers` (entries found) and `dht_get_correct` (1 when
   every entry is its writer's `value_of`);
4. at `expired_at_s`: the same get again: `dht_get_after_expiry` (entries found; 0 once they expired);
5. keeps serving until `duration_s`, then ends.

Round numbers of the logged metrics: 0 bootstrap, 1 store, 2 lookups and get, 3 after expiry.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pydantic import Field

from meshfl.algorithms.base import Algorithm, register
from meshfl.algorithms.dht import Dht, DhtConfig, closest_peers, key_id
from meshfl.core.context import NodeContext
from meshfl.core.messages import PeerLiveness
from meshfl.core.section import Section

if TYPE_CHECKING:
    from meshfl.config import ExperimentConfig


class DhtProbeConfig(Section):
    dht: DhtConfig = Field(default_factory=DhtConfig, description="the DHT under test")
    join_spacing_s: float = Field(0.05, ge=0, description="peer p bootstraps at p x this (staggered joins)")
    store_at_s: float = Field(60.0, ge=0, description="when every peer stores its value under its group's key")
    lookup_at_s: float = Field(70.0, ge=0, description="when every peer runs its measured lookups and gets its group's key")
    lookups: int = Field(4, ge=0, description="lookups of random keys per peer")
    group_size: int = Field(8, ge=1, description="peers p with the same p // group_size write under one key")
    expired_at_s: float = Field(200.0, ge=0, description="when every peer gets its group's key again (after dht.ttl_s)")
    duration_s: float = Field(210.0, gt=0, description="a peer serves until then and ends")
    from_start: bool = Field(False, description="count every time above from this peer's algorithm start, not from 0 of ctx.now() "
                                                "(real peers' clocks start at their process start, seconds apart)")


def group_key(peer: int, group_size: int) -> str:
    """The key `peer` writes under."""
    return f"probe/group/{peer // group_size}"


def value_of(peer: int) -> str:
    """What `peer` writes (JSON text, as a Moshpit peer would)."""
    return f'{{"peer": {peer}, "endpoint": "peer-{peer}"}}'


async def _until(ctx: NodeContext, at: float) -> None:
    if at > ctx.now():
        await ctx.sleep(at - ctx.now())


def _schedule(config: DhtProbeConfig, origin: float) -> DhtProbeConfig:
    """The config with its times moved by `origin` seconds."""
    names = ("store_at_s", "lookup_at_s", "expired_at_s", "duration_s")
    return config.model_copy(update={name: getattr(config, name) + origin for name in names})


async def _drain(ctx: NodeContext) -> None:
    """Liveness notices and stray messages nobody else takes (the DHT takes its own types)."""
    while True:
        await ctx.recv(None, (PeerLiveness,))


async def _lookups(ctx: NodeContext, dht: Dht, count: int) -> None:
    for i in range(count):
        key = f"probe/random/{ctx.peer_id}/{i}/{int(ctx.rng.integers(1 << 30))}"
        found = await dht.lookup(key)
        stats = dht.last_lookup
        assert stats is not None
        truth = closest_peers(key_id(key), (p for p in ctx.peers if p == ctx.peer_id or ctx.is_alive(p)), dht.config.k)
        ctx.log("dht_lookup_rounds", stats.rounds, round=2)
        ctx.log("dht_lookup_hops", stats.hops, round=2)
        ctx.log("dht_lookup_exact", float(found == truth), round=2)


async def run_probe(ctx: NodeContext, config: DhtProbeConfig) -> None:
    origin = ctx.now() if config.from_start else 0.0
    config = _schedule(config, origin)
    dht = Dht(ctx, config.dht)
    helpers = [asyncio.create_task(dht.serve()), asyncio.create_task(_drain(ctx))]
    try:
        await _until(ctx, origin + ctx.peer_id * config.join_spacing_s)
        ctx.log("dht_contacts", await dht.bootstrap(), round=0)
        key = group_key(ctx.peer_id, config.group_size)
        if ctx.now() <= config.store_at_s:  # a peer joining after the store phase only reads
            await _until(ctx, config.store_at_s)
            ctx.log("dht_stored", await dht.store(key, value_of(ctx.peer_id)), round=1)
        await _until(ctx, config.lookup_at_s)
        await _lookups(ctx, dht, config.lookups)
        found = await dht.get(key)
        ctx.log("dht_get_writers", len(found), round=2)
        ctx.log("dht_get_correct", float(all(v == value_of(w) for w, v in found.items())), round=2)
        await _until(ctx, config.expired_at_s)
        ctx.log("dht_get_after_expiry", len(await dht.get(key)), round=3)
        await _until(ctx, config.duration_s)
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)


def _worst_case_s(config: DhtProbeConfig, experiment: ExperimentConfig) -> float:
    return config.duration_s + 4 * config.dht.max_rounds * config.dht.request_timeout_s


DHT_PROBE = register(Algorithm(
    name="dht_probe",
    summary="diagnostic: bootstrap a Kademlia DHT, store, look up and get on a fixed schedule, log hops and exactness",
    config=DhtProbeConfig,
    messages=(),
    peer=lambda config, experiment: lambda ctx: run_probe(ctx, config),
    worst_case_s=_worst_case_s,
))

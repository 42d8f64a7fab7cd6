"""Smart gossip: versioned, staleness-weighted updates, a neighbour model cache and degree-aware targets.

The smart communication protocol of the P2PFL-based system (its paper's ideas, made to work):

1. **Versioned updates.** Every trained model travels as an `Update` carrying its version (the
   round that produced it), signed by its origin and relayed unchanged. A peer in round r sees an
   update of version v as s = max(0, r - v) rounds stale.
2. **Staleness-weighted aggregation.** A peer averages the updates it holds with weight
   samples x alpha(s) (`staleness`: inverse 1/(1+s), exponential, polynomial, hinge, constant).
   Late updates (version < r, never folded in before) are used, not dropped; `staleness: none`
   drops them, as P2PFL does.
3. **Asynchronous rounds** (`mode: async`). A round closes when `round_fraction` of the live train
   set's models for the round have arrived, or at `round_timeout_s`; a slow peer's model arrives
   later and is folded in with its staleness weight. A peer that finds the network rounds ahead
   (updates of newer versions) jumps to the newest round it has seen.
4. **Neighbour model cache.** Each peer keeps the newest updates of every origin (the cache of
   each neighbour's latest model is the part of it from neighbours); when a train-set neighbour's
   model for the round is missing when the round closes, its cached model stands in, with its
   staleness weight (`cache`, on by default in the asynchronous mode).
5. **Degree-aware targets** (`targets: degree`). A peer counts its successful interactions with
   each neighbour (a model it sent that the neighbour confirmed, a new model it got from the
   neighbour) and gossips to neighbours in descending order of that count, ties at random from
   ctx.rng; `targets: uniform` picks at random. At the end each peer logs the counts
   (`interactions`, about the neighbour) for the report's distribution.

The train set of round r is drawn from the run seed and r (the same at every peer, no messages):
P2PFL's vote needs every live peer's ballot, so one slow peer would hold every round's election,
which is what the asynchronous mode exists to avoid. Every peer starts from the same initial model
(`ctx.initial_params()` is seeded by the run), so there is no round-0 diffusion.

Each origin's `VERSIONS_KEPT` newest updates are kept (a table bounded by the number of peers): a
peer still closing round r may already hold a faster peer's round r+1 model, and must still
average that peer's round-r one, as every other peer does. Updates are relayed to neighbours that have not confirmed that version (`Holds`), signed by their origin, and
checked (layout, finite values) before they are averaged.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from meshfl.aggregate.fedavg import fedavg
from meshfl.algorithms.base import Algorithm, register
from meshfl.algorithms.gossip import choose_targets
from meshfl.core.context import NodeContext
from meshfl.core.messages import LOSSLESS, Codec, Message, Reply, Request
from meshfl.core.metrics import TRAIN_LOSS
from meshfl.core.params import Params
from meshfl.core.section import Section

if TYPE_CHECKING:
    from meshfl.config import ExperimentConfig

Staleness = Literal["none", "inverse", "exponential", "polynomial", "hinge", "constant"]
VERSIONS_KEPT = 3
"""Updates kept per origin: the round being closed, the next, and one late one."""
TRAIN_SET_TAG = 0x736D617274  # "smart": the train-set stream, apart from every other use of the seed


class SmartGossipConfig(Section):
    train_set_size: int = Field(10, ge=1, description="peers drawn each round (from the run seed) to train; capped at the number of peers")
    mode: Literal["sync", "async"] = Field("sync", description="sync: a round closes when every live train-set model has arrived (or at round_timeout_s); async: when round_fraction of them has, or at round_timeout_s")
    round_fraction: float = Field(0.7, gt=0, le=1, description="async: fraction of the live train set's models for the round that closes it")
    round_timeout_s: float = Field(300.0, gt=0, description="a round closes at the latest this long after its training ends")
    staleness: Staleness = Field("inverse", description="weight alpha(s) of an update s rounds stale: inverse 1/(1+s) (the paper's), exponential exp(-lambda s), polynomial (1+s)^-a, hinge (1 up to b, then 1/(a(s-b)+1)), constant 1; none: late updates are dropped (P2PFL)")
    staleness_lambda: float = Field(0.5, gt=0, description="staleness=exponential: lambda")
    staleness_a: float = Field(0.5, gt=0, description="staleness=polynomial: exponent a; staleness=hinge: slope a")
    staleness_b: int = Field(4, ge=0, description="staleness=hinge: rounds of staleness with full weight")
    max_staleness: int = Field(10, ge=0, description="updates more than this many rounds stale are never used")
    cache: bool | None = Field(None, description="use a train-set neighbour's latest model when its model for the round is missing (default: on in async mode, off in sync mode)")
    targets: Literal["uniform", "degree"] = Field("degree", description="gossip targets: degree = neighbours with the most successful interactions first (ties random); uniform = at random")
    gossip_fanout: int = Field(2, ge=1, description="neighbours a peer sends an update to per gossip step")
    gossip_period_s: float = Field(0.1, gt=0, description="seconds between gossip steps")
    resend_timeout_s: float = Field(5.0, gt=0, description="how long a sender waits for a neighbour to confirm an update before sending it another")
    join_timeout_s: float = Field(5.0, gt=0, description="a restarted peer waits this long for a neighbour to say which round the network is in")
    compression: Literal["none", "gzip", "zstd"] = Field("none", description="byte compression of models (lossless; values travel as float32, exactly as their origin signed them)")

    @property
    def uses_cache(self) -> bool:
        return self.mode == "async" if self.cache is None else self.cache


# ---- messages -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Update(Message):
    """One peer's trained model of round `version`, relayed unchanged; signed by `origin` with its weight."""

    origin: int
    version: int
    samples: int
    params: Params
    codec: Codec = LOSSLESS
    signature: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.origin < 0 or self.version < 0:
            raise ValueError(f"Update: origin and version must be >= 0, got {self.origin}, {self.version}")
        if self.samples < 1:
            raise ValueError(f"Update: samples must be >= 1, got {self.samples}")


@dataclass(frozen=True, kw_only=True)
class Holds(Message):
    """The newest version the sender holds of each listed origin, so neighbours skip sending those."""

    origins: tuple[int, ...]
    versions: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.origins) != len(self.versions):
            raise ValueError("Holds: origins and versions differ in length")


@dataclass(frozen=True, kw_only=True)
class RoundRequest(Request):
    """A restarted peer asks a neighbour which round the network is in."""


@dataclass(frozen=True, kw_only=True)
class RoundReply(Reply):
    """The neighbour's current round and its latest aggregated model."""

    round: int
    params: Params


# ---- the maths, as plain functions -------------------------------------------------------

def staleness_weight(config: SmartGossipConfig, staleness: int) -> float:
    """alpha(s): the factor on an update's sample count when it is `staleness` rounds old (0 = fresh -> 1)."""
    s = max(0, staleness)
    kind = config.staleness
    if kind in ("none", "constant"):
        return 1.0
    if kind == "inverse":
        return 1.0 / (1.0 + s)
    if kind == "exponential":
        return math.exp(-config.staleness_lambda * s)
    if kind == "polynomial":
        return (1.0 + s) ** -config.staleness_a
    if s <= config.staleness_b:  # hinge
        return 1.0
    return 1.0 / (config.staleness_a * (s - config.staleness_b) + 1.0)


def seeded_train_set(seed: int, round: int, peers: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The train set of `round`: `size` peers drawn from (seed, round) alone, so every peer draws the same."""
    if size >= len(peers):
        return tuple(peers)
    rng = np.random.default_rng([seed, TRAIN_SET_TAG, round])
    return tuple(sorted(int(p) for p in rng.choice(np.asarray(peers), size=size, replace=False)))


def degree_order(rng: np.random.Generator, candidates: list[int], counts: Mapping[int, int]) -> list[int]:
    """`candidates` in descending order of `counts`, ties in random order (one permutation from `rng`)."""
    shuffled = [candidates[i] for i in rng.permutation(len(candidates))]
    return sorted(shuffled, key=lambda n: -counts.get(n, 0))  # stable: ties keep the random order


def gini(values: list[float] | np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 = all equal, towards 1 = all on one."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0 or x.sum() == 0:
        return 0.0
    n = x.size
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def update_bytes(origin: int, version: int, samples: int, params: Params) -> bytes:
    """What the origin of an `Update` signs."""
    return f"smart_gossip.update|{version}|{origin}|{samples}|{params.digest}".encode()


@dataclass(frozen=True)
class Weighted:
    """An update chosen for an aggregation, why it was chosen, and its weight."""

    update: Update
    staleness: int
    weight: float
    reason: Literal["fresh", "late", "cached"]


# ---- the peer ---------------------------------------------------------------------------

class SmartGossipPeer:
    """One peer's side of the protocol (one object per incarnation)."""

    def __init__(self, config: SmartGossipConfig, rounds: int, seed: int) -> None:
        self.config = config
        self.rounds = rounds
        self.seed = seed
        self.codec = Codec(kind="float32", compression=config.compression)
        self.round = 0
        self.model: Params | None = None
        self.updates: dict[int, dict[int, Update]] = {}  # origin -> version -> update (relayed unchanged)
        self.used: dict[int, int] = {}  # origin -> newest version already folded into one of our aggregations
        self.neighbour_holds: dict[int, dict[int, int]] = {}  # neighbour -> origin -> newest version it confirmed
        self.awaiting: dict[int, float] = {}  # neighbour -> when we sent it an update it has not confirmed
        self.interactions: Counter[int] = Counter()
        self.refused = 0
        self._peers: frozenset[int] = frozenset()

    async def run(self, ctx: NodeContext) -> None:
        self._peers = frozenset(ctx.peers)
        if ctx.incarnation > 0:
            self.round, self.model = await self._rejoin(ctx)
        else:
            self.round, self.model = 1, ctx.initial_params()
        while self.round <= self.rounds:
            await self._run_round(ctx, self.round)
            self.round = max(self.round + 1, self._newest_seen_round(ctx))  # a peer behind (a straggler, a fresh restart) catches up
        await self._pump(ctx, lambda: self._last_round_delivered(ctx), ctx.now() + self.config.round_timeout_s)
        for neighbour in ctx.neighbours:
            ctx.log("interactions", self.interactions[neighbour], about=neighbour)

    async def _rejoin(self, ctx: NodeContext) -> tuple[int, Params]:
        layout = ctx.initial_params().layout
        for neighbour in [n for n in ctx.neighbours if ctx.is_alive(n)]:
            reply = await ctx.request(neighbour, RoundRequest(sender=ctx.peer_id), self.config.join_timeout_s)
            if (isinstance(reply, RoundReply) and 1 <= reply.round <= self.rounds
                    and reply.params.layout.fingerprint == layout.fingerprint and reply.params.finite):
                ctx.log("rejoined", reply.round, round=reply.round)
                return reply.round, reply.params
        ctx.log("rejoined", 0, round=0)
        return 1, ctx.initial_params()

    def _last_round_delivered(self, ctx: NodeContext) -> bool:
        """Whether every live neighbour confirmed the last round's updates we hold: a peer that left at once
        could take the only copy of its own last model with it."""
        return not any(u.version >= self.rounds for n in ctx.neighbours if ctx.is_alive(n) for u in self._lacks(n))

    def _newest_seen_round(self, ctx: NodeContext) -> int:
        """Where the network is: the newest version that at least two other peers' updates have reached (one
        peer alone, honest or lying, cannot move everyone to the last round); with one other peer, its newest."""
        newest = sorted((max(versions) for origin, versions in self.updates.items() if origin != ctx.peer_id and versions),
                        reverse=True)
        witnessed = newest[1] if len(newest) >= 2 else (newest[0] if newest and len(ctx.peers) <= 2 else 0)
        return min(self.rounds, witnessed)

    def train_set(self, ctx: NodeContext, round: int) -> tuple[int, ...]:
        return seeded_train_set(self.seed, round, ctx.peers, min(self.config.train_set_size, len(ctx.peers)))

    async def _run_round(self, ctx: NodeContext, round: int) -> None:
        train_set = self.train_set(ctx, round)
        assert self.model is not None
        if ctx.peer_id in train_set:
            result = await ctx.train(self.model)
            ctx.log(TRAIN_LOSS, result.loss, round=round)
            samples = max(ctx.num_samples, 1)
            signature = ctx.sign(update_bytes(ctx.peer_id, round, samples, result.params))
            self._keep(Update(sender=ctx.peer_id, origin=ctx.peer_id, version=round, samples=samples,
                              params=result.params, codec=self.codec, signature=signature))
        closed = await self._pump(ctx, lambda: self._round_closed(ctx, round, train_set),
                                  ctx.now() + self.config.round_timeout_s)
        if not closed:
            ctx.log("round_timeout", 1, round=round)
        chosen = self.choose(ctx, round, train_set)
        self.model = self._aggregate(ctx, round, chosen)
        for metric, value in (await ctx.evaluate(self.model)).items():
            ctx.log(metric, value, round=round)

    # ---- closing and aggregating a round -----------------------------------------------------

    def _fresh(self, origin: int, round: int) -> Update | None:
        """`origin`'s model for `round`: of that version, else the nearest newer one (its round-r one never came)."""
        versions = self.updates.get(origin, {})
        newer = [v for v in versions if v >= round]
        return versions[min(newer)] if newer else None

    def _round_closed(self, ctx: NodeContext, round: int, train_set: tuple[int, ...]) -> bool:
        live = [p for p in train_set if p == ctx.peer_id or ctx.is_alive(p)]
        have = sum(1 for p in live if self._fresh(p, round) is not None)
        if self.config.mode == "sync":
            return have >= len(live)
        return have >= math.ceil(self.config.round_fraction * len(live))

    def choose(self, ctx: NodeContext, round: int, train_set: tuple[int, ...]) -> list[Weighted]:
        """The updates to average for `round`, one per origin, sorted by origin, each weighted samples x alpha(staleness).

        fresh: a train-set member's model for the round. late: the newest older model of any peer, never
        folded in before (dropped when staleness=none or too stale). cached: a train-set neighbour's newest
        model standing in for its missing one (option `cache`). Models of later rounds wait for their round.
        """
        config = self.config
        members = frozenset(train_set)
        neighbours = frozenset(ctx.neighbours)
        chosen: list[Weighted] = []
        dropped = 0
        for origin in sorted(self.updates):
            fresh = self._fresh(origin, round) if origin in members else None
            if fresh is not None:
                chosen.append(Weighted(fresh, 0, float(fresh.samples), "fresh"))
                continue
            older = [v for v in self.updates[origin] if v < round]
            if not older:
                continue
            update = self.updates[origin][max(older)]
            staleness = round - update.version
            if update.version > self.used.get(origin, -1):
                if config.staleness == "none" or staleness > config.max_staleness:
                    dropped += 1
                    continue
                reason: Literal["late", "cached"] = "late"
            elif config.uses_cache and origin in members and origin in neighbours and staleness <= config.max_staleness:
                reason = "cached"
            else:
                continue
            chosen.append(Weighted(update, staleness, update.samples * staleness_weight(config, staleness), reason))
        if dropped:
            ctx.log("dropped_stale", dropped, round=round)
        return chosen

    def _aggregate(self, ctx: NodeContext, round: int, chosen: list[Weighted]) -> Params:
        assert self.model is not None
        usable = [w for w in chosen if w.update.params.layout.fingerprint == self.model.layout.fingerprint
                  and w.update.params.finite]
        if len(usable) < len(chosen):
            ctx.log("unusable_models", len(chosen) - len(usable), round=round)
        for reason in ("fresh", "late", "cached"):
            count = sum(1 for w in usable if w.reason == reason)
            if count and reason != "fresh":
                ctx.log(f"{reason}_updates", count, round=round)
        ctx.log("aggregated_models", len(usable), round=round)
        stale = [w.staleness for w in usable if w.reason != "fresh"]
        if stale:
            ctx.log("mean_staleness", float(np.mean(stale)), round=round)
        if not usable:
            return self.model
        for w in usable:
            self.used[w.update.origin] = max(self.used.get(w.update.origin, -1), w.update.version)
        return fedavg([w.update.params for w in usable], [w.weight for w in usable])

    # ---- gossip -----------------------------------------------------------------------------

    def _keep(self, update: Update) -> bool:
        """Hold `update` unless we hold it or it is older than the `VERSIONS_KEPT` we keep of its origin."""
        versions = self.updates.setdefault(update.origin, {})
        if update.version in versions or (len(versions) >= VERSIONS_KEPT and update.version < min(versions)):
            return False
        versions[update.version] = update
        if len(versions) > VERSIONS_KEPT:
            del versions[min(versions)]
        return True

    def _lacks(self, neighbour: int) -> list[Update]:
        """Updates we hold that are newer than what `neighbour` confirmed of their origin (and not its own)."""
        holds = self.neighbour_holds.get(neighbour, {})
        return [u for origin, versions in sorted(self.updates.items()) if origin != neighbour
                for version, u in sorted(versions.items()) if version > holds.get(origin, -1)]

    def _gossip(self, ctx: NodeContext) -> None:
        now = ctx.now()
        lacking: dict[int, list[Update]] = {}
        for neighbour in ctx.neighbours:
            if not ctx.is_alive(neighbour):
                continue
            sent_at = self.awaiting.get(neighbour)
            if sent_at is not None and now - sent_at < self.config.resend_timeout_s:
                continue
            missing = self._lacks(neighbour)
            if missing:
                lacking[neighbour] = missing
        if not lacking:
            return
        candidates = sorted(lacking)
        if self.config.targets == "degree":
            targets = degree_order(ctx.rng, candidates, self.interactions)[:self.config.gossip_fanout]
        else:
            targets = choose_targets(ctx.rng, candidates, [], self.config.gossip_fanout)
        for target in targets:
            missing = lacking[target]
            own = [u for u in missing if u.origin == ctx.peer_id]
            oldest = min(u.version for u in own or missing)  # a neighbour still closing a round needs that round's
            pool = [u for u in own or missing if u.version == oldest]
            update = pool[0] if len(pool) == 1 else pool[int(ctx.rng.integers(len(pool)))]
            ctx.send(target, update)  # held with this peer as sender: one message object, encoded once
            self.awaiting[target] = now

    async def _pump(self, ctx: NodeContext, done: Callable[[], bool], deadline: float) -> bool:
        """Handle messages and gossip every period until `done()` or the deadline.

        What is already waiting is handled first, even when `done()` holds at once: a round that closes
        as soon as training ends (async, the fraction already in) must still answer a restarted peer."""
        next_tick = ctx.now()
        while True:
            while (waiting := await ctx.recv(0)) is not None:
                self.handle(ctx, waiting)
            if done():
                break
            now = ctx.now()
            if now >= deadline:
                return False
            if now >= next_tick:
                self._gossip(ctx)
                next_tick = now + self.config.gossip_period_s
            message = await ctx.recv(min(deadline, next_tick) - now)
            if message is not None:
                self.handle(ctx, message)
        return True

    # ---- receiving --------------------------------------------------------------------------

    def handle(self, ctx: NodeContext, message: Message) -> None:
        if isinstance(message, RoundRequest):
            if self.model is not None and self.round >= 1:
                ctx.reply(message, RoundReply(sender=ctx.peer_id, round=self.round, params=self.model))
        elif isinstance(message, Holds):
            self._handle_holds(message)
        elif isinstance(message, Update):
            self._handle_update(ctx, message)

    def _handle_holds(self, message: Holds) -> None:
        if message.sender not in self._peers or len(message.origins) > len(self._peers):
            return
        holds = self.neighbour_holds.setdefault(message.sender, {})
        for origin, version in zip(message.origins, message.versions, strict=True):
            if origin in self._peers and 0 <= version <= self.rounds and version > holds.get(origin, -1):
                holds[origin] = version
        if self.awaiting.pop(message.sender, None) is not None:
            self.interactions[message.sender] += 1  # it confirmed what we sent: a successful interaction

    def _handle_update(self, ctx: NodeContext, message: Update) -> None:
        if message.origin not in self._peers or message.version > self.rounds:
            return  # no peer of the experiment, or a round no honest peer reaches: a lie
        versions = self.updates.get(message.origin, {})
        if message.version not in versions and (len(versions) < VERSIONS_KEPT or message.version > min(versions)):
            if not ctx.verify(message.origin, update_bytes(message.origin, message.version, message.samples,
                                                           message.params), message.signature):
                self.refused += 1
                ctx.log("refused_updates", self.refused)
                return
            self._keep(replace(message, sender=ctx.peer_id))
            if message.sender in ctx.neighbours:
                self.interactions[message.sender] += 1  # a new model from it: a successful interaction
            holds = Holds(sender=ctx.peer_id, origins=(message.origin,), versions=(message.version,))
            for neighbour in ctx.neighbours:
                ctx.send(neighbour, holds)
        else:
            ctx.send(message.sender, Holds(sender=ctx.peer_id, origins=(message.origin,), versions=(max(versions),)))


def _worst_case_s(config: SmartGossipConfig, experiment: ExperimentConfig) -> float:
    return config.join_timeout_s * experiment.peers + experiment.rounds * config.round_timeout_s


SMART_GOSSIP = register(Algorithm(
    name="smart_gossip",
    summary="gossip of versioned, signed updates: staleness-weighted FedAvg, asynchronous rounds, neighbour model cache, degree-aware targets",
    config=SmartGossipConfig,
    messages=(Update, Holds, RoundRequest, RoundReply),
    peer=lambda config, experiment: SmartGossipPeer(config, experiment.rounds, experiment.seed).run,
    quick=("smart_gossip.round_timeout_s=5", "smart_gossip.resend_timeout_s=0.5", "smart_gossip.join_timeout_s=1"),
    worst_case_s=_worst_case_s,
))

"""Gossip FedAvg with P2PFL's round workflow.

Round 0 diffuses the initiator's model to every peer. Each round r >= 1 then:
1. VOTE: every peer votes for `votes_per_peer` random peers with random weights; ballots are
   flooded, and every peer tallies the same train set (most votes, ties by lower id). A relay
   holds the ballots it learns for `vote_batch_s` and sends them as one `Votes` message, the
   same to every neighbour, so flooding costs a few messages per link, not one per peer.
2. TRAIN: train-set peers train locally.
3. AGGREGATE: peers gossip disjoint partial aggregates (each step to `gossip_fanout`
   neighbours the parts they lack, train-set neighbours first) until they hold every
   train-set model, or a timeout passes. Peers outside the train set wait for the model.
4. DIFFUSE: a peer with the round's model gossips it to neighbours that lack it.
5. EVALUATE and log. A peer that timed out goes on with what it has and logs what it missed.

`gossip.exchange: individual` is the robust mode: instead of steps 3-4, every train-set model
travels on its own (`Contribution`, relayed unchanged to neighbours that lack it), and EVERY
peer aggregates the live train set's models itself with `gossip.aggregation` (a rule of
`meshfl.aggregate.robust`), models sorted by origin: no peer adopts another's aggregate, so a
liar's model reaches each peer as itself, where a robust rule can discount it. After its own
aggregation a peer keeps relaying contributions to neighbours that still lack them (until they
all hold the round's model or `diffusion_timeout_s`).

Neighbours confirm what they hold with `HaveModels`; a sender waits for that confirmation
(or `resend_timeout_s`) before sending the same neighbour another model.

Failures cost one detector timeout: a peer the failure detector believes dead gets no
votes, no ballot is awaited from it, no model is awaited from it, and no model is sent to
it, until it is heard again. A restarted peer (incarnation > 0) asks its neighbours where
the network is (`JoinRequest`) and joins the next round with a neighbour's model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from meshfl.aggregate.partial import Part, PartialAggregates
from meshfl.aggregate.robust import RobustConfig, robust_aggregate
from meshfl.algorithms.base import Algorithm, register
from meshfl.algorithms.checkpoints import CheckpointConfig
from meshfl.algorithms.recovery import Recovery
from meshfl.core.context import NodeContext
from meshfl.core.messages import LOSSLESS, Codec, Message, Reply, Request
from meshfl.core.metrics import TRAIN_LOSS
from meshfl.core.params import Params
from meshfl.core.section import Section

if TYPE_CHECKING:
    from meshfl.config import ExperimentConfig

MAX_ROUNDS_AHEAD = 2
"""Messages for rounds further ahead than this are ignored: no peer can be that far ahead honestly."""


class GossipConfig(Section):
    train_set_size: int = Field(8, ge=1, description="number of peers elected each round to train (capped at the number of peers)")
    votes_per_peer: int = Field(4, ge=1, description="number of candidates each peer votes for in the train-set election")
    gossip_fanout: int = Field(2, ge=1, description="neighbours a peer sends models to per gossip step")
    gossip_period_s: float = Field(0.1, gt=0, description="virtual/real seconds between gossip steps")
    vote_batch_s: float = Field(0.02, ge=0, description="a relay holds the ballots it learns this long, then sends them to its neighbours in one message (0: relay as they arrive)")
    vote_timeout_s: float = Field(30.0, gt=0, description="how long a peer waits for every live peer's vote before tallying what it has")
    aggregation_timeout_s: float = Field(300.0, gt=0, description="how long a train-set peer waits for every live train-set model")
    wait_model_timeout_s: float = Field(300.0, gt=0, description="how long a peer outside the train set waits for the aggregated model")
    diffusion_timeout_s: float = Field(60.0, gt=0, description="how long a peer keeps sending the round's model to live neighbours that lack it")
    resend_timeout_s: float = Field(5.0, gt=0, description="how long a sender waits for a neighbour to confirm a model before sending it another")
    join_timeout_s: float = Field(5.0, gt=0, description="a restarted peer waits this long for a neighbour to say which round the network is in")
    initiator: int = Field(0, ge=0, description="peer whose initial model is diffused to every peer")
    codec: Literal["float32", "float16", "int8"] = Field("float32", description="how models travel: exact float32, float16, or int8 with a per-tensor scale (lossy, in both runtimes alike)")
    compression: Literal["none", "gzip", "zstd"] = Field("none", description="byte compression of models after the codec")
    exchange: Literal["partial", "individual"] = Field("partial", description="partial: P2PFL's partial aggregates, then the round's model is diffused; individual: every train-set model travels on its own and every peer aggregates them itself with `aggregation` (robust, costs more bytes)")
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig, description="local checkpoints at three points of each round, replicas at the farthest peers, three-tier recovery after a restart (off by default)")
    aggregation: RobustConfig = Field(default_factory=RobustConfig, description="exchange=individual: how each peer combines the train set's models (fedavg, or a rule robust to lying peers; claimed samples capped by max_weight); exchange=partial needs fedavg")


# ---- messages -------------------------------------------------------------------------------

MAX_VOTE = 1000
"""A ballot's i-th candidate gets at most MAX_VOTE // (i + 1): an honest ballot's largest weights (P2PFL's)."""


@dataclass(frozen=True)
class Ballot:
    """One peer's train-set ballot for a round: the candidates it votes for, with weights.

    `signature` is the origin's signature of (round, origin, candidates, weights): relays cannot
    forge or alter a ballot, and a ballot of one round counts for no other.
    """

    origin: int
    candidates: tuple[int, ...]
    weights: tuple[int, ...]
    signature: str = ""

    def __post_init__(self) -> None:
        if self.origin < 0:
            raise ValueError(f"Ballot.origin must be >= 0, got {self.origin}")
        if len(self.candidates) != len(self.weights):
            raise ValueError(f"Ballot of peer {self.origin}: candidates and weights differ in length")


@dataclass(frozen=True, kw_only=True)
class Votes(Message):
    """Ballots flooded so every peer tallies the same train set; relays batch ballots that arrive close together."""

    round: int
    ballots: tuple[Ballot, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ballots:
            raise ValueError("Votes: ballots must not be empty")


@dataclass(frozen=True, kw_only=True)
class PartialModel(Message):
    """A weighted average of the models of `contributors`; `weight` is their total sample count."""

    round: int
    params: Params
    contributors: frozenset[int]
    weight: float
    codec: Codec = LOSSLESS

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.contributors:
            raise ValueError("PartialModel: contributors must not be empty")
        if not self.weight > 0 or self.weight == float("inf"):
            raise ValueError(f"PartialModel: weight must be finite and > 0, got {self.weight}")


@dataclass(frozen=True, kw_only=True)
class AggregatedModel(Message):
    """The round's aggregated model, gossiped to neighbours that lack it (round 0: the initial model)."""

    round: int
    params: Params
    contributors: frozenset[int] = frozenset()
    codec: Codec = LOSSLESS


@dataclass(frozen=True, kw_only=True)
class Contribution(Message):
    """exchange=individual: one train-set peer's own trained model (`origin`), relayed unchanged; `samples` is its claimed weight.

    `signature` is the origin's signature of (round, origin, samples, params digest): a relay can
    neither alter the model or its weight nor pass off a model of its own as another peer's.
    """

    round: int
    origin: int
    samples: int
    params: Params
    codec: Codec = LOSSLESS
    signature: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.origin < 0:
            raise ValueError(f"Contribution: origin must be >= 0, got {self.origin}")
        if self.samples < 1:
            raise ValueError(f"Contribution: samples must be >= 1, got {self.samples}")

    @property
    def contributors(self) -> frozenset[int]:
        return frozenset((self.origin,))


@dataclass(frozen=True, kw_only=True)
class HaveModels(Message):
    """Tells neighbours which contributions (or the whole aggregate) the sender holds, so they skip them."""

    round: int
    contributors: frozenset[int]
    complete: bool = False


@dataclass(frozen=True, kw_only=True)
class Skip(Message):
    """A restarted peer's word that it sits out `round` (it joins the next one): nobody waits for its ballot or
    model of that round. Signed by `origin` (a relay cannot make an honest peer skip); flooded once."""

    round: int
    origin: int
    signature: str = ""


def skip_bytes(round: int, origin: int) -> bytes:
    """What the origin of a `Skip` signs."""
    return f"gossip.skip|{round}|{origin}".encode()


@dataclass(frozen=True, kw_only=True)
class JoinRequest(Request):
    """A restarted peer asks a neighbour which round the network is in."""


@dataclass(frozen=True, kw_only=True)
class JoinReply(Reply):
    """The neighbour's current round and the last model it completed."""

    round: int
    params: Params


# ---- the maths, as plain functions -------------------------------------------------------

def make_ballot(rng: np.random.Generator, origin: int, peers: tuple[int, ...], votes_per_peer: int) -> Ballot:
    """P2PFL's ballot: k distinct random candidates, the i-th weighted floor(U[0,1000] / (i+1)); unsigned."""
    count = min(votes_per_peer, len(peers))
    candidates = rng.choice(np.asarray(peers), size=count, replace=False)
    weights = [int(rng.integers(0, MAX_VOTE + 1)) // (i + 1) for i in range(count)]
    return Ballot(origin, tuple(int(c) for c in candidates), tuple(weights))


def ballot_bytes(round: int, ballot: Ballot) -> bytes:
    """What the origin signs: the round and the whole ballot."""
    return (f"gossip.ballot|{round}|{ballot.origin}|{','.join(map(str, ballot.candidates))}|"
            f"{','.join(map(str, ballot.weights))}").encode()


def contribution_bytes(round: int, origin: int, samples: int, params: Params) -> bytes:
    """What the origin of a `Contribution` signs."""
    return f"gossip.contribution|{round}|{origin}|{samples}|{params.digest}".encode()


def honest_shape(ballot: Ballot, peers: frozenset[int], votes_per_peer: int) -> bool:
    """Whether a ballot could have come from `make_ballot`: known, distinct candidates, at most
    `votes_per_peer` of them, weights in P2PFL's range. Anything else only a liar sends (e.g. one
    ballot worth a billion votes would choose the train set alone)."""
    return (len(ballot.candidates) <= votes_per_peer and len(set(ballot.candidates)) == len(ballot.candidates)
            and peers.issuperset(ballot.candidates)
            and all(0 <= w <= MAX_VOTE // (i + 1) for i, w in enumerate(ballot.weights)))


def tally_votes(ballots: Iterable[Ballot], train_set_size: int, exclude: Iterable[int] = ()) -> tuple[int, ...]:
    """The `train_set_size` peers with the most vote weight; ties go to the lower peer id.

    Only peers named on some ballot are ranked, and never those in `exclude` (believed
    dead). One numpy pass: with a thousand peers every peer tallies a thousand ballots each round.
    """
    ballots = list(ballots)
    candidates = np.fromiter(chain.from_iterable(b.candidates for b in ballots), dtype=np.int64)
    if candidates.size == 0:
        return ()
    weights = np.fromiter(chain.from_iterable(b.weights for b in ballots), dtype=np.int64, count=candidates.size)
    named = np.flatnonzero(np.bincount(candidates))  # peers on some ballot, even with weight 0
    totals = np.bincount(candidates, weights=weights.astype(np.float64))[named]  # exact: integer sums < 2**53
    ranked = named[np.lexsort((named, -totals))]
    excluded = np.fromiter(exclude, dtype=np.int64)
    if excluded.size:
        ranked = ranked[~np.isin(ranked, excluded)]
    return tuple(sorted(int(p) for p in ranked[:train_set_size]))


def choose_targets(rng: np.random.Generator, preferred: list[int], others: list[int], fanout: int) -> list[int]:
    """Up to `fanout` random targets from `preferred`, falling back to `others` only if it is empty."""
    pool = sorted(preferred) if preferred else sorted(others)
    if len(pool) <= fanout:
        return pool
    return sorted(int(p) for p in rng.choice(np.asarray(pool), size=fanout, replace=False))


# ---- per-round state ------------------------------------------------------------------------

@dataclass
class RoundState:
    round: int = 0
    ballots: dict[int, Ballot] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)  # peers that said (signed) they sit this round out
    train_set: tuple[int, ...] = ()
    parts: PartialAggregates = field(default_factory=PartialAggregates)
    aggregated: AggregatedModel | None = None
    diffused: AggregatedModel | None = None  # this peer's model of the round, as it sends it to neighbours
    contributions: dict[int, Contribution] = field(default_factory=dict)  # individual: origin -> our copy to relay
    neighbour_holds: dict[int, frozenset[int]] = field(default_factory=dict)
    neighbour_complete: set[int] = field(default_factory=set)
    awaiting_ack: dict[int, float] = field(default_factory=dict)
    refused_ballots: int = 0  # ballots whose signature or shape was wrong: forged, altered or lying
    refused_contributions: int = 0  # individual models whose origin did not sign them, or that no elected peer made

    @property
    def model(self) -> Params | None:
        return self.diffused.params if self.diffused is not None else None


@dataclass
class RelayBatch:
    """Ballots learned since the last relay, and the neighbours they came from."""

    ballots: list[Ballot] = field(default_factory=list)
    sources: set[int] = field(default_factory=set)


class _VoteWatch:
    """Whether every peer the detector believes alive (and this one) has a ballot: `state.ballots.keys() >=
    set(alive peers)`, re-checked after every message of the election without scanning every peer each time.

    Ballots are only ever added during a round, so the peers (in id order) before `_start` that held one
    hold one for good; the last peer found alive without a ballot (`_witness`) is asked first. The answer is
    always the one a full scan gives: beliefs about peers past `_start` are read afresh at every call.
    """

    def __init__(self, ctx: NodeContext, ballots: dict[int, Ballot], moved_on: Callable[[int], bool]) -> None:
        self._ctx = ctx
        self._ballots = ballots
        self._moved_on = moved_on
        self._peers = ctx.peers
        self._start = 0
        self._witness: int | None = None

    def _awaited(self, peer: int) -> bool:
        return peer not in self._ballots and (peer == self._ctx.peer_id or (self._ctx.is_alive(peer) and not self._moved_on(peer)))

    def __call__(self) -> bool:
        witness = self._witness
        if witness is not None and self._awaited(witness):
            return False
        peers, ballots, start = self._peers, self._ballots, self._start
        while start < len(peers) and peers[start] in ballots:
            start += 1
        self._start = start
        for i in range(start, len(peers)):
            if self._awaited(peers[i]):
                self._witness = peers[i]
                return False
        self._witness = None
        return True


class GossipPeer:
    """One peer's side of the protocol (one object per incarnation); `run` drives it round by round."""

    def __init__(self, config: GossipConfig, rounds: int, experiment: str = "") -> None:
        self.config = config
        self.rounds = rounds
        self.recovery = Recovery(config.checkpoints, experiment)  # every call a no-op unless checkpoints.enabled
        self.codec = Codec(kind=config.codec, compression=config.compression)
        self.round = 0
        self._states: dict[int, RoundState] = {}
        self._completed: AggregatedModel | None = None  # the last round's model this peer completed
        self._relay: dict[int, RelayBatch] = {}  # round -> ballots learned since the last relay
        self._relay_at: float | None = None
        self._peers: frozenset[int] | None = None
        self._ballots: np.random.Generator | None = None

    def _ballot_rng(self, ctx: NodeContext) -> np.random.Generator:
        """Ballots draw from their own stream, split off ctx.rng once: how often a peer gossiped (which
        depends on timing, so differs between the runtimes) must not change whom it votes for."""
        if self._ballots is None:
            self._ballots = np.random.default_rng(int(ctx.rng.integers(2**63)))
        return self._ballots

    def state(self, round: int) -> RoundState:
        if round not in self._states:
            self._states[round] = RoundState(round=round)
        return self._states[round]

    # ---- driving ----------------------------------------------------------------------------

    async def run(self, ctx: NodeContext) -> None:
        self._ballot_rng(ctx)  # split before anything else draws from ctx.rng
        self.recovery.start(ctx, ctx.initial_params().layout)
        if ctx.incarnation > 0:
            first, model = await self._rejoin(ctx)
        else:
            first, model = 1, await self._initial_model(ctx)
        for round in range(first, self.rounds + 1):
            self.round = round
            for old in [r for r in self._states if r < round - 1]:
                del self._states[old]
            model = await self._run_round(ctx, round, model)

    async def _rejoin(self, ctx: NodeContext) -> tuple[int, Params]:
        """Ask live neighbours which round the network is in; join the next one.

        The model is the last one the neighbour completed (the round before its current one):
        the current round finishes without this peer, whose ballots for it would come too late.
        With checkpoints on, the peer first recovers its own model (tier 1: local checkpoint,
        2: replicas from peers, 3: none) and keeps it if it is as new as the neighbour's; an
        older one gives way to the neighbour's (the network moved on while it was down).
        """
        layout = ctx.initial_params().layout
        network: JoinReply | None = None
        for neighbour in self._alive_neighbours(ctx):
            reply = await ctx.request(neighbour, JoinRequest(sender=ctx.peer_id), self.config.join_timeout_s)
            if (isinstance(reply, JoinReply) and 0 <= reply.round <= self.rounds  # a round past the run's end is a lie
                    and reply.params.layout.fingerprint == layout.fingerprint and reply.params.finite):
                network = reply
                break
        recovered = await self.recovery.recover(ctx, layout, current_round=None if network is None else network.round)
        if network is None:
            if recovered.params is not None and recovered.round is not None and recovered.round <= self.rounds:
                ctx.log("rejoined", recovered.round, round=recovered.round)
                self.round = recovered.round
                return recovered.round + 1, recovered.params
            ctx.log("rejoined", 0, round=0)
            return 1, ctx.initial_params()
        self.round = network.round
        ctx.log("rejoined", network.round, round=network.round)
        skip = Skip(sender=ctx.peer_id, round=network.round, origin=ctx.peer_id,
                    signature=ctx.sign(skip_bytes(network.round, ctx.peer_id)))
        for neighbour in ctx.neighbours:  # the others may be waiting for its ballot or model of that round
            ctx.send(neighbour, skip)
        if recovered.params is not None and recovered.round is not None and recovered.round >= network.round:
            return network.round + 1, recovered.params
        return network.round + 1, network.params

    async def _initial_model(self, ctx: NodeContext) -> Params:
        state = self.state(0)
        if ctx.peer_id == self.config.initiator:
            self._complete_round(ctx, 0, ctx.initial_params())
        else:
            await self._pump(ctx, lambda: state.aggregated is not None, ctx.now() + self.config.wait_model_timeout_s)
            if state.aggregated is None:
                ctx.log("missed_initial_model", 1, round=0)
                self._complete_round(ctx, 0, ctx.initial_params())
            else:
                self._complete_round(ctx, 0, state.aggregated.params)
        await self._diffuse(ctx, 0)
        return state.model

    async def _run_round(self, ctx: NodeContext, round: int, model: Params) -> Params:
        state = self.state(round)
        state.train_set = await self._elect_train_set(ctx, round)
        if self.config.exchange == "individual":
            return await self._run_individual_round(ctx, round, model)
        self._keep_train_set(state)
        if ctx.peer_id in state.train_set:
            result = await ctx.train(model)
            ctx.log(TRAIN_LOSS, result.loss, round=round)
            self._checkpoint(ctx, "local", round, result.params, (ctx.peer_id,))
            state.parts.add(Part(result.params, frozenset([ctx.peer_id]), float(max(ctx.num_samples, 1))))
            timeout = self.config.aggregation_timeout_s
        else:
            timeout = self.config.wait_model_timeout_s
        await self._pump(ctx, lambda: not self._live_train_set(ctx, state) or self._complete_model(ctx, state) is not None,
                         ctx.now() + timeout, on_tick=lambda: self._gossip_parts(ctx, round))
        self._complete_round(ctx, round, *self._best_model(ctx, state, model))
        self._checkpoint(ctx, "aggregated", round, state.model, state.diffused.contributors)
        await self._diffuse(ctx, round)
        for metric, value in (await ctx.evaluate(state.model)).items():
            ctx.log(metric, value, round=round)
        self._finish_round(ctx, round, state)
        return state.model

    async def _run_individual_round(self, ctx: NodeContext, round: int, model: Params) -> Params:
        """exchange=individual: train, relay individual models, aggregate them here, relay the rest, evaluate."""
        state = self.state(round)
        if ctx.peer_id in state.train_set:
            result = await ctx.train(model)
            ctx.log(TRAIN_LOSS, result.loss, round=round)
            self._checkpoint(ctx, "local", round, result.params, (ctx.peer_id,))
            samples = max(ctx.num_samples, 1)
            signature = ctx.sign(contribution_bytes(round, ctx.peer_id, samples, result.params))
            state.contributions[ctx.peer_id] = Contribution(sender=ctx.peer_id, round=round, origin=ctx.peer_id,
                                                            samples=samples, params=result.params, codec=self.codec,
                                                            signature=signature)
            timeout = self.config.aggregation_timeout_s
        else:
            timeout = self.config.wait_model_timeout_s
        await self._pump(ctx, lambda: self._holds_every_contribution(ctx, state), ctx.now() + timeout,
                         on_tick=lambda: self._gossip_contributions(ctx, round))
        self._complete_round(ctx, round, *self._aggregate_contributions(ctx, round, model))
        self._checkpoint(ctx, "aggregated", round, state.model, state.diffused.contributors)
        everyone_has_it = lambda: state.neighbour_complete.issuperset(self._alive_neighbours(ctx))  # noqa: E731
        await self._pump(ctx, everyone_has_it, ctx.now() + self.config.diffusion_timeout_s,
                         on_tick=lambda: self._gossip_contributions(ctx, round))
        for metric, value in (await ctx.evaluate(state.model)).items():
            ctx.log(metric, value, round=round)
        self._finish_round(ctx, round, state)
        return state.model

    def _checkpoint(self, ctx: NodeContext, kind: str, round: int, params: Params, contributors: Iterable[int]) -> None:
        self.recovery.checkpoint(ctx, kind, round, params, contributors=contributors, samples=ctx.num_samples)

    def _finish_round(self, ctx: NodeContext, round: int, state: RoundState) -> None:
        """The round's last checkpoint, and every `replica_every` rounds a replica to the farthest peers."""
        if state.diffused is not None:
            self._checkpoint(ctx, "round_finished", round, state.diffused.params, state.diffused.contributors)
            self.recovery.replicate(ctx, round, state.diffused.params)

    def _holds_every_contribution(self, ctx: NodeContext, state: RoundState) -> bool:
        """Whether every live train-set peer's model is here (true at once when none is alive: nothing can come)."""
        return state.contributions.keys() >= set(self._live_train_set(ctx, state))

    def _live_train_set(self, ctx: NodeContext, state: RoundState) -> list[int]:
        """The train-set peers whose models can still come: this one and those believed alive that did not skip the round."""
        return [p for p in state.train_set if p == ctx.peer_id or (ctx.is_alive(p) and not self._moved_on(state.round, p))]

    def _moved_on(self, round: int, peer: int) -> bool:
        """Whether `peer` skipped `round`: it signed a ballot for a later round and none for this one (a restarted
        peer joins the round after the network's current one), so nothing of this round will come from it."""
        current = self._states.get(round)
        if current is not None and peer in current.skipped:
            return True
        if current is not None and peer in current.ballots:
            return False
        return any(peer in later.ballots for r, later in self._states.items() if r > round)

    def _aggregate_contributions(self, ctx: NodeContext, round: int, start: Params) -> tuple[Params, frozenset[int]]:
        """The robust aggregate of the train set's models this peer holds (sorted by origin), and their origins.

        The same set of models gives the same model at every peer. With none, the round's starting model.
        """
        state = self.state(round)
        if state.refused_contributions:
            ctx.log("refused_contributions", state.refused_contributions, round=round)
        origins = sorted(o for o in state.contributions if o in state.train_set)
        missed = set(state.train_set) - set(origins)
        if missed:
            ctx.log("missed_models", len(missed), round=round)
        chosen = [state.contributions[o] for o in origins]
        usable = [c for c in chosen if c.params.layout.fingerprint == start.layout.fingerprint
                  and c.params.finite]
        if len(usable) < len(chosen):
            ctx.log("unusable_models", len(chosen) - len(usable), round=round)  # NaN/Inf (a diverged or lying peer)
        if not usable:
            return start, frozenset()
        rule = self.config.aggregation
        if rule.rule in ("krum", "multi_krum") and len(usable) <= 2 * rule.byzantine + 2:
            ctx.log("aggregation_fallback", len(usable), round=round)  # too few models for Krum this round
            rule = rule.model_copy(update={"rule": "median"})
        model = robust_aggregate([c.params for c in usable], [float(c.samples) for c in usable], rule, reference=start)
        return model, frozenset(c.origin for c in usable)

    def _gossip_contributions(self, ctx: NodeContext, round: int) -> None:
        """Each step, up to `gossip_fanout` live neighbours that lack some train-set model we hold get one of them:
        our own if they lack it (nobody else has it yet), else a random one, so senders rarely push the same model
        to the same neighbour before its `HaveModels` says it has it."""
        state = self.state(round)
        train_set = set(state.train_set)
        mine = sorted(o for o in state.contributions if o in train_set)
        lacking: dict[int, list[int]] = {}
        for neighbour in self._alive_neighbours(ctx):
            if neighbour in state.neighbour_complete or not self._ready_for(ctx, state, neighbour):
                continue
            held = state.neighbour_holds.get(neighbour, frozenset())
            missing = [o for o in mine if o not in held and o != neighbour]
            if missing:
                lacking[neighbour] = missing
        for target in choose_targets(ctx.rng, list(lacking), [], self.config.gossip_fanout):
            missing = lacking[target]
            if ctx.peer_id in missing:  # one's own model first: nobody else has it yet
                origin = ctx.peer_id
            else:
                origin = missing[int(ctx.rng.integers(len(missing)))] if len(missing) > 1 else missing[0]
            ctx.send(target, state.contributions[origin])
            state.awaiting_ack[target] = ctx.now()

    async def _elect_train_set(self, ctx: NodeContext, round: int) -> tuple[int, ...]:
        state = self.state(round)
        alive = self._alive_peers(ctx)
        own = make_ballot(self._ballot_rng(ctx), ctx.peer_id, alive, self.config.votes_per_peer)
        own = replace(own, signature=ctx.sign(ballot_bytes(round, own)))
        self._learn_ballots(ctx, round, (own,), came_from=ctx.peer_id)
        self._send_relays(ctx)  # one's own ballot goes out at once
        await self._pump(ctx, _VoteWatch(ctx, state.ballots, lambda p: self._moved_on(round, p)),
                         ctx.now() + self.config.vote_timeout_s)
        expected = self._alive_peers(ctx)
        missing = len(set(expected) - state.ballots.keys())
        if missing:
            ctx.log("missed_votes", missing, round=round)
        if state.refused_ballots:
            ctx.log("refused_ballots", state.refused_ballots, round=round)
        dead = set(ctx.peers) - set(expected)
        return tally_votes(state.ballots.values(), min(self.config.train_set_size, len(expected)), exclude=dead)

    async def _diffuse(self, ctx: NodeContext, round: int) -> None:
        """DIFFUSE: send the round's model to live neighbours not known to hold it, until all do."""
        state = self.state(round)
        everyone_has_it = lambda: state.neighbour_complete.issuperset(self._alive_neighbours(ctx))  # noqa: E731
        await self._pump(ctx, everyone_has_it, ctx.now() + self.config.diffusion_timeout_s,
                         on_tick=lambda: self._gossip_model(ctx, round))

    async def _pump(self, ctx: NodeContext, done: Callable[[], bool], deadline: float,
                    on_tick: Callable[[], None] | None = None) -> bool:
        """Handle messages (and gossip every period) until `done()` or the deadline.

        Ballots waiting to be relayed go out when their batch time comes, and in any case
        before returning: a peer may not pump again for a long time (it trains). A change
        of liveness arrives as a message too, so `done()` is re-checked when a peer dies.
        """
        next_tick = ctx.now()
        try:
            while not done():
                now = ctx.now()
                if now >= deadline:
                    return False
                if on_tick is not None and now >= next_tick:
                    on_tick()
                    next_tick = now + self.config.gossip_period_s
                if self._relay_at is not None and now >= self._relay_at:
                    self._send_relays(ctx)
                wake = min(deadline, next_tick) if on_tick is not None else deadline
                if self._relay_at is not None:
                    wake = min(wake, self._relay_at)
                message = await ctx.recv(wake - now)
                if message is not None:
                    self.handle(ctx, message)
            return True
        finally:
            self._send_relays(ctx)

    # ---- liveness -------------------------------------------------------------------------

    def _alive_peers(self, ctx: NodeContext) -> tuple[int, ...]:
        return tuple(p for p in ctx.peers if p == ctx.peer_id or ctx.is_alive(p))

    def _alive_neighbours(self, ctx: NodeContext) -> list[int]:
        return [n for n in ctx.neighbours if ctx.is_alive(n)]

    # ---- round model ----------------------------------------------------------------------

    def _complete_model(self, ctx: NodeContext, state: RoundState) -> Params | None:
        """The round's model if this peer holds every live train-set peer's part of it, else None."""
        needed = self._live_train_set(ctx, state)
        if state.aggregated is not None and state.aggregated.contributors.issuperset(needed):  # within the train set: see _keep_train_set
            return state.aggregated.params
        if needed and state.parts.covers(needed):
            return state.parts.result().params
        return None

    @staticmethod
    def _keep_train_set(state: RoundState) -> None:
        """Drop models that arrived before the election and claim a contributor outside the train
        set: no honest peer builds one, and a part claiming everyone would block every honest part."""
        train_set = frozenset(state.train_set)
        if state.aggregated is not None and not train_set.issuperset(state.aggregated.contributors):
            state.aggregated = None
        if not train_set.issuperset(state.parts.covered):
            state.parts = state.parts.within(train_set)

    def _best_model(self, ctx: NodeContext, state: RoundState, previous: Params) -> tuple[Params, frozenset[int]]:
        """The most complete model this peer holds for the round, and whose updates it holds.

        The contributors are what the model was built from, never the train set it was meant
        to cover: a neighbour must not take a model that misses updates for a complete one.
        """
        have = state.parts.covered
        if state.aggregated is not None and len(state.aggregated.contributors) >= len(have):
            model, have = state.aggregated.params, state.aggregated.contributors
        else:
            model = state.parts.result().params if have else previous
        missed = set(state.train_set) - have
        if missed:
            ctx.log("missed_models", len(missed), round=self.round)
        return model, frozenset(have)

    def _complete_round(self, ctx: NodeContext, round: int, model: Params,
                        contributors: frozenset[int] = frozenset()) -> None:
        """Keep the round's model as the one message every neighbour may be sent, and tell them we have it.

        One message object per round (not one per send) lets the gRPC runtime encode it once.
        """
        state = self.state(round)
        state.diffused = AggregatedModel(sender=ctx.peer_id, round=round, params=model, contributors=contributors,
                                         codec=self.codec)
        self._completed = state.diffused
        have = HaveModels(sender=ctx.peer_id, round=round, contributors=contributors, complete=True)
        for neighbour in self._alive_neighbours(ctx):
            ctx.send(neighbour, have)

    # ---- gossip steps ---------------------------------------------------------------------

    def _ready_for(self, ctx: NodeContext, state: RoundState, neighbour: int) -> bool:
        sent_at = state.awaiting_ack.get(neighbour)
        return sent_at is None or ctx.now() - sent_at >= self.config.resend_timeout_s

    def _gossip_parts(self, ctx: NodeContext, round: int) -> None:
        state = self.state(round)
        train_set = set(state.train_set)
        holds: dict[int, frozenset[int]] = {}
        for neighbour in self._alive_neighbours(ctx):
            if neighbour in state.neighbour_complete or not self._ready_for(ctx, state, neighbour):
                continue
            held = state.neighbour_holds.get(neighbour, frozenset())
            if neighbour in train_set:
                held = held | {neighbour}
            if state.parts.has_part_for(held):
                holds[neighbour] = held
        preferred = [n for n in holds if n in train_set]
        others = [n for n in holds if n not in train_set]
        for target in choose_targets(ctx.rng, preferred, others, self.config.gossip_fanout):
            part = state.parts.for_neighbour(holds[target])
            ctx.send(target, PartialModel(sender=ctx.peer_id, round=round, params=part.params,
                                          contributors=part.contributors, weight=part.weight, codec=self.codec))
            state.awaiting_ack[target] = ctx.now()

    def _gossip_model(self, ctx: NodeContext, round: int) -> None:
        state = self.state(round)
        lacking = [n for n in self._alive_neighbours(ctx)
                   if n not in state.neighbour_complete and self._ready_for(ctx, state, n)]
        for target in choose_targets(ctx.rng, lacking, [], self.config.gossip_fanout):
            ctx.send(target, state.diffused)
            state.awaiting_ack[target] = ctx.now()

    # ---- receiving ------------------------------------------------------------------------

    def handle(self, ctx: NodeContext, message: Message) -> None:
        if self.recovery.handle(ctx, message):
            return  # checkpoints' own messages: topology, replicas, their acks and fetches
        if isinstance(message, JoinRequest):
            if self._completed is not None:
                ctx.reply(message, JoinReply(sender=ctx.peer_id, round=self.round, params=self._completed.params))
            return
        round = getattr(message, "round", None)
        if round is None or round > self.round + MAX_ROUNDS_AHEAD:
            return  # liveness notices (re-checked by the pump), or rounds no honest peer can be in yet
        if isinstance(message, Skip):
            self._handle_skip(ctx, message)
        elif isinstance(message, Votes):
            if round >= self.round and len(message.ballots) <= len(ctx.peers):  # an honest relay never sends more
                self._learn_ballots(ctx, round, message.ballots, came_from=message.sender)
        elif isinstance(message, (HaveModels, PartialModel, AggregatedModel, Contribution)):
            if not self._peer_set(ctx).issuperset(message.contributors):
                return  # contributors that are no peer of the experiment: forged, and would only grow our state
            if isinstance(message, HaveModels):
                self._handle_have(message)
            elif self.config.exchange == "individual":
                if isinstance(message, Contribution):
                    self._handle_contribution(ctx, message)
                elif isinstance(message, AggregatedModel) and message.round == 0:
                    self._handle_model(ctx, message)  # only round 0's initial model is diffused in this mode
            elif not isinstance(message, Contribution):
                self._handle_model(ctx, message)

    def _handle_skip(self, ctx: NodeContext, message: Skip) -> None:
        """Note a signed skip of the current round (or a later one) and relay it once to the other neighbours."""
        if message.round < self.round or message.origin not in self._peer_set(ctx):
            return
        state = self.state(message.round)
        if message.origin in state.skipped or not ctx.verify(message.origin, skip_bytes(message.round, message.origin),
                                                              message.signature):
            return
        state.skipped.add(message.origin)
        relay = replace(message, sender=ctx.peer_id)
        for neighbour in ctx.neighbours:
            if neighbour != message.sender and neighbour != message.origin:
                ctx.send(neighbour, relay)

    def _learn_ballots(self, ctx: NodeContext, round: int, ballots: Iterable[Ballot], came_from: int) -> None:
        """Keep the first valid ballot of each peer and queue it for the next relay to the neighbours.

        A ballot counts only if its origin signed it for this round and it has an honest
        ballot's shape (see `honest_shape`); others are counted as refused and never relayed,
        so a forged ballot can neither pre-empt the real one nor skew the tally.
        """
        state = self.state(round)
        known = state.ballots
        peers = self._peer_set(ctx)
        unseen = []
        for ballot in ballots:
            if ballot.origin in known or ballot.origin not in peers:
                continue
            if not (honest_shape(ballot, peers, self.config.votes_per_peer)
                    and ctx.verify(ballot.origin, ballot_bytes(round, ballot), ballot.signature)):
                state.refused_ballots += 1
                break  # an honest relay checks before it relays: the rest of a lying message is not worth a check
            unseen.append(ballot)
        if not unseen:
            return
        batch = self._relay.setdefault(round, RelayBatch())
        for ballot in unseen:  # the first ballot of an origin counts, even within one message
            if ballot.origin not in known:
                known[ballot.origin] = ballot
                batch.ballots.append(ballot)
        batch.sources.add(came_from)
        if self._relay_at is None:
            self._relay_at = ctx.now() + self.config.vote_batch_s

    def _peer_set(self, ctx: NodeContext) -> frozenset[int]:
        if self._peers is None:
            self._peers = frozenset(ctx.peers)
        return self._peers

    def _send_relays(self, ctx: NodeContext) -> None:
        """One `Votes` message per round with every ballot learned since the last relay, to each neighbour.

        Every neighbour gets the same message (its own or its relayed ballots may echo back
        and are ignored there): filtering per neighbour would cost peers x ballots x degree
        work per round for a few bytes. A neighbour that sent every ballot of the batch
        gets nothing.
        """
        for round, batch in sorted(self._relay.items()):
            message = Votes(sender=ctx.peer_id, round=round, ballots=tuple(batch.ballots))
            for neighbour in ctx.neighbours:
                if batch.sources != {neighbour}:
                    ctx.send(neighbour, message)
        self._relay.clear()
        self._relay_at = None

    def _handle_have(self, message: HaveModels) -> None:
        if message.round < self.round - 1:
            return
        state = self.state(message.round)
        previous = state.neighbour_holds.get(message.sender, frozenset())
        state.neighbour_holds[message.sender] = previous | message.contributors
        state.awaiting_ack.pop(message.sender, None)
        if message.complete:
            state.neighbour_complete.add(message.sender)

    def _handle_model(self, ctx: NodeContext, message: PartialModel | AggregatedModel) -> None:
        if message.round < self.round or self.state(message.round).model is not None:  # no state for past rounds
            ctx.send(message.sender, HaveModels(sender=ctx.peer_id, round=message.round,
                                                contributors=message.contributors, complete=True))
            return
        state = self.state(message.round)
        if state.train_set and not frozenset(state.train_set).issuperset(message.contributors):
            return  # claims a peer that was not elected: no honest peer sends that
        if isinstance(message, AggregatedModel):
            state.neighbour_complete.add(message.sender)
            if state.aggregated is None or len(message.contributors) > len(state.aggregated.contributors):
                state.aggregated = message
            return
        kept = state.parts.add(Part(message.params, message.contributors, message.weight))
        have = HaveModels(sender=ctx.peer_id, round=message.round, contributors=state.parts.covered)
        for neighbour in (ctx.neighbours if kept else (message.sender,)):
            ctx.send(neighbour, have)

    def _handle_contribution(self, ctx: NodeContext, message: Contribution) -> None:
        """Keep the first copy of each origin's model (as our own message, to relay unchanged)."""
        state = self.state(message.round) if message.round >= self.round else None
        if state is None or state.model is not None:  # a past round, or this round's model is made
            ctx.send(message.sender, HaveModels(sender=ctx.peer_id, round=message.round,
                                                contributors=message.contributors, complete=True))
            return
        if message.origin not in state.contributions and not (
                (not state.train_set or message.origin in state.train_set)
                and ctx.verify(message.origin, contribution_bytes(message.round, message.origin, message.samples,
                                                                  message.params), message.signature)):
            state.refused_contributions += 1  # forged, altered, or from a peer that was not elected: never relayed
            return
        kept = message.origin not in state.contributions  # unusable values are relayed too, and left out when aggregating
        if kept:
            state.contributions[message.origin] = replace(message, sender=ctx.peer_id)
        have = HaveModels(sender=ctx.peer_id, round=message.round, contributors=frozenset(state.contributions))
        for neighbour in (ctx.neighbours if kept else (message.sender,)):
            ctx.send(neighbour, have)


def _check(config: GossipConfig, experiment: ExperimentConfig) -> None:
    if config.initiator >= experiment.peers:
        raise ValueError(f"gossip.initiator must be < peers ({experiment.peers})")
    rule = config.aggregation
    if config.exchange == "individual" and config.codec != "float32":
        raise ValueError(f"gossip.codec: {config.codec} changes a model on the way, and exchange=individual signs each "
                         "model as its origin made it; use float32 (gossip.compression is lossless and fine)")
    if config.exchange == "partial" and rule.rule != "fedavg":
        raise ValueError(f"gossip.aggregation.rule: {rule.rule} needs the individual models; partial aggregates "
                         "allow only fedavg (set gossip.exchange=individual)")
    train_set = min(config.train_set_size, experiment.peers)
    if rule.rule in ("krum", "multi_krum") and train_set <= 2 * rule.byzantine + 2:
        raise ValueError(f"gossip.aggregation.byzantine: {rule.rule} with f={rule.byzantine} needs more than "
                         f"{2 * rule.byzantine + 2} models a round, the train set has {train_set}")


def _worst_case_s(config: GossipConfig, experiment: ExperimentConfig) -> float:
    """Round 0, a restarted peer asking each neighbour in turn, then every round waiting out every timeout."""
    round_s = config.vote_timeout_s + max(config.aggregation_timeout_s, config.wait_model_timeout_s) + config.diffusion_timeout_s
    fetch = config.checkpoints
    recover_s = fetch.fetch_timeout_s * (2 + experiment.peers // fetch.fetch_parallel) if fetch.enabled else 0.0
    return (config.wait_model_timeout_s + config.diffusion_timeout_s + config.join_timeout_s * (experiment.peers - 1)
            + recover_s + experiment.rounds * round_s)


GOSSIP = register(Algorithm(
    name="gossip",
    summary="gossip FedAvg with P2PFL's round workflow (vote, train, gossip partial aggregates, diffuse); exchange=individual: robust aggregation at every peer",
    config=GossipConfig,
    messages=(Votes, PartialModel, AggregatedModel, HaveModels, JoinRequest, JoinReply, Contribution, Skip, *Recovery.messages),
    peer=lambda config, experiment: GossipPeer(config, experiment.rounds, experiment.name).run,
    check=_check,
    quick=("gossip.vote_timeout_s=3", "gossip.aggregation_timeout_s=4", "gossip.wait_model_timeout_s=5",
           "gossip.diffusion_timeout_s=3", "gossip.resend_timeout_s=0.5", "gossip.join_timeout_s=1"),
    worst_case_s=_worst_case_s,
))

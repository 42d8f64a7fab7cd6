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

Neighbours confirm what they hold with `HaveModels`; a sender waits for that confirmation
(or `resend_timeout_s`) before sending the same neighbour another model.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from meshfl.aggregate.partial import Part, PartialAggregates
from meshfl.config import GossipConfig
from meshfl.core.context import NodeContext
from meshfl.core.messages import AggregatedModel, Ballot, HaveModels, Message, PartialModel, Votes
from meshfl.core.params import Params


class Phase(enum.Enum):
    INITIAL_MODEL = "initial_model"
    VOTE = "vote"
    TRAIN = "train"
    AGGREGATE = "aggregate"
    WAIT_MODEL = "wait_model"
    DIFFUSE = "diffuse"
    EVALUATE = "evaluate"
    DONE = "done"


# ---- the maths, as plain functions -------------------------------------------------------

def make_ballot(rng: np.random.Generator, origin: int, peers: tuple[int, ...], votes_per_peer: int) -> Ballot:
    """P2PFL's ballot: k distinct random candidates, the i-th weighted floor(U[0,1000] / (i+1))."""
    count = min(votes_per_peer, len(peers))
    candidates = rng.choice(np.asarray(peers), size=count, replace=False)
    weights = [int(rng.integers(0, 1001)) // (i + 1) for i in range(count)]
    return Ballot(origin, tuple(int(c) for c in candidates), tuple(weights))


def tally_votes(ballots: Iterable[Ballot], train_set_size: int) -> tuple[int, ...]:
    """The `train_set_size` peers with the most vote weight; ties go to the lower peer id.

    Only peers named on some ballot are ranked. One numpy pass: with a thousand peers every
    peer tallies a thousand ballots each round.
    """
    ballots = list(ballots)
    candidates = np.fromiter(chain.from_iterable(b.candidates for b in ballots), dtype=np.int64)
    if candidates.size == 0:
        return ()
    weights = np.fromiter(chain.from_iterable(b.weights for b in ballots), dtype=np.int64, count=candidates.size)
    named = np.flatnonzero(np.bincount(candidates))  # peers on some ballot, even with weight 0
    totals = np.bincount(candidates, weights=weights.astype(np.float64))[named]  # exact: integer sums < 2**53
    ranked = named[np.lexsort((named, -totals))]
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
    ballots: dict[int, Ballot] = field(default_factory=dict)
    train_set: tuple[int, ...] = ()
    parts: PartialAggregates = field(default_factory=PartialAggregates)
    aggregated: AggregatedModel | None = None
    diffused: AggregatedModel | None = None  # this peer's model of the round, as it sends it to neighbours
    neighbour_holds: dict[int, frozenset[int]] = field(default_factory=dict)
    neighbour_complete: set[int] = field(default_factory=set)
    awaiting_ack: dict[int, float] = field(default_factory=dict)

    @property
    def model(self) -> Params | None:
        return self.diffused.params if self.diffused is not None else None


@dataclass
class RelayBatch:
    """Ballots learned since the last relay, and the neighbours they came from."""

    ballots: list[Ballot] = field(default_factory=list)
    sources: set[int] = field(default_factory=set)


class GossipPeer:
    """One peer's side of the protocol; `run` drives it through the phases."""

    def __init__(self, config: GossipConfig, rounds: int) -> None:
        self.config = config
        self.rounds = rounds
        self.phase = Phase.INITIAL_MODEL
        self.round = 0
        self._states: dict[int, RoundState] = {}
        self._ctx: NodeContext | None = None
        self._relay: dict[int, RelayBatch] = {}  # round -> ballots learned since the last relay
        self._relay_at: float | None = None
        self._peers: frozenset[int] | None = None

    def state(self, round: int) -> RoundState:
        if round not in self._states:
            self._states[round] = RoundState()
        return self._states[round]

    # ---- driving ----------------------------------------------------------------------------

    async def run(self, ctx: NodeContext) -> None:
        self._ctx = ctx
        model = await self._initial_model(ctx)
        for round in range(1, self.rounds + 1):
            self.round = round
            self._states.pop(round - 2, None)
            model = await self._run_round(ctx, round, model)
        self.phase = Phase.DONE

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
        self.phase = Phase.VOTE
        state.train_set = await self._elect_train_set(ctx, round)
        if ctx.peer_id in state.train_set:
            self.phase = Phase.TRAIN
            result = await ctx.train(model)
            ctx.log("train_loss", result.loss, round=round)
            state.parts.add(Part(result.params, frozenset([ctx.peer_id]), float(max(ctx.num_samples, 1))))
            self.phase = Phase.AGGREGATE
            timeout = self.config.aggregation_timeout_s
        else:
            self.phase = Phase.WAIT_MODEL
            timeout = self.config.wait_model_timeout_s
        await self._pump(ctx, lambda: self._complete_model(state) is not None, ctx.now() + timeout,
                         on_tick=lambda: self._gossip_parts(ctx, round))
        self._complete_round(ctx, round, self._best_model(ctx, state, model))
        await self._diffuse(ctx, round)
        self.phase = Phase.EVALUATE
        for metric, value in (await ctx.evaluate(state.model)).items():
            ctx.log(metric, value, round=round)
        return state.model

    async def _elect_train_set(self, ctx: NodeContext, round: int) -> tuple[int, ...]:
        state = self.state(round)
        own = make_ballot(ctx.rng, ctx.peer_id, ctx.peers, self.config.votes_per_peer)
        self._learn_ballots(ctx, round, (own,), came_from=ctx.peer_id)
        self._send_relays(ctx)  # one's own ballot goes out at once
        everyone = len(ctx.peers)
        await self._pump(ctx, lambda: len(state.ballots) >= everyone, ctx.now() + self.config.vote_timeout_s)
        if len(state.ballots) < everyone:
            ctx.log("missed_votes", everyone - len(state.ballots), round=round)
        return tally_votes(state.ballots.values(), min(self.config.train_set_size, everyone))

    async def _diffuse(self, ctx: NodeContext, round: int) -> None:
        """DIFFUSE: send the round's model to neighbours not known to hold it, until all do."""
        self.phase = Phase.DIFFUSE
        state = self.state(round)
        everyone_has_it = lambda: state.neighbour_complete.issuperset(ctx.neighbours)  # noqa: E731
        await self._pump(ctx, everyone_has_it, ctx.now() + self.config.diffusion_timeout_s,
                         on_tick=lambda: self._gossip_model(ctx, round))

    async def _pump(self, ctx: NodeContext, done: Callable[[], bool], deadline: float,
                    on_tick: Callable[[], None] | None = None) -> bool:
        """Handle messages (and gossip every period) until `done()` or the deadline.

        Ballots waiting to be relayed go out when their batch time comes, and in any case
        before returning: a peer may not pump again for a long time (it trains).
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

    # ---- round model ----------------------------------------------------------------------

    def _complete_model(self, state: RoundState) -> Params | None:
        """The round's model if this peer holds all of it, else None."""
        if state.aggregated is not None and state.aggregated.contributors.issuperset(state.train_set):
            return state.aggregated.params
        if state.train_set and state.parts.covers(state.train_set):
            return state.parts.result().params
        return None

    def _best_model(self, ctx: NodeContext, state: RoundState, previous: Params) -> Params:
        complete = self._complete_model(state)
        if complete is not None:
            return complete
        have = state.parts.covered
        if state.aggregated is not None and len(state.aggregated.contributors) >= len(have):
            have = state.aggregated.contributors
            best = state.aggregated.params
        else:
            best = state.parts.result().params if have else previous
        ctx.log("missed_models", len(set(state.train_set) - have), round=self.round)
        return best

    def _complete_round(self, ctx: NodeContext, round: int, model: Params) -> None:
        """Keep the round's model as the one message every neighbour may be sent, and tell them we have it.

        One message object per round (not one per send) lets the gRPC runtime encode it once.
        """
        state = self.state(round)
        contributors = frozenset(state.train_set) if round else frozenset()
        state.diffused = AggregatedModel(sender=ctx.peer_id, round=round, params=model, contributors=contributors)
        have = HaveModels(sender=ctx.peer_id, round=round, contributors=contributors, complete=True)
        for neighbour in ctx.neighbours:
            ctx.send(neighbour, have)

    # ---- gossip steps ---------------------------------------------------------------------

    def _ready_for(self, ctx: NodeContext, state: RoundState, neighbour: int) -> bool:
        sent_at = state.awaiting_ack.get(neighbour)
        return sent_at is None or ctx.now() - sent_at >= self.config.resend_timeout_s

    def _gossip_parts(self, ctx: NodeContext, round: int) -> None:
        state = self.state(round)
        train_set = set(state.train_set)
        holds: dict[int, frozenset[int]] = {}
        for neighbour in ctx.neighbours:
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
                                          contributors=part.contributors, weight=part.weight))
            state.awaiting_ack[target] = ctx.now()

    def _gossip_model(self, ctx: NodeContext, round: int) -> None:
        state = self.state(round)
        lacking = [n for n in ctx.neighbours
                   if n not in state.neighbour_complete and self._ready_for(ctx, state, n)]
        for target in choose_targets(ctx.rng, lacking, [], self.config.gossip_fanout):
            ctx.send(target, state.diffused)
            state.awaiting_ack[target] = ctx.now()

    # ---- receiving ------------------------------------------------------------------------

    def handle(self, ctx: NodeContext, message: Message) -> None:
        if isinstance(message, Votes):
            if message.round >= self.round:
                self._learn_ballots(ctx, message.round, message.ballots, came_from=message.sender)
        elif isinstance(message, HaveModels):
            self._handle_have(message)
        elif isinstance(message, (PartialModel, AggregatedModel)):
            self._handle_model(ctx, message)

    def _learn_ballots(self, ctx: NodeContext, round: int, ballots: Iterable[Ballot], came_from: int) -> None:
        """Keep the first ballot of each peer and queue it for the next relay to the neighbours.

        Ballots of unknown peers, or naming unknown candidates, are ignored: they could only
        skew the tally.
        """
        known = self.state(round).ballots
        peers = self._peer_set(ctx)
        unseen = [b for b in ballots if b.origin not in known and b.origin in peers and peers.issuperset(b.candidates)]
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
        state = self.state(message.round)
        if message.round < self.round or state.model is not None:
            ctx.send(message.sender, HaveModels(sender=ctx.peer_id, round=message.round,
                                                contributors=message.contributors, complete=True))
            return
        if isinstance(message, AggregatedModel):
            state.neighbour_complete.add(message.sender)
            if state.aggregated is None or len(message.contributors) > len(state.aggregated.contributors):
                state.aggregated = message
            return
        kept = state.parts.add(Part(message.params, message.contributors, message.weight))
        have = HaveModels(sender=ctx.peer_id, round=message.round, contributors=state.parts.covered)
        for neighbour in (ctx.neighbours if kept else (message.sender,)):
            ctx.send(neighbour, have)


def build_gossip(config: GossipConfig, rounds: int) -> Callable[[int], Callable[[NodeContext], object]]:
    """Factory per peer, as the runtimes expect."""
    return lambda peer_id: GossipPeer(config, rounds).run

"""Moshpit all-reduce over a DHT (MAR-FL): group averaging on a virtual grid, no coordinator.

Every iteration t = 1..rounds, every live peer:

1. trains (the train config's amount: `train.local_steps` or `train.local_epochs`) if it is in the iteration's train set (a fraction
   `train_fraction` drawn from (seed, t): every peer computes the same set, nobody announces it);
2. runs `averaging_rounds` rounds (default d, the grid's dimension) of Moshpit averaging unless it
   sits this iteration out (probability `dropout`, from its own ctx.rng: churn). In round r:
   - its group comes from the plan: the scheme (`moshpit_math.make_scheme`: on a perfect grid N = M^d,
     Moshpit's keys C <- C[1:] + [rank], exact after d rounds; otherwise the scheme chosen by
     measurement, see moshpit_math) run once with the ranks of a failure-free run, which every peer
     computes alone (`schedule_groups`). A failed member shrinks its planned group; it never moves
     anyone to another group (keys from the ranks in shrunk groups scattered peers into groups whose
     planned members were elsewhere: 5 s waits each round, drifting clocks, and 0.44 instead of 0.74
     minimum accuracy with 2 of 8 peers killed, measured);
   - matchmaking through the DHT (`meshfl.algorithms.dht`): it stores a signed entry under
     `moshpit/<t>/<r>/<first planned member>` and reads the key until every live planned member has
     written or `matchmaking_timeout_s` passed; a member that never came is simply not in the group;
   - agreement: the lowest peer id it found leads. The others send it `Join`; the leader answers
     every joiner of its key with `Begin(members)` once all it found have joined (or at
     `join_timeout_s`), so the members agree on one list. A peer asked by a joiner while it follows
     someone else points the joiner to its leader once. No answer: the peer is a group of one;
   - butterfly all-reduce (hivemind's): the flat model is cut into len(members) parts; member j
     reduces part j: every member sends it its part j (`Part`), it takes the weighted mean of what
     came within `allreduce_timeout_s` (a member that died or is late is left out of that part) and
     sends the mean back (`Reduced`); a part whose reducer never answers keeps the member's own
     values. A peer sends about 2 (M - 1) / M model sizes per round, not (M - 1) whole models;
3. checkpoints (t, model) in `ctx.store`, evaluates every `eval_every` iterations and at the end.

Waiting never blocks: matchmaking, joins and parts all have deadlines, and the detector's
`PeerLiveness` notices stop waits for dead peers early. A restarted peer resumes after its
checkpoint and starts matching at the iteration the others are in (it reads their progress
entries from the DHT); with its store wiped it first asks a live peer for its model (`State`).

Bounds: only `Part`/`Reduced` of the group keys of the current and next round are kept, one per
sender and key; joins only for the current round's key; values must have the run's layout and be
finite, weights positive and bounded by the number of samples a peer can have.
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field

from meshfl.algorithms import moshpit_dp, moshpit_math
from meshfl.algorithms.base import Algorithm, register
from meshfl.algorithms.dht import Dht, DhtConfig
from meshfl.core.context import NodeContext
from meshfl.core.messages import Message, PeerLiveness, Reply, Request
from meshfl.core.metrics import TRAIN_LOSS
from meshfl.core.params import Layout, Params, ParamsSlice
from meshfl.core.section import Section

if TYPE_CHECKING:
    from meshfl.config import ExperimentConfig

STORE_ENTRY = "moshpit.model"
"""The checkpoint: the model after the last finished iteration, with {"iteration": t}."""
PROGRESS_KEY = "moshpit/progress"
TRAIN_SET_TAG = 0x6D6F7368  # "mosh": the train-set stream, apart from every other use of the seed
MAX_WEIGHT = 1e9


class DpConfig(Section):
    enabled: bool = Field(False, description="distributed DP-FedAvg with adaptive clipping (Andrew et al. 2021): each participant clips its update, adds its share of the noise, smooths; the clip norm adapts")
    noise_multiplier: float = Field(1.0, gt=0, description="z: noise multiplier of the whole mechanism (update and unclipped count); needs z < peers x (1 - dropout) / 10")
    clip_norm: float = Field(0.1, gt=0, description="C0: initial clip norm of a participant's update")
    delta: float | None = Field(None, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee (default peers^-1.1)")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's RDP or PLD accountant (Poisson-subsampled Gaussian, rate 1 - moshpit.dropout)")


class MoshpitConfig(Section):
    group_size: int = Field(4, ge=2, description="M: peers per averaging group (the side of the virtual grid)")
    scheme: Literal["auto", *moshpit_math.SCHEMES] = Field(  # type: ignore[valid-type]
        "auto", description="group keys: auto = moshpit (Moshpit's grid keys) when the peers are a perfect power M^d, "
                            f"else {moshpit_math.DEFAULT_SCHEME}; see meshfl/algorithms/moshpit_math.py")
    averaging_rounds: int | None = Field(None, ge=0, description="rounds of group averaging per iteration (default d = ceil(log_M peers): exact on a perfect grid)")
    train_fraction: float = Field(1.0, gt=0, le=1, description="fraction of the peers that train in an iteration, drawn from (seed, iteration): the same at every peer")
    dropout: float = Field(0.0, ge=0, lt=1, description="probability that a peer sits out an iteration's averaging (churn; from its own random stream)")
    weighting: Literal["samples", "uniform"] = Field("samples", description="group means weighted by training samples (FedAvg) or unweighted (MAR-FL)")
    matchmaking_timeout_s: float = Field(5.0, gt=0, description="how long a peer reads its group key in the DHT for the members it expects")
    join_timeout_s: float = Field(3.0, gt=0, description="how long a leader waits for the members it found to join, and a joiner for the member list")
    allreduce_timeout_s: float = Field(10.0, gt=0, description="how long a reducer waits for the parts of its members, and a member for the reduced parts")
    poll_s: float = Field(0.2, gt=0, description="seconds between two reads of the group key while matchmaking")
    eval_every: int = Field(5, ge=1, description="evaluate every this many iterations (and after the last)")
    linger_s: float = Field(30.0, ge=0, description="after its last iteration a peer keeps serving until every live peer has finished, at most this long")
    dht: DhtConfig = Field(default_factory=DhtConfig, description="the DHT used for matchmaking and progress")
    dp: DpConfig = Field(default_factory=DpConfig, description="differential privacy (off by default)")


# ---- messages -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Join(Request):
    """Asks the leader of `group` (a DHT key) for the member list."""

    group: str


@dataclass(frozen=True, kw_only=True)
class Begin(Reply):
    """The leader's member list for `group` (sorted); empty with `leader` >= 0: ask that peer instead."""

    group: str
    members: tuple[int, ...]
    leader: int = -1


@dataclass(frozen=True, kw_only=True)
class Part(Message):
    """A member's part `index` of its model for the reducer of that part, with its weight."""

    group: str
    index: int
    weight: float
    values: ParamsSlice


@dataclass(frozen=True, kw_only=True)
class Reduced(Message):
    """The weighted mean of part `index` over the `contributors` whose parts came."""

    group: str
    index: int
    contributors: int
    values: ParamsSlice


@dataclass(frozen=True, kw_only=True)
class State(Request):
    """A restarted peer without a checkpoint asks for a model and the iteration it belongs to."""


@dataclass(frozen=True, kw_only=True)
class StateReply(Reply):
    iteration: int
    params: Params


# ---- one peer -----------------------------------------------------------------------------

class MoshpitPeer:
    """One peer's side (one object per incarnation): iterations, matchmaking, butterfly all-reduce."""

    def __init__(self, config: MoshpitConfig, experiment: ExperimentConfig) -> None:
        self.config = config
        self.iterations = experiment.rounds
        self.seed = experiment.seed
        self.model: Params | None = None
        self.iteration = 0
        self.dht: Dht | None = None
        self.parts: dict[tuple[str, int], dict[int, Part]] = {}  # (group, index) -> sender -> part
        self.reduced: dict[tuple[str, int], Reduced] = {}
        self.joins: dict[str, dict[int, Join]] = {}  # group -> joiner -> request
        self.live_groups: set[str] = set()  # keys whose messages are kept now
        self.leading: dict[str, tuple[int, ...] | None] = {}  # group -> members once begun (None: still gathering)
        self.following: dict[str, int] = {}  # group -> our leader
        self.refused = 0
        self.last_averaging_s = 1.0
        self._expected: list[list[list[int]]] | None = None
        self.vector_layout: Layout | None = None
        self.smoothed: torch.Tensor | None = None  # DP: s, the smoothed noisy update
        self.clip_norm = config.dp.clip_norm
        self.dp_steps = 0

    # -- lifecycle
    async def run(self, ctx: NodeContext) -> None:
        model = ctx.initial_params()
        first = 1
        stored = ctx.store.get_params(STORE_ENTRY, model.layout)
        if stored is not None:
            model, meta = stored
            first = int(meta.get("iteration", 0)) + 1
        self.model = model
        self.dht = Dht(ctx, self.config.dht)
        pump = asyncio.ensure_future(self.pump(ctx))
        try:
            await self.dht.bootstrap()
            if ctx.incarnation > 0:
                ctx.log("resumed", first - 1, round=first - 1)
                if stored is None:
                    await self.fetch_state(ctx)
                first = max(first, await self.network_iteration(ctx))
            for t in range(first, self.iterations + 1):
                await self.run_iteration(ctx, t)
            if self.iteration < self.iterations:
                await self.evaluate(ctx, self.iterations)
            await self.linger(ctx)
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def linger(self, ctx: NodeContext) -> None:
        """Keep serving the DHT and our last groups until every live peer reports the last iteration (at most linger_s):
        a peer that left at once would stall the lookups of the others still matching."""
        assert self.dht is not None
        deadline = ctx.now() + self.config.linger_s
        while ctx.now() < deadline:
            progress = await self.dht.get(PROGRESS_KEY)
            behind = [p for p in ctx.peers if p != ctx.peer_id and ctx.is_alive(p)
                      and not (progress.get(p, "").isdigit() and int(progress[p]) >= self.iterations)]
            if not behind:
                return
            await ctx.sleep(min(1.0, max(deadline - ctx.now(), 0.0)))

    async def pump(self, ctx: NodeContext) -> None:
        """Every message that arrives: the DHT's requests, our groups' traffic, liveness notices."""
        assert self.dht is not None
        while True:
            message = await ctx.recv()
            if message is None or self.dht.handle(message):
                continue
            self.handle(ctx, message)

    def handle(self, ctx: NodeContext, message: Message) -> None:
        assert self.model is not None
        if isinstance(message, PeerLiveness):
            return
        if isinstance(message, State):
            ctx.reply(message, StateReply(sender=ctx.peer_id, iteration=self.iteration, params=self.model))
        elif isinstance(message, Join):
            self.on_join(ctx, message)
        elif isinstance(message, Part):
            key = (message.group, message.index)
            live = message.group in self.live_groups and 0 <= message.index < 2 * self.config.group_size
            held = self.parts.setdefault(key, {}) if live else None
            if held is None or message.sender in held or not self.slice_fits(message.values) or not 0 < message.weight <= MAX_WEIGHT:
                self.refused += 1
                return
            held[message.sender] = message
        elif isinstance(message, Reduced):
            key = (message.group, message.index)
            if message.group not in self.live_groups or key in self.reduced or not self.slice_fits(message.values):
                self.refused += 1
                return
            self.reduced[key] = message

    def slice_fits(self, piece: ParamsSlice) -> bool:
        """Our averaged vector's layout (the model, or the model + DP state) and finite values."""
        assert self.model is not None
        layout = self.vector_layout or self.model.layout
        return piece.layout.fingerprint == layout.fingerprint and bool(torch.isfinite(piece.values).all())

    # -- one iteration
    def train_set(self, ctx: NodeContext, t: int) -> set[int]:
        peers = list(ctx.peers)
        count = max(1, round(self.config.train_fraction * len(peers)))
        if count >= len(peers):
            return set(peers)
        rng = np.random.default_rng([self.seed, TRAIN_SET_TAG, t])
        return {int(p) for p in rng.choice(peers, size=count, replace=False)}

    async def run_iteration(self, ctx: NodeContext, t: int) -> None:
        assert self.model is not None and self.dht is not None
        weight = 1.0
        start = self.model
        if ctx.peer_id in self.train_set(ctx, t):
            result = await ctx.train(self.model)
            self.model = result.params
            ctx.log(TRAIN_LOSS, result.loss, round=t)
        if self.config.weighting == "samples" and not self.config.dp.enabled:
            weight = float(max(ctx.num_samples, 1))
        started = ctx.now()
        if float(ctx.rng.random()) < self.config.dropout:
            ctx.log("sat_out", 1, round=t)
            await ctx.sleep(self.last_averaging_s)  # about as long as the others average, so it stays in step
        else:
            vector = self.private_vector(ctx, start) if self.config.dp.enabled else self.model
            averaged = await self.average(ctx, t, vector, weight)
            self.model = self.after_private(ctx, t, averaged) if self.config.dp.enabled else averaged
            self.last_averaging_s = max(ctx.now() - started, 1e-3)
        self.iteration = t
        ctx.store.put_params(STORE_ENTRY, self.model, {"iteration": t})
        await self.dht.store(PROGRESS_KEY, str(t), ttl=self.config.dht.ttl_s)
        if self.refused:
            ctx.log("refused", self.refused, round=t)
            self.refused = 0
        if t % self.config.eval_every == 0 or t == self.iterations:
            await self.evaluate(ctx, t)

    async def evaluate(self, ctx: NodeContext, t: int) -> None:
        assert self.model is not None
        for metric, value in (await ctx.evaluate(self.model)).items():
            ctx.log(metric, value, round=t)

    def scheme(self, ctx: NodeContext) -> moshpit_math.GroupScheme:
        n, m = len(ctx.peers), self.config.group_size
        name = self.config.scheme
        if name == "auto":
            d = moshpit_math.rounds_needed(n, m)
            name = "moshpit" if m**d == n else moshpit_math.DEFAULT_SCHEME
        return moshpit_math.make_scheme(name, n, m, seed=self.seed)

    async def average(self, ctx: NodeContext, t: int, vector: Params, weight: float) -> Params:
        """`vector` averaged over this iteration's groups, round by round."""
        self.vector_layout = vector.layout
        index = ctx.peers.index(ctx.peer_id)
        rounds = self.config.averaging_rounds
        if rounds is None:
            rounds = moshpit_math.rounds_needed(len(ctx.peers), self.config.group_size)
        if self._expected is None:  # the plan, the same every iteration and at every peer: computed once
            self._expected = moshpit_math.schedule_groups(self.scheme(ctx), rounds)
        sent = 0
        for r in range(rounds):
            mates = next((g for g in self._expected[r] if index in g), [index])
            group = f"moshpit/{t}/{r}/{mates[0]}"  # the planned group, named by its first member
            members = await self.match(ctx, group, [ctx.peers[i] for i in mates])
            ctx.log("group_size", len(members), round=t)
            vector, sent_now = await self.all_reduce(ctx, group, members, vector, weight, t)
            sent += sent_now
        ctx.log("model_sizes_sent", sent / max(vector.nbytes, 1), round=t)
        return vector

    # -- matchmaking
    async def match(self, ctx: NodeContext, group: str, expected: list[int]) -> list[int]:
        """The agreed member list of `group` (sorted, this peer included)."""
        assert self.dht is not None
        self.live_groups.add(group)
        await self.dht.store(group, "1", ttl=self.config.matchmaking_timeout_s + self.config.join_timeout_s
                             + self.config.allreduce_timeout_s)
        deadline = ctx.now() + self.config.matchmaking_timeout_s
        found: set[int] = {ctx.peer_id}
        wanted = {p for p in expected if ctx.is_alive(p) or p == ctx.peer_id}
        while True:
            found |= {p for p in (await self.dht.get(group)) if p in ctx.peers}
            wanted = {p for p in wanted if p in found or ctx.is_alive(p)}
            if wanted <= found or ctx.now() >= deadline:
                break
            await ctx.sleep(min(self.config.poll_s, max(deadline - ctx.now(), 0.0)))
        leader = min(found)
        if leader == ctx.peer_id:
            return await self.lead(ctx, group, found)
        return await self.follow(ctx, group, leader)

    async def lead(self, ctx: NodeContext, group: str, found: set[int]) -> list[int]:
        self.leading[group] = None
        deadline = ctx.now() + self.config.join_timeout_s
        while True:
            joined = set(self.joins.get(group, {}))
            waiting = {p for p in found if p != ctx.peer_id and p not in joined and ctx.is_alive(p)}
            if not waiting or ctx.now() >= deadline:
                break
            await ctx.sleep(min(self.config.poll_s / 4, deadline - ctx.now()))
        members = tuple(sorted({ctx.peer_id, *self.joins.get(group, {})})[: self.config.group_size * 2])
        self.leading[group] = members
        for request in self.joins.pop(group, {}).values():
            if request.sender in members:
                ctx.reply(request, Begin(sender=ctx.peer_id, group=group, members=members))
        return list(members)

    async def follow(self, ctx: NodeContext, group: str, leader: int) -> list[int]:
        self.following[group] = leader
        for _ in range(2):  # one redirect at most
            reply = await ctx.request(leader, Join(sender=ctx.peer_id, group=group), self.config.join_timeout_s * 2)
            if not isinstance(reply, Begin) or reply.group != group:
                return [ctx.peer_id]
            if reply.members:
                members = sorted(set(reply.members))
                return members if ctx.peer_id in members and len(members) == len(reply.members) else [ctx.peer_id]
            if reply.leader < 0 or reply.leader == leader or reply.leader == ctx.peer_id:
                return [ctx.peer_id]
            leader = reply.leader
        return [ctx.peer_id]

    def on_join(self, ctx: NodeContext, request: Join) -> None:
        group = request.group
        if group not in self.live_groups:
            self.refused += 1
            return
        if group in self.following:  # we follow someone else: point the joiner there once
            ctx.reply(request, Begin(sender=ctx.peer_id, group=group, members=(), leader=self.following[group]))
            return
        begun = self.leading.get(group)
        if begun is not None:  # too late for this group
            ctx.reply(request, Begin(sender=ctx.peer_id, group=group, members=()))
            return
        held = self.joins.setdefault(group, {})
        if len(held) < 4 * self.config.group_size:
            held[request.sender] = request

    # -- butterfly all-reduce
    async def all_reduce(self, ctx: NodeContext, group: str, members: list[int], vector: Params, weight: float,
                         t: int) -> tuple[Params, int]:
        """`vector` averaged over `members` by reduce-scatter and all-gather; and the bytes this peer sent."""
        if len(members) < 2:
            self.forget(group)
            return vector, 0
        model = vector
        bounds = moshpit_math.part_bounds(model.layout.numel, len(members))
        me = members.index(ctx.peer_id)
        sent = 0
        for j, reducer in enumerate(members):
            a, b = bounds[j]
            if reducer == ctx.peer_id or b <= a:
                continue
            piece = ParamsSlice.of(model, ((a, b),))
            ctx.send(reducer, Part(sender=ctx.peer_id, group=group, index=j, weight=weight, values=piece))
            sent += piece.nbytes
        a, b = bounds[me]
        mine = model.flat[a:b]
        reduced_own = mine
        if b > a:
            deadline = ctx.now() + self.config.allreduce_timeout_s
            others = [p for p in members if p != ctx.peer_id]
            while True:
                got = self.parts.get((group, me), {})
                missing = [p for p in others if p not in got and ctx.is_alive(p)]
                if not missing or ctx.now() >= deadline:
                    break
                await ctx.sleep(min(0.01, deadline - ctx.now()))
            got = self.parts.get((group, me), {})
            rows = [mine, *(got[p].values.values for p in sorted(got))]
            weights = [weight, *(got[p].weight for p in sorted(got))]
            reduced_own = moshpit_math.reduce_part(rows, weights)
            piece = ParamsSlice(reduced_own.contiguous(), model.layout, ((a, b),))
            for p in sorted(got):
                ctx.send(p, Reduced(sender=ctx.peer_id, group=group, index=me, contributors=len(rows), values=piece))
                sent += piece.nbytes
            if len(got) < len(others):
                ctx.log("parts_missing", len(others) - len(got), round=t)
        flat = model.flat.clone()
        flat[a:b] = reduced_own
        deadline = ctx.now() + self.config.allreduce_timeout_s
        while True:
            waiting = [j for j, p in enumerate(members) if p != ctx.peer_id and bounds[j][1] > bounds[j][0]
                       and (group, j) not in self.reduced and ctx.is_alive(p)]
            if not waiting or ctx.now() >= deadline:
                break
            await ctx.sleep(min(0.01, deadline - ctx.now()))
        lost = 0
        for j, p in enumerate(members):
            if p == ctx.peer_id:
                continue
            answer = self.reduced.get((group, j))
            ja, jb = bounds[j]
            if answer is not None and answer.values.ranges == ((ja, jb),):
                flat[ja:jb] = answer.values.values
            elif jb > ja:
                lost += 1  # its reducer failed: this part keeps our own values
        if lost:
            ctx.log("reduced_missing", lost, round=t)
        self.forget(group)
        return Params(flat, model.layout), sent

    def forget(self, group: str) -> None:
        self.live_groups.discard(group)
        self.leading.pop(group, None)
        self.following.pop(group, None)
        self.joins.pop(group, None)
        for key in [k for k in self.parts if k[0] == group]:
            del self.parts[key]
        for key in [k for k in self.reduced if k[0] == group]:
            del self.reduced[key]

    # -- differential privacy
    def participants(self, ctx: NodeContext) -> int:
        """m: the expected participants of an aggregation (each peer takes part with probability 1 - dropout)."""
        return max(1, round(len(ctx.peers) * (1.0 - self.config.dropout)))

    def private_vector(self, ctx: NodeContext, start: Params) -> Params:
        """What a DP participant averages: theta_dp = theta_last + eta_s s, s itself, and its noisy unclipped bit.

        The update is clipped to C and gets this peer's share of the noise (std z_delta C / sqrt(m)), so the
        group means carry the noise of one Gaussian mechanism; the bit gets a share of the count noise likewise,
        so every peer ends with the same noisy count and the same clip norm."""
        assert self.model is not None
        m = self.participants(ctx)
        generator = torch.Generator().manual_seed(int(ctx.rng.integers(2**63 - 1)))
        delta = self.model.flat - start.flat
        noisy, unclipped = moshpit_dp.privatize_delta(delta, self.clip_norm, self.config.dp.noise_multiplier, m, generator)
        self.smoothed = moshpit_dp.smooth(self.smoothed, noisy)
        theta = moshpit_dp.dp_params(start.flat, self.smoothed)
        count_share = float(unclipped) + float(torch.randn((), generator=generator)) * moshpit_dp.count_noise_std(m) / math.sqrt(m)
        layout = Layout((*start.layout.names, "dp.smoothed", "dp.unclipped"),
                        (*start.layout.shapes, (start.layout.numel,), (1,)))
        return Params(torch.cat([theta, self.smoothed, torch.tensor([count_share])]).float(), layout)

    def after_private(self, ctx: NodeContext, t: int, averaged: Params) -> Params:
        """Unpack the averaged vector: the model, s, and the noisy unclipped fraction that moves C."""
        assert self.model is not None
        n = self.model.layout.numel
        self.smoothed = averaged.flat[n:2 * n].clone()
        fraction = min(1.0, max(0.0, float(averaged.flat[2 * n])))
        self.clip_norm = moshpit_dp.update_clip_norm(self.clip_norm, fraction)
        self.dp_steps += 1
        dp = self.config.dp
        delta = dp.delta if dp.delta is not None else moshpit_dp.default_delta(len(ctx.peers))
        rate = min(1.0, self.participants(ctx) / len(ctx.peers))
        ctx.log("epsilon", _epsilon(dp.noise_multiplier, rate, self.dp_steps, delta, dp.accountant), round=t)
        ctx.log("clip_norm", self.clip_norm, round=t)
        ctx.log("unclipped_fraction", fraction, round=t)
        return Params(averaged.flat[:n].clone(), self.model.layout)

    # -- rejoining
    async def network_iteration(self, ctx: NodeContext) -> int:
        """The iteration the live peers are at (their progress entries in the DHT), +1; 1 if none is known."""
        assert self.dht is not None
        entries = await self.dht.get(PROGRESS_KEY)
        done = sorted(int(v) for p, v in entries.items() if p != ctx.peer_id and v.isdigit() and ctx.is_alive(p))
        if not done:
            return 1
        at = done[len(done) // 2] + 1  # the median: one peer that lies about its progress cannot move us
        ctx.log("rejoined", at, round=at)
        return at

    async def fetch_state(self, ctx: NodeContext) -> None:
        assert self.model is not None
        for p in ctx.peers:
            if p == ctx.peer_id or not ctx.is_alive(p):
                continue
            reply = await ctx.request(p, State(sender=ctx.peer_id), self.config.join_timeout_s)
            if (isinstance(reply, StateReply) and reply.params.layout.fingerprint == self.model.layout.fingerprint
                    and reply.params.finite):
                self.model = reply.params
                ctx.log("adopted_from", p, round=0)
                return


_epsilon = functools.lru_cache(maxsize=1024)(moshpit_dp.epsilon)  # every simulated peer asks the same question


# ---- declaration -------------------------------------------------------------------------------

def _check(config: MoshpitConfig, experiment: ExperimentConfig) -> None:
    if experiment.peers < 2:
        raise ValueError("moshpit needs peers >= 2")
    if config.dp.enabled:
        m = max(1, round(experiment.peers * (1.0 - config.dropout)))
        if config.dp.noise_multiplier >= m / 10:
            raise ValueError(f"moshpit.dp.noise_multiplier: must be below participants / 10 = {m / 10:g} (peers x (1 - "
                             f"dropout) = {m}), got {config.dp.noise_multiplier}: the count noise would need all the privacy")
        if config.train_fraction < 1:
            raise ValueError("moshpit.train_fraction: must be 1 with moshpit.dp.enabled (participation is the dropout's "
                             "Poisson sampling, which the accountant assumes)")
    if config.scheme == "moshpit":
        d = moshpit_math.rounds_needed(experiment.peers, config.group_size)
        if config.group_size**d != experiment.peers:
            raise ValueError(f"moshpit.scheme: moshpit needs peers = group_size^d, got {experiment.peers} peers and "
                             f"group_size {config.group_size}; use auto or {moshpit_math.DEFAULT_SCHEME}")


def _worst_case_s(config: MoshpitConfig, experiment: ExperimentConfig) -> float:
    rounds = config.averaging_rounds if config.averaging_rounds is not None else moshpit_math.rounds_needed(
        experiment.peers, config.group_size)
    per_round = config.matchmaking_timeout_s + 3 * config.join_timeout_s + 2 * config.allreduce_timeout_s
    return 2 * (experiment.rounds + 1) * (rounds * per_round + 10 * config.dht.request_timeout_s) + 60


MOSHPIT = register(Algorithm(
    name="moshpit",
    summary="Moshpit all-reduce (MAR-FL): group averaging on a virtual grid, groups found through a DHT, "
            "butterfly reduce-scatter/all-gather inside each group, no coordinator",
    config=MoshpitConfig,
    messages=(Join, Begin, Part, Reduced, State, StateReply),
    peer=lambda config, experiment: MoshpitPeer(config, experiment).run,
    check=_check,
    quick=("moshpit.matchmaking_timeout_s=2", "moshpit.join_timeout_s=1", "moshpit.allreduce_timeout_s=2",
           "moshpit.dht.request_timeout_s=0.5", "train.local_steps=2"),
    worst_case_s=_worst_case_s,
))

__all__ = ["MOSHPIT", "Begin", "Join", "MoshpitConfig", "MoshpitPeer", "Part", "Reduced", "State", "StateReply"]

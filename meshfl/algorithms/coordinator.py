"""FedAvg through a coordinator, with a quorum of live workers and no single point of failure.

Each round the coordinator sends the global model and a workload (`Work`: epochs or steps) to
every worker it believes alive; workers train and answer with their update, their sample
count and how long they trained (`Update`). The round closes when `quorum` of the workers
believed alive have answered (dead workers leave the count; at least `min_updates`), or at
`round_timeout_s` with what it has, never later. A worker that has not answered is sent its
work again after a jittered exponential backoff, a bounded number of times; a worker that
gets the same work twice sends its update again instead of training again. Updates that
arrive after their round closed are dropped or, with `late_policy: stale`, folded into the
next aggregation with weight samples x staleness decay (`meshfl.aggregate.staleness`).
FedAvg is weighted by samples; `aggregation.rule` picks a robust rule instead
(`meshfl.aggregate.robust`: clip, median, trimmed mean, Krum, Multi-Krum, geometric median).

Round trips (work sent to update received) and throughput are measured per worker.
`load_balancing: aimd` adds `aimd_increase` to a worker that answered in time (within the round,
and not a straggler) and halves the workload of a late one or a straggler; `speed` gives each worker the workload whose expected round trip
(its measured communication time plus workload / its throughput) matches a target, the
median expected round trip at `workload` unless `target_round_trip_s` is set. A worker
slower than `straggler_factor` x the median is logged.

No single point of failure. The coordinator keeps the round, the global model and the
per-worker statistics in `ctx.store` and resumes after a restart. Who coordinates is sticky:
`coordinator` at first; when the peer a worker follows is no longer believed alive, the
lowest live id takes over and continues from the newest global model it holds. A peer that
receives work built on an older global model than its own answers `Held` (its round, whom it
follows, its model): a returning old coordinator learns from it that a successor leads and
follows it; a coordinator that lost its store adopts the newer model. Between two live
coordinators the newer global model wins, then the lower id. `Done` ends the run, and so does
a whole round without any live worker (nothing can train; logged `no_workers`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BeforeValidator, Field

from meshfl.aggregate.robust import RobustConfig, robust_aggregate
from meshfl.aggregate.staleness import StalenessConfig, staleness_weight
from meshfl.algorithms.base import Algorithm, register
from meshfl.core.context import NodeContext
from meshfl.core.messages import LOSSLESS, Codec, Message, PeerLiveness
from meshfl.core.params import Params
from meshfl.core.section import Section

if TYPE_CHECKING:
    from meshfl.config import ExperimentConfig

STORE_ENTRY = "coordinator_global"


def _yaml_off(value: object) -> object:
    """YAML reads a bare `off` as false: take it as the option it meant."""
    return "off" if value is False else value


class CoordinatorConfig(Section):
    coordinator: int = Field(0, ge=0, description="the peer that coordinates first; if it dies, the lowest live id takes over for good")
    quorum: float = Field(0.75, gt=0, le=1, description="a round closes when this fraction of the workers believed alive has answered")
    min_updates: int = Field(1, ge=1, description="below this many updates a round waits for round_timeout_s, then goes on with what it has")
    round_timeout_s: float = Field(120.0, gt=0, description="a round closes at this time whatever has arrived")
    late_policy: Literal["drop", "stale"] = Field("drop", description="updates after their round closed: dropped, or folded into the next aggregation with the staleness decay")
    staleness: StalenessConfig = Field(default_factory=StalenessConfig, description="late_policy stale: weight of an update s rounds late")
    aggregation: RobustConfig = Field(default_factory=RobustConfig, description="how the workers' models are combined (fedavg, or a rule robust to lying workers)")
    retries: int = Field(3, ge=0, description="most times work is sent again to a worker that has not answered, per round")
    retry_base_s: float = Field(10.0, gt=0, description="wait before the first resend (plus the worker's expected round trip once measured)")
    retry_factor: float = Field(2.0, ge=1, description="each further resend waits this many times longer (jittered, capped)")
    retry_cap_s: float = Field(60.0, gt=0, description="longest wait between two sends of the same work")
    workload_unit: Literal["epochs", "steps"] = Field("epochs", description="what a workload counts: local epochs or mini-batch steps")
    workload: int = Field(1, ge=1, description="epochs or steps a worker trains per round at first (and the speed rule's reference); the coordinator sets the work, so train.local_epochs is not used")
    min_workload: int = Field(1, ge=1, description="load balancing never gives less")
    max_workload: int | None = Field(None, ge=1, description="load balancing never gives more (default 4 x workload); workers refuse more")
    load_balancing: Annotated[Literal["off", "aimd", "speed"], BeforeValidator(_yaml_off)] = Field("off", description="off; aimd: in time +aimd_increase, late halves; speed: workloads that make each round trip match the target")
    aimd_increase: int = Field(1, ge=1, description="aimd: workload added after a round answered in time")
    target_round_trip_s: float | None = Field(None, gt=0, description="speed: the round trip to aim at (default: the median expected round trip at `workload`)")
    straggler_factor: float = Field(2.0, gt=1, description="a worker whose round trip exceeds this x the median is logged as a straggler")
    codec: Literal["float32", "float16", "int8"] = Field("float32", description="how models travel")

    @property
    def workload_cap(self) -> int:
        return self.max_workload if self.max_workload is not None else 4 * self.workload


@dataclass(frozen=True, kw_only=True)
class Work(Message):
    """Train `workload` (epochs or steps) from `params`, the global model of round - 1, and answer for `round`."""

    round: int
    term: int
    workload: int
    params: Params
    codec: Codec = LOSSLESS


@dataclass(frozen=True, kw_only=True)
class Update(Message):
    """A worker's model after `round`'s work: `samples` it holds (the FedAvg weight), `trained`
    samples it went through, in `train_s` seconds of its own clock."""

    round: int
    samples: int
    trained: int
    train_s: float
    params: Params
    codec: Codec = LOSSLESS


@dataclass(frozen=True, kw_only=True)
class Held(Message):
    """The answer to work that loses to what this peer follows: 'I hold the global model of `round`,
    made under `leader`'s coordination in `term`'."""

    round: int
    term: int
    leader: int
    params: Params
    codec: Codec = LOSSLESS


@dataclass(frozen=True, kw_only=True)
class Done(Message):
    """The run is over; `params` is the final global model (of `round`)."""

    round: int
    params: Params


# ---- the maths, as plain functions -------------------------------------------------------

def quorum_reached(answered: int, alive_workers: int, quorum: float, min_updates: int) -> bool:
    """`quorum` of the live workers (rounded up) and at least min_updates (or every live worker, if fewer)."""
    needed = max(math.ceil(quorum * alive_workers - 1e-9), min(min_updates, alive_workers))
    return alive_workers > 0 and answered >= needed


def rank(round: int, term: int, leader: int) -> tuple[int, int, int]:
    """How coordinations compare: the newer global model, then the later term (a successor's term is
    one more than its predecessor's, so a returning old coordinator loses a tie), then the lower id."""
    return (round, term, -leader)


@dataclass(frozen=True)
class Estimate:
    """A worker's measured speed: seconds of communication per round trip and workload units per second."""

    comm_s: float
    throughput: float

    def round_trip(self, workload: float) -> float:
        return self.comm_s + workload / self.throughput

    def workload_for(self, round_trip: float) -> float:
        return (round_trip - self.comm_s) * self.throughput


def estimate(workload: int, round_trip: float, train_s: float) -> Estimate:
    """From one answered round: the worker's claimed training time is bounded by the round trip we saw."""
    train_s = min(max(train_s, 1e-9), round_trip) if round_trip > 0 else 1e-9
    return Estimate(comm_s=max(round_trip - train_s, 0.0), throughput=workload / train_s)


def next_workload(policy: str, workload: int, in_time: bool, speed: Estimate | None, target: float | None,
                  low: int, high: int, increase: int = 1) -> int:
    """The next round's workload of one worker. aimd: +increase in time, else half. speed: what
    makes its round trip `target` when this round measured it (`speed`), else half."""
    if policy == "aimd":
        workload = workload + increase if in_time else workload // 2
    elif policy == "speed":
        if speed is not None and target is not None:
            workload = round(speed.workload_for(target))
        elif not in_time:
            workload = workload // 2
    return max(low, min(high, workload))


def retry_delay(attempt: int, base: float, factor: float, cap: float, jitter: float) -> float:
    """Exponential backoff with jitter in [0.5, 1): `jitter` is a draw in [0, 1)."""
    return min(cap, base * factor ** attempt) * (0.5 + 0.5 * jitter)


def _work_rank(work: Work) -> tuple[int, int, int]:
    """The rank of the coordination that sent `work` (it is built on the model of round - 1)."""
    return rank(work.round - 1, work.term, work.sender)


def _lowest_live(ctx: NodeContext, passing_over: int | None = None) -> int:
    """The deterministic successor: the lowest id this peer believes alive (itself included)."""
    return min(p for p in ctx.peers if p != passing_over and (p == ctx.peer_id or ctx.is_alive(p)))


def usable(params: Params, like: Params) -> bool:
    """A received model we may average: our layout, every value finite."""
    return params.layout.fingerprint == like.layout.fingerprint and params.finite


# ---- per-worker bookkeeping ----------------------------------------------------------------

SENT_ROUNDS_KEPT = 16


@dataclass
class WorkerStats:
    workload: int
    late: int = 0
    speed: Estimate | None = None
    sent: dict[int, tuple[float, int]] = field(default_factory=dict)  # round -> (sent at, workload), the last few

    def record_send(self, round: int, at: float, workload: int) -> None:
        self.sent[round] = (at, workload)
        for old in sorted(self.sent)[:-SENT_ROUNDS_KEPT]:
            del self.sent[old]


@dataclass
class Round:
    """One round in flight at the coordinator."""

    number: int
    work: dict[int, Work]
    tries: dict[int, int]
    retry_at: dict[int, float]
    updates: dict[int, Update]
    measured: dict[int, tuple[float, Update, int]]  # worker -> (round trip, update, its workload): in time or late


class Alone(Exception):
    """No worker was alive for a whole round: nothing can train, so the run ends here."""


class SteppedDown(Exception):
    """This peer stopped coordinating (a coordination that ranks higher, or the end of the run)."""


EMPTY_ROUND_REPEATS = 2  # a round that got no update at all is run again this many times before going on


class CoordinatorPeer:
    """One peer: it coordinates while it is the leader, else it follows whoever leads."""

    def __init__(self, config: CoordinatorConfig, rounds: int, liveness_timeout_s: float) -> None:
        self.config = config
        self.rounds = rounds
        self.codec = Codec(kind=config.codec)
        self.round = 0  # the last round whose global model this peer holds
        self.model: Params | None = None
        self.leader_id = config.coordinator  # whom this peer expects to lead (sticky)
        self.served = config.coordinator  # the coordinator whose work it last served (or itself, leading)
        self.term = 0  # that coordinator's term
        self.done = False
        self.patience = 2 * config.round_timeout_s + liveness_timeout_s  # longest silence of a live leader
        self._answered: dict[int, Update] = {}  # round -> this worker's update, sent again on a repeat
        self._stashed: Work | None = None  # work that made a coordinator step down: served as a worker
        self._stats_meta: dict = {}

    def leader(self, ctx: NodeContext) -> int:
        """Whom this peer follows: sticky while believed alive, else the lowest live id."""
        if self.leader_id != ctx.peer_id and not ctx.is_alive(self.leader_id):
            self.leader_id = _lowest_live(ctx)
        return self.leader_id

    def _rank(self) -> tuple[int, int, int]:
        return rank(self.round, self.term, self.served)

    async def run(self, ctx: NodeContext) -> None:
        self.model = ctx.initial_params()
        stored = ctx.store.get_params(STORE_ENTRY, self.model.layout)
        if stored is not None:
            self.model, meta = stored
            self.round = int(meta.get("round", 0))
            self.leader_id = self.served = int(meta.get("leader", self.leader_id))
            self.term = int(meta.get("term", 0))
            self._stats_meta = meta
        while not self.done:
            finished = await ctx.recv(0, types=(Done,))  # a Done waiting since we trained ends the run
            if isinstance(finished, Done):
                await self._finish(ctx, finished)
            elif self.leader(ctx) == ctx.peer_id:
                await self.lead(ctx)
            else:
                await self.follow(ctx)

    async def _finish(self, ctx: NodeContext, done: Done) -> bool:
        """End the run with the final model; False (ignored) for a Done of a round that cannot exist."""
        if done.round > self.rounds:
            return False
        if usable(done.params, self.model):
            await self._adopt(ctx, done.round, done.params)
        self.done = True
        return True

    # ---- worker ---------------------------------------------------------------------------

    async def follow(self, ctx: NodeContext) -> None:
        """Serve work until Done, or until this peer becomes the leader. A leader silent for longer
        than a live one can be (`patience`) is passed over: the next lowest live id is expected."""
        heard = ctx.now()
        while not self.done and self.leader(ctx) != ctx.peer_id:
            if self._stashed is not None:
                work, self._stashed = self._stashed, None
                await self._work(ctx, work)
                heard = ctx.now()
                continue
            wait = heard + self.patience - ctx.now()
            message = await ctx.recv(max(wait, 0.0), types=(Work, Done, Update, Held, PeerLiveness))
            if isinstance(message, Done):
                await self._finish(ctx, message)
            elif isinstance(message, Work):
                work = await self._newest_work(ctx, message)
                if work is not None:
                    await self._work(ctx, work)
                heard = ctx.now()
            elif message is None and ctx.now() >= heard + self.patience:
                silent = self.leader_id
                self.leader_id = _lowest_live(ctx, passing_over=silent)
                ctx.log("leader_silent", silent, round=self.round)
                heard = ctx.now()
            # an Update or a Held here is for a coordination this peer no longer runs: dropped

    def _valid_work(self, work: Work) -> bool:
        return 1 <= work.round <= self.rounds + 1 and usable(work.params, self.model)

    async def _newest_work(self, ctx: NodeContext, first: Work) -> Work | None:
        """A slow worker finds several rounds' work waiting: it serves the newest valid one and drops
        the rest (their rounds have closed without it), so it never trains on a backlog. Each work
        is checked once."""
        newest = None
        work: Work | None = first
        while work is not None:
            if self._valid_work(work) and (newest is None or _work_rank(work) >= _work_rank(newest)):
                newest = work
            work = await ctx.recv(0, types=(Work,))
        return newest

    async def _work(self, ctx: NodeContext, work: Work) -> None:
        """Serve `work` (already checked by `_valid_work`): train and answer, or tell its sender whom we follow."""
        repeat = self._answered.get(work.round)
        if repeat is not None and work.sender == self.served:
            ctx.send(work.sender, repeat)
            return
        if _work_rank(work) < self._rank() and (work.round - 1 < self.round or ctx.is_alive(self.served)):
            self._tell_held(ctx, work.sender)  # it loses to what we follow: tell it whom to follow
            return
        self.leader_id = self.served = work.sender
        self.term = work.term
        await self._adopt(ctx, work.round - 1, work.params)
        workload = max(self.config.min_workload, min(work.workload, self.config.workload_cap))  # the config's bounds
        started = ctx.now()
        result = await ctx.train(work.params, **{self.config.workload_unit: workload})
        ctx.log("train_loss", result.loss, round=work.round)
        update = Update(sender=ctx.peer_id, round=work.round, samples=max(ctx.num_samples, 1), trained=result.samples,
                        train_s=ctx.now() - started, params=result.params, codec=self.codec)
        self._answered = {work.round: update}
        ctx.send(work.sender, update)

    def _tell_held(self, ctx: NodeContext, to: int) -> None:
        ctx.send(to, Held(sender=ctx.peer_id, round=self.round, term=self.term, leader=self.served, params=self.model,
                          codec=self.codec))

    async def _adopt(self, ctx: NodeContext, round: int, params: Params) -> None:
        """Hold (store and evaluate) the global model of `round`, if it is newer than ours."""
        if round < self.round or (round == self.round and round > 0):
            return  # older, or already held and evaluated
        self.round, self.model = round, params
        meta = {**self._stats_meta, "round": round, "leader": self.served, "term": self.term}
        ctx.store.put_params(STORE_ENTRY, params, meta)
        if round > 0:
            for metric, value in (await ctx.evaluate(params)).items():
                ctx.log(metric, value, round=round)

    # ---- coordinator ----------------------------------------------------------------------

    async def lead(self, ctx: NodeContext) -> None:
        if self.served != ctx.peer_id:
            self.term += 1  # taking over from another coordinator: a later term than theirs
        self.leader_id = self.served = ctx.peer_id
        stats = self._load_stats()
        stale: dict[int, tuple[Update, int]] = {}
        ctx.log("coordinating", ctx.peer_id, round=self.round)
        empty = 0
        try:
            while self.round < self.rounds:
                updates = await self._round(ctx, self.round + 1, stats, stale)
                if updates is None:
                    continue  # a newer global model was adopted: go on from it
                if not updates and not stale and empty < EMPTY_ROUND_REPEATS:
                    empty += 1
                    ctx.log("round_repeated", empty, round=self.round + 1)
                    continue
                empty = 0
                await self._aggregate(ctx, self.round + 1, updates, stale, stats)
        except SteppedDown:
            return
        except Alone:
            self.done = True
            return
        for peer in self._workers(ctx):
            ctx.send(peer, Done(sender=ctx.peer_id, round=self.round, params=self.model))
        self.done = True

    def _workers(self, ctx: NodeContext) -> list[int]:
        return [p for p in ctx.peers if p != ctx.peer_id and ctx.is_alive(p)]

    def _load_stats(self) -> dict[int, WorkerStats]:
        workloads, late = self._stats_meta.get("workload"), self._stats_meta.get("late")
        workloads = workloads if isinstance(workloads, dict) else {}
        late = late if isinstance(late, dict) else {}
        return {int(p): WorkerStats(int(w), int(late.get(p, 0))) for p, w in workloads.items()}

    def _first_retry(self, ctx: NodeContext, stat: WorkerStats) -> float:
        expected = stat.speed.round_trip(stat.workload) if stat.speed else 0.0
        return expected + retry_delay(0, self.config.retry_base_s, self.config.retry_factor, self.config.retry_cap_s,
                                      ctx.rng.random())

    async def _round(self, ctx: NodeContext, number: int, stats: dict[int, WorkerStats],
                     stale: dict[int, tuple[Update, int]]) -> dict[int, Update] | None:
        """Send work, collect updates until quorum or timeout; None if a newer global model was adopted."""
        config = self.config
        now = ctx.now()
        state = Round(number, {}, {}, {}, {}, {})
        for peer in self._workers(ctx):
            stat = stats.setdefault(peer, WorkerStats(config.workload))
            state.work[peer] = Work(sender=ctx.peer_id, round=number, term=self.term, workload=stat.workload,
                                    params=self.model, codec=self.codec)
            ctx.send(peer, state.work[peer])
            stat.record_send(number, now, stat.workload)
            state.tries[peer] = 0
            state.retry_at[peer] = now + self._first_retry(ctx, stat)
        deadline = now + config.round_timeout_s
        while ctx.now() < deadline:
            alive = [p for p in self._workers(ctx) if p in state.work]
            pool = set(alive) | set(state.updates)  # dead workers leave the count; an update already in stays
            if quorum_reached(len(state.updates), len(pool), config.quorum, config.min_updates):
                break
            waiting = [p for p in alive if p not in state.updates and state.tries[p] < config.retries]
            now = ctx.now()
            for peer in [p for p in waiting if state.retry_at[p] <= now]:
                state.tries[peer] += 1
                ctx.send(peer, state.work[peer])
                state.retry_at[peer] = now + retry_delay(state.tries[peer], config.retry_base_s, config.retry_factor,
                                                         config.retry_cap_s, ctx.rng.random())
                ctx.log("work_resent", state.tries[peer], round=number, about=peer)
            wake = min([deadline, *[state.retry_at[p] for p in waiting]])
            message = await ctx.recv(max(wake - ctx.now(), 0.0), types=(Update, Work, Held, Done, PeerLiveness))
            if isinstance(message, Update):
                self._receive(ctx, state, message, stale, stats)
            elif isinstance(message, (Work, Held, Done)) and await self._rival(ctx, message):
                return None
        if not state.work and not self._workers(ctx):
            ctx.log("no_workers", 0, round=number)  # a whole round_timeout_s without a live worker: stop here
            raise Alone
        if len(state.updates) < config.min_updates:
            ctx.log("quorum_missed", len(state.updates), round=number)
        self._balance(ctx, state, stats)
        return state.updates

    async def _rival(self, ctx: NodeContext, message: Work | Held | Done) -> bool:
        """Another coordination spoke. Step down (raise) if it ranks higher and its coordinator is
        alive; True if we adopted a newer model whose coordinator is gone."""
        me = ctx.peer_id
        if isinstance(message, Done):
            if await self._finish(ctx, message):
                raise SteppedDown
            return False
        if isinstance(message, Work):
            if not self._valid_work(message):
                return False
            if _work_rank(message) > self._rank() and ctx.is_alive(message.sender):
                self.leader_id, self._stashed = message.sender, message
                ctx.log("following", message.sender, round=message.round - 1)
                raise SteppedDown
            self._tell_held(ctx, message.sender)
            return False
        leader = message.leader  # a Held: someone holds a model made under `leader` in `term`
        if (leader not in ctx.peers or message.round > self.rounds or not usable(message.params, self.model)
                or rank(message.round, message.term, leader) <= self._rank()):
            return False
        if leader != me and ctx.is_alive(leader):
            self.leader_id = self.served = leader
            self.term = message.term
            await self._adopt(ctx, message.round, message.params)
            ctx.log("following", leader, round=message.round)
            raise SteppedDown
        if message.round > self.round:  # its coordinator is gone (or was us, before a restart): go on from it
            self.term = max(self.term, message.term)
            await self._adopt(ctx, message.round, message.params)
            ctx.log("adopted", message.sender, round=message.round)
            return True
        return False

    def _receive(self, ctx: NodeContext, state: Round, update: Update, stale: dict[int, tuple[Update, int]],
                 stats: dict[int, WorkerStats]) -> None:
        """Take an update once, for a round whose work this coordinator sent that worker."""
        stat = stats.get(update.sender)
        sent = stat.sent.pop(update.round, None) if stat is not None else None
        if sent is None:
            return  # not ours, or already in (a resend answered twice)
        if not usable(update.params, self.model):
            ctx.log("update_refused", 1, round=state.number, about=update.sender)
            return
        if update.round == state.number:
            state.updates[update.sender] = update
        elif update.round < state.number:
            stat.late += 1
            ctx.log("late_updates", stat.late, round=state.number, about=update.sender)
            if self.config.late_policy == "stale":
                stale[update.sender] = (update, state.number - update.round)  # one per worker: its newest
        if update.sender not in state.measured:
            state.measured[update.sender] = (ctx.now() - sent[0], update, sent[1])

    def _balance(self, ctx: NodeContext, state: Round, stats: dict[int, WorkerStats]) -> None:
        """Measure each answer (in time or late) and set every worker's next workload."""
        config = self.config
        trips: dict[int, float] = {}
        for peer, (trip, update, workload) in state.measured.items():
            stat = stats[peer]
            trips[peer] = trip
            stat.speed = estimate(workload, trip, update.train_s)
            ctx.log("round_trip_s", trip, round=update.round, about=peer)
            ctx.log("throughput", stat.speed.throughput * update.trained / max(workload, 1), round=update.round,
                    about=peer)
        median = statistics.median(trips.values()) if trips else None
        if median:
            ctx.log("round_trip_spread", max(trips.values()) / median, round=state.number)
        for peer, trip in trips.items():
            if median and trip > config.straggler_factor * median:
                ctx.log("straggler", trip / median, round=state.number, about=peer)
        target = config.target_round_trip_s
        if target is None:
            expected = [stats[p].speed.round_trip(config.workload) for p in trips]
            target = statistics.median(expected) if expected else None
        for peer in state.work:
            stat = stats[peer]
            fresh = stat.speed if peer in trips else None
            in_time = peer in state.updates and not (median and trips[peer] > config.straggler_factor * median)
            stat.workload = next_workload(config.load_balancing, stat.workload, in_time, fresh, target,
                                          config.min_workload, config.workload_cap, config.aimd_increase)
            ctx.log("workload", stat.workload, round=state.number + 1, about=peer)

    async def _aggregate(self, ctx: NodeContext, number: int, updates: dict[int, Update],
                         stale: dict[int, tuple[Update, int]], stats: dict[int, WorkerStats]) -> None:
        late = [(u, s) for p, (u, s) in stale.items() if p not in updates]  # a fresh update supersedes a stale one
        models = [u.params for u in updates.values()] + [u.params for u, _ in late]
        weights = ([float(max(u.samples, 1)) for u in updates.values()]
                   + [max(u.samples, 1) * staleness_weight(s, self.config.staleness) for u, s in late])
        stale.clear()
        ctx.log("updates", len(updates), round=number)
        if late:
            ctx.log("stale_updates", len(late), round=number)
        rule = self.config.aggregation
        if rule.rule in ("krum", "multi_krum") and len(models) <= 2 * rule.byzantine + 2:
            ctx.log("aggregation_fallback", len(models), round=number)  # too few models for Krum this round
            rule = rule.model_copy(update={"rule": "median"})
        model = robust_aggregate(models, weights, rule, reference=self.model) if models else self.model
        self._stats_meta = {"workload": {str(p): s.workload for p, s in stats.items()},
                            "late": {str(p): s.late for p, s in stats.items()}}
        await self._adopt(ctx, number, model)


def _check(config: CoordinatorConfig, experiment: ExperimentConfig) -> None:
    if config.coordinator >= experiment.peers:
        raise ValueError(f"coordinator.coordinator must be < peers ({experiment.peers}), got {config.coordinator}")
    if config.min_workload > config.workload_cap:
        raise ValueError(f"coordinator.min_workload ({config.min_workload}) must be <= coordinator.max_workload "
                         f"({config.workload_cap})")
    workers, rule = experiment.peers - 1, config.aggregation
    if rule.rule in ("krum", "multi_krum") and workers <= 2 * rule.byzantine + 2:
        raise ValueError(f"coordinator.aggregation.byzantine: {rule.rule} with f={rule.byzantine} needs more than "
                         f"{2 * rule.byzantine + 2} workers, the experiment has {workers}")
    if not config.min_workload <= config.workload <= config.workload_cap:
        raise ValueError(f"coordinator.workload ({config.workload}) must lie within min_workload..max_workload "
                         f"({config.min_workload}..{config.workload_cap})")


def _worst_case_s(config: CoordinatorConfig, experiment: ExperimentConfig) -> float:
    return (experiment.rounds + 1) * (config.round_timeout_s + experiment.liveness.timeout_s) * 2


COORDINATOR = register(Algorithm(
    name="coordinator",
    summary="FedAvg through a coordinator: quorum of live workers, retries, late-update policy, load balancing, failover",
    config=CoordinatorConfig,
    messages=(Work, Update, Held, Done),
    peer=lambda config, experiment: CoordinatorPeer(config, experiment.rounds, experiment.liveness.timeout_s).run,
    check=_check,
    quick=("coordinator.round_timeout_s=5", "coordinator.retry_base_s=1", "coordinator.retry_cap_s=3"),
    worst_case_s=_worst_case_s,
    timeline=("coordinating", "following", "adopted", "leader_silent"),
))

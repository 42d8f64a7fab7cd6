"""FedAvg through a coordinator, with a quorum of live workers and no single point of failure.

Each round the coordinator sends the global model and a workload (`Work`: epochs) to every
worker it believes alive; workers train and answer with their update and sample count
(`Update`). The round closes when `quorum` of the workers believed alive have answered (dead
workers leave the count, at least `min_updates`), or at `round_timeout_s` with what it has,
never later. A worker that does not answer is sent its work again after a jittered
exponential backoff, a bounded number of times; a worker that gets the same work twice sends
its update again instead of training again. Updates that arrive after their round closed are
dropped or, with `late_policy: stale`, folded into the next aggregation with weight
samples x 1/(1+staleness). FedAvg is weighted by samples.

Round trips are measured per worker; `load_balancing: aimd` adds an epoch to a worker that
answered in time and halves a late one's, `speed` gives each worker the epochs that make its
round trip match the median. A worker slower than `straggler_factor` x the median is logged.

No single point of failure: the coordinator keeps the round and the global model in
`ctx.store` and resumes after a restart. Who coordinates is `coordinator` while it is
believed alive, else the lowest live peer id; a successor continues from the newest global
model it holds. A worker follows whoever sends it work; `Done` ends the run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from meshfl.aggregate.fedavg import fedavg
from meshfl.algorithms.base import Algorithm, register
from meshfl.core.context import NodeContext
from meshfl.core.messages import LOSSLESS, Codec, Message, PeerLiveness
from meshfl.core.params import Params
from meshfl.core.section import Section

if TYPE_CHECKING:
    from meshfl.config import ExperimentConfig

STORE_ENTRY = "coordinator_global"


class CoordinatorConfig(Section):
    coordinator: int = Field(0, ge=0, description="the peer that coordinates while it is believed alive (then the lowest live id)")
    quorum: float = Field(0.75, gt=0, le=1, description="a round closes when this fraction of the workers believed alive has answered")
    min_updates: int = Field(1, ge=1, description="below this many updates a round waits for round_timeout_s, then goes on with what it has")
    round_timeout_s: float = Field(120.0, gt=0, description="a round closes at this time whatever has arrived")
    late_policy: Literal["drop", "stale"] = Field("drop", description="updates after their round closed: dropped, or folded into the next one with weight 1/(1+staleness)")
    retries: int = Field(3, ge=0, description="times work is sent again to a worker that has not answered")
    retry_base_s: float = Field(10.0, gt=0, description="first wait before sending work again (doubled each try, jittered, capped)")
    retry_cap_s: float = Field(60.0, gt=0, description="longest wait between two sends of the same work")
    epochs: int = Field(1, ge=1, description="local epochs a worker trains per round at first")
    min_epochs: int = Field(1, ge=1, description="load balancing never gives fewer epochs")
    max_epochs: int = Field(5, ge=1, description="load balancing never gives more epochs")
    load_balancing: Literal["off", "aimd", "speed"] = Field("off", description="off; aimd: in time +1 epoch, late halves; speed: epochs that make each round trip match the median")
    straggler_factor: float = Field(2.0, gt=1, description="a worker whose round trip exceeds this x the median is logged as a straggler")
    codec: Literal["float32", "float16", "int8"] = Field("float32", description="how models travel")


@dataclass(frozen=True, kw_only=True)
class Work(Message):
    """Train `epochs` from `params` (the global model after round - 1) and answer for `round`."""

    round: int
    epochs: int
    params: Params
    codec: Codec = LOSSLESS


@dataclass(frozen=True, kw_only=True)
class Update(Message):
    round: int
    samples: int
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
    needed = max(math.ceil(quorum * alive_workers), min(min_updates, alive_workers))
    return alive_workers > 0 and answered >= needed


def staleness_weight(staleness: int) -> float:
    return 1.0 / (1.0 + max(staleness, 0))


def next_epochs(policy: str, epochs: int, round_trip: float | None, in_time: bool, median: float | None,
                low: int, high: int) -> int:
    """The next round's workload of one worker."""
    if policy == "aimd":
        epochs = epochs + 1 if in_time else epochs // 2
    elif policy == "speed" and round_trip and median:
        epochs = round(epochs * median / round_trip)
    return max(low, min(high, epochs))


def retry_delay(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff with jitter in [0.5, 1): `jitter` is a draw in [0, 1)."""
    return min(cap, base * 2 ** attempt) * (0.5 + 0.5 * jitter)


# ---- per-worker bookkeeping ----------------------------------------------------------------

@dataclass
class WorkerStats:
    epochs: int
    round_trips: list[float] = field(default_factory=list)
    late: int = 0


class CoordinatorPeer:
    """One peer: it coordinates while it is the leader, else it follows whoever sends it work."""

    def __init__(self, config: CoordinatorConfig, rounds: int) -> None:
        self.config = config
        self.rounds = rounds
        self.codec = Codec(kind=config.codec)
        self.round = 0  # the last round whose global model this peer holds
        self.model: Params | None = None
        self.done = False
        self._answered: dict[int, Update] = {}  # round -> this worker's update, sent again on a repeat

    def leader(self, ctx: NodeContext) -> int:
        preferred = self.config.coordinator
        if preferred == ctx.peer_id or ctx.is_alive(preferred):
            return preferred
        return min(p for p in ctx.peers if p == ctx.peer_id or ctx.is_alive(p))

    async def run(self, ctx: NodeContext) -> None:
        self.model = ctx.initial_params()
        stored = ctx.store.get_params(STORE_ENTRY, self.model.layout)
        if stored is not None:
            self.model, meta = stored
            self.round = int(meta["round"])
        while not self.done:
            finished = await ctx.recv(0, types=(Done,))  # a Done waiting since we trained ends the run
            if isinstance(finished, Done):
                await self._adopt(ctx, finished.round, finished.params)
                return
            if self.leader(ctx) == ctx.peer_id:
                await self.lead(ctx)
            else:
                await self.follow(ctx)

    # ---- worker ---------------------------------------------------------------------------

    async def follow(self, ctx: NodeContext) -> None:
        """Serve work until Done, or until this peer becomes the leader."""
        while self.leader(ctx) != ctx.peer_id:
            message = await ctx.recv(types=(Work, Done, PeerLiveness))
            if isinstance(message, Done):
                if message.round >= self.round:
                    await self._adopt(ctx, message.round, message.params)
                self.done = True
                return
            if isinstance(message, Work):
                await self._work(ctx, message)

    async def _work(self, ctx: NodeContext, work: Work) -> None:
        repeat = self._answered.get(work.round)
        if repeat is not None:
            ctx.send(work.sender, repeat)
            return
        if work.round - 1 < self.round:
            return  # work built on an older global model than ours (an old leader's): ignore
        await self._adopt(ctx, work.round - 1, work.params)
        result = await ctx.train(work.params, epochs=work.epochs)
        ctx.log("train_loss", result.loss, round=work.round)
        update = Update(sender=ctx.peer_id, round=work.round, samples=max(ctx.num_samples, 1), params=result.params,
                        codec=self.codec)
        self._answered = {work.round: update}
        ctx.send(work.sender, update)

    async def _adopt(self, ctx: NodeContext, round: int, params: Params) -> None:
        """Hold (and evaluate) the global model of `round`, if it is newer than ours."""
        if round < self.round or (round == self.round and round > 0):
            return  # older, or already held and evaluated
        self.round, self.model = round, params
        if round > 0:
            for metric, value in (await ctx.evaluate(params)).items():
                ctx.log(metric, value, round=round)

    # ---- coordinator ----------------------------------------------------------------------

    async def lead(self, ctx: NodeContext) -> None:
        stats: dict[int, WorkerStats] = {}
        stale: list[tuple[Update, int]] = []
        ctx.log("coordinating", ctx.peer_id, round=self.round)
        while self.round < self.rounds:
            round = self.round + 1
            updates = await self._round(ctx, round, stats, stale)
            self._aggregate(ctx, round, updates, stale)
            for metric, value in (await ctx.evaluate(self.model)).items():
                ctx.log(metric, value, round=round)
        for peer in ctx.peers:
            if peer != ctx.peer_id and ctx.is_alive(peer):
                ctx.send(peer, Done(sender=ctx.peer_id, round=self.round, params=self.model))
        self.done = True

    def _workers(self, ctx: NodeContext) -> list[int]:
        return [p for p in ctx.peers if p != ctx.peer_id and ctx.is_alive(p)]

    async def _round(self, ctx: NodeContext, round: int, stats: dict[int, WorkerStats],
                     stale: list[tuple[Update, int]]) -> dict[int, Update]:
        config = self.config
        work = {}
        sent_at: dict[int, float] = {}
        tries: dict[int, int] = {}
        for peer in self._workers(ctx):
            stat = stats.setdefault(peer, WorkerStats(config.epochs))
            work[peer] = Work(sender=ctx.peer_id, round=round, epochs=stat.epochs, params=self.model, codec=self.codec)
            ctx.send(peer, work[peer])
            sent_at[peer] = ctx.now()
            tries[peer] = 0
        retry_at = {p: ctx.now() + retry_delay(0, config.retry_base_s, config.retry_cap_s, ctx.rng.random()) for p in work}
        updates: dict[int, Update] = {}
        deadline = ctx.now() + config.round_timeout_s
        while ctx.now() < deadline:
            alive = [p for p in self._workers(ctx) if p in work]
            pool = set(alive) | set(updates)  # dead workers leave the count; an update already in stays
            if not pool or quorum_reached(len(updates), len(pool), config.quorum, config.min_updates):
                break
            now = ctx.now()
            for peer in [p for p in alive if p not in updates and retry_at[p] <= now and tries[p] < config.retries]:
                tries[peer] += 1
                ctx.send(peer, work[peer])
                retry_at[peer] = now + retry_delay(tries[peer], config.retry_base_s, config.retry_cap_s, ctx.rng.random())
                ctx.log("work_resent", peer, round=round)
            wake = min([deadline, *[retry_at[p] for p in alive if p not in updates and tries[p] < config.retries]])
            message = await ctx.recv(max(wake - ctx.now(), 0.0), types=(Update, PeerLiveness))
            if isinstance(message, Update):
                self._receive(ctx, round, message, updates, stale, stats)
        if len(updates) < config.min_updates:
            ctx.log("quorum_missed", len(updates), round=round)
        self._balance(ctx, round, updates, sent_at, stats)
        return updates

    def _receive(self, ctx: NodeContext, round: int, update: Update, updates: dict[int, Update],
                 stale: list[tuple[Update, int]], stats: dict[int, WorkerStats]) -> None:
        if update.round == round:
            updates.setdefault(update.sender, update)
            return
        if update.round < round and update.sender in stats:
            stats[update.sender].late += 1
            ctx.log("late_update", update.sender, round=round)
            if self.config.late_policy == "stale":
                stale.append((update, round - update.round))

    def _balance(self, ctx: NodeContext, round: int, updates: dict[int, Update], sent_at: dict[int, float],
                 stats: dict[int, WorkerStats]) -> None:
        now = ctx.now()
        trips = {p: now - sent_at[p] for p in sent_at}
        answered = [trips[p] for p in updates if p in trips]
        median = statistics.median(answered) if answered else None
        for peer, trip in trips.items():
            stat = stats[peer]
            in_time = peer in updates
            stat.round_trips.append(trip)
            if median and in_time and trip > self.config.straggler_factor * median:
                ctx.log("straggler", peer, round=round)
            stat.epochs = next_epochs(self.config.load_balancing, stat.epochs, trip if in_time else None, in_time, median,
                                      self.config.min_epochs, self.config.max_epochs)

    def _aggregate(self, ctx: NodeContext, round: int, updates: dict[int, Update], stale: list[tuple[Update, int]]) -> None:
        models = [u.params for u in updates.values()] + [u.params for u, _ in stale]
        weights = [float(u.samples) for u in updates.values()] + [u.samples * staleness_weight(s) for u, s in stale]
        stale.clear()
        if models:
            self.model = fedavg(models, weights)
        ctx.log("updates", len(updates), round=round)
        self.round = round
        ctx.store.put_params(STORE_ENTRY, self.model, {"round": round})


def _check(config: CoordinatorConfig, experiment: ExperimentConfig) -> None:
    if config.coordinator >= experiment.peers:
        raise ValueError(f"coordinator.coordinator must be < peers ({experiment.peers})")
    if config.min_epochs > config.max_epochs:
        raise ValueError("coordinator.min_epochs must be <= coordinator.max_epochs")


def _worst_case_s(config: CoordinatorConfig, experiment: ExperimentConfig) -> float:
    return (experiment.rounds + 1) * (config.round_timeout_s + experiment.liveness.timeout_s) * 2


COORDINATOR = register(Algorithm(
    name="coordinator",
    summary="FedAvg through a coordinator: quorum of live workers, retries, late-update policy, load balancing, failover",
    config=CoordinatorConfig,
    messages=(Work, Update, Done),
    peer=lambda config, experiment: CoordinatorPeer(config, experiment.rounds).run,
    check=_check,
    quick=("coordinator.round_timeout_s=5", "coordinator.retry_base_s=1", "coordinator.retry_cap_s=3"),
    worst_case_s=_worst_case_s,
))

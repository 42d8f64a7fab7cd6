"""D-PSGD-style decentralised SGD: every peer trains, then averages with its overlay neighbours.

Each round r = 1..rounds every peer:
1. trains locally from its current model (`ctx.train`, the train config's default amount);
2. sends the trained model (`Model`: round, its degree, params) to every live overlay neighbour;
3. waits up to `dpsgd.wait_s` for the round-r models of its live neighbours;
4. mixes: x_i <- sum_j w_ij x_j over itself and the neighbours whose model came, as one
   matrix-vector product over the stacked models. `metropolis`: w_ij = 1 / (1 + max(d_i, d_j))
   (Metropolis-Hastings, doubly stochastic on the whole graph, so the mean is preserved and
   peers reach consensus); `uniform`: w_ij = 1 / (d_i + 1). A neighbour whose model did not come
   gives its weight to self: the weights always sum to 1 and a crash never stalls a round;
5. checkpoints (round, model) in `ctx.store`, evaluates and logs.

Bounds: a model counts only from an overlay neighbour, with a round in r..r+2 (later rounds wait
in a buffer, at most one model per neighbour per round), a plausible degree, the run's layout and
finite values; anything else is dropped and counted (`dropped_models`), never averaged.

Catch-up: a neighbour heard at a round past r has finished round r, so nobody waits for its round-r
model. A peer that receives a model of a round it has passed answers (once per round of its own)
with its newest model, so a peer that is behind (a restarted one, resumed from its checkpoint)
learns that its neighbours are ahead and runs its remaining rounds without waiting for them, while
they wait (up to `wait_s`) for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from meshfl.aggregate.fedavg import weighted_rows
from meshfl.algorithms.base import Algorithm, register
from meshfl.core.context import NodeContext
from meshfl.core.messages import LOSSLESS, Codec, Message
from meshfl.core.metrics import TRAIN_LOSS
from meshfl.core.params import Params
from meshfl.core.section import Section

if TYPE_CHECKING:
    from meshfl.config import ExperimentConfig

MAX_ROUNDS_AHEAD = 2
"""Models of rounds r..r+MAX_ROUNDS_AHEAD are kept while a peer is in round r; later ones are dropped."""

STORE_ENTRY = "dpsgd.model"
"""The checkpoint: the model after the last finished round, with {"round": r}."""


class DpsgdConfig(Section):
    wait_s: float = Field(30.0, gt=0, description="how long a peer waits each round for its live neighbours' models before mixing what it has")
    mixing: Literal["metropolis", "uniform"] = Field("metropolis", description="neighbour weights: metropolis w_ij = 1/(1+max(d_i,d_j)) (keeps the global mean); uniform w_ij = 1/(d_i+1); self takes the rest")
    codec: Literal["float32", "float16", "int8"] = Field("float32", description="how models travel: exact float32, float16, or int8 with a per-tensor scale (lossy)")
    compression: Literal["none", "gzip", "zstd"] = Field("none", description="byte compression of models after the codec")


@dataclass(frozen=True, kw_only=True)
class Model(Message):
    """A peer's trained model of `round`, and its overlay degree (for the neighbour's Metropolis weight)."""

    round: int
    degree: int
    params: Params
    codec: Codec = LOSSLESS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.round < 1:
            raise ValueError(f"Model.round must be >= 1, got {self.round}")
        if self.degree < 1:
            raise ValueError(f"Model.degree must be >= 1, got {self.degree}")


# ---- the maths, as plain functions -------------------------------------------------------

def mixing_weights(degree: int, received: Mapping[int, int], kind: str = "metropolis") -> tuple[float, list[float]]:
    """(self weight, weights of `received` in sorted neighbour order); `received` maps neighbour -> its degree.

    Neighbours missing from `received` give their weight to self, so the weights sum to 1.
    """
    if kind == "metropolis":
        weights = [1.0 / (1 + max(degree, received[n])) for n in sorted(received)]
    elif kind == "uniform":
        weights = [1.0 / (degree + 1)] * len(received)
    else:
        raise ValueError(f"mixing must be metropolis or uniform, got {kind!r}")
    return 1.0 - sum(weights), weights


def mix(own: Params, models: Sequence[Params], self_weight: float, weights: Sequence[float]) -> Params:
    """sum_j w_j x_j over [own, *models] as one matrix-vector product over the stacked flats."""
    if not models:
        return own
    stacked = torch.stack([own.flat, *(m.flat for m in models)])
    return Params(weighted_rows(stacked, [self_weight, *weights]), own.layout)


def metropolis_matrix(neighbours: Sequence[Sequence[int]]) -> list[list[float]]:
    """The full Metropolis-Hastings matrix W of a graph (row i: peer i's weights), for tests and docs."""
    n = len(neighbours)
    w = [[0.0] * n for _ in range(n)]
    for i, ns in enumerate(neighbours):
        for j in ns:
            w[i][j] = 1.0 / (1 + max(len(ns), len(neighbours[j])))
        w[i][i] = 1.0 - sum(w[i])
    return w


# ---- one peer -----------------------------------------------------------------------------

class DpsgdPeer:
    """One peer's side of the protocol (one object per incarnation); `run` drives it round by round."""

    def __init__(self, config: DpsgdConfig, rounds: int) -> None:
        self.config = config
        self.rounds = rounds
        self.codec = Codec(kind=config.codec, compression=config.compression)
        self.round = 0
        self.model: Params | None = None
        self._held: dict[int, dict[int, Model]] = {}  # round -> neighbour -> its model of that round
        self._heard: dict[int, int] = {}  # neighbour -> the highest round heard from it
        self._hinted: dict[int, int] = {}  # neighbour -> our round when we last answered its stale model
        self._sent: Model | None = None  # our newest model message
        self._neighbours: frozenset[int] = frozenset()
        self._max_degree = 0
        self.dropped = 0  # models refused since the last log
        self.stale = 0  # models of rounds we have passed, since the last log
        self.duplicates = 0  # second models of one neighbour for one round, since the last log

    async def run(self, ctx: NodeContext) -> None:
        self._neighbours = frozenset(ctx.neighbours)
        self._max_degree = max(len(ctx.peers) - 1, 1)
        model = ctx.initial_params()
        first = 1
        stored = ctx.store.get_params(STORE_ENTRY, model.layout)
        if stored is not None:
            model, meta = stored
            first = int(meta.get("round", 0)) + 1
        if ctx.incarnation > 0:
            ctx.log("resumed", first - 1, round=first - 1)  # the checkpoint round it goes on from (0: from scratch)
        self.model = model
        for round in range(first, self.rounds + 1):
            self.model = await self.run_round(ctx, round, self.model)

    async def run_round(self, ctx: NodeContext, round: int, model: Params) -> Params:
        self.round = round
        for old in [r for r in self._held if r < round]:
            del self._held[old]
        result = await ctx.train(model)
        ctx.log(TRAIN_LOSS, result.loss, round=round)
        trained = result.params
        own = Model(sender=ctx.peer_id, round=round, degree=len(ctx.neighbours), params=trained, codec=self.codec)
        self._sent = own
        for neighbour in ctx.neighbours:
            if ctx.is_alive(neighbour):
                ctx.send(neighbour, own)
        await self._wait(ctx, round)
        received = self._held.pop(round, {})
        missed = [n for n in ctx.neighbours if n not in received]
        if missed:
            ctx.log("missed_models", len(missed), round=round)
        self_weight, weights = mixing_weights(len(ctx.neighbours), {n: m.degree for n, m in received.items()},
                                              self.config.mixing)
        mixed = mix(trained, [received[n].params for n in sorted(received)], self_weight, weights)
        ctx.store.put_params(STORE_ENTRY, mixed, {"round": round})
        if self.dropped:
            ctx.log("dropped_models", self.dropped, round=round)
            self.dropped = 0
        if self.stale:
            ctx.log("stale_models", self.stale, round=round)
            self.stale = 0
        if self.duplicates:
            ctx.log("duplicate_models", self.duplicates, round=round)
            self.duplicates = 0
        for metric, value in (await ctx.evaluate(mixed)).items():
            ctx.log(metric, value, round=round)
        return mixed

    def _waiting_for(self, ctx: NodeContext, round: int) -> list[int]:
        """Live neighbours whose round-`round` model has not come and may still come."""
        have = self._held.get(round, {})
        return [n for n in ctx.neighbours
                if n not in have and ctx.is_alive(n) and self._heard.get(n, 0) <= round]

    async def _wait(self, ctx: NodeContext, round: int) -> None:
        deadline = ctx.now() + self.config.wait_s
        while self._waiting_for(ctx, round):
            left = deadline - ctx.now()
            if left <= 0:
                return
            message = await ctx.recv(left)  # a PeerLiveness notice wakes us too: the loop re-checks
            if message is None:
                return
            self.handle(ctx, message)

    # ---- receiving ------------------------------------------------------------------------

    def handle(self, ctx: NodeContext, message: Message) -> None:
        if not isinstance(message, Model):
            return  # liveness notices (re-checked by the wait), or nothing of ours
        if not self.acceptable(message):
            self.dropped += 1
            return
        sender = message.sender
        self._heard[sender] = max(self._heard.get(sender, 0), message.round)
        if message.round < self.round:
            self.stale += 1  # it is behind: tell it (once per round of ours) where we are
            if self._sent is not None and self._hinted.get(sender) != self.round and ctx.is_alive(sender):
                self._hinted[sender] = self.round
                ctx.send(sender, self._sent)
            return
        if message.round > self.round + MAX_ROUNDS_AHEAD:
            self.dropped += 1
            return
        held = self._held.setdefault(message.round, {})
        if sender in held:
            self.duplicates += 1  # one model per neighbour per round: the first counts (a catch-up answer may repeat it)
            return
        held[sender] = message

    def acceptable(self, message: Model) -> bool:
        """From a neighbour, a round of this run, a degree a peer can have, our layout and finite values."""
        return (message.sender in self._neighbours and 1 <= message.round <= self.rounds
                and 1 <= message.degree <= self._max_degree
                and self.model is not None and message.params.layout.fingerprint == self.model.layout.fingerprint
                and message.params.finite)


def _worst_case_s(config: DpsgdConfig, experiment: ExperimentConfig) -> float:
    """Every round waiting out wait_s and a detector timeout, twice over (a restarted peer catching up)."""
    return 2 * (experiment.rounds + 1) * (config.wait_s + experiment.liveness.timeout_s)


DPSGD = register(Algorithm(
    name="dpsgd",
    summary="D-PSGD: train, send the model to overlay neighbours, average with Metropolis-Hastings weights (missing ones to self)",
    config=DpsgdConfig,
    messages=(Model,),
    peer=lambda config, experiment: DpsgdPeer(config, experiment.rounds).run,
    quick=("dpsgd.wait_s=3",),
    worst_case_s=_worst_case_s,
))

"""MPLS: asynchronous layer-wise pulls from chosen peers, stacked into one model (Xu et al., Euro-Par 2025).

Every worker runs its own iterations at its own pace. One iteration k of worker i:

1. training of the model w_i^k starts (`ctx.train`: the train config's amount, e.g. `train.local_steps`) and, overlapped with
   it, the pull phase runs: the worker asks its live neighbours for their metadata (`Info`: label
   counts, the L layer scores g_s(l) of Eq. 5, whether they are done), computes the peer probability
   p_s (Eq. 2-4: measured link speed and data divergence, weighted by tau1 and tau2) and the layer
   probability q_s(l) (Eq. 6), schedules which layers to pull from which peer by list scheduling
   (Eq. 7-9, Algorithm 1) and pulls them (`Pull` -> `Layers`), all peers at once;
2. when both are done, each layer is averaged over the worker's trained layer and the copies pulled
   (Eq. 1), the worker's own layer scores are updated (Eq. 5 between its last two aggregations) and
   the result becomes the model it serves.

A peer serves what it has published: the model of its last finished aggregation, an immutable
snapshot replaced in one assignment, so a pull never reads a half-updated model however training and
serving interleave (training copies the parameters it is given; `tests/test_mpls.py` checks a slow
trainer against a fast puller). Link speed B_s is measured from every pull (bytes over the round
trip, an exponential moving average), in both runtimes; before the first pull from a peer the mean
of the known speeds (or `prior_bandwidth_mbps`) stands in.

`mode` picks the paper's method or a baseline on the same machinery: `mpls`; `peer` (MPLS-Peer,
peer selection only: q uniform); `layer` (MPLS-Layer, layer selection only: p uniform); `rand`
(Rand-MPLS: each layer from one random live neighbour); `appg` (whole models from every live
neighbour, w_i = (sum_j w_j + w_i) / (1 + deg)); `netmax` (a whole model from one neighbour drawn
with probability proportional to its measured link speed, w_i = (w_i + w_j) / 2).

A received value moves nothing unchecked: a `Layers` reply counts only if it answers our request,
has our layout, exactly the requested layers and finite values; metadata only if its lengths fit
and its numbers are finite and non-negative. A worker that has run its iterations tells its
neighbours (`Done`) and keeps serving until every neighbour is done or gone, at most `linger_s`.
The model after every iteration is checkpointed in `ctx.store`; a restarted worker goes on from it, or,
when its store is gone, from a live neighbour's model (`adopted_from`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field

from meshfl.algorithms import mpls_math
from meshfl.algorithms.base import Algorithm, register
from meshfl.core.context import NodeContext
from meshfl.core.messages import Message, Reply, Request
from meshfl.core.metrics import TRAIN_LOSS
from meshfl.core.params import Layout, Params, ParamsSlice
from meshfl.core.section import Section

if TYPE_CHECKING:
    from meshfl.config import ExperimentConfig

Mode = Literal["mpls", "peer", "layer", "rand", "appg", "netmax"]
STORE_ENTRY = "mpls.model"
"""The checkpoint: the model after the last finished iteration, with {"iteration": k}."""
MAX_LABELS = 100_000
"""Most classes a peer's label counts may list (bounds what an `Info` may carry)."""


class MplsConfig(Section):
    mode: Mode = Field("mpls", description="mpls (peer and layer selection, list scheduling); peer (MPLS-Peer: q uniform); "
                       "layer (MPLS-Layer: p uniform); rand (Rand-MPLS: each layer from a random neighbour); appg (whole "
                       "models from every neighbour); netmax (a whole model from one neighbour drawn by link speed)")
    tau1: float = Field(0.5, ge=0, le=1, description="weight of link speed in the peer probability (Eq. 4); tau1 + tau2 = 1")
    tau2: float = Field(0.5, ge=0, le=1, description="weight of data divergence in the peer probability (Eq. 4)")
    bandwidth_ema: float = Field(0.5, gt=0, le=1, description="weight of the newest measurement in a link's speed estimate")
    prior_bandwidth_mbps: float = Field(10.0, gt=0, description="link speed assumed before any pull when no link is measured yet")
    info_timeout_s: float = Field(5.0, gt=0, description="how long a worker waits for a neighbour's metadata each iteration")
    pull_timeout_s: float = Field(60.0, gt=0, description="how long a worker waits for the layers it pulls from one neighbour")
    guard: bool = Field(True, description="fall back to each layer's fastest peer when Algorithm 1's plan is slower (the paper's "
                        "list scheduling can be up to ~2x slower than that plan; see mpls_math.schedule); false: the paper's plan as is")
    eval_every: int = Field(5, ge=1, description="evaluate every this many iterations (and after the last)")
    linger_s: float = Field(3600.0, ge=0, description="after its last iteration a worker serves until every neighbour is done or gone, at most this long "
                            "(a worker that leaves earlier makes a slower neighbour's pull wait out pull_timeout_s)")

    def model_post_init(self, _context: object) -> None:
        if abs(self.tau1 + self.tau2 - 1.0) > 1e-9:
            raise ValueError(f"mpls.tau1 + mpls.tau2 must be 1, got {self.tau1} + {self.tau2}")


# ---- messages -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Info(Request):
    """Asks a neighbour for its metadata."""


@dataclass(frozen=True, kw_only=True)
class InfoReply(Reply):
    """A worker's metadata: its iteration, layer scores g(l) (Eq. 5), label counts, and whether it is done."""

    iteration: int
    scores: tuple[float, ...]
    label_counts: tuple[int, ...]
    done: bool = False


@dataclass(frozen=True, kw_only=True)
class Pull(Request):
    """Asks a neighbour for some of its layers (indices into the model's layer list)."""

    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers or any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)) or self.layers[0] < 0:
            raise ValueError(f"Pull.layers must be distinct ascending layer indices >= 0, got {self.layers}")


@dataclass(frozen=True, kw_only=True)
class Layers(Reply):
    """The layers a `Pull` asked for, from the model of the server's last finished iteration."""

    iteration: int
    slice: ParamsSlice
    scores: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class Done(Message):
    """The sender has run its iterations; it still serves its final model for a while."""

    iteration: int


# ---- layers -----------------------------------------------------------------------------------

def model_layers(layout: Layout) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """The model's layers in order: tensors sharing a module prefix (`conv1.weight`, `conv1.bias`) form one.

    Returns
    -------
    list of (name, ranges)
        Each layer's name and its `[start, stop)` ranges in the flat vector.
    """
    layers: dict[str, list[tuple[int, int]]] = {}
    for name, offset, size in zip(layout.names, layout.offsets, layout.sizes, strict=True):
        prefix = name.rsplit(".", 1)[0] if "." in name else name
        ranges = layers.setdefault(prefix, [])
        if ranges and ranges[-1][1] == offset:
            ranges[-1] = (ranges[-1][0], offset + size)
        else:
            ranges.append((offset, offset + size))
    return [(name, tuple(ranges)) for name, ranges in layers.items()]


def slice_ranges(layers: Sequence[tuple[str, tuple[tuple[int, int], ...]]], picked: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The sorted, merged ranges of the picked layers."""
    ranges = sorted(r for i in picked for r in layers[i][1])
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)


@dataclass
class PeerView:
    """What a worker knows about one neighbour."""

    bandwidth: float | None = None  # bytes per second, EMA of measured pulls
    scores: tuple[float, ...] | None = None
    label_counts: tuple[int, ...] | None = None
    iteration: int = 0
    done: bool = False
    layers_pulled: int = 0


# ---- one worker --------------------------------------------------------------------------------

class MplsPeer:
    """One worker (one object per incarnation): iterations, the pull phase, and the server task."""

    def __init__(self, config: MplsConfig, iterations: int) -> None:
        self.config = config
        self.iterations = iterations
        self.model: Params | None = None  # the published snapshot: replaced, never mutated
        self.iteration = 0
        self.scores: tuple[float, ...] = ()
        self.layers: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        self.views: dict[int, PeerView] = {}
        self.done = False
        self.refused = 0  # replies or requests refused since the last log

    # -- lifecycle
    async def run(self, ctx: NodeContext) -> None:
        model = ctx.initial_params()
        self.layers = model_layers(model.layout)
        self.scores = tuple(1.0 for _ in self.layers)
        first = 1
        stored = ctx.store.get_params(STORE_ENTRY, model.layout)
        if stored is not None:
            model, meta = stored
            first = int(meta.get("iteration", 0)) + 1
            self.scores = tuple(float(s) for s in meta.get("scores", self.scores))
        self.model = model
        if ctx.incarnation > 0:
            ctx.log("resumed", first - 1, round=first - 1)  # the checkpoint iteration it goes on from (0: from scratch)
            if stored is None:
                await self.adopt(ctx)
        self.iteration = first - 1
        self.views = {n: PeerView() for n in ctx.neighbours}
        server = asyncio.ensure_future(self.serve(ctx))
        try:
            for k in range(first, self.iterations + 1):
                await self.run_iteration(ctx, k)
            self.done = True
            for n in ctx.neighbours:
                if ctx.is_alive(n):
                    ctx.send(n, Done(sender=ctx.peer_id, iteration=self.iteration))
            await self.linger(ctx)
            for n, view in sorted(self.views.items()):
                ctx.log("layers_pulled", view.layers_pulled, about=n)
                if view.bandwidth is not None:
                    ctx.log("link_mbps", view.bandwidth * 8 / 1e6, about=n)  # the measured speed of the link n -> here
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)

    async def adopt(self, ctx: NodeContext) -> None:
        """A restarted worker without a checkpoint starts from a live neighbour's model, not from scratch."""
        everything = tuple(range(len(self.layers)))
        for n in sorted(ctx.neighbours):
            if not ctx.is_alive(n):
                continue
            reply = await ctx.request(n, Pull(sender=ctx.peer_id, layers=everything), self.config.pull_timeout_s)
            if reply is not None and self._reply_fits(ctx, everything, reply):
                assert isinstance(reply, Layers) and self.model is not None
                self.model = reply.slice.apply_to(self.model)
                ctx.log("adopted_from", n, round=0)  # the neighbour whose model it starts from
                return

    async def linger(self, ctx: NodeContext) -> None:
        """Serve until every neighbour is done or gone (the server task answers meanwhile)."""
        deadline = ctx.now() + self.config.linger_s
        while ctx.now() < deadline and any(not v.done and ctx.is_alive(n) for n, v in self.views.items()):
            await ctx.sleep(min(0.5, deadline - ctx.now()))

    # -- serving
    async def serve(self, ctx: NodeContext) -> None:
        while True:
            message = await ctx.recv()  # everything: requests, Done, liveness notices (nothing piles up)
            if message is not None:
                self.answer(ctx, message)

    def answer(self, ctx: NodeContext, message: Message) -> None:
        assert self.model is not None
        view = self.views.get(message.sender)
        if view is None:
            self.refused += 1  # not a neighbour: the overlay is who pulls from whom
            return
        if isinstance(message, Done):
            view.done = True
            view.iteration = max(view.iteration, message.iteration)
        elif isinstance(message, Info):
            ctx.reply(message, InfoReply(sender=ctx.peer_id, iteration=self.iteration, scores=self.scores,
                                         label_counts=ctx.label_counts, done=self.done))
        elif isinstance(message, Pull):
            if message.layers[-1] >= len(self.layers):
                self.refused += 1
                return
            model = self.model  # one snapshot for the whole reply
            piece = ParamsSlice.of(model, slice_ranges(self.layers, message.layers))
            ctx.reply(message, Layers(sender=ctx.peer_id, iteration=self.iteration, slice=piece, scores=self.scores))

    # -- one iteration
    async def run_iteration(self, ctx: NodeContext, k: int) -> None:
        assert self.model is not None
        started = ctx.now()
        training = asyncio.ensure_future(ctx.train(self.model))
        try:
            pulled, planned_delay, reachable = await self.pull_phase(ctx, k)
        except BaseException:
            training.cancel()
            raise
        pulled_at = ctx.now()
        result = await training
        trained_at = ctx.now()
        aggregated = self.aggregate(result.params, pulled)
        previous = self.model
        self.scores = tuple(float(g) for g in mpls_math.layer_scores(self._layer_values(previous), self._layer_values(aggregated)))
        self.model = aggregated
        self.iteration = k
        ctx.store.put_params(STORE_ENTRY, aggregated, {"iteration": k, "scores": list(self.scores)})
        ctx.log(TRAIN_LOSS, result.loss, round=k)
        ctx.log("iteration_delay_s", pulled_at - started, round=k)
        ctx.log("planned_delay_s", planned_delay, round=k)
        ctx.log("aggregation_time_s", max(0.0, pulled_at - trained_at), round=k)
        ctx.log("iteration_time_s", ctx.now() - started, round=k)
        ctx.log("bytes_pulled", float(sum(s.nbytes for s in pulled.values())), round=k)
        ctx.log("peers_reachable", reachable, round=k)
        if self.refused:
            ctx.log("refused", self.refused, round=k)
            self.refused = 0
        if k % self.config.eval_every == 0 or k == self.iterations:
            for metric, value in (await ctx.evaluate(aggregated)).items():
                ctx.log(metric, value, round=k)

    def _layer_values(self, params: Params) -> list[torch.Tensor]:
        return [torch.cat([params.flat[a:b] for a, b in ranges]) for _, ranges in self.layers]

    def aggregate(self, trained: Params, pulled: dict[int, ParamsSlice]) -> Params:
        """Eq. 1: each layer averaged over the trained one and every copy pulled (equal weights)."""
        if not pulled:
            return trained
        total = trained.flat.clone()
        count = torch.ones_like(total)
        for piece in pulled.values():
            offset = 0
            for a, b in piece.ranges:
                total[a:b] += piece.values[offset:offset + b - a]
                count[a:b] += 1
                offset += b - a
        return Params(total / count, trained.layout)

    # -- the pull phase
    async def pull_phase(self, ctx: NodeContext, k: int) -> tuple[dict[int, ParamsSlice], float, int]:
        """Metadata, the plan, the pulls. Returns (peer -> pulled slice, planned delay s, peers that answered)."""
        live = [n for n in sorted(self.views) if ctx.is_alive(n)]
        if not live:
            return {}, 0.0, 0
        answers = await asyncio.gather(*(ctx.request(n, Info(sender=ctx.peer_id), self.config.info_timeout_s) for n in live))
        reachable = [n for n, a in zip(live, answers, strict=True) if self.take_info(ctx, n, a)]
        if not reachable:
            return {}, 0.0, 0
        plan, delay = self.plan(ctx, reachable)
        if not plan:
            return {}, delay, len(reachable)
        pieces = await asyncio.gather(*(self.pull(ctx, n, layers) for n, layers in plan.items()))
        return {n: p for n, p in zip(plan, pieces, strict=True) if p is not None}, delay, len(reachable)

    def take_info(self, ctx: NodeContext, peer: int, answer: Reply | None) -> bool:
        if not isinstance(answer, InfoReply):
            return False
        if not self._fits(answer.scores, answer.label_counts, ctx):
            self.refused += 1
            return False
        view = self.views[peer]
        view.scores, view.label_counts = answer.scores, answer.label_counts
        view.iteration, view.done = max(view.iteration, answer.iteration), view.done or answer.done
        return True

    def _fits(self, scores: tuple[float, ...], label_counts: tuple[int, ...] | None, ctx: NodeContext) -> bool:
        if len(scores) != len(self.layers) or not all(math.isfinite(s) and s >= 0 for s in scores):
            return False
        if label_counts is not None:
            return len(label_counts) == len(ctx.label_counts) <= MAX_LABELS and all(c >= 0 for c in label_counts)
        return True

    def bandwidths(self, peers: Sequence[int]) -> np.ndarray:
        """Measured link speeds (bytes/s) of `peers`; an unmeasured link gets the mean of the measured ones."""
        known = [v.bandwidth for v in self.views.values() if v.bandwidth is not None]
        prior = float(np.mean(known)) if known else self.config.prior_bandwidth_mbps * 1e6 / 8
        return np.array([self.views[p].bandwidth or prior for p in peers], dtype=np.float64)

    def plan(self, ctx: NodeContext, peers: list[int]) -> tuple[dict[int, tuple[int, ...]], float]:
        """Which layers to pull from which peer under `mode`, and the planned delay (s)."""
        mode = self.config.mode
        layer_count = len(self.layers)
        bandwidth = self.bandwidths(peers)
        sizes = np.array([4.0 * sum(b - a for a, b in ranges) for _, ranges in self.layers])
        if mode == "appg":
            plan = {p: tuple(range(layer_count)) for p in peers}
            return plan, float(np.max(sizes.sum() / bandwidth))
        if mode == "netmax":
            chosen = peers[mpls_math.netmax_pick(bandwidth, ctx.rng)]
            return {chosen: tuple(range(layer_count))}, float(sizes.sum() / bandwidth[peers.index(chosen)])
        if mode == "rand":
            y = mpls_math.random_layers(len(peers), layer_count, ctx.rng)
        else:
            own = np.asarray(ctx.label_counts, dtype=np.float64)
            divergence = np.array([mpls_math.label_divergence(own, np.asarray(self.views[p].label_counts, dtype=np.float64))
                                   for p in peers])
            p = (mpls_math.peer_probabilities(bandwidth, divergence, self.config.tau1, self.config.tau2)
                 if mode in ("mpls", "peer") else np.full(len(peers), 1.0 / len(peers)))
            g = np.array([self.views[s].scores for s in peers], dtype=np.float64)
            q = mpls_math.layer_probabilities(g) if mode in ("mpls", "layer") else np.full(g.shape, 1.0 / len(peers))
            y = mpls_math.schedule(sizes, bandwidth, p, q, guard=self.config.guard).y
        plan = {peers[s]: tuple(int(layer) for layer in np.flatnonzero(y[s])) for s in range(len(peers)) if y[s].any()}
        times = [(sizes[list(layers)].sum() / bandwidth[peers.index(s)]) for s, layers in plan.items()]
        return plan, float(max(times, default=0.0))

    def _reply_fits(self, ctx: NodeContext, layers: tuple[int, ...], reply: Reply) -> bool:
        """A `Layers` with our layout, exactly the layers asked for, finite values and scores that fit."""
        assert self.model is not None
        return (isinstance(reply, Layers) and reply.slice.layout.fingerprint == self.model.layout.fingerprint
                and reply.slice.ranges == slice_ranges(self.layers, layers) and bool(torch.isfinite(reply.slice.values).all())
                and self._fits(reply.scores, None, ctx))

    async def pull(self, ctx: NodeContext, peer: int, layers: tuple[int, ...]) -> ParamsSlice | None:
        assert self.model is not None
        sent = ctx.now()
        reply = await ctx.request(peer, Pull(sender=ctx.peer_id, layers=layers), self.config.pull_timeout_s)
        if reply is None:
            return None
        if not self._reply_fits(ctx, layers, reply):
            self.refused += 1
            return None
        assert isinstance(reply, Layers)
        view = self.views[peer]
        elapsed = max(ctx.now() - sent, 1e-9)
        measured = reply.slice.nbytes / elapsed
        beta = self.config.bandwidth_ema
        view.bandwidth = measured if view.bandwidth is None else beta * measured + (1 - beta) * view.bandwidth
        view.scores = reply.scores
        view.iteration = max(view.iteration, reply.iteration)
        view.layers_pulled += len(layers)
        return reply.slice


# ---- declaration -------------------------------------------------------------------------------

def _check(config: MplsConfig, experiment: ExperimentConfig) -> None:
    if experiment.peers < 2:
        raise ValueError("mpls needs peers >= 2: a worker pulls layers from its neighbours")


def _worst_case_s(config: MplsConfig, experiment: ExperimentConfig) -> float:
    """Every iteration waiting out the metadata and pull timeouts, twice over (a restarted worker), plus lingering."""
    per_iteration = config.info_timeout_s + config.pull_timeout_s + experiment.liveness.timeout_s
    return 2 * (experiment.rounds + 1) * per_iteration + config.linger_s


MPLS = register(Algorithm(
    name="mpls",
    summary="MPLS: asynchronous workers pull single layers from chosen peers (link speed, data divergence, layer change) "
            "by list scheduling, overlapped with training; APPG, NetMax, Rand-MPLS, MPLS-Peer/-Layer as modes",
    config=MplsConfig,
    messages=(Info, InfoReply, Pull, Layers, Done),
    peer=lambda config, experiment: MplsPeer(config, experiment.rounds).run,
    check=_check,
    quick=("mpls.info_timeout_s=2", "mpls.pull_timeout_s=5", "mpls.linger_s=5", "train.local_steps=2"),
    worst_case_s=_worst_case_s,
))

__all__ = ["MPLS", "Done", "Info", "InfoReply", "Layers", "MplsConfig", "MplsPeer", "Pull", "model_layers"]

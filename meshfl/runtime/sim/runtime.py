"""The simulator: every peer's coroutine in one virtual-time event loop.

Training runs for real (the numbers are real) at the instant it is requested, then the
peer sleeps for the virtual time the compute model charges: samples x seconds_per_sample
/ speed. Messages are delivered when the network model says. A run is a pure function of
(config, seed): all randomness comes from generators seeded by (seed, peer id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from meshfl.config import ExperimentConfig
from meshfl.core.context import NodeContext, TrainResult
from meshfl.core.messages import Message
from meshfl.core.metrics import MetricsLog
from meshfl.core.params import Params
from meshfl.core.seeds import algorithm_rng, batch_generator, initial_model_seed
from meshfl.core.topology import Topology
from meshfl.data import Dataset, PeerData
from meshfl.learn.learner import Learner
from meshfl.runtime.sim.compute import peer_speeds
from meshfl.runtime.sim.loop import VirtualClock, run_virtual
from meshfl.runtime.sim.network import SimNetwork, TrafficCounters

PeerMain = Callable[[NodeContext], Awaitable[None]]


@dataclass
class SimResult:
    traffic: TrafficCounters
    virtual_time_s: float
    final_params: dict[int, Params]


class SimContext:
    """NodeContext of one simulated peer."""

    def __init__(self, sim: Simulation, peer_id: int) -> None:
        self._sim = sim
        self._peer_id = peer_id
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._rng = algorithm_rng(sim.config.seed, peer_id)
        self._torch_generator = batch_generator(sim.config.seed, peer_id)
        self.final_params: Params | None = None

    @property
    def peer_id(self) -> int:
        return self._peer_id

    @property
    def peers(self) -> tuple[int, ...]:
        return self._sim.peer_ids

    @property
    def neighbours(self) -> tuple[int, ...]:
        return self._sim.topology.neighbours[self._peer_id]

    @property
    def rng(self) -> np.random.Generator:
        return self._rng

    @property
    def num_samples(self) -> int:
        return len(self._sim.peer_data[self._peer_id].train)

    def now(self) -> float:
        return self._sim.clock.now

    async def sleep(self, seconds: float) -> None:
        with self._sim.waiting(self._peer_id, "sleep"):
            await asyncio.sleep(seconds)

    def send(self, to: int, message: Message) -> None:
        self._sim.network.send(self.now(), self._peer_id, to, message, message.wire_size)

    def deliver(self, message: Message) -> None:
        self._sim.network.traffic.messages_received[self._peer_id] += 1
        self._inbox.put_nowait(message)

    async def recv(self, timeout: float | None = None) -> Message | None:
        if not self._inbox.empty():
            return self._inbox.get_nowait()
        if timeout is not None and timeout <= 0:
            return None
        with self._sim.waiting(self._peer_id, "recv"):
            try:
                async with asyncio.timeout(timeout):
                    return await self._inbox.get()
            except TimeoutError:
                return None

    def initial_params(self) -> Params:
        return self._sim.learner.init_params(initial_model_seed(self._sim.config.seed))

    async def train(self, params: Params) -> TrainResult:
        data = self._sim.peer_data[self._peer_id].train
        result = self._sim.learner.train(params, data, self._torch_generator)
        compute = self._sim.config.compute
        await self.sleep(result.samples * compute.seconds_per_sample / self._sim.speeds[self._peer_id])
        return result

    async def evaluate(self, params: Params) -> dict[str, float]:
        learner = self._sim.learner
        local = learner.evaluate(params, self._sim.peer_data[self._peer_id].test)
        global_ = learner.evaluate(params, self._sim.global_test)
        self.final_params = params
        return {"local_accuracy": local.accuracy, "local_loss": local.loss,
                "global_accuracy": global_.accuracy, "global_loss": global_.loss}

    def log(self, metric: str, value: float, *, round: int) -> None:
        self._sim.metrics.metric(self._peer_id, round, metric, value)


class Simulation:
    def __init__(self, config: ExperimentConfig, topology: Topology, learner: Learner,
                 peer_data: list[PeerData], global_test: Dataset, metrics: MetricsLog) -> None:
        if topology.num_peers != config.peers or len(peer_data) != config.peers:
            raise ValueError(f"simulation: config has {config.peers} peers, topology {topology.num_peers}, data {len(peer_data)}")
        self.config = config
        self.topology = topology
        self.learner = learner
        self.peer_data = peer_data
        self.global_test = global_test
        self.metrics = metrics
        self.peer_ids = tuple(range(config.peers))
        self._waiting: dict[int, str] = {}
        self.clock = VirtualClock(config.max_virtual_time_s, self._describe_waiters)
        self.speeds = peer_speeds(config.compute, config.peers, config.seed)
        self.network = SimNetwork(config.network, config.peers, config.seed, self._schedule_delivery)
        self.contexts = [SimContext(self, p) for p in self.peer_ids]
        metrics.set_virtual_clock(lambda: self.clock.now)

    @contextmanager
    def waiting(self, peer: int, what: str) -> Iterator[None]:
        """Mark `peer` as blocked on `what`, so a deadlock report can name it."""
        self._waiting[peer] = what
        try:
            yield
        finally:
            self._waiting.pop(peer, None)

    def _describe_waiters(self) -> str:
        if not self._waiting:
            return "no peer is waiting"
        shown = [f"peer {p} ({what})" for p, what in sorted(self._waiting.items())[:20]]
        more = len(self._waiting) - len(shown)
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "")

    def _schedule_delivery(self, at: float, target: int, message: Message) -> None:
        asyncio.get_running_loop().call_at(at, self.contexts[target].deliver, message)

    def run(self, peer_main: Callable[[int], PeerMain]) -> SimResult:
        """Run `peer_main(peer_id)(ctx)` for every peer until all finish."""

        async def one(ctx: SimContext) -> None:
            try:
                await peer_main(ctx.peer_id)(ctx)
            except Exception as exc:
                exc.add_note(f"in peer {ctx.peer_id} at virtual time {self.clock.now:.3f}s")
                raise

        async def main() -> None:
            async with asyncio.TaskGroup() as group:
                for ctx in self.contexts:
                    group.create_task(one(ctx), name=f"peer-{ctx.peer_id}")

        run_virtual(main, self.clock)
        final = {c.peer_id: c.final_params for c in self.contexts if c.final_params is not None}
        return SimResult(self.network.traffic, self.clock.now, final)

"""The simulator: every peer's coroutine in one virtual-time event loop, under a supervisor.

Training runs for real (the numbers are real) at the instant it is requested, then the
peer sleeps for the virtual time the compute model charges: samples x seconds_per_sample
/ speed. Messages are delivered when the network model says, as the exact bytes the gRPC
runtime would send (a lossy codec is applied here too). A run is a pure function of
(config, seed): all randomness comes from generators seeded by (seed, peer id, incarnation).

Each peer runs under a `PeerSlot`: a crash cancels its coroutine (messages that reach it
while it is down are lost), a restart runs the algorithm's coroutine again with the next
incarnation number and the same `ctx.store`, a wipe empties the store. An exception in an
algorithm is that peer's crash, logged with its traceback, not the end of the run.
"""

from __future__ import annotations

import asyncio
import collections
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch

from meshfl.algorithms import PeerMain
from meshfl.config import ExperimentConfig
from meshfl.core.context import TrainResult
from meshfl.core.messages import Message, PeerLiveness
from meshfl.core.metrics import PEER_CRASHED, PEER_FINISHED, PEER_STARTED, MetricsLog
from meshfl.core.params import Layout, Params
from meshfl.core.store import MemoryStore
from meshfl.core.topology import Topology
from meshfl.data import Dataset
from meshfl.faults import Byzantine
from meshfl.learn.batched import TrainJob
from meshfl.runtime.peer import PeerContext, Worlds, evaluation_fields
from meshfl.runtime.sim.compute import peer_speeds
from meshfl.runtime.sim.compute_queue import ComputeQueue
from meshfl.runtime.sim.faults import FaultInjector
from meshfl.runtime.sim.loop import VirtualClock, run_virtual
from meshfl.runtime.sim.network import SimNetwork, TrafficCounters
from meshfl.wire.envelope import codec_of, decode, encode, encoded_size

LINGER_S = 1.0
"""A finished peer is believed gone this long (plus one latency) after it ends: what a real peer's
linger (PeerConfig.linger_s) and Goodbye do, so messages in flight still count."""


@dataclass
class SimResult:
    traffic: TrafficCounters
    virtual_time_s: float
    final_params: dict[int, Params]
    incarnations: dict[int, int] = field(default_factory=dict)


class SimContext(PeerContext):
    """NodeContext of one incarnation of one simulated peer."""

    def __init__(self, sim: Simulation, slot: PeerSlot) -> None:
        super().__init__(sim.config, slot.peer, slot.incarnation, sim.topology.neighbours[slot.peer], sim.worlds,
                         slot.store, sim.config.wire.inbox_messages)
        self._sim = sim

    def now(self) -> float:
        return self._sim.clock.now

    async def sleep(self, seconds: float) -> None:
        with self._sim.waiting(self.peer_id, "sleep"):
            await asyncio.sleep(seconds)

    async def recv(self, timeout: float | None = None, types: tuple[type, ...] | None = None) -> Message | None:
        if len(self.inbox) and (message := self.inbox.take(types)) is not None:
            return message
        with self._sim.waiting(self.peer_id, "recv"):
            return await self.inbox.get(timeout, types)

    async def request(self, to: int, message: Any, timeout: float) -> Any:
        with self._sim.waiting(self.peer_id, f"reply from peer {to}"):
            return await super().request(to, message, timeout)

    def _transmit(self, to: int, message: Message) -> None:
        self._sim.network.send(self.now(), self.peer_id, to, message, encoded_size(message))

    async def _compute(self, fn: Callable[..., Any], *args: Any, cost: Callable[[Any], float] | None = None) -> Any:
        result = fn(*args)
        if cost is not None:
            await self.sleep(cost(result) / self._sim.speeds[self.peer_id])
        return result

    async def _train_on(self, params: Params, data: Dataset, steps: int) -> TrainResult:
        """Queued with this instant's other training requests (one batch), then charged as before."""
        with self._sim.waiting(self.peer_id, "train"):
            result = await self._sim.compute.train(TrainJob(params, data, self._torch_generator, steps))
        await self.sleep(result.samples * self.config.compute.seconds_per_sample / self._sim.speeds[self.peer_id])
        return result

    async def _evaluation(self, params: Params) -> dict[str, float]:
        with self._sim.waiting(self.peer_id, "evaluate"):
            return await self._sim.compute.evaluate(params, self._data.test, evaluation_fields)

    def is_alive(self, peer: int) -> bool:
        return self._sim.detector.is_alive(self.peer_id, peer)

    def _record(self, event: str, **fields: Any) -> None:
        self._sim.metrics.record(event, **fields)

    def byzantine(self) -> Byzantine | None:
        return self._sim.faults.byzantine(self.peer_id)


@dataclass
class PeerSlot:
    """One peer's supervisor state: which incarnation runs, its task and its store."""

    peer: int
    store: MemoryStore = field(default_factory=MemoryStore)
    incarnation: int = -1
    up: bool = False
    task: asyncio.Task | None = None
    context: SimContext | None = None
    status: str = "not_started"


class SimDetector:
    """The failure detector every peer runs, modelled: a peer that goes down is believed dead
    by each other peer `timeout_s` after its last sign of life (what heartbeats would show);
    it is believed alive again once it is heard from, or `latency` after it comes back.
    A peer that ends on purpose says goodbye: it is believed gone after LINGER_S and one latency.

    Scale: beliefs are kept per observer as the set of subjects it believes dead (nothing for the
    common case, everyone alive), and with liveness.watch=all the watchers of a peer (everyone else)
    are a range, never a materialised peers x peers table."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self.timeout_s = sim.config.liveness.timeout_s
        self._peers = sim.config.peers
        self._dead: list[set[int]] = [set() for _ in range(self._peers)]  # observer -> subjects believed dead
        self._epoch = [0] * sim.config.peers  # bumped whenever a peer goes down or comes up
        self._network_epoch = 0  # bumped at every partition or heal
        # symmetric: who watches s = whom s watches; None (watch=all): every other peer, in id order
        self._watchers: list[tuple[int, ...]] | None = None
        if sim.config.liveness.watch != "all":  # only the overlay neighbours watch a peer, as over gRPC with liveness.watch=overlay
            self._watchers = [tuple(sim.topology.neighbours[s]) for s in range(self._peers)]

    def watchers(self, subject: int) -> Iterable[int]:
        """The peers that watch `subject` (and that `subject` watches), in id order."""
        if self._watchers is not None:
            return self._watchers[subject]
        return chain(range(subject), range(subject + 1, self._peers))

    def is_alive(self, observer: int, subject: int) -> bool:
        return subject not in self._dead[observer]

    def went_down(self, subject: int, delay: float) -> None:
        """`subject` stopped (crash: delay = detector timeout; goodbye: one latency)."""
        self._epoch[subject] += 1
        epoch = self._epoch[subject]
        loop = asyncio.get_running_loop()
        loop.call_at(self._sim.clock.now + delay, self._believe_down, subject, epoch)

    def came_up(self, subject: int) -> None:
        self._epoch[subject] += 1
        loop = asyncio.get_running_loop()
        loop.call_at(self._sim.clock.now + self._sim.config.network.latency_s, self._believe_up, subject, self._epoch[subject])

    def fresh_observer(self, observer: int) -> None:
        """A restarted peer knows nothing: it believes everyone alive until its timeout says otherwise."""
        self._dead[observer].clear()
        loop, later = asyncio.get_running_loop(), self._sim.clock.now + self.timeout_s
        for subject in self.watchers(observer):
            if not self._sim.slots[subject].up:
                loop.call_at(later, self._believe_down_for, observer, subject, self._epoch[subject])
            elif not self._sim.network.reachable(subject, observer):
                loop.call_at(later, self._cut_off, observer, subject, self._network_epoch)

    def network_changed(self) -> None:
        """A partition or heal: peers cut off are believed dead after the timeout, reachable ones alive again."""
        self._network_epoch += 1
        epoch = self._network_epoch
        network, slots, loop = self._sim.network, self._sim.slots, asyncio.get_running_loop()
        for observer in range(self._peers):
            dead = self._dead[observer]
            # with no partition left every pair is reachable: only subjects believed dead (always watched ones) matter
            subjects = self.watchers(observer) if network.partitioned else sorted(dead)
            for subject in subjects:
                if not slots[subject].up:
                    continue
                if not network.reachable(subject, observer):
                    loop.call_at(self._sim.clock.now + self.timeout_s, self._cut_off, observer, subject, epoch)
                elif subject in dead:
                    loop.call_at(self._sim.clock.now + network.latency(subject, observer), self._reconnected,
                                 observer, subject, epoch)

    def _cut_off(self, observer: int, subject: int, epoch: int) -> None:
        if epoch == self._network_epoch and subject not in self._dead[observer]:
            self._set(observer, subject, False)

    def _reconnected(self, observer: int, subject: int, epoch: int) -> None:
        if epoch == self._network_epoch and subject in self._dead[observer] and self._sim.slots[subject].up:
            self._set(observer, subject, True)

    def heard(self, observer: int, subject: int) -> None:
        if subject in self._dead[observer]:
            self._set(observer, subject, True)

    def _believe_down(self, subject: int, epoch: int) -> None:
        for observer in self.watchers(subject):
            self._believe_down_for(observer, subject, epoch)

    def _believe_down_for(self, observer: int, subject: int, epoch: int) -> None:
        if self._epoch[subject] != epoch or observer == subject or subject in self._dead[observer]:
            return
        self._set(observer, subject, False)

    def _believe_up(self, subject: int, epoch: int) -> None:
        if self._epoch[subject] != epoch:
            return
        for observer in range(self._peers):
            if subject in self._dead[observer] and self._sim.network.reachable(subject, observer):
                self._set(observer, subject, True)

    def _set(self, observer: int, subject: int, alive: bool) -> None:
        if alive:
            self._dead[observer].discard(subject)
        else:
            self._dead[observer].add(subject)
        slot = self._sim.slots[observer]
        if slot.up and slot.context is not None:
            slot.context.deliver(PeerLiveness(sender=observer, peer=subject, alive=alive))


class Simulation:
    def __init__(self, config: ExperimentConfig, topology: Topology, worlds: Worlds, metrics: MetricsLog,
                 new_peer: Callable[[], PeerMain]) -> None:
        if topology.num_peers != config.peers or len(worlds.peer_data) != config.peers:
            raise ValueError(f"simulation: config has {config.peers} peers, topology {topology.num_peers}, "
                             f"data {len(worlds.peer_data)}")
        self.config = config
        self.topology = topology
        self.worlds = worlds
        self.metrics = metrics
        self.new_peer = new_peer  # a fresh coroutine function for every start (incarnation)
        self._waiting: dict[int, collections.Counter[str]] = {}
        self.compute = ComputeQueue(config, worlds)
        self.clock = VirtualClock(config.max_virtual_time_s, self._describe_waiters, self.compute.flush)
        self.speeds = peer_speeds(config.compute, config.peers, config.seed)
        self.network = SimNetwork(config.network, config.peers, config.seed, self._schedule_delivery)
        self.slots = [PeerSlot(p) for p in range(config.peers)]
        self.detector = SimDetector(self)
        self.faults = FaultInjector(self)
        self.final_params: dict[int, Params] = {}
        self._settled: asyncio.Event | None = None
        metrics.set_virtual_clock(lambda: self.clock.now)

    # -- waiting, for deadlock reports
    @contextmanager
    def waiting(self, peer: int, what: str) -> Iterator[None]:
        """Mark one of `peer`'s tasks as blocked on `what`, so a deadlock report can name it."""
        counter = self._waiting.setdefault(peer, collections.Counter())
        counter[what] += 1
        try:
            yield
        finally:
            counter[what] -= 1
            if counter[what] <= 0:
                del counter[what]
            if not counter:
                self._waiting.pop(peer, None)

    def _describe_waiters(self) -> str:
        if not self._waiting:
            return "no peer is waiting"
        shown = [f"peer {p} ({', '.join(sorted(what))})" for p, what in sorted(self._waiting.items())[:20]]
        more = len(self._waiting) - len(shown)
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "")

    # -- messages
    def _schedule_delivery(self, at: float, target: int, message: Message) -> None:
        """Called while the message is sent: it is meant for the target's incarnation of that moment."""
        incarnation = self.slots[target].incarnation
        asyncio.get_running_loop().call_at(at, self._deliver, target, message, incarnation)

    def _deliver(self, target: int, message: Message, incarnation: int) -> None:
        slot = self.slots[target]
        if not slot.up or slot.context is None or slot.incarnation != incarnation:  # lost with the crash
            self.network.traffic.messages_dropped[message.sender] += 1
            return
        self.network.traffic.messages_received[target] += 1
        self.detector.heard(target, message.sender)
        slot.context.deliver(_as_received(message, self.worlds.learner.layout, self.worlds.learner.params_device))

    # -- lifecycle
    def start(self, peer: int) -> None:
        slot = self.slots[peer]
        if slot.up:
            return
        slot.incarnation += 1
        slot.up = True
        slot.status = "running"
        slot.context = SimContext(self, slot)
        if slot.incarnation > 0:
            self.detector.fresh_observer(peer)
            self.detector.came_up(peer)
        self.metrics.record(PEER_STARTED, peer=peer, incarnation=slot.incarnation)
        main = self.new_peer()
        slot.task = asyncio.get_running_loop().create_task(self._run_peer(slot, main, slot.context),
                                                           name=f"peer-{peer}.{slot.incarnation}")

    async def _run_peer(self, slot: PeerSlot, main: PeerMain, ctx: SimContext) -> None:
        incarnation = slot.incarnation
        try:
            await main(ctx)
        except asyncio.CancelledError:
            return  # crashed from outside: `crash` logged it
        except Exception as exc:  # noqa: BLE001 - one peer's bug is that peer's crash
            if slot.incarnation != incarnation or slot.context is not ctx:
                return  # an earlier incarnation ending late: nothing of it may touch the current one
            self.metrics.record(PEER_CRASHED, peer=slot.peer, incarnation=incarnation, reason="exception",
                                error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=20))
            self._down(slot, "crashed", self.detector.timeout_s)
        else:
            if slot.incarnation != incarnation or slot.context is not ctx:
                return
            self.metrics.record(PEER_FINISHED, peer=slot.peer, incarnation=incarnation, status="finished")
            if ctx.final_params is not None:
                self.final_params[slot.peer] = ctx.final_params
            self._down(slot, "finished", LINGER_S + self.config.network.latency_s)
        finally:
            self.wake()

    def crash(self, peer: int, reason: str = "fault") -> None:
        slot = self.slots[peer]
        if not slot.up:
            return
        self.metrics.record(PEER_CRASHED, peer=peer, incarnation=slot.incarnation, reason=reason)
        self._down(slot, "crashed", self.detector.timeout_s)
        if slot.task is not None:
            slot.task.cancel()

    def leave(self, peer: int) -> None:
        """A peer leaves on purpose: its coroutine stops and the others learn it at once (a goodbye)."""
        slot = self.slots[peer]
        if not slot.up:
            return
        self.metrics.record(PEER_FINISHED, peer=peer, incarnation=slot.incarnation, status="left")
        self._down(slot, "left", self.config.network.latency_s)
        if slot.task is not None:
            slot.task.cancel()

    def wake(self) -> None:
        """Let the run's main loop re-check whether anything is still to come."""
        if self._settled is not None:
            self._settled.set()

    def _down(self, slot: PeerSlot, status: str, detection_delay: float) -> None:
        slot.up = False
        slot.status = status
        slot.context = None
        self.detector.went_down(slot.peer, detection_delay)

    # -- the run
    def run(self) -> SimResult:
        """Run every peer until each has finished or crashed for good."""

        async def main() -> None:
            self._settled = asyncio.Event()
            self.faults.arm()
            joining = self.faults.joining
            for peer in range(self.config.peers):
                if peer not in joining:
                    self.start(peer)
            while self.faults.pending_starts or any(s.task is not None and not s.task.done() for s in self.slots):
                self._settled.clear()
                await self._settled.wait()

        try:
            run_virtual(main, self.clock)
        finally:  # a peer task that ended with Ctrl-C: its exception is propagating already, not "never retrieved"
            for slot in self.slots:
                if slot.task is not None and slot.task.done() and not slot.task.cancelled():
                    slot.task.exception()
        incarnations = {slot.peer: slot.incarnation + 1 for slot in self.slots}
        return SimResult(self.network.traffic, self.clock.now, dict(sorted(self.final_params.items())), incarnations)


def _as_received(message: Message, layout: Layout, device: torch.device) -> Message:
    """What the receiver gets: the message itself, or, for a lossy codec, what decoding its bytes gives.

    The decoded copy is kept on the message, so one message sent to many peers is coded once.
    """
    if not codec_of(message).lossy:
        return message
    received = message.__dict__.get("_meshfl_received")
    if received is None:
        received = decode(encode(message), layout, device=None if device.type == "cpu" else device)
        object.__setattr__(message, "_meshfl_received", received)
    return received

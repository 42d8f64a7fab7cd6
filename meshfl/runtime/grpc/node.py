"""One real peer: the algorithm's coroutine driven by a real clock and gRPC sockets.

`GrpcContext` is the `NodeContext` of a peer process. Time is `time.monotonic()` since the
peer started; `send` enqueues onto the target's `Link` (transport.py; opened on first use,
every peer of the experiment is in the address book) and never blocks. Incoming envelopes
pass through the `Door` (which refuses anything malformed, forged, oversized or non-finite,
counting the reason) and only then reach the algorithm. Training and evaluation run in a
worker thread so messages keep flowing while a peer trains.

The peer appends to metrics.jsonl as it goes (one flushed line per event), so a killed peer
leaves everything up to its death and a restarted one continues the same file (its
incarnation is the number of `peer_started` lines already there); its `ctx.store` is a
folder that survives kill -9. A `traffic` event after every evaluation carries its
counters. SIGTERM cancels the algorithm between two messages, flushes, says `Goodbye` to
its neighbours and exits 0.

Secure by default (`check_listen`): a peer listens on a non-loopback address only with mTLS,
unless `grpc.insecure` (or `meshfl node --insecure`) says otherwise, and then it warns at
every start (stderr and a `security_warning` event); with TLS its certificate must name it
(`certs.check_identity`).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import torch

from meshfl.algorithms import get_algorithm
from meshfl.config import ExperimentConfig, dump_config
from meshfl.core.messages import Goodbye, Heartbeat, Message, PeerLiveness
from meshfl.core.metrics import (
    LIVENESS,
    PEER_CRASHED,
    PEER_FINISHED,
    PEER_STARTED,
    PROCESS_STARTED,
    MetricsLog,
    event_line,
)
from meshfl.core.params import Params
from meshfl.core.store import DirectoryStore
from meshfl.faults import Byzantine
from meshfl.runtime.grpc.door import Door, Refused
from meshfl.runtime.grpc.faults import TransportFaults
from meshfl.runtime.grpc.peer_config import PeerConfig, check_listen
from meshfl.runtime.grpc.transport import (
    InboxFull,
    Link,
    PeerServicer,
    StreamBudget,
    Traffic,
    max_concurrent_rpcs,
    peer_from_auth_context,
    server_options,
)
from meshfl.runtime.keys import keys_for
from meshfl.runtime.peer import PeerContext, build_worlds, warm_up
from meshfl.wire import meshfl_pb2_grpc
from meshfl.wire.envelope import encode

STARTUP_PING_TIMEOUT_S = 2.0
GOODBYE_TIMEOUT_S = 1.0
ENCODED_KEPT = 4
FAULT_POLL_S = 0.2
SECURITY_WARNING = "security_warning"


# ---- the context the algorithm sees ---------------------------------------------------------

class GrpcContext(PeerContext):
    """NodeContext of a real peer process: real clock, links opened on demand, training in a thread."""

    def __init__(self, node: PeerNode) -> None:
        super().__init__(node.config, node.peer_id, node.incarnation, node.neighbour_ids, node.worlds, node.store,
                         node.config.wire.inbox_messages, int(node.config.wire.inbox_mb * (1 << 20)),
                         node.config.wire.inbox_sender_share)
        self._node = node
        self._learner_lock = threading.Lock()

    def now(self) -> float:
        return self._node.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    def _transmit(self, to: int, message: Message) -> None:
        self._node.send(to, message)

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._learner_lock:
            return fn(*args)

    async def _compute(self, fn: Callable[..., Any], *args: Any, cost: Callable[[Any], float] | None = None) -> Any:
        started = self.now()
        result = await asyncio.to_thread(self._locked, fn, *args)
        speed = self._node.faults.speed
        if cost is not None and speed < 1.0:  # a slow peer (compute tiers, a straggler fault): 1/speed as long
            await asyncio.sleep((self.now() - started) * (1.0 / speed - 1.0))
        return result

    async def evaluate(self, params: Params) -> dict[str, float]:
        result = await super().evaluate(params)
        self._node.snapshot()
        return result

    def is_alive(self, peer: int) -> bool:
        return self._node.is_alive(peer)

    def _record(self, event: str, **fields: Any) -> None:
        self._node.metrics.record(event, **fields)

    def byzantine(self) -> Byzantine | None:
        return self._node.faults.byzantine


def resident_mb() -> float:
    """This process's resident memory in MB (Linux /proc; elsewhere its peak, from getrusage)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the peer process -----------------------------------------------------------------------

class MetricsFile:
    """Appends each event to metrics.jsonl and flushes, so a killed peer leaves its history."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = path.open("a")  # a restarted peer appends to its history

    def __call__(self, event: dict[str, Any]) -> None:
        if self._handle.closed:
            return
        self._handle.write(event_line(event))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class PeerNode:
    """Everything one peer process owns: data, learner, store, door, server, links and counters.

    Complete after its constructor: the data split and learner are built there, so a peer
    that cannot load its data fails before it listens.
    """

    def __init__(self, peer_config: PeerConfig, config: ExperimentConfig, out_dir: Path, *, insecure: bool = False) -> None:
        self.peer_config = peer_config
        self.config = config
        self.peer_id = peer_config.peer_id
        self.tls = peer_config.tls_for(config)
        warning = check_listen(peer_config.listen, self.tls, insecure or config.grpc.insecure)  # before anything is written
        if self.tls.mode != "none":
            from meshfl.runtime.grpc.certs import check_identity
            check_identity(self.tls, self.peer_id)
        self.out_dir = out_dir
        self.neighbour_ids = tuple(sorted(peer_config.neighbours))
        self.addresses = dict(peer_config.addresses)
        self._start = time.monotonic()
        self.traffic = Traffic()
        metrics_path = out_dir / "metrics.jsonl"
        self.incarnation = previous_incarnations(metrics_path)
        self.metrics = MetricsLog(virtual_clock=self.now)
        self.metrics_file = MetricsFile(metrics_path)
        (out_dir / "config.yaml").write_text(dump_config(config))  # `meshfl merge` rebuilds the run from these folders
        self.metrics.subscribe(self.metrics_file)
        self.record(PROCESS_STARTED, unix_time=time.time() - self.now())  # first thing: a kill during the slow setup below still counts as an incarnation
        if warning is not None:  # at every start, where the operator and the run's records both see it
            print(f"peer {self.peer_id}: {warning}", file=sys.stderr, flush=True)
            self.record(SECURITY_WARNING, detail=warning, listen=peer_config.listen, tls=self.tls.mode)
        self._backoff_rng = np.random.default_rng([config.seed, self.peer_id, 0x6261636B, self.incarnation])
        self.store = DirectoryStore(out_dir / "store")
        self.faults = TransportFaults(config, self.peer_id, out_dir)
        self.worlds = build_worlds(config)
        self._load_keys()
        self.partition = self.worlds.partition[self.peer_id]
        warm_up(self.worlds, self.peer_id, config.train.batch_size)
        self.door = Door(layout=self.worlds.learner.layout, known_peers=frozenset(range(config.peers)), wire=config.wire,
                         log=self._door_log)
        self.streams = StreamBudget(int(config.wire.stream_buffer_mb * (1 << 20)))
        self.links: dict[int, Link] = {}
        self.context: GrpcContext | None = None
        self._encoded: collections.OrderedDict[int, tuple[Message, bytes]] = collections.OrderedDict()

    def _load_keys(self) -> None:
        """This peer's signing key and everyone's public keys, now: a wrong key file fails before listening."""
        signer, keyring = keys_for(self.config, self.peer_id, keys=self.peer_config.keys_for(self.config),
                                   ca=self.tls.ca if self.tls.mode != "none" else None)
        self.worlds.signers[self.peer_id] = signer
        self.worlds.keyring = keyring
        if keyring.derived_from_seed:
            self.record(SECURITY_WARNING, detail="keys.keyring is not set: content signatures use keys derived from "
                        "the run seed, which anyone who knows the config can forge (`meshfl certs` makes real keys)")

    # -- clock, counters, events

    def now(self) -> float:
        return time.monotonic() - self._start

    def backoff(self, attempt: int) -> float:
        grpc_config = self.config.grpc
        base = min(grpc_config.backoff_max_s, grpc_config.backoff_initial_s * 2 ** attempt)
        return float(base * self._backoff_rng.uniform(0.5, 1.0))

    def encoded(self, message: Message) -> bytes:
        """`message` as envelope bytes, encoded once however many links send it (the last few are kept).

        Algorithms send one message object to several peers (a round's model, relayed
        ballots); with compression on, encoding a model costs more than sending it.
        """
        cached = self._encoded.get(id(message))
        if cached is not None and cached[0] is message:  # holding the message keeps its id from being reused
            self._encoded.move_to_end(id(message))
            return cached[1]
        data = encode(message)
        self._encoded[id(message)] = (message, data)
        if len(self._encoded) > ENCODED_KEPT:
            self._encoded.popitem(last=False)
        return data

    async def log_resources(self, every_s: float) -> None:
        """`cpu_percent` (of one core, since the last line) and `memory_mb` (resident) of this process, every `every_s`:
        with many peers on one host, the report shows which ones starve or swell."""
        cpu, wall = time.process_time(), time.monotonic()
        while True:
            await asyncio.sleep(every_s)
            now_cpu, now_wall = time.process_time(), time.monotonic()
            percent = 100.0 * (now_cpu - cpu) / max(now_wall - wall, 1e-9)
            cpu, wall = now_cpu, now_wall
            self.metrics.metric(self.peer_id, None, "cpu_percent", round(percent, 2), incarnation=self.incarnation)
            self.metrics.metric(self.peer_id, None, "memory_mb", round(resident_mb(), 2), incarnation=self.incarnation)

    def record(self, event: str, **fields: Any) -> None:
        self.metrics.record(event, peer=self.peer_id, incarnation=self.incarnation, **fields)

    def refusals(self) -> dict[str, int]:
        return dict(sorted(self.door.refused.items()))

    def snapshot(self) -> None:
        """A `traffic` event: the counters so far (the launcher keeps each peer's last one)."""
        dead = sorted(p for p, link in self.links.items() if not link.alive and not link.left)
        left = sorted(p for p, link in self.links.items() if link.left)
        self.record("traffic", **asdict(self.traffic), refused=self.refusals(), admitted=self.door.admitted,
                    stream_buffer_peak=self.streams.peak, dead_neighbours=dead, left_neighbours=left)

    # -- links and liveness

    def link(self, peer: int, heartbeat: bool = True) -> Link:
        """The link to `peer`, opened on first use (every peer of the experiment is in the address book).

        Overlay links are opened before the algorithm starts without heartbeats (start-up pings
        stand in for them until the algorithm runs)."""
        link = self.links.get(peer)
        if link is None:
            address = self.addresses.get(peer)
            if address is None:
                raise ValueError(f"peer {self.peer_id} has no address for peer {peer}")
            link = Link(self, peer, address, self.config.grpc, self.config.liveness, self.tls,
                        queue_limit=self.config.wire.inbox_messages, wire=self.config.wire)
            self.links[peer] = link
            link.start(heartbeat)
        return link

    def send(self, to: int, message: Message) -> None:
        self.traffic.count_sent(message)
        self.link(to).enqueue(message)

    def is_alive(self, peer: int) -> bool:
        link = self.links.get(peer)
        return link is None or link.alive

    def liveness_changed(self, peer: int, alive: bool, reason: str) -> None:
        self.record(LIVENESS, subject=peer, alive=alive, reason=reason)
        if self.context is not None:
            self.context.deliver(PeerLiveness(sender=self.peer_id, peer=peer, alive=alive))
        self.snapshot()

    async def watch_faults(self) -> None:
        """Pick up network and compute faults the launcher fires (see runtime/grpc/faults.py)."""
        while True:
            self.faults.refresh()
            await asyncio.sleep(FAULT_POLL_S)

    async def close_idle_links(self) -> None:
        """Links to peers outside the overlay close after grpc.idle_link_s without use (unless the
        detector watches every peer: liveness.watch=all keeps them, they carry its heartbeats)."""
        if self.config.liveness.watch == "all":
            return
        idle = self.config.grpc.idle_link_s
        while True:
            await asyncio.sleep(min(idle, 5.0))
            for peer, link in list(self.links.items()):
                if peer not in self.neighbour_ids and self.now() - link.last_used > idle and link.queue.empty():
                    del self.links[peer]
                    await link.close()

    # -- receiving

    def _door_log(self, line: str) -> None:
        self.record("refused", detail=str(line)[:300])

    def peer_hint(self, context: grpc.aio.ServicerContext) -> int | None:
        """With mTLS, the peer id the client's certificate names (None: it names no peer of the
        experiment, which the servicer refuses); None otherwise (nothing authenticated)."""
        if self.tls.mode != "mtls":
            return None
        return peer_from_auth_context(context.auth_context(), self.config.peers)

    def receive(self, data: bytes, peer_hint: int | None = None, control_only: bool = False) -> bool:
        """Door, then the algorithm. True when admitted. The unary `Ping` carries only Heartbeat and
        Goodbye (`control_only`): anything else must come over `Stream`, whose size the server bounds."""
        try:
            message = self.door.admit(data, peer_hint)
        except Refused:
            return False
        if control_only and not isinstance(message, (Heartbeat, Goodbye)):
            self.door.reject("malformed", f"Ping carries {type(message).__name__}; only Heartbeat or Goodbye", peer_hint)
            return False
        if self.faults.active and not self.faults.reachable(message.sender, self.peer_id):
            return True  # an injected partition: it never arrived
        link = self.links.get(message.sender)
        if isinstance(message, Goodbye):
            if link is not None:
                link.mark_left()
            return True
        if link is not None:
            link.heard()
        if not isinstance(message, Heartbeat):
            if self.context is not None and not self.context.deliver(message):
                raise InboxFull(f"{self.context.inbox.bytes} bytes in {len(self.context.inbox)} unread messages "
                                f"(wire.inbox_mb={self.config.wire.inbox_mb:g}, inbox_sender_share={self.config.wire.inbox_sender_share:g})")
            self.traffic.messages_received += 1
        return True

    async def start_server(self) -> grpc.aio.Server:
        # gRPC's own limits (transport.server_options), then ours in PeerServicer.Stream
        server = grpc.aio.server(options=server_options(self.config.grpc),
                                 maximum_concurrent_rpcs=max_concurrent_rpcs(self.config.grpc, self.config.peers))
        meshfl_pb2_grpc.add_PeerServicer_to_server(PeerServicer(self), server)
        listen = self.peer_config.listen
        try:
            if self.tls.mode == "none":
                port = server.add_insecure_port(listen)
            else:
                from meshfl.runtime.grpc.certs import load_credentials
                port = server.add_secure_port(listen, load_credentials(self.tls, server=True))
        except RuntimeError as exc:
            raise OSError(f"listen: cannot bind {listen} ({exc})") from None
        if port == 0:
            raise OSError(f"listen: cannot bind {listen}; is the port taken?")
        await server.start()
        return server

    async def wait_for_neighbours(self) -> None:
        """Ping every neighbour until it answers or startup_timeout_s passes (it is then marked dead)."""
        deadline = self.now() + self.peer_config.startup_timeout_s

        async def reach(link: Link) -> None:
            while self.now() < deadline:
                if await link.ping(timeout=min(STARTUP_PING_TIMEOUT_S, max(deadline - self.now(), 0.1)), wait_for_ready=True):
                    return
                await asyncio.sleep(0.1)
            link.mark_dead("never_answered")

        await asyncio.gather(*(reach(link) for link in self.links.values()))
        for link in self.links.values():
            link.last_heard = self.now()

    # -- the run

    async def run(self, stop: asyncio.Event) -> str:
        """Serve, wait for neighbours, run the algorithm; returns finished | stopped.

        The context (and its inbox) exists before the server listens: a neighbour that starts
        its algorithm first may send at once, and what it sends waits in the inbox instead of
        being dropped (its sender would only resend after a timeout).
        """
        self.context = GrpcContext(self)
        server = await self.start_server()
        for peer in self.neighbour_ids:
            self.link(peer, heartbeat=False)
        reaper: asyncio.Task | None = None
        watcher = asyncio.create_task(self.watch_faults(), name="faults") if self.faults.actions else None
        usage = (asyncio.create_task(self.log_resources(self.config.grpc.resources_every_s), name="resources")
                 if self.config.grpc.resources_every_s > 0 else None)
        status = "stopped"
        try:
            layout = self.worlds.learner.layout
            self.record(PEER_STARTED, listen=self.peer_config.listen, neighbours=list(self.neighbour_ids),
                        unix_time=time.time() - self.now(), partition=self.partition,
                        cpus=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                        parameters=layout.numel, layout=layout.fingerprint)
            if not await _until_stopped(self.wait_for_neighbours(), stop):
                return status
            self.record("algorithm_started")
            for link in self.links.values():
                link.start_heartbeat()
            if self.config.liveness.watch == "all":  # the detector watches every peer, not only the overlay
                for peer in sorted(self.addresses):
                    self.link(peer)
            reaper = asyncio.create_task(self.close_idle_links(), name="idle-links")
            algorithm = get_algorithm(self.config.algorithm)
            peer_main = algorithm.peer(self.config.section(), self.config)
            try:
                completed = await _until_stopped(peer_main(self.context), stop)
            except Exception as exc:  # the algorithm's bug is this peer's crash, with its traceback
                self.record(PEER_CRASHED, reason="exception", error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc(limit=20))
                status = "failed"
                raise
            if completed:
                status = "finished"
                self._save_final_model()
                await self._drain(self.peer_config.linger_s + 5.0, stop)
                await _until_stopped(asyncio.sleep(self.peer_config.linger_s), stop)
            else:
                await self._finish_in_hand(2.0)
            return status
        except BaseException:
            status = "failed"
            raise
        finally:
            for task in (reaper, watcher, usage):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(link.say_goodbye(GOODBYE_TIMEOUT_S) for link in self.links.values() if link.alive),
                                 return_exceptions=True)
            try:
                await server.stop(grace=0.2)
                await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)
            finally:  # last, after the server stopped: only `serve`'s peer_failed line may follow
                self.snapshot()
                self.record(PEER_FINISHED, status=status)

    def _save_final_model(self) -> None:
        """The model this peer last evaluated, as `<out_dir>/final_model.safetensors` + .json (`meshfl merge` collects it)."""
        from meshfl.learn.saved import PEER_MODEL, provenance, save_model

        params = self.context.final_params if self.context is not None else None
        if params is None:
            return
        rounds = [e.get("round") for e in self.metrics.events
                  if e.get("event") == "metric" and e.get("metric") == "global_accuracy" and e.get("peer") == self.peer_id]
        learner = self.worlds.learner
        save_model(self.out_dir / PEER_MODEL, params, provenance(
            self.config, self.peer_id, round=rounds[-1] if rounds else None, incarnation=self.incarnation,
            runtime="grpc", feature_shape=learner.feature_shape, num_classes=learner.num_classes))

    async def _drain(self, timeout: float, stop: asyncio.Event) -> None:
        """Let queued messages go out (bounded), so neighbours get the last round's messages."""
        joins = asyncio.gather(*(link.queue.join() for link in self.links.values()))
        try:
            async with asyncio.timeout(timeout):
                await _until_stopped(joins, stop)
        except TimeoutError:
            pass
        finally:
            joins.cancel()

    async def _finish_in_hand(self, timeout: float) -> None:
        deadline = self.now() + timeout
        while any(link.in_hand for link in self.links.values()) and self.now() < deadline:
            await asyncio.sleep(0.05)


def previous_incarnations(metrics_path: Path) -> int:
    """How many times this peer's process started before (its metrics file survives a crash): its incarnation now."""
    if not metrics_path.is_file():
        return 0
    marker = f'"event": "{PROCESS_STARTED}"'.encode()
    with metrics_path.open("rb") as handle:
        return sum(1 for line in handle if marker in line)


async def _until_stopped(awaitable: Any, stop: asyncio.Event) -> bool:
    """Await `awaitable` unless `stop` is set first (then cancel it); True when it completed."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        task.result()  # re-raise the algorithm's error
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return False


async def serve(peer_config: PeerConfig, config: ExperimentConfig, out_dir: Path,
                stop: asyncio.Event | None = None, *, insecure: bool = False) -> str:
    """Run one peer until its algorithm returns or `stop` is set; returns its status.

    Without a `stop` event (a peer process), SIGTERM and SIGINT set one.
    """
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    node = PeerNode(peer_config, config, out_dir, insecure=insecure)
    try:
        return await node.run(stop)
    finally:
        node.metrics_file.close()


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once (a fixed mmap threshold).

    By default glibc raises its mmap threshold each time a large block is freed, after which
    1 MiB chunks come from the heap and stay resident once freed: 16 hostile streams left a peer
    hundreds of MiB above its live data. With the threshold fixed at 128 KiB, RSS follows what
    the stream budget (wire.stream_buffer_mb) holds. A no-op where there is no glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def run_node(peer_config: PeerConfig, base: Path, *, insecure: bool = False) -> str:
    """Entry point of `meshfl node`: resolve the experiment, serve, return the final status.

    Relative TLS paths of the peer config are relative to its folder `base`."""
    return_freed_memory()
    config = peer_config.resolve_experiment(base)
    peer_config = peer_config.with_base(base)
    torch.set_num_threads(peer_config.torch_threads)
    return asyncio.run(serve(peer_config, config, peer_config.out_path(base), insecure=insecure))

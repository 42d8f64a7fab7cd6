"""One real peer: the algorithm's coroutine driven by a real clock and gRPC sockets.

`GrpcContext` is the `NodeContext` of a peer process. Time is `time.monotonic()` since the
peer started; `send` enqueues onto the neighbour's `Link` (transport.py) and never blocks.
Incoming envelopes pass through the `Door` (which refuses anything malformed, hostile or
stale, counting the reason) and only then reach the inbox. Training and evaluation run in a
worker thread so messages keep flowing while a peer trains.

The peer writes metrics.jsonl as it goes (one flushed line per event), so a killed peer
leaves everything up to its death; a `traffic` event after every evaluation carries its
counters. SIGTERM cancels the algorithm between two messages, flushes, says `Goodbye` to
its neighbours and exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import torch

from meshfl.algorithms import build_algorithm
from meshfl.config import ExperimentConfig, dump_config
from meshfl.core.context import TrainResult
from meshfl.core.messages import Message
from meshfl.core.metrics import MetricsLog
from meshfl.core.params import Params
from meshfl.core.seeds import algorithm_rng, batch_generator, initial_model_seed
from meshfl.data import load_dataset, partition_stats, split_for_peers
from meshfl.learn.learner import TorchLearner
from meshfl.runtime.grpc import meshfl_pb2_grpc
from meshfl.runtime.grpc.door import Door, Refused
from meshfl.runtime.grpc.peer_config import PeerConfig
from meshfl.runtime.grpc.transport import Link, PeerServicer, Traffic, channel_options, peer_from_auth_context
from meshfl.runtime.grpc.wire import Goodbye, Heartbeat, encode

STARTUP_PING_TIMEOUT_S = 2.0
GOODBYE_TIMEOUT_S = 1.0
ENCODED_KEPT = 4

# ---- the context the algorithm sees ---------------------------------------------------------

class GrpcContext:
    """NodeContext of a real peer process."""

    def __init__(self, node: PeerNode) -> None:
        self._node = node
        self._rng = algorithm_rng(node.config.seed, node.peer_id)
        self._torch_generator = batch_generator(node.config.seed, node.peer_id)
        self._learner_lock = threading.Lock()

    @property
    def peer_id(self) -> int:
        return self._node.peer_id

    @property
    def peers(self) -> tuple[int, ...]:
        return tuple(range(self._node.config.peers))

    @property
    def neighbours(self) -> tuple[int, ...]:
        return self._node.neighbour_ids

    @property
    def rng(self) -> np.random.Generator:
        return self._rng

    @property
    def num_samples(self) -> int:
        return len(self._node.data.train)

    def now(self) -> float:
        return self._node.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    def send(self, to: int, message: Message) -> None:
        link = self._node.links.get(to)
        if link is None:
            raise ValueError(f"peer {self.peer_id} sent {type(message).__name__} to peer {to}, which is not its neighbour")
        node = self._node
        node.note_round(message.round)
        node.traffic.messages_sent += 1
        size = message.wire_size
        node.traffic.bytes_sent += size
        kind = type(message).__name__
        node.traffic.messages_by_type[kind] = node.traffic.messages_by_type.get(kind, 0) + 1
        node.traffic.bytes_by_type[kind] = node.traffic.bytes_by_type.get(kind, 0) + size
        link.enqueue(message)

    async def recv(self, timeout: float | None = None) -> Message | None:
        inbox = self._node.inbox
        if not inbox.empty():
            return inbox.get_nowait()
        if timeout is not None and timeout <= 0:
            return None
        try:
            async with asyncio.timeout(timeout):
                return await inbox.get()
        except TimeoutError:
            return None

    def initial_params(self) -> Params:
        return self._node.learner.init_params(initial_model_seed(self._node.config.seed))

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._learner_lock:
            return fn(*args)

    async def train(self, params: Params) -> TrainResult:
        node = self._node
        return await asyncio.to_thread(self._locked, node.learner.train, params, node.data.train, self._torch_generator)

    def _evaluate(self, params: Params) -> dict[str, float]:
        learner = self._node.learner
        local = learner.evaluate(params, self._node.data.test)
        global_ = learner.evaluate(params, self._node.global_test)
        return {"local_accuracy": local.accuracy, "local_loss": local.loss,
                "global_accuracy": global_.accuracy, "global_loss": global_.loss}

    async def evaluate(self, params: Params) -> dict[str, float]:
        result = await asyncio.to_thread(self._locked, self._evaluate, params)
        self._node.snapshot()
        return result

    def log(self, metric: str, value: float, *, round: int) -> None:
        self._node.note_round(round)
        self._node.metrics.metric(self._node.peer_id, round, metric, value)


# ---- the peer process -----------------------------------------------------------------------

class MetricsFile:
    """Appends each event to metrics.jsonl and flushes, so a killed peer leaves its history."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = path.open("w")

    def __call__(self, event: dict[str, Any]) -> None:
        if self._handle.closed:
            return
        self._handle.write(json.dumps(event, allow_nan=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class PeerNode:
    """Everything one peer process owns: data, learner, door, server, links and counters."""

    def __init__(self, peer_config: PeerConfig, config: ExperimentConfig, out_dir: Path) -> None:
        self.peer_config = peer_config
        self.config = config
        self.peer_id = peer_config.peer_id
        self.tls = peer_config.tls_for(config)
        self.out_dir = out_dir
        self.neighbour_ids = tuple(sorted(peer_config.neighbours))
        self._start = time.monotonic()
        self.round = 0
        self.traffic = Traffic()
        self.metrics = MetricsLog(virtual_clock=self.now)
        self.metrics_file = MetricsFile(out_dir / "metrics.jsonl")
        (out_dir / "config.yaml").write_text(dump_config(config))  # `meshfl merge` rebuilds the run from these folders
        self.metrics.subscribe(self.metrics_file)
        self._backoff_rng = np.random.default_rng([config.seed, self.peer_id, 0x6261636B])
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.links: dict[int, Link] = {}
        self._encoded: collections.OrderedDict[int, tuple[Message, bytes]] = collections.OrderedDict()

    # -- clock, counters, events

    def now(self) -> float:
        return time.monotonic() - self._start

    def note_round(self, round: int) -> None:
        self.round = max(self.round, round)

    def backoff(self, attempt: int) -> float:
        grpc_config = self.config.grpc
        base = min(grpc_config.backoff_max_s, grpc_config.backoff_initial_s * 2 ** attempt)
        return float(base * self._backoff_rng.uniform(0.5, 1.0))

    def encoded(self, message: Message) -> bytes:
        """`message` as envelope bytes, encoded once however many links send it (the last few are kept).

        Algorithms send one message object to several neighbours (a round's model, relayed
        ballots); with compression on, encoding a model costs more than sending it.
        """
        cached = self._encoded.get(id(message))
        if cached is not None and cached[0] is message:  # holding the message keeps its id from being reused
            self._encoded.move_to_end(id(message))
            return cached[1]
        data = encode(message, self.config.wire)
        self._encoded[id(message)] = (message, data)
        if len(self._encoded) > ENCODED_KEPT:
            self._encoded.popitem(last=False)
        return data

    def record(self, event: str, **fields: Any) -> None:
        self.metrics.record(event, peer=self.peer_id, round=self.round, **fields)

    def refusals(self) -> dict[str, int]:
        door = getattr(self, "door", None)
        return dict(sorted(door.refused.items())) if door is not None else {}

    def snapshot(self) -> None:
        """A `traffic` event: the counters so far (the launcher keeps each peer's last one)."""
        dead = sorted(p for p, link in self.links.items() if not link.alive and not link.left)
        left = sorted(p for p, link in self.links.items() if link.left)
        self.record("traffic", **asdict(self.traffic), refused=self.refusals(),
                    admitted=getattr(getattr(self, "door", None), "admitted", 0), dead_neighbours=dead,
                    left_neighbours=left)

    # -- setup

    def load(self) -> None:
        """Data split, learner and door: derived from the experiment config exactly as the sim does."""
        config = self.config
        train, global_test = load_dataset(config.data, config.seed)
        peer_data = split_for_peers(train, config.peers, config.data, config.seed)
        self.data = peer_data[self.peer_id]
        self.global_test = global_test
        self.partition = partition_stats(peer_data, train.num_classes)[self.peer_id]
        self.learner = TorchLearner(config.train, train.feature_shape, train.num_classes)
        self._warm_up()
        self.door = Door(layout=self.learner.layout, known_peers=frozenset(self.neighbour_ids), wire=config.wire,
                         current_round=lambda: self.round, log=self._door_log)

    def _warm_up(self) -> None:
        """One tiny training step now: torch's first step costs seconds, which must not eat round 1's timeouts.

        Uses its own generator, so the peer's training stream stays the simulator's.
        """
        data = self.data.train
        if len(data) == 0:
            return
        sample = data.subset(np.arange(min(len(data), self.config.train.batch_size)))
        params = self.learner.init_params(0)
        self.learner.train(params, sample, torch.Generator().manual_seed(0))
        self.learner.evaluate(params, sample)

    def _door_log(self, line: str) -> None:
        self.record("refused", detail=str(line)[:300])

    def peer_hint(self, context: grpc.aio.ServicerContext) -> int | None:
        """With mTLS, the peer id the client's certificate names; None otherwise."""
        if self.tls.mode != "mtls":
            return None
        return peer_from_auth_context(context.auth_context())

    def receive(self, data: bytes, peer_hint: int | None = None) -> bool:
        """Door, then inbox. True when admitted."""
        try:
            message = self.door.admit(data, peer_hint)
        except Refused:
            return False
        link = self.links.get(message.sender)
        if isinstance(message, Goodbye):
            if link is not None:
                link.mark_left()
            return True
        if link is not None:
            link.heard()
        if not isinstance(message, Heartbeat):
            self.traffic.messages_received += 1
            self.inbox.put_nowait(message)
        return True

    async def start_server(self) -> grpc.aio.Server:
        # no SO_REUSEPORT: a second server on a taken port must fail, not share the port
        server = grpc.aio.server(options=[*channel_options(self.config.grpc), ("grpc.so_reuseport", 0)])
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
        """Serve, wait for neighbours, run the algorithm; returns finished | stopped."""
        self.load()
        server = await self.start_server()
        self.links = {p: Link(self, p, a) for p, a in sorted(self.peer_config.neighbours.items())}
        background: list[asyncio.Task] = []
        status = "stopped"
        try:
            self.record("peer_started", listen=self.peer_config.listen, neighbours=list(self.neighbour_ids),
                        unix_time=time.time() - self.now(), partition=self.partition,
                        parameters=self.learner.layout.numel, layout=self.learner.layout.fingerprint)
            background = [asyncio.create_task(link.run_sender(), name=f"send-{p}") for p, link in self.links.items()]
            if not await _until_stopped(self.wait_for_neighbours(), stop):
                return status
            self.record("algorithm_started")
            background += [asyncio.create_task(link.run_heartbeat(), name=f"heartbeat-{p}") for p, link in self.links.items()]
            peer_main = build_algorithm(self.config)(self.peer_id)
            if await _until_stopped(peer_main(GrpcContext(self)), stop):
                status = "finished"
                await self._drain(self.peer_config.linger_s + 5.0, stop)
                await _until_stopped(asyncio.sleep(self.peer_config.linger_s), stop)
            else:
                await self._finish_in_hand(2.0)
            return status
        except BaseException:
            status = "failed"
            raise
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await asyncio.gather(*(link.say_goodbye(GOODBYE_TIMEOUT_S) for link in self.links.values() if link.alive),
                                 return_exceptions=True)
            try:
                await server.stop(grace=0.2)
                await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)
            finally:  # last, after the server stopped: only `serve`'s peer_failed line may follow
                self.snapshot()
                self.record("peer_finished", status=status)

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
                stop: asyncio.Event | None = None) -> str:
    """Run one peer until its algorithm returns or `stop` is set; returns its status.

    Without a `stop` event (a peer process), SIGTERM and SIGINT set one.
    """
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    node = PeerNode(peer_config, config, out_dir)
    try:
        return await node.run(stop)
    except Exception as exc:
        node.record("peer_failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        node.metrics_file.close()


def run_node(peer_config: PeerConfig, base: Path) -> str:
    """Entry point of `meshfl node`: resolve the experiment, serve, return the final status."""
    config = peer_config.resolve_experiment(base)
    torch.set_num_threads(peer_config.torch_threads)
    return asyncio.run(serve(peer_config, config, peer_config.out_path(base)))

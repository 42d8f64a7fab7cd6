"""How a peer talks to one neighbour over gRPC: channels, the outgoing `Link`, the server side.

A `Link` per neighbour drains an outgoing queue, streams each encoded envelope in
`grpc.chunk_kb` chunks over `Stream`, retries with jittered exponential backoff, pings the
neighbour every `heartbeat_interval_s` and declares it dead after `liveness.timeout_s` of
silence (sends to a dead neighbour are dropped and counted; hearing from it again revives
it); a neighbour that says `Goodbye` has left on purpose and is not declared dead.
`PeerServicer` joins incoming chunks into envelopes and hands them to the node's door.
`Traffic` holds the counters; gRPC/HTTP2 framing is estimated, not measured.

Limits on what a client can make a peer hold (issue 13, part 4): gRPC's own first
(`server_options`: concurrent streams per connection, keepalive, idle and age limits;
the server's `maximum_concurrent_rpcs`), then by hand in `PeerServicer.Stream`: with mTLS a
client whose certificate names no peer of the experiment is refused before one chunk is
read (UNAUTHENTICATED); every stream has a deadline that grows with its bytes
(`stream_timeout`); all streams together hold at most `wire.stream_buffer_mb` (`StreamBudget`);
an mTLS sender's bytes are rate-limited as they arrive. Each refusal is counted by reason
at the door and shows in the peer's `traffic` events.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from meshfl.config import GrpcConfig, LivenessConfig, TlsConfig, WireConfig
from meshfl.core.messages import Goodbye, Heartbeat, Message
from meshfl.wire import meshfl_pb2, meshfl_pb2_grpc
from meshfl.wire.envelope import chunks, encode, encoded_size

if TYPE_CHECKING:
    from meshfl.runtime.grpc.faults import TransportFaults
    from meshfl.runtime.grpc.node import PeerNode

class InboxFull(Exception):
    """The algorithm has not read what it holds: the sender is told to back off (RESOURCE_EXHAUSTED) and retry."""


# ---- framing estimate -----------------------------------------------------------------------
# gRPC python does not expose per-call HTTP/2 byte counts, so framing is estimated from the
# protocol: every gRPC message has a 5-byte length prefix, every HTTP/2 frame a 9-byte header
# (DATA frames carry at most 16 KiB by default), a Chunk adds its protobuf tags, and a call
# costs HEADERS (mostly HPACK-indexed after the first call on a connection), the Ack and
# trailers. TCP/IP headers are below gRPC and not counted.
HTTP2_FRAME_HEADER = 9
HTTP2_MAX_FRAME = 16384
GRPC_MESSAGE_PREFIX = 5
CALL_OVERHEAD_BYTES = 120


def chunk_framing(payload: int) -> int:
    """Estimated bytes gRPC + HTTP/2 add around one Chunk carrying `payload` data bytes."""
    protobuf = 1 + _varint_size(payload) + 2  # data tag + length, last flag
    body = payload + protobuf + GRPC_MESSAGE_PREFIX
    return protobuf + GRPC_MESSAGE_PREFIX + HTTP2_FRAME_HEADER * max(1, math.ceil(body / HTTP2_MAX_FRAME))


def call_framing(chunk_sizes: list[int]) -> int:
    return CALL_OVERHEAD_BYTES + sum(chunk_framing(size) for size in chunk_sizes)


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


# ---- counters -------------------------------------------------------------------------------

@dataclass
class Traffic:
    """One peer's counters.

    messages_sent / bytes_sent: what the algorithm asked for (sum of `encoded_size`), as the
    simulator counts them. messages_delivered / algorithm_bytes_delivered: the part that
    crossed the wire (the receiver's server acknowledged it; refused_by_neighbours of those
    its door refused). wire_bytes_sent: encoded envelope bytes of those; framing_bytes_estimate:
    gRPC/HTTP2 bytes around them (see `call_framing`); heartbeat_bytes: Pings, apart.
    """

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_delivered: int = 0
    algorithm_bytes_delivered: int = 0
    wire_bytes_sent: int = 0
    framing_bytes_estimate: int = 0
    heartbeat_bytes: int = 0
    messages_dropped: int = 0
    messages_received: int = 0
    send_retries: int = 0
    refused_by_neighbours: int = 0
    messages_by_type: dict[str, int] = field(default_factory=dict)
    bytes_by_type: dict[str, int] = field(default_factory=dict)

    def count_sent(self, message: Message) -> None:
        """What the algorithm asked to send, counted as the simulator counts it."""
        size = encoded_size(message)
        kind = type(message).__name__
        self.messages_sent += 1
        self.bytes_sent += size
        self.messages_by_type[kind] = self.messages_by_type.get(kind, 0) + 1
        self.bytes_by_type[kind] = self.bytes_by_type.get(kind, 0) + size


def channel_options(config: GrpcConfig) -> list[tuple[str, Any]]:
    """Options both ends share: message size (one chunk) and no hidden retries."""
    limit = max(4 * config.chunk_kb * 1024, 4 << 20)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.enable_retries", 0),
    ]


def client_options(config: GrpcConfig) -> list[tuple[str, Any]]:
    return [
        *channel_options(config),
        ("grpc.initial_reconnect_backoff_ms", int(config.backoff_initial_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(config.backoff_initial_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(config.backoff_max_s * 1000)),
        ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(config: GrpcConfig) -> list[tuple[str, Any]]:
    """gRPC's own limits, before anything by hand: streams per connection, a fixed per-stream window,
    keepalive (and how often a client may ping: half our own interval, two strikes), idle and maximum
    connection age."""
    return [
        *channel_options(config),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share the port
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        ("grpc.http2.bdp_probe", 0),  # a window grown by BDP probing let 16 hostile streams park GBs in gRPC's buffers
        ("grpc.http2.lookahead_bytes", config.stream_window_kb * 1024),
        ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(config.keepalive_s * 500)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", int(config.idle_connection_s * 1000)),
        ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.connection_age_grace_s * 1000)),
    ]


def max_concurrent_rpcs(config: GrpcConfig, peers: int) -> int:
    """Calls one server runs at once (each peer has one stream and one ping to us at most), then RESOURCE_EXHAUSTED."""
    return config.max_concurrent_rpcs or 4 * peers + 64


def stream_timeout(size: int, wire: WireConfig) -> float:
    """How long a stream of `size` bytes may take: wire.stream_deadline_s + size / wire.stream_min_mb_per_s.

    The receiver aborts a stream past it (counting its bytes so far), the sender gives up at it."""
    return wire.stream_deadline_s + size / (wire.stream_min_mb_per_s * 1e6)


def make_channel(address: str, config: GrpcConfig, tls: TlsConfig, peer: int | None = None) -> grpc.aio.Channel:
    """A channel to `address`; with TLS, the server must present a certificate naming `peer-<peer>`
    (checked instead of the address, so a certificate of another peer of the same CA is refused)."""
    options = client_options(config)
    if tls.mode == "none":
        return grpc.aio.insecure_channel(address, options=options)
    from meshfl.runtime.grpc.certs import load_credentials, peer_name
    if peer is not None:
        options.append(("grpc.ssl_target_name_override", peer_name(peer)))
    return grpc.aio.secure_channel(address, load_credentials(tls, server=False), options=options)


def peer_from_auth_context(auth: dict[str, list[bytes]], peers: int) -> int | None:
    """The peer id an mTLS client certificate names: common name exactly `peer-<id>` with id in 0..peers-1.

    Anything else (another name, a leading zero, several names, an id outside the
    experiment, no certificate) is None, which an mTLS server refuses: it fails closed.
    """
    names = auth.get("x509_common_name", [])
    if len(names) != 1:
        return None
    match = re.fullmatch(r"peer-(0|[1-9][0-9]{0,8})", names[0].decode("ascii", "replace"))
    if match is None or int(match.group(1)) >= peers:
        return None
    return int(match.group(1))


class Inflow:
    """One incoming stream's share of the budget: bytes it holds, and how to wake it when evicted."""

    def __init__(self, deadline: asyncio.Timeout) -> None:
        self.deadline = deadline
        self.held = 0
        self.evicted = False
        self.closed = asyncio.Event()


EVICTION_WAIT_S = 1.0


class StreamBudget:
    """Bytes buffered in incoming streams, all streams together, against wire.stream_buffer_mb.

    When a chunk would pass the limit, the stream holding the most is evicted (aborted
    RESOURCE_EXHAUSTED) if it holds more than the asking stream would, and the asking stream
    waits until the evicted one has dropped its buffer (the next step of its handler); else
    the asking stream is refused. So small messages get through a buffer that large stalled
    streams (a slow or hostile sender) fill, and the bytes alive never pass the limit (plus
    the chunks in hand). The handlers run on one event loop, so no lock. `peak` is the most
    ever held.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.evictions = 0
        self._streams: set[Inflow] = set()

    def open(self, deadline: asyncio.Timeout) -> Inflow:
        stream = Inflow(deadline)
        self._streams.add(stream)
        return stream

    async def take(self, stream: Inflow, size: int) -> bool:
        while self.used + size > self.limit:
            victim = max(self._streams, key=lambda s: s.held)
            if victim is stream or victim.held <= stream.held + size:
                return False
            if not victim.evicted:
                victim.evicted = True
                self.evictions += 1
                if not victim.deadline.expired():  # its read is cancelled at the next step
                    victim.deadline.reschedule(asyncio.get_running_loop().time())
            try:
                await asyncio.wait_for(victim.closed.wait(), EVICTION_WAIT_S)
            except TimeoutError:
                return False
            if stream.evicted:  # a larger newcomer evicted us while we waited
                return False
        stream.held += size
        self.used += size
        self.peak = max(self.peak, self.used)
        return True

    def release(self, stream: Inflow) -> None:
        self.used -= stream.held
        stream.held = 0

    def close(self, stream: Inflow) -> None:
        """The stream ended and dropped its buffer: its bytes are free."""
        self.release(stream)
        self._streams.discard(stream)
        stream.closed.set()


# ---- one neighbour --------------------------------------------------------------------------

class LinkHost(Protocol):
    """What a Link may use of the peer that owns it."""

    peer_id: int
    traffic: Traffic
    faults: TransportFaults

    def now(self) -> float: ...

    def encoded(self, message: Message) -> bytes: ...

    def backoff(self, attempt: int) -> float: ...

    def liveness_changed(self, peer: int, alive: bool, reason: str) -> None: ...

    def record(self, event: str, **fields: Any) -> None: ...


class Link:
    """Outgoing queue, sender task, heartbeat task and liveness of one peer (opened on demand)."""

    def __init__(self, host: LinkHost, peer: int, address: str, grpc_config: GrpcConfig, liveness: LivenessConfig,
                 tls: TlsConfig, queue_limit: int, wire: WireConfig | None = None) -> None:
        self.host = host
        self.peer = peer
        self.address = address
        self.grpc_config = grpc_config
        self.liveness = liveness
        self.wire = wire if wire is not None else WireConfig()
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_limit)
        self.alive = True
        self.left = False  # said Goodbye: gone on purpose, not dead
        self.last_heard = host.now()
        self.last_used = host.now()
        self.in_hand = False
        self.channel = make_channel(address, grpc_config, tls, peer)
        self.stub = meshfl_pb2_grpc.PeerStub(self.channel)
        self.tasks: list[asyncio.Task] = []
        self._ping: asyncio.Task | None = None

    def start(self, heartbeat: bool = True) -> None:
        self.tasks.append(asyncio.create_task(self.run_sender(), name=f"send-{self.peer}"))
        if heartbeat:
            self.start_heartbeat()

    def start_heartbeat(self) -> None:
        self.tasks.append(asyncio.create_task(self.run_heartbeat(), name=f"heartbeat-{self.peer}"))

    def heard(self) -> None:
        self.last_heard = self.host.now()
        if not self.alive:
            self.alive = True
            self.left = False
            self.host.liveness_changed(self.peer, True, "heard")

    def mark_dead(self, reason: str) -> None:
        if not self.alive:
            return
        self.alive = False
        self.host.liveness_changed(self.peer, False, reason)
        self._drop_queued()

    def mark_left(self) -> None:
        if self.left:
            return
        self.alive = False
        self.left = True
        self.host.liveness_changed(self.peer, False, "goodbye")
        self._drop_queued()

    def _drop_queued(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
            self.queue.task_done()
            self.host.traffic.messages_dropped += 1

    def enqueue(self, message: Message) -> None:
        self.last_used = self.host.now()
        if not self.alive or self.queue.full():
            self.host.traffic.messages_dropped += 1
            return
        self.queue.put_nowait(message)

    async def run_sender(self) -> None:
        while True:
            message = await self.queue.get()
            self.in_hand = True
            try:
                await self._deliver(message)
            except Exception as exc:  # e.g. a codec that cannot encode this tensor: drop it, keep the link
                self.host.traffic.messages_dropped += 1
                self.host.record("send_failed", neighbour=self.peer, message=type(message).__name__,
                                 error=f"{type(exc).__name__}: {exc}"[:300])
            finally:
                self.in_hand = False
                self.queue.task_done()

    async def _deliver(self, message: Message) -> None:
        node = self.host
        data = node.encoded(message)
        if node.faults.active:  # injected faults (meshfl launch with a faults: schedule)
            if node.faults.drops(self.peer):
                node.traffic.messages_dropped += 1
                return
            delay = node.faults.delay(self.peer, len(data))
            if delay > 0:
                await asyncio.sleep(delay)
        pieces = list(chunks(data, self.grpc_config.chunk_kb * 1024))
        timeout = stream_timeout(len(data), self.wire)  # the receiver's own bound for this stream
        retries = self.grpc_config.connect_retries
        for attempt in range(retries + 1):
            if not self.alive:
                break
            try:
                ack = await self.stub.Stream(iter(_chunk_messages(pieces)), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                busy = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not (exc.details() or "").startswith("too_large")
                if attempt < retries and (busy or exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)):  # busy: its buffers or our rate are full now, not for good
                    node.traffic.send_retries += 1
                    await asyncio.sleep(node.backoff(attempt))
                    continue
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.mark_dead("unreachable")
                break
            self.heard()
            if ack.refused:  # it crossed the wire, but the neighbour's door said no (a config mismatch, a forged or oversized message)
                node.traffic.refused_by_neighbours += 1
            node.traffic.messages_delivered += 1
            node.traffic.algorithm_bytes_delivered += encoded_size(message)
            node.traffic.wire_bytes_sent += len(data)
            node.traffic.framing_bytes_estimate += call_framing([len(p) for p in pieces])
            return
        node.traffic.messages_dropped += 1

    async def ping(self, timeout: float, wait_for_ready: bool = False) -> bool:
        """A heartbeat; True (and the neighbour counts as heard) when it answered."""
        if self.host.faults.active and not self.host.faults.reachable(self.host.peer_id, self.peer):
            return False  # an injected partition cuts heartbeats too
        answered = await self._control(Heartbeat(sender=self.host.peer_id), timeout, wait_for_ready)
        if answered:
            self.heard()
        return answered

    async def say_goodbye(self, timeout: float) -> None:
        """Tell the neighbour this peer is leaving on purpose; best effort, bounded by `timeout`."""
        await self._control(Goodbye(sender=self.host.peer_id), timeout)

    async def _control(self, message: Heartbeat | Goodbye, timeout: float, wait_for_ready: bool = False) -> bool:
        """Send a payload-free message over the unary `Ping`; its bytes count as heartbeat bytes."""
        data = encode(message)
        try:
            await self.stub.Ping(meshfl_pb2.Chunk(data=data, last=True), timeout=timeout, wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError:
            return False
        self.host.traffic.heartbeat_bytes += len(data) + call_framing([len(data)])
        return True

    async def run_heartbeat(self) -> None:
        """Ping every heartbeat_interval_s; declare the peer dead once it has been silent for
        liveness.timeout_s, checked at that instant (not at the next ping), so a crash costs
        one detector timeout and no more."""
        config = self.liveness
        next_ping = self.host.now()
        while True:
            now = self.host.now()
            if self.alive and not self.left and now - self.last_heard > config.timeout_s:
                self.mark_dead("silent")
            if now >= next_ping:
                next_ping = now + config.heartbeat_interval_s
                in_flight = self._ping is not None and not self._ping.done()
                if not self.left and not in_flight:  # it comes back by talking to us, not by being pinged
                    self._ping = asyncio.create_task(self.ping(timeout=max(config.heartbeat_interval_s, 0.5)))
            silent_until = self.last_heard + config.timeout_s + 0.01
            wake = min(next_ping, silent_until) if self.alive else next_ping
            await asyncio.sleep(max(wake - self.host.now(), 0.01))

    async def close(self) -> None:
        if self._ping is not None:
            self.tasks.append(self._ping)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.channel.close(grace=None)


def _chunk_messages(pieces: list[bytes]) -> Iterator[meshfl_pb2.Chunk]:
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        yield meshfl_pb2.Chunk(data=piece, last=i == last)


# ---- the server side ------------------------------------------------------------------------

class PeerServicer(meshfl_pb2_grpc.PeerServicer):
    """Joins chunks into envelopes and hands each to the node's door; never raises at a sender.

    What a stream may cost is bounded before the door sees it: the caller's identity (mTLS),
    the message size, the bytes buffered in all streams, the stream's deadline and (mTLS)
    the sender's byte rate; a stream past one is aborted and the reason counted.
    """

    def __init__(self, node: PeerNode) -> None:
        self.node = node

    async def _identify(self, context) -> int | None:
        """The authenticated peer (mTLS) or None (plaintext, tls); aborts UNAUTHENTICATED a client whose
        certificate names no peer of the experiment, before anything of its call is read."""
        node = self.node
        hint = node.peer_hint(context)
        if hint is None and node.tls.mode == "mtls":
            names = b",".join(context.auth_context().get("x509_common_name", [])).decode("ascii", "replace")[:80]
            node.door.reject("unauthenticated", f"client certificate named {names or 'nothing'!r}, not peer-<id> of this experiment")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "client certificate names no peer of this experiment")
        return hint

    async def Stream(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        node = self.node
        hint = await self._identify(context)
        door, budget, wire = node.door, node.streams, node.config.wire
        accepted = refused = 0
        buffer = bytearray()
        received = 0
        failure: tuple[str, str, grpc.StatusCode] | None = None
        loop = asyncio.get_running_loop()
        started = loop.time()
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        stream: Inflow | None = None
        try:
            async with asyncio.timeout_at(started + stream_timeout(0, wire)) as deadline:
                stream = budget.open(deadline)
                async for chunk in request_iterator:
                    if stream.evicted:  # evicted while this chunk was on its way: its wake-up must not be lost
                        raise TimeoutError
                    data = chunk.data
                    size = len(data)
                    received += size
                    if len(buffer) + size > door.max_bytes:
                        failure = ("too_large", f"stream passed {door.max_bytes} bytes", exhausted)
                        break
                    if hint is not None and not door.limiter.take(hint, 0, size):
                        failure = ("rate_limited", f"sender {hint} is past wire.sender_mb_per_s ({wire.sender_mb_per_s:g})", exhausted)
                        break
                    if not await budget.take(stream, size):
                        failure = ("buffer_full", f"streams hold {budget.used} bytes; wire.stream_buffer_mb={wire.stream_buffer_mb:g}",
                                   exhausted)
                        break
                    buffer += data
                    del data
                    if not deadline.expired():  # expired: the cancellation is on its way, at the next read
                        deadline.reschedule(started + stream_timeout(received, wire))
                    if chunk.last:
                        message, buffer = bytes(buffer), bytearray()
                        budget.release(stream)  # the joined copy is the door's now
                        try:
                            admitted = node.receive(message, hint)
                        except InboxFull as full:
                            failure = ("inbox_full", str(full), exhausted)
                            break
                        if admitted:
                            accepted += 1
                        else:
                            refused += 1
                        del message
        except TimeoutError:
            if stream is not None and stream.evicted:
                failure = ("buffer_full", f"evicted holding the most of wire.stream_buffer_mb={wire.stream_buffer_mb:g} "
                                          f"({received} bytes received)", exhausted)
            else:
                failure = ("stream_deadline", f"{received} bytes in {loop.time() - started:.1f}s, past wire.stream_deadline_s="
                                              f"{wire.stream_deadline_s:g} + bytes / wire.stream_min_mb_per_s",
                           grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            incomplete = len(buffer) > 0
            buffer = bytearray()  # freed before the budget says so: a stream waiting for these bytes gets them
            if stream is not None:
                budget.close(stream)
        if failure is not None:
            reason, detail, code = failure
            door.reject(reason, detail, hint)
            await context.abort(code, f"{reason}: {detail}")
        if incomplete:
            door.reject("malformed", "stream ended without a last chunk", hint)
            refused += 1
        return meshfl_pb2.Ack(accepted=accepted, refused=refused)

    async def Ping(self, request, context):  # noqa: N802
        hint = await self._identify(context)
        ok = self.node.receive(bytes(request.data), hint, control_only=True)
        return meshfl_pb2.Ack(accepted=int(ok), refused=int(not ok))

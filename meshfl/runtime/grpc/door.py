"""Validation at the door: nothing a stranger sends reaches the algorithm unchecked.

Every incoming envelope goes through `Door.admit`, which runs the checks in a fixed order
(cheapest and most telling first) and either returns a well-formed Message whose tensors
are fresh, finite and shaped like this peer's model, or raises `Refused` with a reason:

    too_large (before parsing) -> malformed -> unknown_type -> unknown_sender ->
    rate_limited -> layout_mismatch -> bad_shape -> bad_codec -> too_large/malformed
    (decompression) -> bad_dtype/bad_shape (byte length) -> non_finite -> malformed (fields,
    construction)

Any peer of the experiment may send (reachability is not the overlay); strangers may not.
Which rounds or versions are still useful is the algorithm's policy, not the door's.
`rate_limited`: each sender (the authenticated one with mTLS, else the claimed one, which
the door has just checked is a peer of the experiment, so the state is bounded) has a token
bucket of messages and one of bytes (`wire.sender_*`).

The transport refuses some things before a message is whole and counts them here with
`reject` under TRANSPORT_REASONS: `unauthenticated` (mTLS client certificate that names no
peer of the experiment), `buffer_full` (wire.stream_buffer_mb), `stream_deadline`
(wire.stream_deadline_s), `rate_limited` (bytes of an mTLS sender, counted per chunk),
`inbox_full` (wire.inbox_mb / inbox_sender_share: the sender backs off and retries).

Refusals are counted by reason; the first refusal of each reason is logged with its
detail, later ones only counted, so a hostile or broken peer cannot flood the log.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Collection

from meshfl.config import WireConfig
from meshfl.core.messages import Message
from meshfl.core.params import Layout
from meshfl.wire import envelope as wire_format
from meshfl.wire.envelope import REASONS, Refused

__all__ = ["REASONS", "TRANSPORT_REASONS", "Door", "RateLimiter", "Refused"]

TRANSPORT_REASONS = ("unauthenticated", "buffer_full", "stream_deadline", "rate_limited", "inbox_full")
"""Refusals decided by the transport or the rate limiter rather than by decoding the envelope."""

_MIB = 1 << 20
_logger = logging.getLogger("meshfl.door")


class TransportRefused(Refused):
    """A refusal with one of TRANSPORT_REASONS (Refused itself takes only the decoder's REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in TRANSPORT_REASONS:
            raise ValueError(f"TransportRefused: unknown reason {reason!r}")
        Exception.__init__(self, f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RateLimiter:
    """Token buckets per sender: messages/s and bytes/s, each with a burst; `take` refuses without spending."""

    def __init__(self, wire: WireConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.rates = (wire.sender_messages_per_s, wire.sender_mb_per_s * 1e6)
        self.bursts = (float(wire.sender_burst_messages), wire.sender_burst_mb * 1e6)
        self.clock = clock
        self._buckets: dict[int, list[float]] = {}  # sender -> [messages, bytes, last refill]
        self._lock = threading.Lock()

    def take(self, sender: int, messages: int = 0, size: int = 0) -> bool:
        """Spend `messages` and `size` bytes of `sender`'s allowance; False (nothing spent) when either is short."""
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(sender)
            if bucket is None:
                bucket = self._buckets[sender] = [self.bursts[0], self.bursts[1], now]
            elapsed = max(now - bucket[2], 0.0)
            bucket[2] = now
            for i in (0, 1):
                bucket[i] = min(self.bursts[i], bucket[i] + elapsed * self.rates[i])
            if bucket[0] < messages or bucket[1] < size:
                return False
            bucket[0] -= messages
            bucket[1] -= size
            return True


class Door:
    """Checks every incoming message before the algorithm sees it; counts refusals by reason; logs each reason once."""

    def __init__(self, *, layout: Layout, known_peers: Collection[int], wire: WireConfig,
                 log: Callable[[str], None] | None = None) -> None:
        self.layout = layout
        self.known_peers = frozenset(known_peers)
        self.wire = wire
        self.log = log if log is not None else _logger.warning
        self.max_bytes = int(wire.max_message_mb * _MIB)
        """Largest envelope admitted (max_message_mb in MiB); a transport can stop reading a stream past it."""
        self.refused: collections.Counter[str] = collections.Counter()
        self.admitted = 0
        self.limiter = RateLimiter(wire)
        self._lock = threading.Lock()  # sync gRPC servers call admit from a thread pool

    def admit(self, data: bytes, peer_hint: int | None = None) -> Message:
        """Return the decoded message or raise Refused (counted and, the first time, logged).

        `peer_hint` is the peer id the transport authenticated the connection as (e.g. from
        its mTLS certificate); when given, the envelope's sender must be that peer, and its
        bytes are taken to be rate-counted already (as they arrived), so only the message is.
        """
        try:
            message = self._check(data, peer_hint)
        except Refused as exc:
            self._count(exc, peer_hint)
            raise
        except Exception as exc:  # a bug or an exotic input must not crash the receiving loop
            refused = Refused("malformed", f"unexpected {type(exc).__name__}: {exc}")
            self._count(refused, peer_hint)
            raise refused from exc
        with self._lock:
            self.admitted += 1
        return message

    def reject(self, reason: str, detail: str, peer_hint: int | None = None) -> Refused:
        """Count and log a refusal the transport decided itself (e.g. a stream past max_bytes); return it to raise."""
        refused = TransportRefused(reason, detail) if reason in TRANSPORT_REASONS else Refused(reason, detail)
        self._count(refused, peer_hint)
        return refused

    def _check(self, data: bytes, peer_hint: int | None) -> Message:
        if len(data) > self.max_bytes:
            raise Refused("too_large", f"{len(data)} bytes exceeds wire.max_message_mb={self.wire.max_message_mb:g}")
        env = wire_format.parse(data)
        cls = wire_format.message_class(env)
        self._check_sender(env.sender, peer_hint)
        if not self.limiter.take(env.sender, 1, 0 if peer_hint is not None else len(data)):
            raise TransportRefused("rate_limited", f"sender {env.sender} is past wire.sender_messages_per_s "
                                                   f"({self.wire.sender_messages_per_s:g}) or wire.sender_mb_per_s "
                                                   f"({self.wire.sender_mb_per_s:g})")
        return wire_format.build(env, cls, self.layout, max_bytes=self.max_bytes)

    def _check_sender(self, sender: int, peer_hint: int | None) -> None:
        if sender not in self.known_peers:
            raise Refused("unknown_sender", f"sender {sender} is not a known peer")
        if peer_hint is not None and sender != peer_hint:
            raise Refused("unknown_sender", f"claims sender {sender} on a connection from peer {peer_hint}")

    def _count(self, refused: Refused, peer_hint: int | None) -> None:
        with self._lock:
            first = self.refused[refused.reason] == 0
            self.refused[refused.reason] += 1
        if first:
            source = "" if peer_hint is None else f" from peer {peer_hint}"
            self.log(f"door: refused {refused.reason}{source}: {refused.detail} (further {refused.reason} refusals are only counted)")

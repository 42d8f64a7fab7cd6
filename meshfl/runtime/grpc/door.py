"""Validation at the door: nothing a stranger sends reaches the algorithm unchecked.

Every incoming envelope goes through `Door.admit`, which runs the checks in a fixed order
(cheapest and most telling first) and either returns a well-formed Message whose tensors
are fresh, finite and shaped like this peer's model, or raises `Refused` with a reason:

    too_large (before parsing) -> malformed -> unknown_type -> unknown_sender ->
    layout_mismatch -> bad_shape -> bad_codec -> too_large/malformed (decompression) ->
    bad_dtype/bad_shape (byte length) -> non_finite -> malformed (fields, construction)

Any peer of the experiment may send (reachability is not the overlay); strangers may not.
Which rounds or versions are still useful is the algorithm's policy, not the door's.

Refusals are counted by reason; the first refusal of each reason is logged with its
detail, later ones only counted, so a hostile or broken peer cannot flood the log.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Collection

from meshfl.config import WireConfig
from meshfl.core.messages import Message
from meshfl.core.params import Layout
from meshfl.wire import envelope as wire_format
from meshfl.wire.envelope import REASONS, Refused

__all__ = ["REASONS", "Door", "Refused"]

_MIB = 1 << 20
_logger = logging.getLogger("meshfl.door")


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
        self._lock = threading.Lock()  # sync gRPC servers call admit from a thread pool

    def admit(self, data: bytes, peer_hint: int | None = None) -> Message:
        """Return the decoded message or raise Refused (counted and, the first time, logged).

        `peer_hint` is the peer id the transport authenticated the connection as (e.g. from
        its mTLS certificate); when given, the envelope's sender must be that peer.
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
        refused = Refused(reason, detail)
        self._count(refused, peer_hint)
        return refused

    def _check(self, data: bytes, peer_hint: int | None) -> Message:
        if len(data) > self.max_bytes:
            raise Refused("too_large", f"{len(data)} bytes exceeds wire.max_message_mb={self.wire.max_message_mb:g}")
        env = wire_format.parse(data)
        cls = wire_format.message_class(env)
        self._check_sender(env.sender, peer_hint)
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

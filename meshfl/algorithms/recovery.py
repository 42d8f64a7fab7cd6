"""Checkpoints, remote replicas and three-tier recovery, for any algorithm (issue 9, items 7-9).

An algorithm owns one `Recovery` per incarnation and calls it at a few points:

    recovery = Recovery(section.checkpoint, experiment.name)
    recovery.start(ctx, layout)                      # announce this peer's neighbours (topology flood)
    if ctx.incarnation > 0:
        result = await recovery.recover(ctx, layout)  # tier 1 local, 2 replicas from peers, 3 nothing
    ... every round:
    recovery.checkpoint(ctx, "local", round, trained, samples=...)
    recovery.checkpoint(ctx, "aggregated", round, model, contributors=...)
    recovery.checkpoint(ctx, "round_finished", round, model, contributors=...)
    recovery.replicate(ctx, round, model)            # every `replica_every` rounds
    ... in its message pump:
    if recovery.handle(ctx, message): continue       # its own message types

and lists `Recovery.messages` among its `Algorithm.messages`.

Local checkpoints (`ckpt.<round>.<kind>` in `ctx.store`, Params + JSON metadata with a SHA-256 of the
float32 values) keep the last `keep_rounds` rounds. Replicas go to the peers farthest from this one in
the overlay, which every peer learns from signed `Adjacency` announcements flooded once per origin
and version; holders keep them as `replica.<origin>.<round>` within quotas and give them back only to
their origin. Local checkpoints and the config: `meshfl.algorithms.checkpoints`; payloads and the
choice of holders: `meshfl.algorithms.replica_codec`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from meshfl.algorithms.checkpoints import (
    KINDS,
    CheckpointConfig,
    CheckpointKind,
    checkpoint_name,
    checkpoints,
    newest_valid_checkpoint,
    save_checkpoint,
)
from meshfl.algorithms.replica_codec import (
    COMPRESSIONS,
    VALUE_CODECS,
    ReplicaError,
    checksum,
    decode_payload,
    encode_payload,
    farthest_peers,
    max_payload_bytes,
    pack,
    packed_count,
    payload_digest,
    unpack,
)
from meshfl.core.context import NodeContext
from meshfl.core.messages import Message, Reply, Request
from meshfl.core.params import Layout, Params
from meshfl.core.store import StoreError

REPLICA_PREFIX = "replica."
_REPLICA_NAME = re.compile(r"replica\.(\d{1,9})\.(\d{1,12})")
_MIB = 1 << 20
FULL = -1
"""`base_round` of a full replica."""


# ---- messages -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Announcement:
    """A peer's overlay neighbours, signed by it (`version`: its incarnation; a newer one replaces an older one)."""

    origin: int
    version: int
    neighbours: tuple[int, ...]
    signature: str = ""


@dataclass(frozen=True, kw_only=True)
class Adjacency(Message):
    """Announcements flooded through the overlay, each relayed once per (origin, version)."""

    announcements: tuple[Announcement, ...]


@dataclass(frozen=True)
class ReplicaEntry:
    """One replica payload: the model of `round`, full or a delta against the replica of `base_round`.

    A full one has `base_round` -1 (`FULL`). `checksum` is the SHA-256 of the model it rebuilds to; `length` the payload's bytes, which
    travel packed 63 bits to a float in `payload` (`replica_codec.pack`). `signature`: the origin's, over all of it (`entry_bytes`).
    """

    round: int
    base_round: int
    codec: str
    compression: str
    fingerprint: str
    checksum: str
    length: int
    payload: tuple[float, ...]
    signature: str = ""

    @property
    def full(self) -> bool:
        """Whether this is a full replica rather than a delta."""
        return self.base_round == FULL


@dataclass(frozen=True, kw_only=True)
class Replica(Message):
    """An origin's replica for a holder; only the origin itself sends it (`origin == sender`)."""

    origin: int
    entry: ReplicaEntry


@dataclass(frozen=True, kw_only=True)
class ReplicaAck(Message):
    """The holder's answer to a replica of `round`: kept or not, and whether the next one must be full."""

    round: int
    accepted: bool
    need_full: bool


@dataclass(frozen=True, kw_only=True)
class ReplicaFetch(Request):
    """The sender asks for its own replicas: the newest held round in [min_round, max_round]."""

    min_round: int
    max_round: int


@dataclass(frozen=True, kw_only=True)
class ReplicaChain(Reply):
    """A full replica and the deltas that lead from it to the newest round asked for (empty: none held)."""

    entries: tuple[ReplicaEntry, ...] = ()


__all__ = ["KINDS", "MESSAGES", "Adjacency", "Announcement", "CheckpointConfig", "CheckpointKind", "Recovery",
           "RecoveryResult", "Replica", "ReplicaAck", "ReplicaChain", "ReplicaEntry", "ReplicaFetch", "checkpoint_name",
           "checkpoints", "farthest_peers", "newest_valid_checkpoint", "save_checkpoint"]

MESSAGES: tuple[type[Message], ...] = (Adjacency, Replica, ReplicaAck, ReplicaFetch, ReplicaChain)


def announcement_bytes(experiment: str, a: Announcement) -> bytes:
    """What the origin of an announcement signs."""
    return f"meshfl.adjacency|{experiment}|{a.origin}|{a.version}|{','.join(map(str, a.neighbours))}".encode()


def entry_bytes(experiment: str, origin: int, entry: ReplicaEntry, digest: str) -> bytes:
    """What the origin of a replica signs; `digest` is the SHA-256 of the payload bytes."""
    return (f"meshfl.replica|{experiment}|{origin}|{entry.round}|{entry.base_round}|{entry.codec}|{entry.compression}|"
            f"{entry.fingerprint}|{entry.checksum}|{entry.length}|{digest}").encode()


# ---- the façade ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveryResult:
    """What `Recovery.recover` found.

    Attributes
    ----------
    tier : int
        1 (local checkpoint), 2 (replicas from peers) or 3 (nothing: `params` is None and the
        algorithm takes a live neighbour's current model).
    round : int or None
        The recovered model's round.
    params : Params or None
        The recovered model.
    meta : dict
        The checkpoint's metadata (tier 1), or round, checksum, codec, holder and fingerprint (tier 2).
    source : int or None
        The holder the replicas came from (tier 2).
    """

    tier: int
    round: int | None = None
    params: Params | None = None
    meta: dict = field(default_factory=dict)
    source: int | None = None


@dataclass
class _Sent:
    round: int
    rebuilt: Params  # what the holder rebuilds: the base of the next delta to it


@dataclass
class _Held:
    round: int
    base_round: int
    length: int
    name: str


class Recovery:
    """One peer's checkpoints, replicas (as origin and as holder) and recovery; see the module docstring.

    Parameters
    ----------
    config
        The algorithm's `CheckpointConfig` section; with `enabled` False every call is a no-op
        (`handle` still consumes and ignores this module's messages) and `recover` returns tier 3 silently.
    experiment
        The experiment's name: part of every signature and checkpoint's metadata. (The peer is
        `ctx.peer_id` of each call.)
    wall_clock
        Optional seconds-since-epoch clock recorded as `wall_time` in checkpoints (algorithms cannot
        read a clock themselves); None records null.
    """

    messages = MESSAGES

    def __init__(self, config: CheckpointConfig, experiment: str, *,
                 wall_clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.experiment = experiment
        self.wall_clock = wall_clock
        self.layout: Layout | None = None
        self.adjacency: dict[int, Announcement] = {}
        self.refused = 0  # forged or malformed announcements and replicas
        self._sent: dict[int, _Sent] = {}  # holder -> replica awaiting its ack
        self._acked: dict[int, _Sent] = {}  # holder -> last replica it acknowledged
        self._refusing: set[int] = set()  # holders that cannot keep our replicas (quota)
        self._held: dict[int, list[_Held]] | None = None  # origin -> its chain, full first (loaded on first use)

    @property
    def enabled(self) -> bool:
        """Whether checkpoints are on (`config.enabled`)."""
        return self.config.enabled

    # ---- start and the topology flood --------------------------------------------------------

    def start(self, ctx: NodeContext, layout: Layout | None = None) -> None:
        """Remember the model layout and announce this peer's overlay neighbours to them."""
        self.layout = layout
        if not self.enabled or not self.config.replicas:
            return
        own = Announcement(ctx.peer_id, ctx.incarnation, tuple(ctx.neighbours))
        own = Announcement(own.origin, own.version, own.neighbours, ctx.sign(announcement_bytes(self.experiment, own)))
        self.adjacency[ctx.peer_id] = own
        message = Adjacency(sender=ctx.peer_id, announcements=(own,))
        for neighbour in ctx.neighbours:
            ctx.send(neighbour, message)

    def topology_known(self, ctx: NodeContext) -> bool:
        """Whether every peer's neighbours are known (so holders are the true farthest peers)."""
        return len(self.adjacency) >= len(ctx.peers)

    def _learn(self, ctx: NodeContext, message: Adjacency) -> None:
        peers = frozenset(ctx.peers)
        if len(message.announcements) > len(peers):
            self.refused += 1
            return
        fresh = []
        for a in message.announcements:
            known = self.adjacency.get(a.origin)
            if a.origin == ctx.peer_id or a.origin not in peers or (known is not None and known.version >= a.version):
                continue
            if not (0 <= a.version and len(a.neighbours) < len(peers) and peers.issuperset(a.neighbours)
                    and a.origin not in a.neighbours and len(set(a.neighbours)) == len(a.neighbours)
                    and ctx.verify(a.origin, announcement_bytes(self.experiment, a), a.signature)):
                self.refused += 1
                continue
            self.adjacency[a.origin] = a
            fresh.append(a)
            if a.origin == message.sender and message.sender in ctx.neighbours:
                # a neighbour that (re)started knows nothing: tell it everything we know, once
                others = tuple(b for o, b in sorted(self.adjacency.items()) if o != a.origin)
                if others:
                    ctx.send(a.origin, Adjacency(sender=ctx.peer_id, announcements=others))
        if fresh:
            relay = Adjacency(sender=ctx.peer_id, announcements=tuple(fresh))
            for neighbour in ctx.neighbours:
                if neighbour != message.sender:
                    ctx.send(neighbour, relay)

    def holders(self, ctx: NodeContext) -> tuple[int, ...]:
        """Who gets this peer's replicas: the `replicas` farthest live peers that do not refuse.

        Before the whole topology is known: peers not yet reached in the known part of the graph
        (they are beyond it), then the farthest known ones.
        """
        exclude = self._refusing | {p for p in ctx.peers if p != ctx.peer_id and not ctx.is_alive(p)}
        graph = {origin: a.neighbours for origin, a in self.adjacency.items()}
        graph[ctx.peer_id] = tuple(ctx.neighbours)
        known = farthest_peers(graph, ctx.peer_id, len(ctx.peers), exclude)
        if self.topology_known(ctx):
            return known[:self.config.replicas]
        reached = set(known) | exclude | {ctx.peer_id}
        beyond = tuple(p for p in _cyclic(ctx.peers, ctx.peer_id) if p not in reached)
        return (beyond + known)[:self.config.replicas]

    # ---- receiving ---------------------------------------------------------------------------

    def handle(self, ctx: NodeContext, message: Message) -> bool:
        """Consume this module's messages (True); anything else is the algorithm's (False)."""
        if not isinstance(message, MESSAGES):
            return False
        if not self.enabled:
            return True
        if isinstance(message, Adjacency):
            self._learn(ctx, message)
        elif isinstance(message, Replica):
            self._hold(ctx, message)
        elif isinstance(message, ReplicaAck):
            self._acknowledged(message)
        elif isinstance(message, ReplicaFetch):
            ctx.reply(message, ReplicaChain(sender=ctx.peer_id, entries=self._chain_for(ctx, message)))
        return True  # a ReplicaChain outside ctx.request is a late reply: dropped

    def _layout(self, ctx: NodeContext) -> Layout:
        if self.layout is None:
            self.layout = ctx.initial_params().layout
        return self.layout

    # ---- as origin -----------------------------------------------------------------------------

    def checkpoint(self, ctx: NodeContext, kind: CheckpointKind, round: int, params: Params, *,
                   contributors: Iterable[int] = (), samples: int = 0) -> str | None:
        """Save a local checkpoint of `kind` for `round` in `ctx.store`.

        Returns
        -------
        str or None
            The entry's name; None when checkpoints are disabled.
        """
        if not self.enabled:
            return None
        meta = {"peer": ctx.peer_id, "experiment": self.experiment, "incarnation": ctx.incarnation,
                "virtual_time": ctx.now(), "wall_time": self.wall_clock() if self.wall_clock else None,
                "contributors": sorted(int(c) for c in contributors), "samples": int(samples)}
        return save_checkpoint(ctx.store, kind, round, params, meta, self.config.keep_rounds)

    def newest_valid(self, ctx: NodeContext, layout: Layout) -> tuple[Params | None, dict]:
        """Find the newest local checkpoint of this peer that verifies (tier 1, without logging).

        Returns
        -------
        tuple[Params | None, dict]
            `(params, meta)`, or `(None, {})` when none verifies.
        """
        params, meta, _ = newest_valid_checkpoint(ctx.store, layout, peer=ctx.peer_id, experiment=self.experiment)
        return params, meta

    def replicate(self, ctx: NodeContext, round: int, params: Params) -> tuple[int, ...]:
        """Send `params` to the holders every `replica_every` rounds.

        A holder that acknowledged an earlier replica gets a delta, others a full one. Logs
        `replica_bytes_full` / `replica_bytes_delta` (payload bytes of each replica made).

        Returns
        -------
        tuple[int, ...]
            The holders sent to; empty when disabled, with no replicas configured, off a replica round,
            or when a replica cannot be encoded (logged as `replica_failed`).
        """
        config = self.config
        if not self.enabled or not config.replicas or round % config.replica_every:
            return ()
        holders = self.holders(ctx)
        made: dict[int, tuple[Replica, Params]] = {}  # base round (-1: full) -> one message for every such holder
        for holder in holders:
            base = self._acked.get(holder)
            key = FULL if base is None else base.round
            if key not in made:
                try:
                    made[key] = self._replica(ctx, round, params, base)
                except ReplicaError:  # e.g. values beyond float16's range: no replica this round
                    ctx.log("replica_failed", 1, round=round)
                    return ()
                kind = "full" if key == FULL else "delta"
                ctx.log(f"replica_bytes_{kind}", made[key][0].entry.length, round=round)
            message, rebuilt = made[key]
            ctx.send(holder, message)
            self._sent[holder] = _Sent(round, rebuilt)
        return holders

    def _replica(self, ctx: NodeContext, round: int, params: Params, base: _Sent | None) -> tuple[Replica, Params]:
        config = self.config
        payload, rebuilt = encode_payload(params, None if base is None else base.rebuilt, config.replica_codec,
                                          config.replica_compression)
        entry = ReplicaEntry(round=round, base_round=FULL if base is None else base.round, codec=config.replica_codec,
                             compression=config.replica_compression, fingerprint=params.layout.fingerprint,
                             checksum=checksum(rebuilt), length=len(payload), payload=pack(payload))
        signature = ctx.sign(entry_bytes(self.experiment, ctx.peer_id, entry, payload_digest(payload)))
        entry = replace(entry, signature=signature)
        return Replica(sender=ctx.peer_id, origin=ctx.peer_id, entry=entry), rebuilt

    def _acknowledged(self, ack: ReplicaAck) -> None:
        holder = ack.sender
        sent = self._sent.get(holder)
        if ack.accepted and sent is not None and sent.round == ack.round:
            self._acked[holder] = self._sent.pop(holder)
        elif not ack.accepted and not ack.need_full:
            self._refusing.add(holder)  # it cannot keep us: the next replica goes to another peer
        if ack.need_full or not ack.accepted:
            self._acked.pop(holder, None)

    # ---- as holder -----------------------------------------------------------------------------

    def _chains(self, ctx: NodeContext) -> dict[int, list[_Held]]:
        """Held replicas by origin, read from the store once (they survive a crash, not a wipe)."""
        if self._held is None:
            found: dict[int, list[_Held]] = {}
            for name in ctx.store.names():
                match = _REPLICA_NAME.fullmatch(name)
                try:
                    got = ctx.store.get_bytes(name) if match else None
                except StoreError:
                    got = None
                if got is None:
                    continue
                found.setdefault(int(match[1]), []).append(
                    _Held(int(match[2]), int(got[1].get("base_round", FULL)), len(got[0]), name))
            self._held = {}
            for origin, entries in found.items():
                chain = _linear(entries)
                for orphan in {h.name for h in entries} - {h.name for h in chain}:
                    ctx.store.delete(orphan)  # left by a crash between writing a replica and pruning its old chain
                if chain:
                    self._held[origin] = chain
        return self._held

    def _hold(self, ctx: NodeContext, message: Replica) -> None:
        entry, origin, config = message.entry, message.origin, self.config
        if origin != message.sender or origin == ctx.peer_id or origin not in ctx.peers:
            self.refused += 1
            return
        payload = self._valid_payload(ctx, origin, entry)
        if payload is None:
            self.refused += 1
            ctx.send(origin, ReplicaAck(sender=ctx.peer_id, round=entry.round, accepted=False, need_full=True))
            return
        chains = self._chains(ctx)
        chain = chains.get(origin, [])
        if entry.full:
            kept = []
        else:
            at = next((i for i, h in enumerate(chain) if h.round == entry.base_round), None)
            if at is None:  # we no longer hold its base (wiped, compacted): only a full one helps
                ctx.send(origin, ReplicaAck(sender=ctx.peer_id, round=entry.round, accepted=False, need_full=True))
                return
            kept = chain[:at + 1]
            if not all(h.name in ctx.store for h in kept):  # the store was wiped under us: read it again
                self._held = None
                ctx.send(origin, ReplicaAck(sender=ctx.peer_id, round=entry.round, accepted=False, need_full=True))
                return
        new = kept + [_Held(entry.round, entry.base_round, entry.length, f"{REPLICA_PREFIX}{origin}.{entry.round}")]
        size = sum(h.length for h in new)
        others = sum(h.length for o, c in chains.items() if o != origin for h in c)
        too_big = size > config.replica_quota_mb * _MIB or len(new) - 1 > config.replica_chain
        no_room = others + size > config.replica_total_mb * _MIB or (origin not in chains and len(chains) >= config.replica_origins)
        if too_big or no_room:
            # a delta that does not fit: ask for a full one (it replaces the chain); a full one that does not: refuse
            ctx.send(origin, ReplicaAck(sender=ctx.peer_id, round=entry.round, accepted=False, need_full=not entry.full))
            return
        meta = {"origin": origin, "holder": ctx.peer_id, "experiment": self.experiment, "round": entry.round,
                "base_round": entry.base_round, "codec": entry.codec, "compression": entry.compression,
                "fingerprint": entry.fingerprint, "checksum": entry.checksum, "signature": entry.signature,
                "virtual_time": ctx.now(), "wall_time": self.wall_clock() if self.wall_clock else None}
        ctx.store.put_bytes(new[-1].name, payload, meta)
        names = {h.name for h in new}
        for old in chain:
            if old.name not in names:
                ctx.store.delete(old.name)
        chains[origin] = new
        ctx.send(origin, ReplicaAck(sender=ctx.peer_id, round=entry.round, accepted=True,
                                    need_full=len(new) - 1 >= config.replica_chain))

    def _valid_payload(self, ctx: NodeContext, origin: int, entry: ReplicaEntry) -> bytes | None:
        """The payload bytes if the entry fits this experiment's layout and its origin signed it, else None."""
        layout = self._layout(ctx)
        if (entry.codec not in VALUE_CODECS or entry.compression not in COMPRESSIONS
                or entry.fingerprint != layout.fingerprint or entry.round < 0 or not FULL <= entry.base_round < entry.round
                or not 0 < entry.length <= max_payload_bytes(layout.numel, entry.codec)
                or len(entry.payload) != packed_count(entry.length)):
            return None
        try:
            payload = unpack(entry.payload, entry.length)
        except ReplicaError:
            return None
        if not ctx.verify(origin, entry_bytes(self.experiment, origin, entry, payload_digest(payload)), entry.signature):
            return None
        return payload

    def _chain_for(self, ctx: NodeContext, request: ReplicaFetch) -> tuple[ReplicaEntry, ...]:
        """The sender's own chain up to its newest round <= max_round, if that round is >= min_round."""
        chain = [h for h in self._chains(ctx).get(request.sender, []) if h.round <= request.max_round]
        if not chain or chain[-1].round < request.min_round:
            return ()
        entries = []
        for held in chain:
            got = ctx.store.get_bytes(held.name)
            if got is None:
                return ()
            payload, meta = got
            entries.append(ReplicaEntry(round=held.round, base_round=held.base_round, codec=meta["codec"],
                                        compression=meta["compression"], fingerprint=meta["fingerprint"],
                                        checksum=meta["checksum"], length=len(payload), payload=pack(payload),
                                        signature=meta["signature"]))
        return tuple(entries)

    # ---- recovery ------------------------------------------------------------------------------

    async def recover(self, ctx: NodeContext, layout: Layout, *, current_round: int | None = None) -> RecoveryResult:
        """Find this peer's newest trustworthy model after a restart; logs `recovery_tier` (1, 2 or 3).

        Tier 1: the newest local checkpoint whose checksum verifies (round, then kind order). Tier 2:
        replicas from peers (live neighbours first, then the others, `fetch_parallel` at a time, until
        `replicas` holders answered with one or everyone was asked), each entry's signature and every
        rebuilt model's checksum verified; the newest round wins, and it must be within `recovery_window`
        of `current_round` when that is given. Tier 3: nothing found (`params` None).
        Runs before the algorithm pumps its inbox: replies come through `ctx.request`; this module's
        other messages queued meanwhile are handled between waves, the algorithm's stay queued.

        Parameters
        ----------
        ctx : NodeContext
            The restarted peer's context.
        layout : Layout
            The model's layout.
        current_round : int, optional
            The network's current round, when the caller knows it (bounds tier 2's rounds).

        Returns
        -------
        RecoveryResult
            The tier and, for tiers 1 and 2, the model. Tier 3 at once when disabled.
        """
        if not self.enabled:
            return RecoveryResult(tier=3)
        self.layout = layout
        params, meta, skipped = newest_valid_checkpoint(ctx.store, layout, peer=ctx.peer_id, experiment=self.experiment)
        if skipped:
            ctx.log("checkpoints_skipped", skipped)
        if params is not None:
            ctx.log("recovery_tier", 1, round=meta["round"])
            return RecoveryResult(tier=1, round=meta["round"], params=params, meta=meta)
        low = 0 if current_round is None else max(0, current_round - self.config.recovery_window)
        high = 2**62 if current_round is None else current_round
        found = await self._fetch(ctx, layout, low, high) if self.config.replicas else None
        if found is not None:
            round, params, entry, source = found
            ctx.log("recovery_tier", 2, round=round)
            return RecoveryResult(tier=2, round=round, params=params, source=source,
                                  meta={"round": round, "checksum": entry.checksum, "codec": entry.codec,
                                        "holder": source, "fingerprint": entry.fingerprint})
        ctx.log("recovery_tier", 3)
        return RecoveryResult(tier=3)

    async def _fetch(self, ctx: NodeContext, layout: Layout, low: int, high: int,
                     ) -> tuple[int, Params, ReplicaEntry, int] | None:
        alive = [p for p in ctx.peers if p != ctx.peer_id and ctx.is_alive(p)]
        neighbours = [p for p in alive if p in ctx.neighbours]
        rest = [p for p in alive if p not in ctx.neighbours]
        waves = [neighbours] + [rest[i:i + self.config.fetch_parallel] for i in range(0, len(rest), self.config.fetch_parallel)]
        best: tuple[int, Params, ReplicaEntry, int] | None = None
        answered = 0
        for wave in waves:
            if not wave:
                continue
            await self._serve_queued(ctx)
            replies = await asyncio.gather(*(ctx.request(p, ReplicaFetch(sender=ctx.peer_id, min_round=low, max_round=high),
                                                         self.config.fetch_timeout_s) for p in wave))
            for holder, reply in zip(wave, replies, strict=True):
                if not isinstance(reply, ReplicaChain) or not reply.entries:
                    continue
                rebuilt = self.rebuild(ctx, layout, reply.entries, low, high)
                if rebuilt is None:
                    continue
                answered += 1
                if best is None or rebuilt[0] > best[0]:
                    best = (*rebuilt, holder)
            if answered >= self.config.replicas:
                break
        return best

    async def _serve_queued(self, ctx: NodeContext) -> None:
        """Handle this module's messages already queued (others restarting may be asking us); leave the rest."""
        while (message := await ctx.recv(0, types=MESSAGES)) is not None:
            self.handle(ctx, message)

    def rebuild(self, ctx: NodeContext, layout: Layout, entries: tuple[ReplicaEntry, ...], low: int = 0,
                high: int = 2**62) -> tuple[int, Params, ReplicaEntry] | None:
        """Rebuild a chain (a full replica, then deltas each against the previous round) of this peer's replicas.

        Every entry must carry this peer's signature and rebuild to its checksum; the longest valid prefix
        counts (a later bad entry only costs the rounds after it).

        Returns
        -------
        tuple[int, Params, ReplicaEntry] or None
            `(round, params, last entry)` of the newest valid round in `[low, high]`, or None
            (counted in `refused`).
        """
        limit = max_payload_bytes(layout.numel, "float32") * (self.config.replica_chain + 1)
        if len(entries) > self.config.replica_chain + 1 or sum(e.length for e in entries) > limit:
            self.refused += 1
            return None
        model: Params | None = None
        best = None
        previous = None
        for entry in entries:
            if (entry.fingerprint != layout.fingerprint or entry.codec not in VALUE_CODECS
                    or entry.compression not in COMPRESSIONS or entry.round > high
                    or (previous is None) != entry.full or (previous is not None and entry.base_round != previous.round)):
                break
            try:
                payload = unpack(entry.payload, entry.length)
                if not ctx.verify(ctx.peer_id, entry_bytes(self.experiment, ctx.peer_id, entry, payload_digest(payload)),
                                  entry.signature):
                    break
                model = decode_payload(payload, layout, model, entry.codec, entry.compression)
            except ReplicaError:
                break
            if checksum(model) != entry.checksum:
                break
            previous = entry
            if entry.round >= low:
                best = (entry.round, model, entry)
        if best is None:
            self.refused += 1
        return best


def _linear(entries: list[_Held]) -> list[_Held]:
    """The chain to the newest entry that leads back to a full replica (base by base), full first; [] if none does."""
    by_round = {h.round: h for h in entries}
    for head in sorted(entries, key=lambda h: h.round, reverse=True):
        chain = [head]
        while chain[-1].base_round != FULL and chain[-1].base_round in by_round and len(chain) <= len(entries):
            chain.append(by_round[chain[-1].base_round])
        if chain[-1].base_round == FULL:
            return chain[::-1]
    return []


def _cyclic(peers: Iterable[int], origin: int) -> list[int]:
    """Peers after `origin` in id order, then those before it: spreads holders when distances tie."""
    return sorted((p for p in peers if p != origin), key=lambda p: (p < origin, p))

"""A Kademlia-style distributed hash table on meshfl's own messages, for any algorithm.

Why: Moshpit/MAR-FL peers find their averaging group by key (`group_key -> {peer: metadata}`)
without a coordinator; a DHT gives every peer the same answer with O(log N) messages, and only
small metadata travels through it (models never do).

How (Maymounkov and Mazieres, 2002; the dictionary values of hivemind's DHT):
- Node ids are 160-bit SHA-256 digests of the peer id (`node_id`), keys are hashed the same way from
  their string (`key_id`), so the id space is uniform and no peer can choose where it sits: the peer
  id itself is authenticated by the runtime's door. Distance is XOR.
- `RoutingTable`: bucket i holds up to k contacts at distance [2^i, 2^(i+1)), least recently seen
  first. A peer learns a contact from every request it serves and every reply it gets; a full bucket
  keeps its old live contacts (Kademlia's preference: they have proven to stay) and puts the newcomer
  in a bounded replacement cache; a contact that fails to answer, or that the failure detector
  believes dead, is dropped and the newest replacement takes its place.
- Iterative lookup (`Dht.lookup`): in rounds, ask the `alpha` closest not-yet-asked peers of the
  shortlist for their k closest to the target; when a round brings nothing closer, ask all k
  closest not yet asked at once. It ends when the k closest known peers have all answered (this
  peer counts as one of them when it is close enough); the result is those k, so a store reaches
  exactly the peers a get will ask. Each lookup records its rounds and referral hops (`LookupStats`).
- Values are dictionaries: `store(key, value)` writes this peer's entry under `key` (the subkey is
  the writer's peer id, so no peer can overwrite another's entry), `get(key)` returns
  `{writer: value}` merged from the k closest peers. Each record carries an expiration and the
  writer's Ed25519 signature over (key, writer, value, expiration); holders verify it before
  storing and readers verify it again, so a forged or altered record is refused everywhere.
- Expiry uses `ctx.now()`: records past their expiration are dropped on read and pruned from
  storage. Every table is bounded (records per node, writers per key, key and value length,
  contacts per bucket and replacements), and nothing received is trusted beyond those bounds.

Time caveat: in the simulator every peer shares the virtual clock. Over gRPC `ctx.now()` is the
seconds since each process started, so expirations written by one peer are read on another's clock:
they are off by the difference of their start times (a restarted writer's records look older than
they are). Holders cap every record at `max_ttl_s` of their own clock, so a skewed clock can never
keep a record forever. A shared wall clock in `NodeContext` would remove the caveat.

Usage (one `Dht` per incarnation; its messages are registered at import as `meshfl.dht.<Class>`):

    dht = Dht(ctx, section.dht)
    server = asyncio.create_task(dht.serve())      # or call dht.handle(message) from your own pump
    await dht.bootstrap()                          # lookup of own id through known peers
    await dht.store("group/3", json.dumps({...}))
    members = await dht.get("group/3")             # {peer id: value}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from pydantic import Field

from meshfl.core.context import NodeContext
from meshfl.core.messages import Message, Reply, Request, register_message
from meshfl.core.section import Section

ID_BITS = 160
"""Bits of a node id or key id (the length of Kademlia's SHA-1 ids; taken from SHA-256 here)."""
ID_HEX = ID_BITS // 4
MAX_EXCLUDED = 2
"""A request's `exclude` counts at most this many times k peers (the rest is ignored)."""


class DhtConfig(Section):
    k: int = Field(20, ge=1, le=256, description="bucket size and replication: a lookup returns the k closest peers, a value is stored on them")
    alpha: int = Field(3, ge=1, le=64, description="lookup parallelism: peers asked at once in each round of a lookup")
    request_timeout_s: float = Field(2.0, gt=0, description="how long a lookup waits for one peer's answer before it counts as failed")
    max_rounds: int = Field(64, ge=1, description="a lookup stops after this many rounds of requests, whatever it has (a safety bound)")
    ttl_s: float = Field(60.0, gt=0, description="default lifetime of a stored value, seconds of ctx.now()")
    max_ttl_s: float = Field(3600.0, gt=0, description="a holder keeps no record longer than this from when it got it, whatever its expiration says")
    bootstrap: list[int] = Field(default_factory=list, description="peers a new peer first asks; empty: the lowest peer id believed alive (not itself)")
    refresh_on_join: bool = Field(True, description="after the lookup of its own id, look up a random id in every bucket that is not full yet (Kademlia's join)")
    max_records: int = Field(10_000, ge=1, description="records (one per key and writer) a peer holds for others at most; more are refused")
    max_writers: int = Field(256, ge=1, description="writers (subkeys) one key holds at most; a new writer beyond that is refused")
    max_key_chars: int = Field(256, ge=1, description="longest key accepted")
    max_value_chars: int = Field(1024, ge=0, description="longest value accepted (metadata only: JSON text, ids)")


# ---- ids and distance ---------------------------------------------------------------------

@lru_cache(maxsize=1 << 16)
def node_id(peer: int) -> int:
    """The 160-bit id of `peer`: SHA-256 of its id, so ids are uniform and nobody picks theirs."""
    return int.from_bytes(hashlib.sha256(b"meshfl.dht.peer\0" + str(peer).encode()).digest()[:ID_BITS // 8], "big")


@lru_cache(maxsize=1 << 12)
def key_id(key: str) -> int:
    """The 160-bit id a key is stored under (SHA-256 of its UTF-8 text)."""
    return int.from_bytes(hashlib.sha256(b"meshfl.dht.key\0" + key.encode("utf-8", "surrogatepass")).digest()[:ID_BITS // 8],
                          "big")


def distance(a: int, b: int) -> int:
    """Kademlia's XOR distance between two ids."""
    return a ^ b


def bucket_index(own: int, other: int) -> int:
    """The bucket of `other` in the table of `own`: i such that 2^i <= own ^ other < 2^(i+1); -1 for itself."""
    return (own ^ other).bit_length() - 1


def closest_peers(target: int, peers: Iterable[int], count: int) -> list[int]:
    """The `count` peers whose node ids are nearest `target` by XOR, nearest first (ties cannot happen: ids differ)."""
    return sorted(peers, key=lambda p: node_id(p) ^ target)[:count]


def id_hex(ident: int) -> str:
    """An id as it travels (the wire's integers are 64-bit): 40 lowercase hex digits."""
    return f"{ident:0{ID_HEX}x}"


def parse_id_hex(text: str) -> int | None:
    """The id written by `id_hex`, or None for anything else."""
    if len(text) != ID_HEX or any(c not in "0123456789abcdef" for c in text):
        return None
    return int(text, 16)


# ---- messages -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DhtRecord:
    """One entry of a key's dictionary: `writer`'s value until `expiration`, signed by the writer.

    The signature covers (key, writer, value, expiration) (`record_bytes`); the key is the message's.
    """

    writer: int
    value: str
    expiration: float
    signature: str = ""


@dataclass(frozen=True, kw_only=True)
class FindNode(Request):
    """Ask for the peers the receiver knows nearest `target` (an id as 40 hex digits), leaving out `exclude`.

    `exclude`: peers the asker found dead in this lookup (they may still look alive to the receiver).
    """

    target: str
    exclude: frozenset[int] = frozenset()


@dataclass(frozen=True, kw_only=True)
class FoundNodes(Reply):
    """Up to k peers nearest the target, nearest first."""

    peers: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class FindValue(Request):
    """Ask for the records held under `key`, and the peers nearest its id (leaving out `exclude`, as `FindNode`)."""

    key: str
    exclude: frozenset[int] = frozenset()


@dataclass(frozen=True, kw_only=True)
class FoundValue(Reply):
    """The live records held under the key (by writer) and up to k peers nearest its id."""

    records: tuple[DhtRecord, ...]
    peers: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class StoreValue(Request):
    """Keep these signed records under `key`."""

    key: str
    records: tuple[DhtRecord, ...]


@dataclass(frozen=True, kw_only=True)
class StoredValue(Reply):
    """How many of the records were kept."""

    accepted: int


MESSAGES: tuple[type[Message], ...] = (FindNode, FoundNodes, FindValue, FoundValue, StoreValue, StoredValue)
SERVED: tuple[type[Message], ...] = (FindNode, FindValue, StoreValue)
"""The requests `Dht.handle` answers."""

for _cls in MESSAGES:
    register_message(_cls, f"meshfl.dht.{_cls.__name__}")


def record_bytes(key: str, writer: int, value: str, expiration: float) -> bytes:
    """What a writer signs: unambiguous JSON of (key, writer, value, exact expiration)."""
    return b"meshfl.dht.record\0" + json.dumps([key, writer, value, float(expiration).hex()], separators=(",", ":")).encode()


# ---- routing table --------------------------------------------------------------------------

class RoutingTable:
    """k-buckets of contacts by XOR distance from `own` (a peer id), least recently seen first.

    Bounded: at most k contacts and k replacements per bucket, ID_BITS buckets.
    """

    def __init__(self, own: int, k: int) -> None:
        self.own = own
        self.own_id = node_id(own)
        self.k = k
        self._buckets: dict[int, list[int]] = {}
        self._replacements: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def __contains__(self, peer: int) -> bool:
        return peer in self._buckets.get(bucket_index(self.own_id, node_id(peer)), ())

    def contacts(self) -> list[int]:
        """Every contact, sorted by id."""
        return sorted(p for b in self._buckets.values() for p in b)

    def bucket(self, index: int) -> list[int]:
        """The contacts of bucket `index`, least recently seen first (a copy)."""
        return list(self._buckets.get(index, ()))

    def bucket_indices(self) -> list[int]:
        """Indices of the non-empty buckets, ascending."""
        return sorted(i for i, b in self._buckets.items() if b)

    def touch(self, peer: int, alive: Callable[[int], bool]) -> bool:
        """`peer` was heard from: make it the most recent of its bucket; True if it is in the table now.

        A full bucket evicts its least recently seen contact only if `alive` says it is dead; otherwise
        the newcomer waits in the bucket's replacement cache (the newest k kept).
        """
        if peer == self.own:
            return False
        index = bucket_index(self.own_id, node_id(peer))
        bucket = self._buckets.setdefault(index, [])
        if peer in bucket:
            bucket.remove(peer)
            bucket.append(peer)
            return True
        if len(bucket) >= self.k:
            stale = next((p for p in bucket if not alive(p)), None)
            if stale is None:
                cache = self._replacements.setdefault(index, [])
                if peer in cache:
                    cache.remove(peer)
                cache.append(peer)
                del cache[:-self.k]
                return False
            bucket.remove(stale)
        bucket.append(peer)
        return True

    def remove(self, peer: int, alive: Callable[[int], bool]) -> None:
        """`peer` failed (no answer, or believed dead): drop it, promote the newest live replacement."""
        index = bucket_index(self.own_id, node_id(peer))
        cache = self._replacements.get(index, [])
        if peer in cache:
            cache.remove(peer)
        bucket = self._buckets.get(index)
        if not bucket or peer not in bucket:
            return
        bucket.remove(peer)
        while cache:
            candidate = cache.pop()
            if alive(candidate):
                bucket.append(candidate)
                return

    def closest(self, target: int, count: int, exclude: int | None = None) -> list[int]:
        """Up to `count` contacts nearest `target`, nearest first (`exclude`: a peer to leave out)."""
        return closest_peers(target, (p for b in self._buckets.values() for p in b if p != exclude), count)


# ---- local storage --------------------------------------------------------------------------

@dataclass
class _Held:
    record: DhtRecord
    deadline: float  # min(expiration, arrival + max_ttl_s) on this peer's clock


class RecordStore:
    """The records a peer holds for others: key -> writer -> record, bounded by the config."""

    def __init__(self, config: DhtConfig) -> None:
        self.config = config
        self._keys: dict[str, dict[int, _Held]] = {}
        self.size = 0

    def put(self, key: str, record: DhtRecord, now: float) -> bool:
        """Keep `record` (already verified) unless it is expired, older than the writer's held one, or over a bound."""
        if record.expiration <= now:
            return False
        writers = self._keys.get(key)
        held = writers.get(record.writer) if writers else None
        if held is not None:
            if held.record.expiration >= record.expiration:
                return held.record == record  # the same record again is fine; an older one is refused
        else:
            if self.size >= self.config.max_records or (writers and len(writers) >= self.config.max_writers):
                self.prune(now)
                writers = self._keys.get(key)
                if self.size >= self.config.max_records or (writers and len(writers) >= self.config.max_writers):
                    return False
            self.size += 1
        deadline = min(record.expiration, now + self.config.max_ttl_s)
        self._keys.setdefault(key, {})[record.writer] = _Held(record, deadline)
        return True

    def get(self, key: str, now: float) -> list[DhtRecord]:
        """The live records of `key` by writer; expired ones are dropped here."""
        writers = self._keys.get(key)
        if not writers:
            return []
        for writer in [w for w, h in writers.items() if h.deadline <= now]:
            del writers[writer]
            self.size -= 1
        if not writers:
            del self._keys[key]
            return []
        return [writers[w].record for w in sorted(writers)]

    def prune(self, now: float) -> int:
        """Drop every expired record; returns how many."""
        before = self.size
        for key in list(self._keys):
            self.get(key, now)
        return before - self.size


# ---- the node -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LookupStats:
    """How one lookup went.

    Attributes
    ----------
    rounds : int
        Sequential rounds of requests (what a lookup costs in latency).
    hops : int
        Referral hops: the longest chain of peers that named, one to the next, a peer of the result.
    asked : int
        Peers asked.
    failed : int
        Peers that did not answer in time (or were believed dead).
    """

    rounds: int
    hops: int
    asked: int
    failed: int


@dataclass
class _Search:
    target: int
    depth: dict[int, int] = field(default_factory=dict)  # known peer -> referral hops from our own table
    asked: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    replies: dict[int, Reply] = field(default_factory=dict)
    asked_with: dict[int, int] = field(default_factory=dict)  # answered peer -> failures excluded when it was last asked


class Dht:
    """One peer's DHT node: answers requests (`serve` or `handle`) and runs lookups, stores and gets.

    Parameters
    ----------
    ctx : NodeContext
        The peer's context; the only door to the world.
    config : DhtConfig
        k, alpha, timeouts, lifetimes and bounds.
    """

    messages = MESSAGES

    def __init__(self, ctx: NodeContext, config: DhtConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.peer = ctx.peer_id
        self.id = node_id(ctx.peer_id)
        self.table = RoutingTable(ctx.peer_id, config.k)
        self.records = RecordStore(config)
        self._known = frozenset(ctx.peers)
        self.last_lookup: LookupStats | None = None
        self.refused = 0  # requests or records refused (malformed, forged, over a bound)

    # -- serving

    async def serve(self) -> None:
        """Answer FindNode, FindValue and StoreValue requests forever (other message types stay queued)."""
        while True:
            message = await self.ctx.recv(None, SERVED)
            if message is not None:
                self.handle(message)

    def handle(self, message: Message) -> bool:
        """Answer `message` if it is a DHT request; False (and nothing done) for any other message."""
        if not isinstance(message, SERVED):
            return False
        self._heard(message.sender)
        if isinstance(message, FindNode):
            target = parse_id_hex(message.target)
            if target is None:
                self.refused += 1
                return True
            self.ctx.reply(message, FoundNodes(sender=self.peer, peers=self._nearest(target, message)))
        elif isinstance(message, FindValue):
            if len(message.key) > self.config.max_key_chars:
                self.refused += 1
                return True
            records = self.records.get(message.key, self.ctx.now())
            self.ctx.reply(message, FoundValue(sender=self.peer, records=tuple(records),
                                               peers=self._nearest(key_id(message.key), message)))
        else:
            self.ctx.reply(message, StoredValue(sender=self.peer, accepted=self._keep(message.key, message.records)))
        return True

    def _nearest(self, target: int, request: FindNode | FindValue) -> tuple[int, ...]:
        """Up to k live contacts nearest `target`, without the asker and the peers it found dead."""
        excluded = set(sorted(request.exclude)[:MAX_EXCLUDED * self.config.k])
        excluded.add(request.sender)
        wanted = self.config.k + len(excluded)
        return tuple(p for p in self.table.closest(target, wanted) if p not in excluded and self.ctx.is_alive(p))[:self.config.k]

    def _keep(self, key: str, records: Sequence[DhtRecord]) -> int:
        if len(key) > self.config.max_key_chars or len(records) > self.config.max_writers:
            self.refused += 1
            return 0
        now, kept = self.ctx.now(), 0
        for record in records:
            if self.valid(key, record, now) and self.records.put(key, record, now):
                kept += 1
            else:
                self.refused += 1
        return kept

    def valid(self, key: str, record: DhtRecord, now: float) -> bool:
        """Whether `record` may be believed: a known writer, a bounded value, not expired, the writer's signature."""
        return (record.writer in self._known and len(record.value) <= self.config.max_value_chars
                and len(key) <= self.config.max_key_chars and record.expiration > now
                and self.ctx.verify(record.writer, record_bytes(key, record.writer, record.value, record.expiration),
                                    record.signature))

    def _heard(self, peer: int) -> None:
        if peer in self._known:
            self.table.touch(peer, self.ctx.is_alive)

    # -- joining

    def default_bootstrap(self) -> list[int]:
        """The configured bootstrap peers, else the lowest peer id believed alive other than this one."""
        if self.config.bootstrap:
            return [p for p in self.config.bootstrap if p != self.peer and p in self._known]
        first = next((p for p in sorted(self._known) if p != self.peer and self.ctx.is_alive(p)), None)
        return [] if first is None else [first]

    async def bootstrap(self, known: Sequence[int] | None = None) -> int:
        """Join: add `known` peers (default `default_bootstrap()`), look up our own id, refresh far buckets.

        Returns
        -------
        int
            Contacts in the routing table afterwards.
        """
        for peer in self.default_bootstrap() if known is None else known:
            if peer != self.peer and peer in self._known:
                self.table.touch(peer, self.ctx.is_alive)
        if len(self.table):
            await self.lookup_id(self.id)
            if self.config.refresh_on_join:
                await self.refresh()
        return len(self.table)

    async def refresh(self) -> None:
        """Look up a random id in every bucket farther than our nearest contact that is not full."""
        indices = self.table.bucket_indices()
        if not indices:
            return
        for index in range(indices[0] + 1, ID_BITS):
            if len(self.table.bucket(index)) < self.config.k:
                await self.lookup_id(self.random_id_in_bucket(index))

    def random_id_in_bucket(self, index: int) -> int:
        """A random id at distance [2^index, 2^(index+1)) from ours (drawn from ctx.rng)."""
        low = int.from_bytes(self.ctx.rng.bytes(ID_BITS // 8), "big") & ((1 << index) - 1)
        return self.id ^ ((1 << index) | low)

    # -- lookups

    async def lookup(self, key: str) -> list[int]:
        """The k live peers nearest `key`'s id (this one included when it is among them), nearest first."""
        return await self.lookup_id(key_id(key))

    async def lookup_id(self, target: int) -> list[int]:
        """The k live peers nearest the id `target`, nearest first; `last_lookup` tells how it went."""
        hexed = id_hex(target)
        search = await self._search(target, lambda exclude: FindNode(sender=self.peer, target=hexed, exclude=exclude))
        return self._result(search)

    async def _search(self, target: int, make: Callable[[frozenset[int]], FindNode | FindValue]) -> _Search:
        """Rounds of requests built by `make(exclude)` until the k closest known live peers have all answered.

        A peer that answered before others of the lookup failed is asked again (with those excluded)
        when the lookup would otherwise end with fewer than k peers: its first answer may have named
        only peers that have since been found dead.
        """
        config, search = self.config, _Search(target)
        search.depth = {p: 0 for p in self.table.closest(target, config.k)}
        search.depth[self.peer] = 0
        search.asked.add(self.peer)
        best, wide, rounds = None, False, 0
        while rounds < config.max_rounds:
            top = self._top(search)
            pending = [p for p in top if p not in search.asked]
            if not pending and len(top) < config.k and search.failed:
                pending = [p for p in top if search.asked_with.get(p, len(search.failed)) < len(search.failed)
                           and len(getattr(search.replies[p], "peers", ())) >= config.k]
                wide = True
            if not pending:
                break
            batch = pending if wide else pending[:config.alpha]
            rounds += 1
            failures = len(search.failed)
            exclude = frozenset(closest_peers(target, search.failed, MAX_EXCLUDED * config.k))
            replies = await asyncio.gather(*(self.ctx.request(p, make(exclude), config.request_timeout_s) for p in batch))
            for peer, reply in zip(batch, replies, strict=True):
                search.asked_with[peer] = failures
                self._absorb(search, peer, reply)
            top = self._top(search)
            wide = bool(top) and top[0] == best  # nothing closer this round: ask all of the k closest next
            best = top[0] if top else None
        result = self._result(search)
        self.last_lookup = LookupStats(rounds=rounds, hops=max((search.depth[p] for p in result), default=0),
                                       asked=len(search.asked) - 1, failed=len(search.failed))
        return search

    def _top(self, search: _Search) -> list[int]:
        live = [p for p in search.depth if p not in search.failed]
        for peer in live:
            if peer != self.peer and peer not in search.asked and not self.ctx.is_alive(peer):
                search.failed.add(peer)  # believed dead: never asked, never returned
                self.table.remove(peer, self.ctx.is_alive)
        return closest_peers(search.target, (p for p in live if p not in search.failed), self.config.k)

    def _absorb(self, search: _Search, peer: int, reply: Reply | None) -> None:
        search.asked.add(peer)
        if reply is None or not isinstance(reply, FoundNodes | FoundValue):
            search.failed.add(peer)
            self.table.remove(peer, self.ctx.is_alive)
            return
        self._heard(peer)
        search.replies[peer] = reply
        for named in reply.peers[:self.config.k]:
            if named in self._known and named not in search.depth:
                search.depth[named] = search.depth[peer] + 1

    def _result(self, search: _Search) -> list[int]:
        return [p for p in self._top(search) if p in search.asked]

    # -- values

    async def store(self, key: str, value: str, ttl: float | None = None) -> int:
        """Write this peer's entry of `key` on the k peers nearest it; returns how many kept it.

        Raises
        ------
        ValueError
            If the key or value is longer than the config allows.
        """
        if len(key) > self.config.max_key_chars or len(value) > self.config.max_value_chars:
            raise ValueError(f"dht: key of {len(key)} or value of {len(value)} characters is over "
                             f"max_key_chars={self.config.max_key_chars} / max_value_chars={self.config.max_value_chars}")
        lifetime = min(self.config.ttl_s if ttl is None else ttl, self.config.max_ttl_s)
        expiration = self.ctx.now() + lifetime
        record = DhtRecord(writer=self.peer, value=value, expiration=expiration,
                           signature=self.ctx.sign(record_bytes(key, self.peer, value, expiration)))
        return await self.put(key, (record,))

    async def put(self, key: str, records: Sequence[DhtRecord]) -> int:
        """Store already signed records (ours or relayed) on the k peers nearest `key`; returns how many peers kept them all."""
        targets = await self.lookup(key)
        others = [p for p in targets if p != self.peer]
        replies = await asyncio.gather(*(self.ctx.request(p, StoreValue(sender=self.peer, key=key, records=tuple(records)),
                                                          self.config.request_timeout_s) for p in others))
        kept = sum(1 for r in replies if isinstance(r, StoredValue) and r.accepted == len(records))
        if self.peer in targets and self._keep(key, records) == len(records):
            kept += 1
        return kept

    async def get_records(self, key: str) -> dict[int, DhtRecord]:
        """The live, correctly signed records of `key` from the k peers nearest it: writer -> newest record."""
        search = await self._search(key_id(key), lambda exclude: FindValue(sender=self.peer, key=key, exclude=exclude))
        now = self.ctx.now()
        found: dict[int, DhtRecord] = {r.writer: r for r in self.records.get(key, now)}
        for peer in sorted(search.replies):
            reply = search.replies[peer]
            if not isinstance(reply, FoundValue):
                continue
            for record in reply.records[:self.config.max_writers]:
                held = found.get(record.writer)
                if (held is None or record.expiration > held.expiration) and self.valid(key, record, now):
                    found[record.writer] = record
                elif held is None:
                    self.refused += 1
        return {w: found[w] for w in sorted(found)}

    async def get(self, key: str) -> dict[int, str]:
        """`key`'s dictionary: writer peer id -> value, live and signed entries only."""
        return {w: r.value for w, r in (await self.get_records(key)).items()}

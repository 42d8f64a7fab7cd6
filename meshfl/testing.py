"""`FakeContext`: a whole `NodeContext` with no runtime, for unit tests of an algorithm's phases.

A simulation tests a protocol end to end but cannot say *why* a peer waited 30 s or which
message it answered. A fake context lets a test script one peer's world instead: the
messages it will receive and when (`deliver`), which peers its failure detector believes
dead from when (`kill`, `revive`), what a request gets back (`replies`), and then assert on
what the peer sent (`sent`), logged (`logged`), trained and evaluated, and on the fake clock.

Time is a number, not a timer: a wait jumps the clock straight to the next due message or
to the end of its timeout, so an algorithm runs under plain `asyncio.run` in microseconds
whatever its timeouts. One fake context serves one coroutine (the peer under test): two
tasks waiting on it would each jump the same clock.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from meshfl.core.context import TrainResult
from meshfl.core.messages import Message, PeerLiveness, Reply, Request
from meshfl.core.metrics import GLOBAL_ACCURACY, GLOBAL_LOSS, LOCAL_ACCURACY, LOCAL_LOSS
from meshfl.core.params import Layout, Params
from meshfl.core.seeds import algorithm_rng
from meshfl.core.store import MemoryStore
from meshfl.runtime.keys import DerivedKeyring, derived_key

DEFAULT_LAYOUT = Layout(("w", "b"), ((2, 2), (2,)))
"""Six numbers: big enough to tell models apart, small enough to write out in a test."""

DEFAULT_METRICS = {LOCAL_ACCURACY: 0.5, LOCAL_LOSS: 1.0, GLOBAL_ACCURACY: 0.5, GLOBAL_LOSS: 1.0}


class FakeStalled(RuntimeError):
    """`recv(timeout=None)` with nothing scripted that could ever arrive: a real peer would hang."""


class Logged(NamedTuple):
    """One `log` call recorded by `FakeContext`: metric, value, round and the peer it is `about`."""

    metric: str
    value: float
    round: int | None
    about: int | None = None


@dataclass(frozen=True)
class _Scripted:
    at: float
    seq: int  # ties at one time keep the order the test scripted them in
    message: Message


Responder = Callable[["FakeContext", int, Message], None]
"""Called after each `send(to, message)`: plays the other peers, e.g. `ctx.deliver(ack, at=ctx.now() + 0.01)`."""


class FakeContext:
    """One peer's scripted world; implements every member of `NodeContext`.

    Scripted inputs: `deliver(message, at)`, `kill(peer, at)` / `revive(peer, at)`,
    `replies[(peer, RequestType)]` (a Reply, a function of the request, or None for a
    timeout; a missing key is a timeout too), `respond` (a `Responder`), `train_fn`,
    `metrics`. Recorded outputs: `sent` [(to, message)], `logged` [(metric, value, round)],
    `trained` [params given to train], `evaluated` [params given to evaluate], `slept`.

    Parameters
    ----------
    peer_id : int, default 0
        The peer under test; must be one of `peers`.
    peers : int or iterable of int, default 4
        The experiment's peers: `range(peers)` for an int, else the ids given.
    neighbours : iterable of int, optional
        The overlay; default every other peer.
    incarnation : int, default 0
        What `incarnation` reports; with `seed` and `peer_id` it seeds `rng` as the runtimes do.
    seed : int, default 0
        The run seed: `rng` and the signing keys derive from it.
    num_samples : int, default 100
        What `num_samples` reports, and the samples of a `TrainResult`.
    params : Params, optional
        What `initial_params` returns (a clone); default zeros of `DEFAULT_LAYOUT`.
    label_counts : iterable of int, optional
        What `label_counts` reports; default all `num_samples` in one class.
    train_delta, train_loss, train_time_s, train_fn
        What `train` does (see `train`).
    metrics : dict[str, float], optional
        What `evaluate` returns; default `DEFAULT_METRICS`.
    evaluate_time_s : float, default 0.0
        How far `evaluate` moves the clock.
    reply_delay_s : float, default 0.0
        How long a scripted reply to `request` takes.
    respond : Responder, optional
        Called after each `send`, to play the other peers.
    start : float, default 0.0
        The clock's starting time.

    Raises
    ------
    ValueError
        If `peer_id` is not among `peers`.
    """

    def __init__(self, peer_id: int = 0, peers: int | Iterable[int] = 4, neighbours: Iterable[int] | None = None, *,
                 incarnation: int = 0, seed: int = 0, num_samples: int = 100, params: Params | None = None,
                 label_counts: Iterable[int] | None = None,
                 train_delta: float = 1.0, train_loss: float = 0.5, train_time_s: float = 0.0,
                 train_fn: Callable[[Params], Params | TrainResult] | None = None,
                 metrics: dict[str, float] | None = None, evaluate_time_s: float = 0.0,
                 reply_delay_s: float = 0.0, respond: Responder | None = None, start: float = 0.0) -> None:
        self._peer_id = peer_id
        self._peers = tuple(range(peers)) if isinstance(peers, int) else tuple(sorted(peers))
        if peer_id not in self._peers:
            raise ValueError(f"FakeContext: peer_id {peer_id} is not among peers {self._peers}")
        others = tuple(p for p in self._peers if p != peer_id)
        self._neighbours = others if neighbours is None else tuple(sorted(neighbours))
        self._incarnation = incarnation
        self._num_samples = num_samples
        self._label_counts = tuple(label_counts) if label_counts is not None else (num_samples,)
        self._rng = algorithm_rng(seed, peer_id, incarnation)  # what the runtimes give this peer
        self.keyring = DerivedKeyring(seed, max(self._peers) + 1)  # signatures as a simulated run makes them
        self._signing_key = derived_key(seed, peer_id)
        self._store = MemoryStore()
        self._params = params if params is not None else Params(torch.zeros(DEFAULT_LAYOUT.numel), DEFAULT_LAYOUT)
        self.train_delta = train_delta
        self.train_loss = train_loss
        self.train_time_s = train_time_s
        self.train_fn = train_fn
        self.metrics = dict(DEFAULT_METRICS if metrics is None else metrics)
        self.evaluate_time_s = evaluate_time_s
        self.reply_delay_s = reply_delay_s
        self.respond = respond
        self.replies: dict[tuple[int, type[Request]], Reply | Callable[[Request], Reply | None] | None] = {}
        self._now = start
        self._inbox: list[_Scripted] = []
        self._seq = itertools.count()
        self._request_ids = itertools.count(1)
        self._liveness: dict[int, list[tuple[float, bool]]] = {}  # peer -> sorted (time, alive) changes
        self.sent: list[tuple[int, Message]] = []
        self.logged: list[Logged] = []
        self.trained: list[Params] = []
        self.evaluated: list[Params] = []
        self.slept: list[float] = []

    # -- scripting -------------------------------------------------------------------------

    def deliver(self, message: Message, at: float | None = None) -> None:
        """Script `message` to arrive at time `at` (default: now)."""
        entry = _Scripted(self._now if at is None else at, next(self._seq), message)
        bisect.insort(self._inbox, entry, key=lambda e: (e.at, e.seq))

    def kill(self, peer: int, at: float | None = None) -> None:
        """Script `peer` dead from `at` on (default: now); a `PeerLiveness` notice arrives at `at`.

        Raises
        ------
        ValueError
            If `peer` is not another peer of the experiment.
        """
        self._set_liveness(peer, False, at)

    def revive(self, peer: int, at: float | None = None) -> None:
        """Script `peer` alive again from `at` on (default: now); a `PeerLiveness` notice arrives at `at`.

        Raises
        ------
        ValueError
            If `peer` is not another peer of the experiment.
        """
        self._set_liveness(peer, True, at)

    def _set_liveness(self, peer: int, alive: bool, at: float | None) -> None:
        if peer not in self._peers or peer == self._peer_id:
            raise ValueError(f"FakeContext: cannot script the liveness of peer {peer}")
        at = self._now if at is None else at
        changes = self._liveness.setdefault(peer, [])
        bisect.insort(changes, (at, alive), key=lambda c: c[0])
        self.deliver(PeerLiveness(sender=self._peer_id, peer=peer, alive=alive), at=at)

    @property
    def alive(self) -> frozenset[int]:
        """Peers the detector believes alive now (this peer included)."""
        return frozenset(p for p in self._peers if p == self._peer_id or self.is_alive(p))

    @property
    def pending(self) -> list[tuple[float, Message]]:
        """Scripted messages not received yet, with their arrival times."""
        return [(e.at, e.message) for e in self._inbox]

    def sent_of(self, kind: type[Message] | tuple[type[Message], ...]) -> list[tuple[int, Message]]:
        """Filter `sent` to the messages of `kind`."""
        return [(to, m) for to, m in self.sent if isinstance(m, kind)]

    def logs(self, metric: str) -> list[tuple[float, int | None]]:
        """List `(value, round)` of every `log(metric, ...)`, in order."""
        return [(e.value, e.round) for e in self.logged if e.metric == metric]

    # -- NodeContext: identity ---------------------------------------------------------------

    @property
    def peer_id(self) -> int:
        """The peer under test."""
        return self._peer_id

    @property
    def incarnation(self) -> int:
        """The `incarnation` given."""
        return self._incarnation

    @property
    def peers(self) -> tuple[int, ...]:
        """Every peer id, sorted."""
        return self._peers

    @property
    def neighbours(self) -> tuple[int, ...]:
        """The overlay neighbours, sorted."""
        return self._neighbours

    @property
    def rng(self) -> np.random.Generator:
        """The generator the runtimes would give this peer (from seed, peer id and incarnation)."""
        return self._rng

    @property
    def num_samples(self) -> int:
        """The `num_samples` given."""
        return self._num_samples

    @property
    def label_counts(self) -> tuple[int, ...]:
        """The `label_counts` given (default: every sample in one class)."""
        return self._label_counts

    @property
    def store(self) -> MemoryStore:
        """A `MemoryStore`, empty at first."""
        return self._store

    # -- NodeContext: time and messages -----------------------------------------------------------

    def now(self) -> float:
        """The fake clock."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Record `seconds` in `slept` and move the clock on by them (at once)."""
        self.slept.append(seconds)
        self._now += max(seconds, 0.0)

    def is_alive(self, peer: int) -> bool:
        """Whether `peer` is alive now as scripted by `kill` / `revive` (alive unless scripted otherwise)."""
        alive = True
        for at, state in self._liveness.get(peer, ()):
            if at > self._now:
                break
            alive = state
        return alive

    def send(self, to: int, message: Message) -> None:
        """Record the message (checked as the runtimes check it), then let `respond` play the receiver.

        Raises
        ------
        ValueError
            If `to` is not in the experiment or is this peer.
        """
        if to not in self._peers:
            raise ValueError(f"peer {self._peer_id} sent {type(message).__name__} to peer {to}, which is not in the experiment")
        if to == self._peer_id:
            raise ValueError(f"peer {self._peer_id} sent {type(message).__name__} to itself")
        self.sent.append((to, message))
        if self.respond is not None:
            self.respond(self, to, message)

    async def recv(self, timeout: float | None = None, types: tuple[type, ...] | None = None) -> Message | None:
        """The earliest scripted message of `types` due within `timeout` (the clock jumps to it), else None.

        A message due exactly at the end of the timeout is received. Messages due later, or of
        other types, stay queued.

        Raises
        ------
        FakeStalled
            If `timeout` is None and nothing scripted could arrive (a real peer would hang).
        """
        horizon = None if timeout is None else self._now + max(timeout, 0.0)
        for i, entry in enumerate(self._inbox):
            if horizon is not None and entry.at > horizon:
                break
            if types is None or isinstance(entry.message, types):
                del self._inbox[i]
                self._now = max(self._now, entry.at)
                return entry.message
        if horizon is None:
            raise FakeStalled(f"peer {self._peer_id} waits forever at t={self._now} for "
                              f"{'any message' if types is None else [t.__name__ for t in types]}: nothing scripted")
        self._now = horizon
        return None

    async def request(self, to: int, message: Request, timeout: float) -> Reply | None:
        """Send `message` and give the scripted reply to `(to, type of message)` after `reply_delay_s`.

        Returns None after `timeout` when nothing is scripted, the script gives None, or
        `reply_delay_s` exceeds `timeout`.

        Raises
        ------
        TypeError
            If `message` is not a Request.
        """
        if not isinstance(message, Request):
            raise TypeError(f"ctx.request needs a Request, got {type(message).__name__}")
        request = replace(message, request_id=next(self._request_ids))
        self.send(to, request)
        scripted = self.replies.get((to, type(message)))
        reply = scripted(request) if callable(scripted) else scripted
        if reply is None or self.reply_delay_s > timeout:
            self._now += timeout
            return None
        self._now += self.reply_delay_s
        return replace(reply, in_reply_to=request.request_id)

    def reply(self, request: Request, message: Reply) -> None:
        """Send `message` to the request's sender, with `in_reply_to` set."""
        self.send(request.sender, replace(message, in_reply_to=request.request_id))

    # -- NodeContext: signatures -----------------------------------------------------------------

    def sign(self, data: bytes) -> str:
        """Sign `data` as this peer, as a simulated run with this seed would (hex)."""
        return self._signing_key.sign(data).hex()

    def sign_as(self, peer: int, data: bytes) -> str:
        """Sign `data` as another peer of this fake world (to script what it would send)."""
        return derived_key(self.keyring.seed, peer).sign(data).hex()

    def verify(self, peer: int, data: bytes, signature: str) -> bool:
        """Whether `signature` is `peer`'s signature of `data` under this seed's keys."""
        return self.keyring.verify(peer, data, signature)

    # -- NodeContext: compute -------------------------------------------------------------------

    def initial_params(self) -> Params:
        """A clone of the `params` given."""
        return self._params.clone()

    async def train(self, params: Params, *, epochs: int | None = None, steps: int | None = None) -> TrainResult:
        """Record `params` in `trained` and train: `train_fn(params)` if given, else params + `train_delta`.

        The clock moves on by `train_time_s`. A `TrainResult` from `train_fn` is returned as is;
        otherwise the result has `num_samples` samples, `steps` steps (default 1) and `train_loss`.
        """
        self.trained.append(params)
        self._now += self.train_time_s
        if self.train_fn is not None:
            out = self.train_fn(params)
            if isinstance(out, TrainResult):
                return out
        else:
            out = Params(params.flat + self.train_delta, params.layout)
        return TrainResult(params=out, samples=self._num_samples, steps=steps if steps is not None else 1,
                           loss=self.train_loss)

    async def evaluate(self, params: Params) -> dict[str, float]:
        """Record `params` in `evaluated`, move the clock by `evaluate_time_s` and return a copy of `metrics`."""
        self.evaluated.append(params)
        self._now += self.evaluate_time_s
        return dict(self.metrics)

    def log(self, metric: str, value: float, *, round: int | None = None, about: int | None = None) -> None:
        """Record the event in `logged`."""
        self.logged.append(Logged(metric, value, round, about))


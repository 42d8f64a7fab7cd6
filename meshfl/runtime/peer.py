"""What both runtimes share: a peer's world, its inbox, and the NodeContext built on them.

`build_worlds` derives every peer's data split, the learner and the seeds from the config
exactly once, the same way in both runtimes, so a real peer process trains on what its
simulated twin trains on. `PeerContext` implements everything of `NodeContext` that does
not depend on how time passes or bytes move; a runtime subclasses it and supplies
`now`, `sleep`, `_transmit`, `_compute` (run training or evaluation), `is_alive` and
`_record` (where events go).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from meshfl.config import ExperimentConfig
from meshfl.core.context import TrainResult
from meshfl.core.messages import Message, Reply, Request
from meshfl.core.metrics import GLOBAL_ACCURACY, GLOBAL_LOSS, GLOBAL_METRIC, LOCAL_ACCURACY, LOCAL_LOSS, LOCAL_METRIC
from meshfl.core.params import Params
from meshfl.core.seeds import algorithm_rng, batch_generator, byzantine_generator, initial_model_seed
from meshfl.core.store import Store
from meshfl.data import Dataset, PeerData, load_dataset, partition_stats, split_for_peers
from meshfl.faults import Byzantine
from meshfl.learn.adapters import make_learner
from meshfl.learn.learner import Evaluation, Learner
from meshfl.runtime.keys import Keyring, Signer, keys_for
from meshfl.wire.envelope import encoded_size

GLOBAL_EVALUATIONS_KEPT = 64
BUFFERS_ENTRY = "meshfl.buffers"
"""`ctx.store` entry of a peer's own batch-norm buffers (`train.buffers: local`): survives a crash and a
restart as the store does, not a wipe (then the peer starts again from the initial model's buffers)."""


@dataclass
class Worlds:
    """The data every peer of a run derives from (config, seed): splits, global test set, learner."""

    peer_data: list[PeerData]
    global_test: Dataset
    learner: Learner
    partition: list[dict]
    keyring: Keyring | None = None
    """Every peer's public key, loaded or derived on first use (see runtime/keys.py)."""
    signers: dict[int, Signer] = field(default_factory=dict)
    """Private keys of the peers this process runs (one over gRPC, every peer in the simulator)."""

    def signer(self, config: ExperimentConfig, peer: int) -> Signer:
        if peer not in self.signers:
            self.signers[peer], self.keyring = keys_for(config, peer, self.keyring)
        return self.signers[peer]

    def keys(self, config: ExperimentConfig, peer: int) -> Keyring:
        if self.keyring is None:
            self.signer(config, peer)
        assert self.keyring is not None
        return self.keyring

    global_evaluations: collections.OrderedDict[str, Evaluation] = field(default_factory=collections.OrderedDict)

    def knows_global(self, params: Params) -> bool:
        return params.digest in self.global_evaluations

    def remember_global(self, params: Params, evaluation: Evaluation) -> None:
        """An evaluation of `params` on the global test set made elsewhere (the simulator's batched evaluation)."""
        self.global_evaluations[params.digest] = evaluation
        self.global_evaluations.move_to_end(params.digest)
        if len(self.global_evaluations) > GLOBAL_EVALUATIONS_KEPT:
            self.global_evaluations.popitem(last=False)

    def evaluate_global(self, params: Params) -> Evaluation:
        """The learner's evaluation of `params` on the global test set, computed once per distinct model.

        Peers that agree on a round's model (every peer of a converged round) share one
        evaluation: the same model gives the same numbers, so only the simulator's wall time changes."""
        if params.flat.device.type != "cpu":  # a digest would copy the model back; the simulator's GPU runs batch this anyway
            return self.learner.evaluate(params, self.global_test)
        key = params.digest  # layout and values, hashed once per Params object (one object reaches every simulated peer)
        found = self.global_evaluations.get(key)
        if found is None:
            found = self.global_evaluations[key] = self.learner.evaluate(params, self.global_test)
            if len(self.global_evaluations) > GLOBAL_EVALUATIONS_KEPT:
                self.global_evaluations.popitem(last=False)
        return found


def build_worlds(config: ExperimentConfig) -> Worlds:
    """Dataset, per-peer split and learner of a run; one function for both runtimes."""
    train, global_test = load_dataset(config.data, config.seed)
    if config.data.test_samples is not None and config.data.test_samples < len(global_test):
        keep = np.random.default_rng([config.seed, 4]).choice(len(global_test), size=config.data.test_samples, replace=False)
        global_test = global_test.subset(np.sort(keep))
    peer_data = split_for_peers(train, config.peers, config.data, config.seed)
    learner = make_learner(config.train, train.feature_shape, train.num_classes)
    return Worlds(peer_data, global_test, learner, partition_stats(peer_data, train.num_classes))


class Inbox:
    """A peer's received messages: bounded, with receive filtered by type.

    A message is refused (`put` returns False; counted in `dropped`) when `limit` messages
    or `limit_bytes` (their encoded sizes) are already waiting, or when its sender already
    holds `sender_share` of `limit_bytes`: a flood can neither grow a peer's memory nor
    crowd out the other senders. The gRPC runtime answers a refusal with RESOURCE_EXHAUSTED,
    so an honest sender backs off and retries (back-pressure). Messages a filtered receive
    skips stay queued in arrival order.
    """

    def __init__(self, limit: int, limit_bytes: int | None = None, sender_share: float = 1.0) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.sender_bytes = None if limit_bytes is None else max(1, int(limit_bytes * sender_share))
        self._queue: collections.deque[Message] = collections.deque()
        self._waiters: list[tuple[tuple[type, ...] | None, asyncio.Future]] = []
        self._bytes = 0
        self._by_sender: collections.Counter[int] = collections.Counter()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, message: Message) -> bool:
        for i, (types, waiter) in enumerate(self._waiters):
            if not waiter.done() and (types is None or isinstance(message, types)):
                del self._waiters[i]
                waiter.set_result(message)
                return True
        size = _size(message) if self.limit_bytes is not None else 0
        if (len(self._queue) >= self.limit
                or (self.limit_bytes is not None and self._queue
                    and (self._bytes + size > self.limit_bytes
                         or self._by_sender[message.sender] + size > (self.sender_bytes or 0)))):
            self.dropped += 1
            return False
        self._queue.append(message)
        self._bytes += size
        self._by_sender[message.sender] += size
        return True

    def _taken(self, message: Message) -> Message:
        if self.limit_bytes is not None:
            size = _size(message)
            self._bytes -= size
            self._by_sender[message.sender] -= size
            if self._by_sender[message.sender] <= 0:
                del self._by_sender[message.sender]  # bounded by the senders holding messages now
        return message

    def take(self, types: tuple[type, ...] | None) -> Message | None:
        if types is None:
            return self._taken(self._queue.popleft()) if self._queue else None
        for i, message in enumerate(self._queue):
            if isinstance(message, types):
                del self._queue[i]
                return self._taken(message)
        return None

    async def get(self, timeout: float | None, types: tuple[type, ...] | None) -> Message | None:
        message = self.take(types)
        if message is not None or (timeout is not None and timeout <= 0):
            return message
        waiter: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (types, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            return _handed_over(waiter)  # a message put in the same instant the timeout fired is not lost
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)


def _size(message: Message) -> int:
    """Encoded size (cached on the message); local notices such as PeerLiveness are never sent: 0."""
    try:
        return encoded_size(message)
    except (KeyError, TypeError, ValueError):
        return 0


class PeerContext:
    """The runtime-independent part of a peer's NodeContext (one object per incarnation)."""

    def __init__(self, config: ExperimentConfig, peer_id: int, incarnation: int, neighbours: tuple[int, ...],
                 worlds: Worlds, store: Store, inbox_limit: int, inbox_bytes: int | None = None,
                 inbox_sender_share: float = 1.0) -> None:
        self.config = config
        self._peer_id = peer_id
        self._incarnation = incarnation
        self._peers = tuple(range(config.peers))
        self._neighbours = neighbours
        self._worlds = worlds
        self._data = worlds.peer_data[peer_id]
        self._store = store
        self._rng = algorithm_rng(config.seed, peer_id, incarnation)
        self._torch_generator = batch_generator(config.seed, peer_id, incarnation)
        self.inbox = Inbox(inbox_limit, inbox_bytes, inbox_sender_share)
        self._request_ids = itertools.count((incarnation << 32) + 1)  # a late reply to an earlier incarnation never matches
        self._pending: dict[tuple[int, int], asyncio.Future] = {}
        self.late_replies = 0
        self.final_params: Params | None = None
        self._byzantine_generator: torch.Generator | None = None  # made on the first lie that draws
        self._flipped: Dataset | None = None  # label_flip: the peer's train split with labels C-1-y
        self._buffers: Params | None = None  # train.buffers=local: this peer's own buffers, read from the store on first use

    # -- identity
    @property
    def peer_id(self) -> int:
        return self._peer_id

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def peers(self) -> tuple[int, ...]:
        return self._peers

    @property
    def neighbours(self) -> tuple[int, ...]:
        return self._neighbours

    @property
    def rng(self) -> np.random.Generator:
        return self._rng

    @property
    def num_samples(self) -> int:
        byzantine = self.byzantine()
        if byzantine is not None and byzantine.behaviour == "inflate_weight":
            return int(byzantine.weight)
        return len(self._data.train)

    @property
    def label_counts(self) -> tuple[int, ...]:
        train = self._data.train
        return tuple(int(c) for c in torch.bincount(train.y, minlength=train.num_classes).tolist())

    @property
    def store(self) -> Store:
        return self._store

    # -- what a runtime supplies
    def now(self) -> float:
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def _transmit(self, to: int, message: Message) -> None:
        raise NotImplementedError

    async def _compute(self, fn: Callable[..., Any], *args: Any, cost: Callable[[Any], float] | None = None) -> Any:
        """Run `fn(*args)` (training, evaluation); the simulator then charges `cost(result)` / speed virtual seconds."""
        raise NotImplementedError

    def is_alive(self, peer: int) -> bool:
        raise NotImplementedError

    def _record(self, event: str, **fields: Any) -> None:
        raise NotImplementedError

    def byzantine(self) -> Byzantine | None:
        """The Byzantine behaviour a fault has switched on for this peer now (None: honest).

        Lives in the runtime's fault state (it outlasts an incarnation, like a straggler's speed);
        read by `train` and `num_samples` only, never by the algorithm."""
        return None

    # -- messages
    def send(self, to: int, message: Message) -> None:
        if not 0 <= to < len(self._peers):
            raise ValueError(f"peer {self._peer_id} sent {type(message).__name__} to peer {to}, which is not in the experiment")
        if to == self._peer_id:
            raise ValueError(f"peer {self._peer_id} sent {type(message).__name__} to itself")
        self._transmit(to, message)

    def deliver(self, message: Message) -> bool:
        """A message admitted for this peer: a pending request's reply, or the inbox; False when the inbox refused it."""
        if isinstance(message, Reply):
            waiter = self._pending.pop((message.sender, message.in_reply_to), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
            else:
                self.late_replies += 1  # its request timed out (or was never made): nobody waits for it
            return True
        return self.inbox.put(message)

    async def recv(self, timeout: float | None = None, types: tuple[type, ...] | None = None) -> Message | None:
        return await self.inbox.get(timeout, types)

    async def request(self, to: int, message: Request, timeout: float) -> Reply | None:
        if not isinstance(message, Request):
            raise TypeError(f"ctx.request needs a Request, got {type(message).__name__}")
        request_id = next(self._request_ids)
        waiter: asyncio.Future = asyncio.get_running_loop().create_future()
        key = (to, request_id)
        self._pending[key] = waiter
        try:
            self.send(to, replace(message, request_id=request_id))
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            return _handed_over(waiter)
        finally:
            self._pending.pop(key, None)

    def reply(self, request: Request, message: Reply) -> None:
        self.send(request.sender, replace(message, in_reply_to=request.request_id))

    # -- signatures
    def sign(self, data: bytes) -> str:
        return self._worlds.signer(self.config, self._peer_id).sign(data)

    def verify(self, peer: int, data: bytes, signature: str) -> bool:
        return self._worlds.keys(self.config, self._peer_id).verify(peer, data, signature)

    # -- compute
    def initial_params(self) -> Params:
        return self._worlds.learner.init_params(initial_model_seed(self.config.seed))

    async def train(self, params: Params, *, epochs: int | None = None, steps: int | None = None) -> TrainResult:
        learner = self._worlds.learner
        work = learner.steps_for(len(self._data.train), epochs=epochs, steps=steps)
        byzantine = self.byzantine()
        if byzantine is None:
            return await self._train_own(params, self._data.train, work)
        if byzantine.behaviour == "free_ride":  # claims the training it did not do, at no compute time
            n, size = len(self._data.train), self.config.train.batch_size
            if n == 0 or work == 0:
                return TrainResult(params, 0, 0, float("nan"))
            per_pass = -(-n // size)  # batches of one pass; only a pass's last batch is short
            return TrainResult(params, (work // per_pass) * n + (work % per_pass) * size, work, float("nan"))
        data = self._label_flipped() if byzantine.behaviour == "label_flip" else self._data.train
        result = await self._train_own(params, data, work)
        return replace(result, params=self._lie(byzantine, params, result.params))

    async def _train_own(self, params: Params, data: Dataset, steps: int) -> TrainResult:
        """`_train_on` with this peer's own buffers joined to `params` (train.buffers=local) and the trained
        buffers kept back: the result holds parameters only, like what came in."""
        full = self._with_own_buffers(params)
        result = await self._train_on(full, data, steps)
        if full is params:
            return result
        trained, buffers = self._worlds.learner.split(result.params)
        self._buffers = buffers
        self._store.put_params(BUFFERS_ENTRY, buffers)
        return replace(result, params=trained)

    def _with_own_buffers(self, params: Params) -> Params:
        """`params` as the learner's whole model: itself when buffers travel, else joined to this peer's buffers."""
        learner = self._worlds.learner
        if not learner.local_buffers:
            return params
        if self._buffers is None:
            stored = self._store.get_params(BUFFERS_ENTRY, learner.buffer_layout) if BUFFERS_ENTRY in self._store else None
            self._buffers = stored[0] if stored is not None else learner.init_buffers(initial_model_seed(self.config.seed))
        return learner.with_buffers(params, self._buffers)

    async def _train_on(self, params: Params, data: Dataset, steps: int) -> TrainResult:
        """`steps` steps of this peer's learner on `data`, batches from the peer's generator; charged
        samples x seconds_per_sample. The simulator overrides it to train requests of one instant together."""
        per_sample = self.config.compute.seconds_per_sample
        return await self._compute(self._worlds.learner.train, params, data, self._torch_generator, steps,
                                   cost=lambda result: result.samples * per_sample)

    def _lie(self, byzantine: Byzantine, given: Params, trained: Params) -> Params:
        """What a Byzantine peer returns instead of `trained` (the honest result of training `given`)."""
        behaviour = byzantine.behaviour
        if behaviour == "sign_flip":
            return Params(given.flat - byzantine.scale * (trained.flat - given.flat), trained.layout)
        if behaviour == "scale":
            return Params(given.flat + byzantine.scale * (trained.flat - given.flat), trained.layout)
        if behaviour in ("noise", "random"):
            if self._byzantine_generator is None:
                self._byzantine_generator = byzantine_generator(self.config.seed, self._peer_id, self._incarnation)
            noise = torch.randn(trained.flat.shape, generator=self._byzantine_generator, dtype=torch.float32) * byzantine.sigma
            noise = noise.to(trained.flat.device)  # the simulator's models may live on the GPU
            return Params((trained.flat + noise) if behaviour == "noise" else noise, trained.layout)
        return trained  # inflate_weight (it lies about num_samples), label_flip (it lied to its learner)

    def _label_flipped(self) -> Dataset:
        if self._flipped is None:
            train = self._data.train
            self._flipped = Dataset(train.x, train.num_classes - 1 - train.y, train.num_classes, train.name)
        return self._flipped

    def _evaluate(self, params: Params) -> dict[str, float]:
        local = self._worlds.learner.evaluate(params, self._data.test)
        return evaluation_fields(local, self._worlds.evaluate_global(params))

    async def _evaluation(self, params: Params) -> dict[str, float]:
        """What `evaluate` reports; the simulator overrides it to evaluate requests of one instant together."""
        return await self._compute(self._evaluate, params)

    async def evaluate(self, params: Params) -> dict[str, float]:
        model = self._with_own_buffers(params)  # with train.buffers=local a peer's model is the given parameters + its own buffers
        result = await self._evaluation(model)
        self.final_params = model
        return result

    def log(self, metric: str, value: float, *, round: int | None = None, about: int | None = None) -> None:
        fields: dict[str, Any] = {"peer": self._peer_id, "metric": metric, "value": value}
        if round is not None:
            fields["round"] = round
        if about is not None:
            fields["about"] = about
        if self._incarnation:
            fields["incarnation"] = self._incarnation
        self._record("metric", **fields)


def evaluation_fields(local: Evaluation, global_: Evaluation) -> dict[str, float]:
    """`ctx.evaluate`'s answer: the model on the peer's local test split and on the global test set."""
    result = {LOCAL_ACCURACY: local.accuracy, LOCAL_LOSS: local.loss,
              GLOBAL_ACCURACY: global_.accuracy, GLOBAL_LOSS: global_.loss}
    for name, value in local.metrics.items():  # train.metrics
        result[f"{LOCAL_METRIC}{name}"] = value
    for name, value in global_.metrics.items():
        result[f"{GLOBAL_METRIC}{name}"] = value
    return result


def _handed_over(waiter: asyncio.Future) -> Message | None:
    """What a waiter got if it was resolved in the instant its timeout fired, else None."""
    if waiter.done() and not waiter.cancelled():
        return waiter.result()
    return None


def warm_up(worlds: Worlds, peer_id: int, batch_size: int) -> None:
    """One tiny training step: torch's first step costs seconds, which must not eat round 1's timeouts.

    Uses its own generator, so the peer's training stream is untouched.
    """
    data = worlds.peer_data[peer_id].train
    if len(data) == 0:
        return
    sample = data.subset(np.arange(min(len(data), batch_size)))
    params = worlds.learner.init_params(0)
    if worlds.learner.local_buffers:
        params = worlds.learner.with_buffers(params, worlds.learner.init_buffers(0))
    worlds.learner.train(params, sample, torch.Generator().manual_seed(0), 1)
    worlds.learner.evaluate(params, sample)

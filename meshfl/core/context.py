"""The only door between an algorithm and the world.

An algorithm is an `async` coroutine per peer that sends, receives, sleeps, trains and
logs through a `NodeContext`. The simulator implements it with a virtual clock and a
modelled network; the gRPC runtime with a real clock and sockets. Randomness comes from
`ctx.rng` (seeded from run seed, peer id and incarnation) and time from `ctx.now()` only.

Reachability is not the overlay: `peers` is the address book (every peer of the
experiment can be sent to), `neighbours` is who the topology says this peer gossips with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from meshfl.core.messages import Message, Reply, Request
from meshfl.core.params import Params

if TYPE_CHECKING:
    from meshfl.core.store import Store

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class TrainResult:
    """What `NodeContext.train` gives back.

    Attributes
    ----------
    params : Params
        The trained parameters.
    samples : int
        Samples trained on.
    steps : int
        Mini-batch steps taken.
    loss : float
        The training loss.
    """

    params: Params
    samples: int
    steps: int
    loss: float


class NodeContext(Protocol):
    """What an algorithm's peer coroutine may use: messaging, time, randomness, training, storage, logging.

    The simulator and the gRPC runtime implement it; `meshfl.testing.FakeContext` is one for unit tests.
    """

    @property
    def peer_id(self) -> int:
        """The id of this peer."""
        ...

    @property
    def incarnation(self) -> int:
        """0 for the first start, +1 at each restart after a crash."""
        ...

    @property
    def peers(self) -> tuple[int, ...]:
        """Every peer id in the experiment, sorted: each one can be sent to."""
        ...

    @property
    def neighbours(self) -> tuple[int, ...]:
        """The overlay: peers the topology says this one gossips with, sorted."""
        ...

    @property
    def rng(self) -> np.random.Generator:
        """The random generator of this peer, seeded from run seed, peer id and incarnation."""
        ...

    @property
    def num_samples(self) -> int:
        """Local training samples: this peer's weight in FedAvg."""
        ...

    @property
    def label_counts(self) -> tuple[int, ...]:
        """Samples of each class in the local training split: metadata a peer may share (a data-divergence peer choice), never the data."""
        ...

    @property
    def store(self) -> Store:
        """Named blobs and Params that survive a crash (not a wipe)."""
        ...

    def now(self) -> float:
        """The current time in seconds (virtual in the simulator, wall-clock in the gRPC runtime)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this context's time."""
        ...

    def send(self, to: int, message: Message) -> None:
        """Queue a message for any peer of the experiment; never blocks. Delivery is not guaranteed."""
        ...

    async def recv(self, timeout: float | None = None, types: tuple[type[M], ...] | None = None) -> M | None:
        """Next delivered message (of one of `types`, others stay queued), or None after `timeout` seconds."""
        ...

    async def request(self, to: int, message: Request, timeout: float) -> Reply | None:
        """Send `message` with a fresh request id and await its reply; None after `timeout` seconds.

        Other messages keep arriving in the inbox meanwhile; a reply that comes late is dropped.
        """
        ...

    def reply(self, request: Request, message: Reply) -> None:
        """Answer `request` (its sender gets `message` with `in_reply_to` set)."""
        ...

    def is_alive(self, peer: int) -> bool:
        """Whether this peer's failure detector believes `peer` alive; changes arrive as `PeerLiveness`."""
        ...

    def sign(self, data: bytes) -> str:
        """Sign `data` with this peer's Ed25519 key: content others relay can be checked against it.

        Returns
        -------
        str
            The signature, hex.
        """
        ...

    def verify(self, peer: int, data: bytes, signature: str) -> bool:
        """Whether `signature` is `peer`'s signature of `data` (False for anything malformed)."""
        ...

    def initial_params(self) -> Params:
        """The run's initial model parameters (the same for every peer)."""
        ...

    async def train(self, params: Params, *, epochs: int | None = None, steps: int | None = None) -> TrainResult:
        """Train locally from `params`: `epochs` passes or `steps` mini-batches (default: the train config's).

        Parameters
        ----------
        params : Params
            Where training starts.
        epochs : int, optional
            Passes over the local data.
        steps : int, optional
            Mini-batches to train on.

        Returns
        -------
        TrainResult
            The trained parameters with samples, steps and loss.
        """
        ...

    async def evaluate(self, params: Params) -> dict[str, float]:
        """Accuracy and loss on the local test split and the global test set; the algorithm logs what it wants."""
        ...

    def log(self, metric: str, value: float, *, round: int | None = None, about: int | None = None) -> None:
        """Record a metric event of this peer.

        Parameters
        ----------
        metric : str
            The metric's name.
        value : float
            Its value.
        round : int, optional
            The round the value belongs to.
        about : int, optional
            The peer the value describes (another peer's round trip as this one measured it),
            so the report can draw one line per described peer.
        """
        ...

"""The only door between an algorithm and the world.

An algorithm is an `async` coroutine per peer that sends, receives, sleeps, trains and
logs through a `NodeContext`. The simulator implements it with a virtual clock and a
modelled network; the gRPC runtime with a real clock and sockets. Randomness comes from
`ctx.rng` (seeded from run seed and peer id) and time from `ctx.now()` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from meshfl.core.messages import Message
from meshfl.core.params import Params


@dataclass(frozen=True)
class TrainResult:
    params: Params
    samples: int
    steps: int
    loss: float


class NodeContext(Protocol):
    @property
    def peer_id(self) -> int: ...

    @property
    def peers(self) -> tuple[int, ...]:
        """Every peer id in the experiment, sorted."""
        ...

    @property
    def neighbours(self) -> tuple[int, ...]:
        """Peers this one may send to directly, sorted."""
        ...

    @property
    def rng(self) -> np.random.Generator: ...

    @property
    def num_samples(self) -> int:
        """Local training samples: this peer's weight in FedAvg."""
        ...

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def send(self, to: int, message: Message) -> None:
        """Queue a message for a neighbour; never blocks. Delivery is not guaranteed."""
        ...

    async def recv(self, timeout: float | None = None) -> Message | None:
        """Next delivered message, or None when `timeout` seconds pass first."""
        ...

    def initial_params(self) -> Params: ...

    async def train(self, params: Params) -> TrainResult:
        """Local training per the experiment's train config, starting from `params`."""
        ...

    async def evaluate(self, params: Params) -> dict[str, float]:
        """Accuracy and loss on the local test split and the global test set."""
        ...

    def log(self, metric: str, value: float, *, round: int) -> None: ...

"""Messages peers exchange: small frozen, keyword-only dataclasses that validate when built.

In the simulator a message is passed by reference and its `wire_size` is computed, so byte
counts are exact without serialising. The size model is the wire format's: a fixed envelope
(type, sender, round, version, layout fingerprint, codec) plus the payload fields, with
tensors as raw float32 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter

from meshfl.core.params import Params

ENVELOPE_BYTES = 48
"""type (1) + codec (1) + padding (2) + sender (4) + round (4) + version (4) + fingerprint (16) + payload length (8) + checksum (8)."""

INT_BYTES = 4
FLOAT_BYTES = 4


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message: who sent it and for which round."""

    sender: int
    round: int

    def __post_init__(self) -> None:
        if self.sender < 0:
            raise ValueError(f"{type(self).__name__}.sender must be >= 0, got {self.sender}")

    @property
    def wire_size(self) -> int:
        return ENVELOPE_BYTES + self.payload_size()

    def payload_size(self) -> int:
        return 0


@dataclass(frozen=True)
class Ballot:
    """One peer's train-set ballot for a round: the candidates it votes for, with weights."""

    origin: int
    candidates: tuple[int, ...]
    weights: tuple[int, ...]

    size: int = field(init=False, repr=False, compare=False)
    """Bytes on the wire: origin, count, then candidates and weights."""

    def __post_init__(self) -> None:
        if self.origin < 0:
            raise ValueError(f"Ballot.origin must be >= 0, got {self.origin}")
        if len(self.candidates) != len(self.weights):
            raise ValueError(f"Ballot of peer {self.origin}: candidates and weights differ in length")
        object.__setattr__(self, "size", INT_BYTES * (2 + 2 * len(self.candidates)))


@dataclass(frozen=True, kw_only=True)
class Votes(Message):
    """Ballots flooded so every peer tallies the same train set; relays batch ballots that arrive close together."""

    ballots: tuple[Ballot, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ballots:
            raise ValueError("Votes: ballots must not be empty")

    def payload_size(self) -> int:
        return self._payload_size

    @cached_property
    def _payload_size(self) -> int:  # relays are sized once per send, with up to every peer's ballot
        return sum(map(attrgetter("size"), self.ballots))


@dataclass(frozen=True, kw_only=True)
class PartialModel(Message):
    """A weighted average of the models of `contributors`; `weight` is their total sample count."""

    params: Params
    contributors: frozenset[int]
    weight: float

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.contributors:
            raise ValueError("PartialModel: contributors must not be empty")
        if self.weight <= 0:
            raise ValueError(f"PartialModel: weight must be > 0, got {self.weight}")

    def payload_size(self) -> int:
        return self.params.nbytes + FLOAT_BYTES + INT_BYTES * (1 + len(self.contributors))


@dataclass(frozen=True, kw_only=True)
class AggregatedModel(Message):
    """The round's aggregated model, gossiped to neighbours that lack it (round 0: the initial model)."""

    params: Params
    contributors: frozenset[int] = field(default_factory=frozenset)

    def payload_size(self) -> int:
        return self.params.nbytes + INT_BYTES * (1 + len(self.contributors))


@dataclass(frozen=True, kw_only=True)
class HaveModels(Message):
    """Tells neighbours which contributions (or the whole aggregate) the sender holds, so they skip them."""

    contributors: frozenset[int]
    complete: bool = False

    def payload_size(self) -> int:
        return 1 + INT_BYTES * (1 + len(self.contributors))

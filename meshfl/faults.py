"""Fault schedules as data: the `faults:` list of an experiment, and its resolution into actions.

An experiment YAML may hold a list of fault events:

    faults:
      - {kind: crash, peers: [3], at_round: 5}
      - {kind: restart, peers: [3], at_round: 8}
      - {kind: loss, probability: 0.1, at_round: 10, until_round: 12}      # every link
      - {kind: partition, groups: [[0,1,2],[3,4,5]], at_s: 30, until_s: 60}
      - {kind: slow_link, links: [[0,1]], bandwidth_mbps: 1, latency_s: 0.2, at_s: 0}
      - {kind: straggler, fraction: 0.25, speed: 0.25, at_s: 0}
      - {kind: crash, count: 2, at_s: 10, wipe: true}
      - {kind: byzantine, behaviour: sign_flip, scale: 10, count: 2, at_s: 0}   # lies until the end

`FaultEvent` validates one event on its own; `check_faults` validates peer ids against the
number of peers; `resolve_faults` turns events into concrete, ordered `FaultAction`s (random
targets drawn from the run seed), which a runtime applies. This module is a leaf: it imports
nothing from meshfl but the Section base, so `meshfl.config` can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, ValidationError, WrapValidator, model_validator

from meshfl.core.section import Section as _Section

FaultKind = Literal["crash", "restart", "wipe", "loss", "partition", "heal", "slow_link", "straggler", "join", "leave",
                    "byzantine"]
ActionKind = Literal["crash", "restart", "wipe", "join", "leave", "set_loss", "clear_loss", "partition", "heal",
                     "slow_link", "restore_link", "straggle", "restore_speed", "byzantine_on", "byzantine_off"]
Behaviour = Literal["sign_flip", "noise", "scale", "random", "inflate_weight", "label_flip", "free_ride"]

LASTING_KINDS = frozenset({"loss", "partition", "slow_link", "straggler", "byzantine"})
"""Kinds that hold from their start until `until_s`/`until_round` (or the end of the run)."""
PEER_KINDS = frozenset({"crash", "restart", "wipe", "join", "leave", "straggler", "byzantine"})
"""Kinds that need a target: `peers`, `fraction` or `count`."""
LINK_KINDS = frozenset({"loss", "slow_link"})
"""Kinds that act on links: `links`, or the links touching `peers`/`fraction`/`count`, or every link."""

FAULT_SEED_TAG = 0x6661756C74  # "fault"

BEHAVIOUR_PARAMETERS: dict[str, tuple[str, ...]] = {
    "sign_flip": ("scale",), "noise": ("sigma",), "scale": ("scale",), "random": ("sigma",),
    "inflate_weight": ("weight",), "label_flip": (), "free_ride": (),
}
"""Which of scale, sigma, weight each Byzantine behaviour reads."""
BEHAVIOUR_DEFAULTS = {("sign_flip", "scale"): 10.0, ("scale", "scale"): 100.0, ("noise", "sigma"): 1.0,
                      ("random", "sigma"): 1.0, ("inflate_weight", "weight"): 1e9}


@dataclass(frozen=True)
class Byzantine:
    """What a Byzantine peer does instead of (or to) its honest training; see `FaultEvent.behaviour`.

    The runtime's shared `PeerContext.train` / `num_samples` apply it; the algorithm never learns it.
    """

    behaviour: Behaviour
    scale: float = 1.0
    sigma: float = 1.0
    weight: float = 1.0

    @classmethod
    def of(cls, behaviour: Behaviour, scale: float | None = None, sigma: float | None = None,
           weight: float | None = None) -> Byzantine:
        """The behaviour with each parameter it reads filled in from its default where not given."""
        given = {"scale": scale, "sigma": sigma, "weight": weight}
        values = {name: float(given[name] if given[name] is not None else BEHAVIOUR_DEFAULTS[(behaviour, name)])
                  for name in BEHAVIOUR_PARAMETERS[behaviour]}
        return cls(behaviour, **values)


class FaultEvent(_Section):
    kind: FaultKind = Field("crash", description="what happens: crash, restart, wipe, loss, partition, heal, slow_link, straggler, join, leave, byzantine")
    at_s: float | None = Field(None, ge=0, description="start: seconds since the run started (virtual in the simulator, real over gRPC)")
    at_round: int | None = Field(None, ge=0, description="start: when any peer (or trigger_peer) first reaches this round")
    trigger_peer: int | None = Field(None, ge=0, description="at_round: fire when this peer reaches the round instead of the first peer to")
    until_s: float | None = Field(None, ge=0, description="end of a lasting fault (loss, partition, slow_link, straggler, byzantine), seconds since start; none: to the end of the run")
    until_round: int | None = Field(None, ge=0, description="end of a lasting fault when any peer (or trigger_peer) first reaches this round")
    peers: list[int] | None = Field(None, description="target peers by id")
    fraction: float | None = Field(None, gt=0, le=1, description="target this fraction of the peers (at least one), drawn from the run seed")
    count: int | None = Field(None, ge=0, description="target this many peers, drawn from the run seed (0: the event does nothing, handy in sweeps)")
    exclude: list[int] | None = Field(None, description="fraction/count: never draw these peers (e.g. a coordinator)")
    links: list[tuple[int, int]] | None = Field(None, description="loss/slow_link: [a, b] pairs, both directions (neither peers nor links: every link)")
    groups: list[list[int]] | None = Field(None, description="partition: groups of peers that can only talk within their group; unlisted peers form one more group")
    probability: float | None = Field(None, ge=0, le=1, description="loss: probability that a message on an affected link is dropped")
    bandwidth_mbps: float | None = Field(None, gt=0, description="slow_link: bandwidth cap of affected links, megabits per second")
    latency_s: float | None = Field(None, ge=0, description="slow_link: one-way latency floor of affected links, seconds")
    speed: float | None = Field(None, gt=0, description="straggler: compute speed factor of the targets while the fault lasts")
    wipe: bool = Field(False, description="crash: the peer also loses its store (it restarts empty)")
    behaviour: Behaviour | None = Field(None, description="byzantine: sign_flip (update = -scale x honest update), noise (honest model + N(0, sigma^2)), scale (update x scale), random (N(0, sigma^2) model), inflate_weight (claims `weight` samples), label_flip (trains on labels C-1-y), free_ride (returns the model it got, untrained, at no compute time)")
    scale: float | None = Field(None, gt=0, description="byzantine sign_flip (default 10) or scale (default 100): factor of the update")
    sigma: float | None = Field(None, gt=0, description="byzantine noise or random: standard deviation (default 1.0)")
    weight: float | None = Field(None, gt=0, description="byzantine inflate_weight: the sample count it claims (default 1e9)")

    @model_validator(mode="after")
    def _consistent(self) -> FaultEvent:
        kind = self.kind
        if (self.at_s is None) == (self.at_round is None):
            raise ValueError("at_s: give exactly one of at_s or at_round")
        if self.trigger_peer is not None and self.at_round is None and self.until_round is None:
            raise ValueError("trigger_peer: only with at_round or until_round")
        if self.until_s is not None and self.until_round is not None:
            raise ValueError("until_s: give at most one of until_s or until_round")
        if (self.until_s is not None or self.until_round is not None) and kind not in LASTING_KINDS:
            which = "until_s" if self.until_s is not None else "until_round"
            raise ValueError(f"{which}: only for lasting kinds (loss, partition, slow_link, straggler, byzantine), not kind={kind}")
        if self.until_s is not None and self.at_s is not None and self.until_s <= self.at_s:
            raise ValueError(f"until_s: must be > at_s ({self.at_s})")
        if self.until_round is not None and self.at_round is not None and self.until_round <= self.at_round:
            raise ValueError(f"until_round: must be > at_round ({self.at_round})")
        if self.links is not None and kind not in LINK_KINDS:
            raise ValueError(f"links: only for kind=loss or kind=slow_link, not kind={kind}")
        targets = [name for name in ("peers", "fraction", "count") if getattr(self, name) is not None]
        if len(targets) > 1:
            raise ValueError(f"{targets[1]}: give only one of peers, fraction or count")
        if kind in PEER_KINDS and not targets:
            raise ValueError(f"peers: kind={kind} needs peers, fraction or count")
        if kind in ("partition", "heal") and targets:
            raise ValueError(f"{targets[0]}: not used by kind={kind}")
        if self.exclude is not None and self.fraction is None and self.count is None:
            raise ValueError("exclude: only with fraction or count")
        if self.peers is not None:
            if not self.peers:
                raise ValueError("peers: must not be empty")
            if len(set(self.peers)) != len(self.peers):
                raise ValueError("peers: a peer is listed twice")
            if min(self.peers) < 0:
                raise ValueError("peers: peer ids are >= 0")
        if self.links is not None:
            if targets:
                raise ValueError(f"links: give either links or {targets[0]}, not both")
            if not self.links:
                raise ValueError("links: must not be empty")
            for a, b in self.links:
                if a == b or min(a, b) < 0:
                    raise ValueError(f"links: [{a}, {b}] is not a link between two peers")
        if kind == "partition":
            if not self.groups:
                raise ValueError("groups: required for kind=partition")
            seen: set[int] = set()
            for group in self.groups:
                if not group:
                    raise ValueError("groups: a group is empty")
                for p in group:
                    if p < 0:
                        raise ValueError("groups: peer ids are >= 0")
                    if p in seen:
                        raise ValueError(f"groups: peer {p} is in two groups")
                    seen.add(p)
        elif self.groups is not None:
            raise ValueError(f"groups: only for kind=partition, not kind={kind}")
        if kind == "loss" and self.probability is None:
            raise ValueError("probability: required for kind=loss")
        if kind != "loss" and self.probability is not None:
            raise ValueError(f"probability: only for kind=loss, not kind={kind}")
        if kind == "slow_link" and self.bandwidth_mbps is None and self.latency_s is None:
            raise ValueError("bandwidth_mbps: kind=slow_link needs bandwidth_mbps or latency_s (or both)")
        for name in ("bandwidth_mbps", "latency_s"):
            if kind != "slow_link" and getattr(self, name) is not None:
                raise ValueError(f"{name}: only for kind=slow_link, not kind={kind}")
        if kind == "straggler" and self.speed is None:
            raise ValueError("speed: required for kind=straggler")
        if kind != "straggler" and self.speed is not None:
            raise ValueError(f"speed: only for kind=straggler, not kind={kind}")
        if kind == "byzantine" and self.behaviour is None:
            raise ValueError("behaviour: required for kind=byzantine (sign_flip, noise, scale, random, inflate_weight, label_flip, free_ride)")
        if kind != "byzantine" and self.behaviour is not None:
            raise ValueError(f"behaviour: only for kind=byzantine, not kind={kind}")
        for name in ("scale", "sigma", "weight"):
            if getattr(self, name) is not None and (self.behaviour is None or name not in BEHAVIOUR_PARAMETERS[self.behaviour]):
                users = ", ".join(b for b, names in BEHAVIOUR_PARAMETERS.items() if name in names)
                raise ValueError(f"{name}: only for kind=byzantine with behaviour {users}")
        if self.wipe and kind != "crash":
            raise ValueError(f"wipe: only for kind=crash, not kind={kind} (use kind=wipe to empty a running peer's store)")
        return self


def _format_item_error(err: ValidationError, field: str) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and len(loc) <= 1:
        # a model-level check: its message starts with the field it names
        return f"{field}.{'.'.join(loc)}.{message}" if loc else f"{field}: {message}"
    if first["type"] == "literal_error":
        message = f"must be one of {first.get('ctx', {}).get('expected', '')}"
    elif first["type"] == "extra_forbidden":
        message = "is not a known field of a fault event"
    got = first.get("input")
    shown = "" if first["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
    return f"{'.'.join([field, *loc])}: {message}{shown}"


def _validate_fault_list(value: Any, handler: Any) -> list[FaultEvent]:
    try:
        return handler(value)
    except ValidationError as err:
        raise ValueError(_format_item_error(err, "faults")) from None


FaultList = Annotated[list[FaultEvent], WrapValidator(_validate_fault_list)]
"""`faults: FaultList = Field(default_factory=list, ...)`: errors read `faults.2.probability: required for kind=loss`."""


def parse_faults(raw: Any) -> list[FaultEvent]:
    """Validate a raw `faults:` list (from YAML); ValueError with one line naming `faults.<i>.<field>`."""
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(FaultList).validate_python(raw)
    except ValidationError as err:
        raise ValueError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


def check_faults(faults: list[FaultEvent], peers: int) -> None:
    """Check every peer id (targets, links, groups, trigger_peer) and count against `peers`; one-line ValueError."""
    def check_ids(where: str, ids: list[int]) -> None:
        bad = sorted({p for p in ids if not 0 <= p < peers})
        if bad:
            raise ValueError(f"{where}: peer {bad[0]} does not exist (peers are 0..{peers - 1})")

    for i, event in enumerate(faults):
        where = f"faults.{i}"

        def check(field: str, ids: list[int], where: str = where) -> None:
            check_ids(f"{where}.{field}", ids)

        if event.trigger_peer is not None:
            check("trigger_peer", [event.trigger_peer])
        if event.peers is not None:
            check("peers", event.peers)
        if event.links is not None:
            check("links", [p for link in event.links for p in link])
        if event.groups is not None:
            listed = [p for group in event.groups for p in group]
            check("groups", listed)
            if len(event.groups) + (len(listed) < peers) < 2:
                raise ValueError(f"{where}.groups: a partition needs at least two groups (unlisted peers form one)")
        if event.exclude is not None:
            check("exclude", event.exclude)
        eligible = peers - len(set(event.exclude or ()))
        if event.count is not None and event.count > eligible:
            others = "" if eligible == peers else " not excluded"
            raise ValueError(f"{where}.count: {event.count} is more than the {eligible} peers{others}")


Trigger = tuple[str, float] | tuple[str, int, int | None]


@dataclass(frozen=True)
class FaultAction:
    """One concrete thing a runtime does when `trigger` fires.

    `trigger` is ("time", seconds) or ("round", r, trigger_peer or None). `key` identifies the
    fault that a start/end pair belongs to (the event index); the network's mutation API is keyed
    by it, so overlapping faults stack and end independently. A `heal` produced by a `kind: heal`
    event has key None: it ends every partition active then.
    """

    index: int
    kind: ActionKind
    trigger: Trigger
    key: int | None
    peers: tuple[int, ...] = ()
    links: tuple[tuple[int, int], ...] = ()
    groups: tuple[tuple[int, ...], ...] = ()
    probability: float | None = None
    bandwidth_mbps: float | None = None
    latency_s: float | None = None
    speed: float | None = None
    wipe: bool = False
    byzantine: Byzantine | None = None

    @property
    def is_end(self) -> bool:
        return self.kind in ("clear_loss", "restore_link", "restore_speed", "byzantine_off") or (self.kind == "heal" and self.key is not None)


_START_END: dict[str, tuple[str, str | None]] = {
    "crash": ("crash", None), "restart": ("restart", None), "wipe": ("wipe", None), "join": ("join", None),
    "leave": ("leave", None), "heal": ("heal", None), "loss": ("set_loss", "clear_loss"),
    "partition": ("partition", "heal"), "slow_link": ("slow_link", "restore_link"),
    "straggler": ("straggle", "restore_speed"), "byzantine": ("byzantine_on", "byzantine_off"),
}


def target_count(fraction: float, peers: int) -> int:
    """How many peers `fraction` of `peers` means: rounded half up, at least one."""
    return max(1, min(peers, int(fraction * peers + 0.5)))


def draw_targets(event: FaultEvent, index: int, peers: int, seed: int) -> tuple[int, ...]:
    """The peers an event targets, sorted; fraction/count are drawn from the run seed and the event index."""
    if event.peers is not None:
        return tuple(sorted(event.peers))
    if event.fraction is None and event.count is None:
        return ()
    excluded = set(event.exclude or ())
    eligible = [p for p in range(peers) if p not in excluded]
    k = event.count if event.count is not None else target_count(event.fraction or 0.0, len(eligible))
    if k > len(eligible):
        raise ValueError(f"faults.{index}.count: {k} is more than the {len(eligible)} peers that may be drawn")
    rng = np.random.default_rng([seed, FAULT_SEED_TAG, index])
    if not excluded:  # the plain draw (kept as it was, so existing schedules resolve as before)
        return tuple(sorted(int(p) for p in rng.choice(peers, size=k, replace=False)))
    return tuple(sorted(int(p) for p in rng.choice(eligible, size=k, replace=False)))


def _trigger(at_s: float | None, at_round: int | None, trigger_peer: int | None) -> Trigger:
    if at_s is not None:
        return ("time", float(at_s))
    assert at_round is not None
    return ("round", int(at_round), trigger_peer)


def _order(action: FaultAction) -> tuple[int, float, int, int]:
    # time triggers first (by seconds), then round triggers (by round); at one instant ends go
    # before starts (a fault holds on [at, until)), then by event index
    return (0 if action.trigger[0] == "time" else 1, float(action.trigger[1]), 1 - action.is_end, action.index)


def resolve_faults(faults: list[FaultEvent], peers: int, seed: int) -> list[FaultAction]:
    """Concrete actions, ordered: time triggers by seconds, then round triggers by round (ends first at a tie).

    Pure and deterministic: random targets come from np.random.default_rng([seed, 0x6661756C74, index]).
    Lasting events give a start and, when they have `until_s`/`until_round`, an end action.
    """
    check_faults(faults, peers)
    actions: list[FaultAction] = []
    for index, event in enumerate(faults):
        if event.count == 0:
            continue  # nothing to target (a sweep's zero point)
        start_kind, end_kind = _START_END[event.kind]
        common: dict[str, Any] = {
            "index": index,
            "peers": draw_targets(event, index, peers, seed),
            "links": tuple((int(a), int(b)) for a, b in event.links or ()),
            "groups": tuple(tuple(int(p) for p in g) for g in event.groups or ()),
            "probability": event.probability, "bandwidth_mbps": event.bandwidth_mbps,
            "latency_s": event.latency_s, "speed": event.speed,
            "byzantine": (Byzantine.of(event.behaviour, event.scale, event.sigma, event.weight)
                          if event.behaviour is not None else None),
        }
        key = None if event.kind == "heal" else index
        actions.append(FaultAction(kind=start_kind, trigger=_trigger(event.at_s, event.at_round, event.trigger_peer),  # type: ignore[arg-type]
                                   key=key, wipe=event.wipe, **common))
        if end_kind is not None and (event.until_s is not None or event.until_round is not None):
            actions.append(FaultAction(kind=end_kind, trigger=_trigger(event.until_s, event.until_round, event.trigger_peer),  # type: ignore[arg-type]
                                       key=key, **common))
    return sorted(actions, key=_order)


def random_schedule(rng: np.random.Generator, peers: int, horizon_s: float, rounds: int) -> list[FaultEvent]:
    """A few random fault events for `meshfl chaos`, deterministic per `rng`.

    Draws 2..5 events among: crash (with or without a later restart, sometimes wiping the
    store), a wipe of a running peer's store, message loss up to 30%, partitions that heal,
    slow links and stragglers. One peer,
    drawn first, is never crashed, so some peer always runs to the end. Starts fall in
    [0, 0.7 * horizon_s) and ends by horizon_s; some crashes trigger on a round in [1, rounds) instead.
    """
    if peers < 1:
        raise ValueError("random_schedule: peers must be >= 1")
    horizon = max(float(horizon_s), 1e-3)
    safe = int(rng.integers(peers))
    candidates = [p for p in range(peers) if p != safe]
    down_for_good: set[int] = set()
    events: list[FaultEvent] = []
    kinds = ["crash", "crash_restart", "crash_wipe", "wipe", "loss", "partition", "slow_link", "straggler"]

    def when() -> float:
        return round(float(rng.uniform(0.0, 0.7 * horizon)), 3)

    def duration(start: float) -> float:  # an end after start, before the horizon
        return min(max(round(start + float(rng.uniform(0.05, 0.3)) * horizon, 3), start + 1e-3), max(horizon, start + 1e-3))

    for _ in range(int(rng.integers(2, 6))):
        kind = kinds[int(rng.integers(len(kinds)))]
        alive = [p for p in candidates if p not in down_for_good]
        if (kind.startswith("crash") or kind == "wipe") and not alive:
            kind = "loss"
        if kind == "partition" and peers < 2:
            kind = "loss"
        if kind.startswith("crash"):
            victim = alive[int(rng.integers(len(alive)))]
            wipe = kind == "crash_wipe"
            if rounds > 1 and rng.random() < 0.3:
                r = int(rng.integers(1, rounds))
                events.append(FaultEvent(kind="crash", peers=[victim], at_round=r, wipe=wipe))
                if kind != "crash" and r + 1 < rounds:
                    events.append(FaultEvent(kind="restart", peers=[victim], at_round=int(rng.integers(r + 1, rounds))))
                elif kind != "crash":
                    down_for_good.add(victim)
            else:
                at = when()
                events.append(FaultEvent(kind="crash", peers=[victim], at_s=at, wipe=wipe))
                if kind != "crash":
                    events.append(FaultEvent(kind="restart", peers=[victim], at_s=duration(at)))
            if kind == "crash":
                down_for_good.add(victim)
        elif kind == "wipe":
            events.append(FaultEvent(kind="wipe", peers=[alive[int(rng.integers(len(alive)))]], at_s=when()))
        elif kind == "loss":
            at = when()
            events.append(FaultEvent(kind="loss", probability=round(float(rng.uniform(0.01, 0.3)), 3),
                                     at_s=at, until_s=duration(at)))
        elif kind == "partition":
            order = [int(p) for p in rng.permutation(peers)]
            cut = int(rng.integers(1, peers))
            at = when()
            events.append(FaultEvent(kind="partition", groups=[sorted(order[:cut])], at_s=at, until_s=duration(at)))
        elif kind == "slow_link":
            at = when()
            if peers >= 2:
                a, b = (int(p) for p in rng.choice(peers, size=2, replace=False))
                target: dict[str, Any] = {"links": [(a, b)]}
            else:
                target = {}
            events.append(FaultEvent(kind="slow_link", bandwidth_mbps=round(float(rng.uniform(0.5, 10.0)), 2),
                                     latency_s=round(float(rng.uniform(0.01, 0.5)), 3), at_s=at, until_s=duration(at), **target))
        else:
            at = when()
            events.append(FaultEvent(kind="straggler", count=int(rng.integers(1, max(2, peers // 4 + 1))),
                                     speed=round(float(rng.uniform(0.1, 0.5)), 3), at_s=at, until_s=duration(at)))
    return events

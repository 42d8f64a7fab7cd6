import numpy as np
import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshfl.config import _format_validation_error
from meshfl.faults import (
    FaultAction,
    FaultEvent,
    FaultList,
    check_faults,
    parse_faults,
    random_schedule,
    resolve_faults,
)

EXAMPLE = yaml.safe_load("""
faults:
  - {kind: crash, peers: [3], at_round: 5}
  - {kind: restart, peers: [3], at_round: 8}
  - {kind: loss, probability: 0.1, at_round: 10, until_round: 12}      # every link
  - {kind: partition, groups: [[0,1,2],[3,4,5]], at_s: 30, until_s: 60}
  - {kind: slow_link, links: [[0,1]], bandwidth_mbps: 1, latency_s: 0.2, at_s: 0}
  - {kind: straggler, fraction: 0.25, speed: 0.25, at_s: 0}
  - {kind: crash, count: 2, at_s: 10, wipe: true}
""")["faults"]


class _Experiment(BaseModel):
    # how ExperimentConfig is expected to hold the list
    model_config = ConfigDict(extra="forbid", frozen=True)
    faults: FaultList = Field(default_factory=list, description="fault events")


def error_of(raw) -> str:
    with pytest.raises(ValidationError) as info:
        _Experiment.model_validate({"faults": raw})
    return _format_validation_error(info.value)


def test_the_documented_example_parses():
    events = parse_faults(EXAMPLE)
    assert [e.kind for e in events] == ["crash", "restart", "loss", "partition", "slow_link", "straggler", "crash"]
    assert events[4].links == [(0, 1)]
    assert events[6].wipe and events[6].count == 2
    check_faults(events, 8)
    assert _Experiment.model_validate({"faults": EXAMPLE}).faults == events


@pytest.mark.parametrize(("raw", "message"), [
    ([{"kind": "crash", "peers": [1], "at_s": 1}, {"kind": "loss", "at_s": 3}], "faults.1.probability: required for kind=loss"),
    ([{"kind": "loss", "probability": 1.5, "at_s": 0}], "faults.0.probability: Input should be less than or equal to 1 (got 1.5)"),
    ([{"kind": "explode", "at_s": 0}], "faults.0.kind: must be one of"),
    ([{"kind": "crash", "peers": [1], "at_s": 0, "colour": "red"}], "faults.0.colour: is not a known field"),
    ([{"kind": "crash", "peers": [1]}], "faults.0.at_s: give exactly one of at_s or at_round"),
    ([{"kind": "crash", "peers": [1], "at_s": 1, "at_round": 2}], "faults.0.at_s: give exactly one"),
    ([{"kind": "crash", "at_s": 1}], "faults.0.peers: kind=crash needs peers, fraction or count"),
    ([{"kind": "crash", "peers": [1], "count": 1, "at_s": 1}], "faults.0.count: give only one of peers, fraction or count"),
    ([{"kind": "crash", "peers": [1], "at_s": 1, "until_s": 5}], "faults.0.until_s: only for lasting kinds"),
    ([{"kind": "loss", "probability": 0.1, "at_s": 5, "until_s": 5}], "faults.0.until_s: must be > at_s"),
    ([{"kind": "loss", "probability": 0.1, "at_round": 5, "until_round": 4}], "faults.0.until_round: must be > at_round"),
    ([{"kind": "partition", "at_s": 1}], "faults.0.groups: required for kind=partition"),
    ([{"kind": "partition", "groups": [[0, 1], [1, 2]], "at_s": 1}], "faults.0.groups: peer 1 is in two groups"),
    ([{"kind": "slow_link", "at_s": 1}], "faults.0.bandwidth_mbps: kind=slow_link needs"),
    ([{"kind": "straggler", "fraction": 0.5, "at_s": 1}], "faults.0.speed: required for kind=straggler"),
    ([{"kind": "straggler", "fraction": 0.5, "speed": 0, "at_s": 1}], "faults.0.speed: Input should be greater than 0"),
    ([{"kind": "straggler", "fraction": 0, "speed": 1, "at_s": 1}], "faults.0.fraction: Input should be greater than 0"),
    ([{"kind": "restart", "peers": [1], "at_s": 1, "wipe": True}], "faults.0.wipe: only for kind=crash"),
    ([{"kind": "crash", "links": [[0, 1]], "at_s": 1}], "faults.0.links: only for kind=loss or kind=slow_link"),
    ([{"kind": "loss", "probability": 0.1, "links": [[2, 2]], "at_s": 1}], "faults.0.links: [2, 2] is not a link"),
    ([{"kind": "loss", "probability": 0.1, "links": [[0, 1]], "peers": [3], "at_s": 1}], "faults.0.links: give either links or peers"),
    ([{"kind": "crash", "peers": [1], "at_s": -1}], "faults.0.at_s: Input should be greater than or equal to 0"),
    ([{"kind": "crash", "peers": [1], "at_s": 1, "trigger_peer": 2}], "faults.0.trigger_peer: only with at_round"),
    (5, "faults: Input should be a valid list"),
])
def test_validation_errors_are_one_line_naming_the_field(raw, message):
    text = error_of(raw)
    assert text.startswith(message), text
    assert "\n" not in text
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_faults(raw)


@pytest.mark.parametrize(("event", "message"), [
    ({"kind": "crash", "peers": [8], "at_s": 1}, "faults.1.peers: peer 8 does not exist (peers are 0..7)"),
    ({"kind": "crash", "count": 9, "at_s": 1}, "faults.1.count: 9 is more than the 8 peers"),
    ({"kind": "loss", "probability": 0.1, "links": [[0, 9]], "at_s": 1}, "faults.1.links: peer 9 does not exist"),
    ({"kind": "partition", "groups": [[0, 10]], "at_s": 1}, "faults.1.groups: peer 10 does not exist"),
    ({"kind": "partition", "groups": [list(range(8))], "at_s": 1}, "faults.1.groups: a partition needs at least two groups"),
    ({"kind": "crash", "peers": [1], "at_round": 1, "trigger_peer": 8}, "faults.1.trigger_peer: peer 8 does not exist"),
])
def test_check_faults_checks_peer_ids(event, message):
    events = parse_faults([{"kind": "crash", "peers": [0], "at_s": 0}, event])
    with pytest.raises(ValueError) as info:
        check_faults(events, 8)
    assert str(info.value).startswith(message)


def test_resolver_orders_time_then_round_and_pairs_lasting_events():
    actions = resolve_faults(parse_faults(EXAMPLE), peers=8, seed=1)
    summary = [(a.kind, a.trigger, a.index) for a in actions]
    assert summary == [
        ("slow_link", ("time", 0.0), 4),
        ("straggle", ("time", 0.0), 5),
        ("crash", ("time", 10.0), 6),
        ("partition", ("time", 30.0), 3),
        ("heal", ("time", 60.0), 3),
        ("crash", ("round", 5, None), 0),
        ("restart", ("round", 8, None), 1),
        ("set_loss", ("round", 10, None), 2),
        ("clear_loss", ("round", 12, None), 2),
    ]
    by_kind = {a.kind: a for a in actions}
    assert by_kind["partition"].groups == ((0, 1, 2), (3, 4, 5)) and by_kind["heal"].key == 3
    assert by_kind["slow_link"].links == ((0, 1),) and by_kind["slow_link"].bandwidth_mbps == 1
    assert by_kind["slow_link"].latency_s == 0.2
    assert by_kind["set_loss"].probability == 0.1 and by_kind["set_loss"].peers == () and by_kind["set_loss"].links == ()
    assert by_kind["straggle"].speed == 0.25 and len(by_kind["straggle"].peers) == 2  # 0.25 of 8
    crash = actions[2]
    assert crash.wipe and len(crash.peers) == 2 and list(crash.peers) == sorted(crash.peers)
    assert len(set(crash.peers)) == 2 and all(0 <= p < 8 for p in crash.peers)
    assert actions[5].peers == (3,)


def test_ends_go_before_starts_at_the_same_instant_and_no_end_without_until():
    events = parse_faults([
        {"kind": "loss", "probability": 0.2, "at_s": 5},
        {"kind": "loss", "probability": 0.1, "at_s": 1, "until_s": 5},
        {"kind": "heal", "at_s": 7},
        {"kind": "crash", "peers": [1], "at_round": 2, "trigger_peer": 4},
        {"kind": "straggler", "peers": [2], "speed": 0.5, "at_round": 1, "until_s": 3},
    ])
    actions = resolve_faults(events, peers=5, seed=0)
    assert [(a.kind, a.index) for a in actions] == [
        ("set_loss", 1), ("restore_speed", 4), ("clear_loss", 1), ("set_loss", 0), ("heal", 2),
        ("straggle", 4), ("crash", 3)]
    assert actions[4].key is None  # a heal event ends every partition
    assert actions[-1].trigger == ("round", 2, 4)
    assert sum(a.index == 0 for a in actions) == 1  # no end: lasts to the end of the run


def test_resolver_is_pure_and_draws_depend_on_seed_and_index():
    events = parse_faults([{"kind": "crash", "fraction": 0.5, "at_s": 1}, {"kind": "crash", "fraction": 0.5, "at_s": 1}])
    a = resolve_faults(events, peers=20, seed=7)
    assert a == resolve_faults(events, peers=20, seed=7)
    assert all(isinstance(x, FaultAction) for x in a)
    assert len(a[0].peers) == 10 and len(a[1].peers) == 10
    assert a[0].peers != a[1].peers  # each event draws its own peers
    expected = tuple(sorted(int(p) for p in np.random.default_rng([7, 0x6661756C74, 0]).choice(20, 10, replace=False)))
    assert a[0].peers == expected
    others = {resolve_faults(events, peers=20, seed=s)[0].peers for s in range(10)}
    assert len(others) > 5
    # fraction rounds half up and is at least one peer
    small = parse_faults([{"kind": "crash", "fraction": 0.01, "at_s": 1}, {"kind": "crash", "fraction": 0.3, "at_s": 1}])
    assert [len(x.peers) for x in resolve_faults(small, peers=5, seed=0)] == [1, 2]


def test_fraction_draws_are_roughly_uniform():
    events = parse_faults([{"kind": "straggler", "count": 1, "speed": 0.5, "at_s": 0}])
    counts = np.zeros(4)
    for seed in range(400):
        counts[resolve_faults(events, peers=4, seed=seed)[0].peers[0]] += 1
    assert counts.min() > 70


def test_event_defaults_and_frozen():
    event = FaultEvent(kind="crash", peers=[1], at_s=0)
    assert event.wipe is False and event.until_s is None
    with pytest.raises(ValidationError):
        event.at_s = 3  # type: ignore[misc]
    for name, info in FaultEvent.model_fields.items():
        assert info.description and "\n" not in info.description, name
        assert not info.is_required(), name


@pytest.mark.parametrize("peers", [1, 2, 3, 8, 30])
def test_random_schedule_is_valid_deterministic_and_spares_a_peer(peers):
    for seed in range(30):
        events = random_schedule(np.random.default_rng(seed), peers, horizon_s=100.0, rounds=10)
        assert events == random_schedule(np.random.default_rng(seed), peers, horizon_s=100.0, rounds=10)
        assert 2 <= len(events)
        check_faults(events, peers)
        actions = resolve_faults(events, peers, seed)
        crashed = {p for a in actions if a.kind in ("crash", "wipe", "leave") for p in a.peers}
        assert len(crashed) < peers
        for e in events:
            if e.kind == "loss":
                assert e.probability is not None and e.probability <= 0.3
            if e.kind == "partition":
                assert e.until_s is not None
            if e.at_s is not None:
                assert 0 <= e.at_s <= 100
        # round-tripping through YAML gives the same events (the chaos command writes them out)
        dumped = yaml.safe_load(yaml.safe_dump([e.model_dump(mode="json", exclude_none=True) for e in events]))
        assert parse_faults(dumped) == events
    kinds = {e.kind for seed in range(40) for e in random_schedule(np.random.default_rng(seed), 8, 60.0, 5)}
    assert {"crash", "restart", "wipe", "loss", "partition", "slow_link", "straggler"} <= kinds


def test_exclude_keeps_peers_out_of_the_draw_and_count_zero_does_nothing():
    events = parse_faults([{"kind": "crash", "count": 14, "exclude": [0], "at_round": 2},
                           {"kind": "crash", "count": 0, "exclude": [0], "at_s": 1},
                           {"kind": "loss", "count": 0, "probability": 1.0, "at_s": 1}])  # not "every link"
    for seed in range(20):
        actions = resolve_faults(events, peers=47, seed=seed)
        assert len(actions) == 1 and len(actions[0].peers) == 14 and 0 not in actions[0].peers
    with pytest.raises(ValueError, match=r"faults.0.count: 5 is more than the 4 peers not excluded"):
        check_faults(parse_faults([{"kind": "crash", "count": 5, "exclude": [0], "at_s": 1}]), 5)
    with pytest.raises(ValueError, match=r"faults.0.exclude: peer 9 does not exist"):
        check_faults(parse_faults([{"kind": "crash", "count": 1, "exclude": [9], "at_s": 1}]), 5)
    assert error_of([{"kind": "crash", "peers": [1], "exclude": [0], "at_s": 1}]).startswith("faults.0.exclude: only with")

"""Coordinator mode: quorum of live workers, retries, load balancing, failover; outcomes, not timings."""

from __future__ import annotations

import pytest

from meshfl.algorithms.coordinator import next_epochs, quorum_reached, retry_delay, staleness_weight
from meshfl.config import load_config
from meshfl.experiment.run import simulate, summarise

BASE = ["algorithm=coordinator", "data.dataset=digits", "coordinator.epochs=3", "coordinator.round_timeout_s=20",
        "coordinator.retry_base_s=2", "liveness.timeout_s=2"]


def run(*overrides: str) -> tuple[dict, list[dict]]:
    config = load_config(None, [*BASE, *overrides])
    result, metrics, _ = simulate(config)
    return summarise(config, result, metrics, 0.0), metrics.events


def logged(events, metric):
    return [e for e in events if e.get("metric") == metric]


def test_quorum_counts_live_workers_and_never_asks_more_than_are_left():
    assert quorum_reached(6, 8, 0.75, 1) and not quorum_reached(5, 8, 0.75, 1)
    assert quorum_reached(3, 4, 0.75, 1)  # 8 workers, 4 died: 3 of the 4 left is enough
    assert not quorum_reached(1, 4, 0.1, 2) and quorum_reached(2, 4, 0.1, 2)  # min_updates
    assert quorum_reached(1, 1, 0.75, 3)  # fewer live workers than min_updates: all of them
    assert not quorum_reached(0, 0, 0.75, 1)


def test_load_balancing_rules_and_backoff():
    assert next_epochs("aimd", 2, 1.0, True, 1.0, 1, 5) == 3
    assert next_epochs("aimd", 4, None, False, 1.0, 1, 5) == 2
    assert next_epochs("aimd", 1, None, False, 1.0, 1, 5) == 1  # bounded below
    assert next_epochs("speed", 4, 4.0, True, 1.0, 1, 5) == 1  # 4x slower than the median: a quarter
    assert next_epochs("speed", 2, 1.0, True, 2.0, 1, 5) == 4
    assert next_epochs("off", 3, 9.0, False, 1.0, 1, 5) == 3
    assert [retry_delay(a, 1.0, 5.0, 1.0 - 1e-12) for a in range(5)] == pytest.approx([1, 2, 4, 5, 5])
    assert retry_delay(0, 1.0, 5.0, 0.0) == 0.5
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.25


def test_every_peer_ends_with_the_global_model():
    summary, events = run("peers=5", "rounds=5")
    assert summary["dead_peers"] == [] and set(summary["peer_status"].values()) == {"finished"}
    final = summary["final_global_accuracy"]
    assert min(final.values()) > 0.75 and max(final.values()) - min(final.values()) < 1e-9, final  # chance is 0.1
    assert {e["round"] for e in logged(events, "global_accuracy")} == {1, 2, 3, 4, 5}


def test_dead_workers_leave_the_quorum_and_no_round_stalls():
    summary, events = run("peers=9", "rounds=6", "faults=[{kind: crash, peers: [5, 6, 7, 8], at_round: 2}]")
    assert summary["dead_peers"] == [5, 6, 7, 8]
    live = [summary["final_global_accuracy"][str(p)] for p in range(5)]
    assert min(live) > 0.7, live
    assert {e["round"] for e in logged(events, "global_accuracy") if e["peer"] == 0} == set(range(1, 7))


def test_the_coordinator_crashes_for_good_and_the_lowest_live_peer_takes_over():
    summary, events = run("peers=5", "rounds=6", "faults=[{kind: crash, peers: [0], at_round: 3}]")
    assert summary["dead_peers"] == [0]
    leaders = [(e["peer"], e["value"]) for e in logged(events, "coordinating")]
    assert leaders[0] == (0, 0) and leaders[-1][0] == 1 and len(leaders) == 2
    rounds = {e["round"] for e in logged(events, "global_accuracy") if e["peer"] == 1}
    assert max(rounds) == 6  # training went on to the last round
    accuracy = {e["round"]: e["value"] for e in logged(events, "global_accuracy") if e["peer"] == 1}
    assert accuracy[6] > accuracy[2], accuracy


def test_late_updates_are_counted_and_folded_in_with_the_stale_policy():
    # one worker at half the speed misses every quorum of 0.6; its updates land in the next round
    slow = ["compute.tiers=[{peers: [4], speed: 0.5}]", "coordinator.quorum=0.6", "compute.seconds_per_sample=0.001"]
    summary, events = run("peers=5", "rounds=6", "coordinator.late_policy=stale", *slow)
    assert logged(events, "late_update") and summary["dead_peers"] == []
    assert min(summary["final_global_accuracy"].values()) > 0.5

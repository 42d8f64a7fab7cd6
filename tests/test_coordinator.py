"""Coordinator mode: quorum of live workers, retries, load balancing, failover; outcomes, not timings."""

from __future__ import annotations

import pytest
import torch

from meshfl.aggregate.staleness import StalenessConfig, staleness_weight
from meshfl.algorithms.coordinator import Estimate, Update, estimate, next_workload, quorum_reached, rank, retry_delay
from meshfl.config import load_config
from meshfl.experiment.run import simulate, summarise

BASE = ["algorithm=coordinator", "data.dataset=digits", "coordinator.workload=3", "coordinator.round_timeout_s=20",
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
    assert next_workload("aimd", 2, True, None, None, 1, 5) == 3
    assert next_workload("aimd", 2, True, None, None, 1, 50, increase=10) == 12
    assert next_workload("aimd", 4, False, None, None, 1, 5) == 2
    assert next_workload("aimd", 1, False, None, None, 1, 5) == 1  # bounded below
    # speed: 1 s of communication, 10 units/s; to take 5 s it gets 40 units; bounded by the cap
    assert next_workload("speed", 8, True, Estimate(1.0, 10.0), 5.0, 1, 100) == 40
    assert next_workload("speed", 8, True, Estimate(1.0, 10.0), 5.0, 1, 30) == 30
    assert next_workload("speed", 8, True, Estimate(6.0, 10.0), 5.0, 1, 100) == 1  # communication alone exceeds it
    assert next_workload("speed", 8, False, Estimate(1.0, 10.0), 5.0, 1, 100) == 40  # late, but measured
    assert next_workload("speed", 8, False, None, 5.0, 1, 100) == 4  # not heard from: half
    assert next_workload("off", 3, False, Estimate(1.0, 10.0), 5.0, 1, 5) == 3
    speed = estimate(workload=20, round_trip=3.0, train_s=2.0)
    assert speed == Estimate(1.0, 10.0) and speed.round_trip(20) == 3.0
    assert estimate(workload=20, round_trip=3.0, train_s=1e9).comm_s == 0.0  # a claim beyond what we saw is cut
    assert [retry_delay(a, 1.0, 2.0, 5.0, 1.0 - 1e-12) for a in range(5)] == pytest.approx([1, 2, 4, 5, 5])
    assert [retry_delay(a, 1.0, 3.0, 100.0, 1.0 - 1e-12) for a in range(3)] == pytest.approx([1, 3, 9])
    assert retry_delay(0, 1.0, 2.0, 5.0, 0.0) == 0.5
    assert rank(5, 0, 3) > rank(4, 9, 0)  # the newer model first
    assert rank(4, 1, 1) > rank(4, 0, 0)  # then the later term: a successor beats the coordinator it replaced
    assert rank(4, 1, 0) > rank(4, 1, 3) and not rank(4, 1, 1) > rank(4, 1, 1)  # then the lower id


def test_staleness_decays():
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.25 and staleness_weight(-2) == 1.0
    exp = StalenessConfig(decay="exponential", rate=0.5)
    assert staleness_weight(2, exp) == pytest.approx(0.36787944)
    assert staleness_weight(3, StalenessConfig(decay="polynomial", exponent=0.5)) == pytest.approx(0.5)
    hinge = StalenessConfig(decay="hinge", rate=1.0, grace=2)
    assert [staleness_weight(s, hinge) for s in (0, 2, 3, 5)] == pytest.approx([1, 1, 0.5, 0.25])
    assert staleness_weight(9, StalenessConfig(decay="constant")) == 1.0


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
    assert min(live) > 0.6, live  # 0.69: the crash lands while round 2's updates are due, so that round has fewer
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


def test_late_updates_are_counted_per_worker_and_folded_in_only_with_the_stale_policy():
    # one worker at half the speed misses every quorum of 0.6; its updates land in the next round
    slow = ["compute.tiers=[{peers: [4], speed: 0.5}]", "coordinator.quorum=0.6", "compute.seconds_per_sample=0.001"]
    for policy in ("stale", "drop"):
        summary, events = run("peers=5", "rounds=6", f"coordinator.late_policy={policy}", *slow)
        late = logged(events, "late_updates")
        assert late and {e["about"] for e in late} == {4} and summary["dead_peers"] == []
        assert [e["value"] for e in late] == list(range(1, len(late) + 1))  # counted per worker
        folded = logged(events, "stale_updates")
        assert (len(folded) == len(late)) if policy == "stale" else not folded, (policy, folded)
        assert min(summary["final_global_accuracy"].values()) > 0.5


def timeline(summary):
    return [(t["peer"], t["metric"], t["value"], t.get("incarnation", 0)) for t in summary["timeline"]]


@pytest.mark.parametrize("wipe", [False, True])
def test_a_returning_coordinator_follows_its_successor(wipe):
    crash = f"{{kind: crash, peers: [0], at_round: 3, wipe: {str(wipe).lower()}}}"
    summary, events = run("peers=5", "rounds=8", f"faults=[{crash}, {{kind: restart, peers: [0], at_round: 6}}]")
    steps = timeline(summary)
    assert steps[:2] == [(0, "coordinating", 0, 0), (1, "coordinating", 1, 0)]
    assert steps[-1] == (0, "following", 1, 1), steps  # back, it learns that peer 1 leads, and follows it
    returned = [t for t in summary["timeline"] if t["peer"] == 0 and t.get("incarnation") == 1]
    assert returned[0]["round"] == (0 if wipe else 2)  # its store (or nothing, wiped) ...
    assert returned[-1]["round"] > returned[0]["round"]  # ... then the successor's newer model
    assert set(summary["peer_status"].values()) == {"finished"} and set(summary["final_round"].values()) == {8}
    assert len(set(summary["final_global_accuracy"].values())) == 1  # one global model everywhere


def test_a_coordinator_restarted_before_anyone_noticed_resumes_from_its_store():
    summary, _ = run("peers=5", "rounds=6",
                     "faults=[{kind: crash, peers: [0], at_round: 3}, {kind: restart, peers: [0], at_round: 3}]")
    assert timeline(summary) == [(0, "coordinating", 0, 0), (0, "coordinating", 0, 1)]
    assert summary["timeline"][1]["round"] == 2  # round 2 was aggregated and stored before the crash
    assert set(summary["final_round"].values()) == {6} and set(summary["peer_status"].values()) == {"finished"}


def test_two_coordinators_of_a_healed_partition_agree_on_one():
    summary, _ = run("peers=6", "rounds=10",
                     "faults=[{kind: partition, groups: [[0,1,2],[3,4,5]], at_round: 2, until_round: 5}]")
    steps = timeline(summary)
    assert steps[:2] == [(0, "coordinating", 0, 0), (3, "coordinating", 3, 0)]  # one per side
    assert steps[-1] == (3, "following", 0, 0)  # healed: the lower id wins the tie
    assert set(summary["final_round"].values()) == {10} and len(set(summary["final_global_accuracy"].values())) == 1


def test_a_coordinator_left_alone_stops_after_a_round_without_workers():
    summary, events = run("peers=4", "rounds=6", "coordinator.min_updates=2",
                          "faults=[{kind: crash, peers: [2, 3], at_round: 2}, {kind: crash, peers: [1], at_round: 3}]")
    missed = [(e["round"], e["virtual_time"]) for e in logged(events, "quorum_missed")]
    assert missed and missed[0][0] == 2  # fewer updates than min_updates: logged, and the round goes on
    stopped = logged(events, "no_workers")
    assert len(stopped) == 1 and stopped[0]["round"] <= 4  # then nobody at all: it stops, not 6 x timeout
    assert stopped[0]["virtual_time"] - missed[-1][1] == pytest.approx(20.0)  # one round_timeout_s later
    assert summary["peer_status"]["0"] == "finished" and summary["final_round"]["0"] == stopped[0]["round"] - 1


# ---- one peer against scripted (and hostile) messages ----------------------------------------

def _peer(*overrides: str):
    from meshfl.algorithms.coordinator import CoordinatorPeer
    config = load_config(None, ["algorithm=coordinator", "rounds=3", "coordinator.max_workload=8", *overrides])
    return CoordinatorPeer(config.section(), config.rounds, config.liveness.timeout_s)


def test_a_worker_refuses_what_no_coordinator_could_send():
    import asyncio

    from meshfl.algorithms.coordinator import Done, Held, Work
    from meshfl.testing import FakeContext

    ctx = FakeContext(2, peers=4)
    asked: list[dict] = []
    train = ctx.train

    async def recording_train(params, **work):
        asked.append(work)
        return await train(params, **work)

    ctx.train = recording_train
    model = ctx.initial_params()
    ctx.deliver(Held(sender=3, round=10**6, term=9, leader=999, params=model), at=0.1)  # not asked for: dropped
    ctx.deliver(Work(sender=0, round=10**6, term=0, workload=2, params=model), at=0.2)  # no such round
    ctx.deliver(Work(sender=0, round=1, term=0, workload=-5, params=model), at=1.0)  # below the config's bounds
    ctx.deliver(Work(sender=0, round=2, term=0, workload=10**9, params=model), at=2.0)  # above them
    ctx.deliver(Done(sender=0, round=10**6, params=model), at=3.0)  # a round that cannot exist: not the end
    ctx.deliver(Done(sender=0, round=3, params=model), at=4.0)
    peer = _peer()
    asyncio.run(peer.run(ctx))
    assert asked == [{"epochs": 1}, {"epochs": 8}]  # min_workload, max_workload
    assert [m.round for _, m in ctx.sent_of(Update)] == [1, 2] and peer.done and peer.round == 3


def test_a_coordinator_takes_each_update_once_and_ignores_a_forged_leader():
    import asyncio

    from meshfl.algorithms.coordinator import Done, Held
    from meshfl.testing import FakeContext

    ctx = FakeContext(0, peers=3)
    model = ctx.initial_params()
    ctx.deliver(Held(sender=1, round=2, term=5, leader=999, params=model), at=0.1)  # no peer 999: not followed
    ctx.deliver(Update(sender=1, round=7, samples=10, trained=10, train_s=0.1, params=model), at=0.2)  # never sent
    for at in (0.5, 0.6):  # the same answer twice (a resend answered twice)
        ctx.deliver(Update(sender=1, round=1, samples=10, trained=10, train_s=0.1, params=model), at=at)
    ctx.deliver(Update(sender=2, round=1, samples=30, trained=30, train_s=0.1, params=model), at=0.7)
    peer = _peer("rounds=1", "coordinator.quorum=1.0")
    asyncio.run(peer.run(ctx))
    assert ctx.logs("updates") == [(2, 1)] and not ctx.logs("late_updates") and not ctx.logs("following")
    assert sorted(to for to, _ in ctx.sent_of(Done)) == [1, 2] and peer.round == 1


def test_resent_work_is_answered_once_and_not_counted_late():
    # a slow worker and a quick resend: it gets its work 2-3 times while training, answers each copy
    slow = ["compute.tiers=[{peers: [3], speed: 0.2}]", "compute.seconds_per_sample=0.002", "coordinator.quorum=1.0",
            "coordinator.retry_base_s=0.2", "coordinator.retry_cap_s=0.5", "coordinator.retries=3"]
    summary, events = run("peers=4", "rounds=3", *slow)
    resent = logged(events, "work_resent")
    assert resent and {e["about"] for e in resent} >= {3}
    assert not logged(events, "late_updates")  # its extra answers are duplicates, not late updates
    assert [e["value"] for e in logged(events, "updates")] == [3, 3, 3]


def test_aimd_and_steps_adapt_each_workers_workload():
    slow = ["compute.tiers=[{peers: [3], speed: 0.25}]", "compute.seconds_per_sample=0.002", "coordinator.quorum=1.0",
            "coordinator.workload_unit=steps", "coordinator.workload=20", "coordinator.max_workload=60",
            "coordinator.aimd_increase=10", "coordinator.load_balancing=aimd"]
    summary, events = run("peers=4", "rounds=4", *slow)
    workloads = {}
    for e in logged(events, "workload"):
        workloads.setdefault(e["about"], []).append(e["value"])
    assert workloads[1][:2] == [30, 40] and workloads[3][0] == 10  # fast: +10; the straggler: halved
    assert all(slow < fast for slow, fast in zip(workloads[3], workloads[1]))  # and it stays below
    assert logged(events, "straggler") and {e["about"] for e in logged(events, "straggler")} == {3}
    assert min(summary["final_global_accuracy"].values()) > 0.5


@pytest.mark.parametrize("rule, holds", [("fedavg", False), ("median", True), ("krum", True)])
def test_a_robust_aggregation_rule_keeps_a_lying_worker_out(rule, holds):
    import asyncio

    from meshfl.core.params import Params
    from meshfl.testing import FakeContext

    ctx = FakeContext(0, peers=6)
    start = ctx.initial_params()
    honest = Params(start.flat + 1.0, start.layout)
    for worker in (1, 2, 3, 4):
        ctx.deliver(Update(sender=worker, round=1, samples=10, trained=10, train_s=0.1, params=honest), at=0.1)
    liar = Params(start.flat - 100.0, start.layout)  # sign flipped and scaled, with a huge claimed weight
    ctx.deliver(Update(sender=5, round=1, samples=10**9, trained=10, train_s=0.1, params=liar), at=0.2)
    peer = _peer("peers=6", "rounds=1", "coordinator.quorum=1.0", f"coordinator.aggregation.rule={rule}",
                 "coordinator.aggregation.byzantine=1")
    asyncio.run(peer.run(ctx))
    assert torch.allclose(peer.model.flat, honest.flat) == holds


def test_krum_needs_enough_workers_and_falls_back_to_the_median_when_too_few_are_left():
    from meshfl.config import ConfigError
    with pytest.raises(ConfigError, match="coordinator.aggregation.byzantine: krum with f=1 needs more than 4 workers"):
        load_config(None, ["algorithm=coordinator", "peers=4", "coordinator.aggregation.rule=krum"])
    summary, events = run("peers=8", "rounds=4", "coordinator.aggregation.rule=krum",
                          "faults=[{kind: crash, count: 4, exclude: [0], at_round: 2}]")
    fallback = logged(events, "aggregation_fallback")
    assert fallback and all(e["value"] <= 4 for e in fallback)  # 3 models left: median instead of Krum
    assert all(summary["final_round"][str(p)] == 4 for p in range(8) if p not in summary["dead_peers"])

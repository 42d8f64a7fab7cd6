"""One set of algorithm-level scenarios, run on both runtimes: the simulator and real gRPC processes.

Each scenario is an experiment config with a `faults:` schedule; both runtimes read the same
config and must reach the same outcome (who finished, who is dead, incarnations, accuracy).
"""

from __future__ import annotations

import pytest

from meshfl.config import load_config
from meshfl.experiment.launch import launch_local
from meshfl.experiment.run import simulate, summarise

# short real-time timeouts, so a lost peer costs seconds, not minutes
FAST = ["data.dataset=digits", "train.local_epochs=1", "gossip.vote_timeout_s=8", "gossip.aggregation_timeout_s=12",
        "gossip.wait_model_timeout_s=12", "gossip.diffusion_timeout_s=4", "gossip.join_timeout_s=3",
        "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=3"]

ALGORITHMS = {
    "gossip": [],
    "coordinator": ["algorithm=coordinator", "coordinator.round_timeout_s=12", "coordinator.retry_base_s=2",
                    "coordinator.workload=2"],
}
# coordinator rounds on digits take ~0.05 s over gRPC: make them ~2 s, so a restarted worker
# (~3 s to start a process) is back, and a partition heals, while the others still run
SLOWER = {("coordinator", scenario): ["coordinator.workload=200", "coordinator.max_workload=200"]
          for scenario in ("restarted_peer", "partition_heals")}

SCENARIOS = {
    "completes": ([], {}),
    "crashed_peer": (["faults=[{kind: crash, peers: [3], at_round: 2}]"], {"dead": [3]}),
    "restarted_peer": (["rounds=8", "faults=[{kind: crash, peers: [3], at_round: 1}, {kind: restart, peers: [3], at_round: 2}]"],
                       {"incarnations": {3: 2}}),
    "partition_heals": (["rounds=6", "faults=[{kind: partition, groups: [[0, 1], [2, 3]], at_round: 2, until_round: 4}]"], {}),
}


def run(runtime: str, overrides: list[str], tmp_path, port: int) -> dict:
    config = load_config(None, ["peers=4", "rounds=3", *FAST, f"grpc.base_port={port}", *overrides])
    if runtime == "sim":
        result, metrics, _ = simulate(config)
        return summarise(config, result, metrics, 0.0)
    return launch_local(config, tmp_path / "run", timeout_s=240, report=False).summary


@pytest.mark.parametrize("runtime", ["sim", "grpc"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_scenario(algorithm, runtime, scenario, tmp_path):
    overrides, expect = SCENARIOS[scenario]
    port = 51000 + 20 * sorted(SCENARIOS).index(scenario) + 100 * sorted(ALGORITHMS).index(algorithm)
    summary = run(runtime, [*ALGORITHMS[algorithm], *SLOWER.get((algorithm, scenario), []), *overrides], tmp_path, port)
    dead = expect.get("dead", [])
    assert summary["dead_peers"] == dead, summary["peer_status"]
    for peer in range(4):
        status = summary["peer_status"][str(peer)]
        assert status == ("crashed" if peer in dead else "finished"), (peer, summary["peer_status"])
    for peer, count in expect.get("incarnations", {}).items():
        assert summary["incarnations"][str(peer)] == count
    live = [summary["final_global_accuracy"][str(p)] for p in range(4) if p not in dead]
    assert all(a is not None and a > 0.5 for a in live), summary["final_global_accuracy"]  # chance is 0.1
    if algorithm == "coordinator":  # one global model: every live peer ends on it, at the last round
        assert len(set(live)) == 1, summary["final_global_accuracy"]
        assert {summary["final_round"][str(p)] for p in range(4) if p not in dead} == {summary["rounds"]}


@pytest.mark.parametrize("runtime", ["sim", "grpc"])
def test_gossip_individual_exchange_with_a_liar_and_a_crash(runtime, tmp_path):
    """Robust gossip in both runtimes: peer 1 sign-flips from round 1's first metric on, peer 3 crashes at round 2;
    every peer aggregates the individual models itself (median), so the honest ones still learn."""
    overrides = ["gossip.exchange=individual", "gossip.aggregation.rule=median", "rounds=4", "train.local_epochs=3",
                 "faults=[{kind: byzantine, behaviour: sign_flip, peers: [1], at_round: 1}, "
                 "{kind: crash, peers: [3], at_round: 2}]"]
    summary = run(runtime, overrides, tmp_path, 51400)
    assert summary["dead_peers"] == [3] and summary["byzantine_peers"] == [1], summary["peer_status"]
    assert [summary["peer_status"][str(p)] for p in range(3)] == ["finished"] * 3
    assert summary["messages_by_type"].get("Contribution", 0) > 0 and "PartialModel" not in summary["messages_by_type"]
    honest = [summary["final_global_accuracy"][str(p)] for p in (0, 2)]
    assert all(a is not None and a > 0.5 for a in honest), summary["final_global_accuracy"]


@pytest.mark.parametrize("runtime", ["sim", "grpc"])
def test_a_sign_flipping_peer_sinks_plain_fedavg_gossip_in_both_runtimes(runtime, tmp_path):
    """The Byzantine fault means the same over gRPC (the launcher fires it through faults.json) as in the simulator."""
    overrides = ["rounds=4", "train.local_epochs=3",
                 "faults=[{kind: byzantine, behaviour: sign_flip, peers: [1], at_round: 1}]"]
    summary = run(runtime, overrides, tmp_path, 51420)
    assert summary["byzantine_peers"] == [1] and summary["dead_peers"] == []
    honest = [summary["final_global_accuracy"][str(p)] for p in (0, 2, 3)]
    assert all(a is not None and a < 0.3 for a in honest), summary["final_global_accuracy"]  # clean: > 0.8

"""gossip with checkpoints and recovery: the three tiers after a crash, a wiped store and wiped holders;
the restarted peer rejoins at the network's round and every later round aggregates all peers again."""

import pytest
import torch

from meshfl.algorithms.checkpoints import newest_valid_checkpoint
from meshfl.algorithms.replica_codec import checksum
from meshfl.config import load_config
from meshfl.core.metrics import without_wall_clock
from meshfl.experiment.run import simulate, summarise

BASE = ["algorithm=gossip", "data.dataset=digits", "peers=4", "rounds=6", "topology.kind=line",
        "gossip.train_set_size=4", "gossip.checkpoints.enabled=true", "gossip.checkpoints.replica_every=1",
        "train.optimizer=adam", "train.learning_rate=0.01"]
CRASH = "{kind: crash, peers: [0], at_round: 3%s}"
RESTART = "{kind: restart, peers: [0], at_round: 4}"
VARIANTS = {
    1: [CRASH % "", RESTART],  # the process dies, its store survives
    2: [CRASH % ", wipe: true", RESTART],  # its store is wiped: replicas at peers 3 and 2 (farthest on the line)
    3: [CRASH % ", wipe: true", "{kind: wipe, peers: [2, 3], at_round: 3}", RESTART],  # its holders are wiped too
}


def metric(metrics, name, peer=None):
    return [e for e in metrics.events if e["event"] == "metric" and e["metric"] == name
            and (peer is None or e["peer"] == peer)]


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_the_restarted_peer_recovers_by_its_tier_and_rejoins_the_whole_network(tier):
    config = load_config(None, [*BASE, f"faults=[{', '.join(VARIANTS[tier])}]"])
    result, metrics, _ = simulate(config)
    summary = summarise(config, result, metrics, 0.0)
    assert [e["value"] for e in metric(metrics, "recovery_tier", 0)] == [tier]
    rejoined = [e["value"] for e in metric(metrics, "rejoined", 0)]
    assert len(rejoined) == 1 and rejoined[0] >= 3  # the network's round, from its neighbour
    assert all(summary["final_round"][str(p)] == 6 for p in range(4)) and summary["dead_peers"] == []
    after = int(rejoined[0]) + 1
    assert not [e for e in metric(metrics, "missed_models") if e["round"] >= after]  # nobody misses peer 0 again
    accuracies = {e["peer"]: e["value"] for e in metric(metrics, "global_accuracy") if e["round"] == 6}
    assert sorted(accuracies) == [0, 1, 2, 3] and min(accuracies.values()) > 0.85  # measured 0.95
    full = [e["value"] for e in metric(metrics, "replica_bytes_full", 0)]
    delta = [e["value"] for e in metric(metrics, "replica_bytes_delta", 0)]
    assert full and delta and max(delta) < 0.85 * min(full)  # lossless float32 deltas: ~0.79 of a full replica


def test_tier_one_restores_exactly_the_last_checkpoint(monkeypatch):
    """What recover() returns is bit-for-bit the checkpoint the peer stored before it crashed."""
    from meshfl.algorithms import recovery as recovery_module

    seen = []
    original = recovery_module.Recovery.recover

    async def spy(self, ctx, layout, **kwargs):
        stored, meta, _ = newest_valid_checkpoint(ctx.store, layout, peer=ctx.peer_id)
        result = await original(self, ctx, layout, **kwargs)
        seen.append((stored, meta, result))
        return result

    monkeypatch.setattr(recovery_module.Recovery, "recover", spy)
    config = load_config(None, [*BASE, f"faults=[{', '.join(VARIANTS[1])}]"])
    simulate(config)
    (stored, meta, result), = seen
    assert result.tier == 1 and result.round == meta["round"] == 2 and meta["kind"] == "round_finished"
    assert torch.equal(result.params.flat, stored.flat) and checksum(result.params) == meta["checksum"]


def test_checkpoints_do_not_change_a_failure_free_run_and_repeat_bit_identically():
    plain = load_config(None, [b for b in BASE if "checkpoints" not in b] + ["rounds=3"])
    _, without, _ = simulate(plain)
    on = load_config(None, [*BASE, "rounds=3"])
    _, first, _ = simulate(on)
    _, again, _ = simulate(on)
    assert without_wall_clock(first.events) == without_wall_clock(again.events)
    accuracy = lambda m: [(e["peer"], e["round"], e["value"]) for e in metric(m, "global_accuracy")]  # noqa: E731
    assert sorted(accuracy(first)) == sorted(accuracy(without))


def test_a_peer_restarted_within_the_round_it_crashed_in_is_not_awaited_in_the_rounds_it_skips():
    """Crash and restart in round 3: it rejoins at round 4, and nobody waits out a vote or model timeout
    for its round-3 ballot or model (its round-4 ballot says it skipped round 3)."""
    config = load_config(None, [*BASE, "rounds=5", "gossip.vote_timeout_s=30", "gossip.aggregation_timeout_s=300",
                                "faults=[{kind: crash, peers: [0], at_round: 3}, {kind: restart, peers: [0], at_round: 3}]"])
    result, metrics, _ = simulate(config)
    summary = summarise(config, result, metrics, 0.0)
    assert all(summary["final_round"][str(p)] == 5 for p in range(4))
    assert result.virtual_time_s < 30  # no vote timeout (30 s) and no aggregation timeout (300 s) was waited out
    rejoined = [e["value"] for e in metric(metrics, "rejoined", 0)]
    assert rejoined == [3] or rejoined == [2]
    assert not [e for e in metric(metrics, "missed_models") if e["round"] > rejoined[0] + 1]


def test_tier_two_with_int8_deltas_rebuilds_exactly_what_the_origin_signed_and_deltas_are_a_fifth_of_full(monkeypatch):
    from meshfl.algorithms import recovery as recovery_module

    seen = []
    original = recovery_module.Recovery.recover

    async def spy(self, ctx, layout, **kwargs):
        result = await original(self, ctx, layout, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(recovery_module.Recovery, "recover", spy)
    config = load_config(None, [*BASE, "gossip.checkpoints.replica_codec=int8", f"faults=[{', '.join(VARIANTS[2])}]"])
    _, metrics, _ = simulate(config)
    (result,) = seen
    assert result.tier == 2 and result.round == 2 and result.meta["codec"] == "int8"
    assert checksum(result.params) == result.meta["checksum"]  # what the origin signed it would rebuild
    full = [e["value"] for e in metric(metrics, "replica_bytes_full", 0)]
    delta = [e["value"] for e in metric(metrics, "replica_bytes_delta", 0)]
    assert max(delta) < 0.35 * min(full)  # measured 0.18 (digits MLP and MNIST MLP)

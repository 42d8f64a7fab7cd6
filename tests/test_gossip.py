import numpy as np
import pytest
import torch

from meshfl.algorithms.gossip import Ballot, choose_targets, make_ballot, tally_votes
from meshfl.config import load_config
from meshfl.core.metrics import without_wall_clock
from meshfl.experiment.run import simulate

SMALL = ["data.dataset=digits", "train.local_epochs=2", "gossip.aggregation_timeout_s=60"]


def metric_table(events, metric):
    table = {}
    for e in events:
        if e["event"] == "metric" and e["metric"] == metric:
            table[(e["round"], e["peer"])] = e["value"]
    return table


def test_tally_takes_most_voted_and_breaks_ties_by_lower_id():
    votes = [Ballot(0, (5, 2, 7), (10, 4, 4)), Ballot(1, (3, 7), (6, 0))]
    assert tally_votes(votes, 2) == (3, 5)
    assert tally_votes(votes, 3) == (2, 3, 5)  # 2 and 7 tie at 4: the lower id wins
    assert tally_votes(votes, 10) == (2, 3, 5, 7)
    assert tally_votes([Ballot(0, (4,), (0,))], 3) == (4,)  # named with weight 0 still ranks; unnamed peers never
    assert tally_votes([], 2) == () and tally_votes([Ballot(1, (), ())], 2) == ()


def test_vote_and_targets_are_deterministic_per_generator():
    peers = tuple(range(10))
    a = make_ballot(np.random.default_rng([1, 2]), 3, peers, 4)
    assert a == make_ballot(np.random.default_rng([1, 2]), 3, peers, 4)
    assert a.origin == 3 and len(set(a.candidates)) == 4 and all(w >= 0 for w in a.weights)
    assert choose_targets(np.random.default_rng(0), [], [4, 1], 3) == [1, 4]
    picked = choose_targets(np.random.default_rng(0), [1, 2, 3, 4], [9], 2)
    assert len(picked) == 2 and set(picked) <= {1, 2, 3, 4}


def test_full_train_set_no_loss_every_peer_ends_each_round_with_the_same_model():
    config = load_config(None, SMALL + ["peers=6", "rounds=3", "gossip.train_set_size=6", "gossip.gossip_fanout=2"])
    result, metrics, _ = simulate(config)
    losses = metric_table(metrics.events, "global_loss")
    for round in range(1, 4):
        per_peer = [losses[(round, p)] for p in range(6)]
        assert max(per_peer) - min(per_peer) < 1e-6, (round, per_peer)
    finals = [result.final_params[p].flat for p in range(6)]
    for other in finals[1:]:
        assert torch.allclose(finals[0], other, rtol=0, atol=1e-6)
    accuracy = metric_table(metrics.events, "global_accuracy")
    assert min(accuracy[(3, p)] for p in range(6)) > 0.5  # chance is 0.1
    assert not [e for e in metrics.events if e.get("metric", "").startswith("missed")]


def test_train_set_subset_ring_topology_and_message_loss_finish_every_round():
    config = load_config(None, SMALL + ["peers=7", "rounds=3", "topology.kind=ring", "network.loss=0.05",
                                        "gossip.train_set_size=3", "gossip.aggregation_timeout_s=20",
                                        "gossip.wait_model_timeout_s=20", "gossip.diffusion_timeout_s=10"])
    result, metrics, _ = simulate(config)
    accuracy = metric_table(metrics.events, "global_accuracy")
    assert sorted(p for (r, p) in accuracy if r == 3) == list(range(7))  # no peer hung
    assert sum(result.traffic.messages_dropped) > 0
    assert np.mean([accuracy[(3, p)] for p in range(7)]) > 0.45  # chance is 0.1; 3 rounds of 3 trainers (0.52 measured)


def test_same_seed_same_metrics_other_seed_differs():
    overrides = SMALL + ["peers=4", "rounds=2", "gossip.train_set_size=2", "network.loss=0.02"]
    first = without_wall_clock(simulate(load_config(None, overrides))[1].events)
    again = without_wall_clock(simulate(load_config(None, overrides))[1].events)
    other = without_wall_clock(simulate(load_config(None, overrides + ["seed=1"]))[1].events)
    assert first == again
    assert first != other


def test_unreachable_peer_times_out_and_records_what_it_missed():
    # The initiator's model cannot reach anyone in time: every other peer records the miss and goes on.
    config = load_config(None, SMALL + ["peers=3", "rounds=1", "network.latency_s=100", "gossip.wait_model_timeout_s=5",
                                        "gossip.vote_timeout_s=5", "gossip.aggregation_timeout_s=5",
                                        "gossip.diffusion_timeout_s=5"])
    _, metrics, _ = simulate(config)
    missed = {(e["peer"], e["metric"]) for e in metrics.events if e.get("metric", "").startswith("missed")}
    assert {(1, "missed_initial_model"), (2, "missed_initial_model")} <= missed
    assert any(m == "missed_votes" for _, m in missed)
    assert len(metric_table(metrics.events, "global_accuracy")) == 3


@pytest.mark.parametrize("kind", ["line", "star", "grid", "random", "small_world"])
def test_every_topology_completes_with_all_models(kind):
    config = load_config(None, SMALL + ["peers=6", "rounds=1", f"topology.kind={kind}",
                                        "gossip.train_set_size=3", "train.local_epochs=1"])
    _, metrics, _ = simulate(config)
    assert len(metric_table(metrics.events, "global_accuracy")) == 6
    assert not [e for e in metrics.events if e.get("metric") == "missed_models"]


def test_two_processes_with_different_hash_seeds_write_identical_metrics(tmp_path):
    import json
    import os
    import subprocess
    import sys

    def run(hash_seed, seed, name):
        env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "meshfl.cli", "run", "--quiet", "--out", str(out), "--set", "peers=4",
                        "--set", "rounds=2", "--set", "train.local_epochs=1", "--set", "gossip.train_set_size=3",
                        "--set", "network.loss=0.05", "--set", f"seed={seed}"], env=env, check=True, capture_output=True)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in lines]

    first, second, other = run(1, 7, "a"), run(2, 7, "b"), run(1, 8, "c")
    assert len(first) > 20
    assert first == second
    assert first != other


def test_batched_vote_relays_elect_the_same_train_set_with_far_fewer_messages():
    """Relays batch ballots: every peer still tallies every ballot, at a fraction of per-ballot flooding."""
    base = SMALL + ["peers=24", "rounds=2", "topology.kind=random", "topology.edge_probability=0.3", "gossip.train_set_size=4"]
    flooded = simulate(load_config(None, base + ["gossip.vote_batch_s=0"]))
    batched = simulate(load_config(None, base + ["gossip.vote_batch_s=0.02"]))
    for result, metrics, _ in (flooded, batched):
        assert not [e for e in metrics.events if e.get("metric") in ("missed_votes", "missed_models")]
    flooded_votes = flooded[0].traffic.messages_by_type["Votes"]
    batched_votes = batched[0].traffic.messages_by_type["Votes"]
    assert batched_votes * 4 < flooded_votes, (batched_votes, flooded_votes)
    # every peer tallied the same ballots, elected the same train set and ended with the same model
    final = batched[0].final_params
    for p in range(1, 24):
        assert torch.allclose(final[0].flat, final[p].flat, atol=1e-5)

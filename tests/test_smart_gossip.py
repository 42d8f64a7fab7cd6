"""smart_gossip: staleness weights, versioned late updates, the neighbour cache, degree-aware targets,
asynchronous rounds with stragglers, restarts and determinism."""

import math

import numpy as np
import pytest
import torch

from meshfl.algorithms.smart_gossip import (
    Holds,
    SmartGossipConfig,
    SmartGossipPeer,
    Update,
    degree_order,
    gini,
    seeded_train_set,
    staleness_weight,
    update_bytes,
)
from meshfl.config import load_config
from meshfl.core.metrics import without_wall_clock
from meshfl.core.params import Params
from meshfl.experiment.run import simulate, summarise
from meshfl.testing import DEFAULT_LAYOUT, FakeContext

SMALL = ["algorithm=smart_gossip", "data.dataset=digits", "train.local_epochs=2", "train.optimizer=adam", "train.learning_rate=0.01"]


def filled(value: float) -> Params:
    return Params(torch.full((DEFAULT_LAYOUT.numel,), float(value)), DEFAULT_LAYOUT)


def update(ctx: FakeContext, origin: int, version: int, value: float, samples: int = 100, sender: int | None = None) -> Update:
    params = filled(value)
    return Update(sender=origin if sender is None else sender, origin=origin, version=version, samples=samples,
                  params=params, signature=ctx.sign_as(origin, update_bytes(origin, version, samples, params)))


def peer_at(round: int, rounds: int = 10, **config) -> SmartGossipPeer:
    peer = SmartGossipPeer(SmartGossipConfig(**config), rounds=rounds, seed=0)
    peer.round = round
    peer.model = filled(0.0)
    peer._peers = frozenset(range(4))
    return peer


# ---- the maths ------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "extra", "expected"), [
    ("inverse", {}, [1, 1 / 2, 1 / 3, 1 / 4]),
    ("exponential", {"staleness_lambda": 0.5}, [1, math.exp(-0.5), math.exp(-1), math.exp(-1.5)]),
    ("polynomial", {"staleness_a": 0.5}, [1, 2 ** -0.5, 3 ** -0.5, 4 ** -0.5]),
    ("hinge", {"staleness_a": 0.5, "staleness_b": 1}, [1, 1, 1 / 1.5, 1 / 2]),
    ("constant", {}, [1, 1, 1, 1]),
])
def test_staleness_weights_are_the_named_functions(kind, extra, expected):
    config = SmartGossipConfig(staleness=kind, **extra)
    assert [staleness_weight(config, s) for s in range(4)] == pytest.approx(expected)
    assert staleness_weight(config, -3) == 1.0  # a newer update than our round is fresh


def test_the_train_set_is_the_same_at_every_peer_and_changes_with_round_and_seed():
    peers = tuple(range(20))
    first = seeded_train_set(7, 3, peers, 5)
    assert first == seeded_train_set(7, 3, peers, 5) and len(first) == 5 and set(first) <= set(peers)
    assert first != seeded_train_set(7, 4, peers, 5) or first != seeded_train_set(7, 5, peers, 5)
    assert first != seeded_train_set(8, 3, peers, 5) or first != seeded_train_set(9, 3, peers, 5)
    assert seeded_train_set(7, 3, peers, 50) == peers


def test_degree_order_puts_most_interactions_first_and_breaks_ties_at_random():
    counts = {1: 5, 2: 0, 3: 2, 4: 2, 5: 0}
    orders = {tuple(degree_order(np.random.default_rng(s), [1, 2, 3, 4, 5], counts)) for s in range(30)}
    assert all(o[0] == 1 and set(o[1:3]) == {3, 4} and set(o[3:]) == {2, 5} for o in orders)
    assert len(orders) == 4  # both tie groups appear in both orders
    assert degree_order(np.random.default_rng(1), [1, 2, 3], {}) == degree_order(np.random.default_rng(1), [1, 2, 3], {})


def test_gini():
    assert gini([3, 3, 3, 3]) == 0.0
    assert gini([0, 0, 0, 8]) == pytest.approx(0.75)
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0


# ---- choosing and weighting updates --------------------------------------------------------

def test_sync_round_averages_the_train_sets_fresh_updates():
    ctx = FakeContext(0, 4)
    peer = peer_at(2)
    for origin, value in ((0, 1.0), (1, 2.0), (2, 3.0), (3, 6.0)):
        peer._keep(update(ctx, origin, 2, value))
    chosen = peer.choose(ctx, 2, (0, 1, 2, 3))
    assert [(w.update.origin, w.reason, w.weight) for w in chosen] == [(o, "fresh", 100.0) for o in range(4)]
    assert torch.allclose(peer._aggregate(ctx, 2, chosen).flat, filled(3.0).flat)
    assert peer.used == {0: 2, 1: 2, 2: 2, 3: 2}


def test_a_late_update_is_folded_in_with_its_staleness_weight_once():
    ctx = FakeContext(0, 4)
    peer = peer_at(3, mode="async", staleness="inverse")
    peer._keep(update(ctx, 0, 3, 0.0))
    peer._keep(update(ctx, 1, 3, 0.0))
    peer._keep(update(ctx, 3, 1, 9.0))  # peer 3's round-1 model, arriving in round 3: 2 rounds stale
    chosen = peer.choose(ctx, 3, (0, 1, 2))
    assert [(w.update.origin, w.reason, w.staleness) for w in chosen] == [(0, "fresh", 0), (1, "fresh", 0), (3, "late", 2)]
    model = peer._aggregate(ctx, 3, chosen)
    assert torch.allclose(model.flat, filled(9.0 * (1 / 3) / (2 + 1 / 3)).flat)
    assert ctx.logs("late_updates") == [(1, 3)]
    # next round it is no longer late (already used), nor cached (peer 3 is no train-set member of round 4);
    # peer 1's round-3 model stands in for its missing round-4 one (cache: on in async mode)
    assert [(w.update.origin, w.reason) for w in peer.choose(ctx, 4, (0, 1))] == [(1, "cached")]


def test_staleness_none_drops_late_updates_as_p2pfl_does():
    ctx = FakeContext(0, 4)
    peer = peer_at(3, mode="async", staleness="none")
    peer._keep(update(ctx, 1, 3, 2.0))
    peer._keep(update(ctx, 3, 1, 9.0))
    chosen = peer.choose(ctx, 3, (0, 1, 2))
    assert [w.update.origin for w in chosen] == [1]
    assert ctx.logs("dropped_stale") == [(1, 3)]


def test_too_stale_updates_are_never_used():
    ctx = FakeContext(0, 4)
    peer = peer_at(9, mode="async", max_staleness=3)
    peer._keep(update(ctx, 3, 2, 9.0))
    assert peer.choose(ctx, 9, (0, 1, 2)) == []


@pytest.mark.parametrize("cache", [True, False])
def test_a_missing_train_set_neighbours_cached_model_stands_in(cache):
    ctx = FakeContext(0, 4)
    peer = peer_at(4, mode="async", cache=cache)
    peer._keep(update(ctx, 1, 4, 1.0))
    peer._keep(update(ctx, 2, 2, 5.0))
    peer.used = {2: 2}  # already folded into round 2's model: not late any more
    chosen = peer.choose(ctx, 4, (1, 2))
    if cache:
        assert [(w.update.origin, w.reason, w.weight) for w in chosen] == [(1, "fresh", 100.0), (2, "cached", 100 * (1 / 3))]
    else:
        assert [w.update.origin for w in chosen] == [1]


def test_the_cache_is_on_by_default_only_in_async_mode():
    assert SmartGossipConfig(mode="async").uses_cache and not SmartGossipConfig(mode="sync").uses_cache
    assert SmartGossipConfig(mode="sync", cache=True).uses_cache


def test_a_round_closes_at_the_fraction_in_async_mode_and_on_all_in_sync_mode():
    ctx = FakeContext(0, 10)
    for mode, expected in (("async", [False] * 6 + [True] * 4), ("sync", [False] * 9 + [True])):
        peer = peer_at(1, mode=mode, round_fraction=0.7)
        closed = []
        for origin in range(10):
            peer._keep(update(ctx, origin, 1, 0.0))
            closed.append(peer._round_closed(ctx, 1, tuple(range(10))))
        assert closed == expected, mode


# ---- receiving and sending -----------------------------------------------------------------

def test_forged_and_impossible_updates_are_refused():
    ctx = FakeContext(0, 4)
    peer = peer_at(1, rounds=5)
    honest = update(ctx, 2, 1, 1.0)
    peer.handle(ctx, Update(sender=3, origin=2, version=1, samples=100, params=filled(7.0), signature=honest.signature))
    peer.handle(ctx, update(ctx, 2, 6, 1.0))  # version past the run's last round
    peer.handle(ctx, Update(sender=3, origin=9, version=1, samples=100, params=filled(7.0)))  # no such peer
    assert peer.updates == {} and peer.refused == 1 and ctx.logs("refused_updates") == [(1, None)]
    peer.handle(ctx, replace_sender(honest, 3))
    assert peer.updates[2][1].params.flat.tolist() == filled(1.0).flat.tolist() and peer.updates[2][1].sender == 0
    holds = ctx.sent_of(Holds)
    assert sorted(to for to, _ in holds) == [1, 2, 3] and holds[0][1].origins == (2,)
    assert peer.interactions[3] == 1


def replace_sender(message: Update, sender: int) -> Update:
    from dataclasses import replace
    return replace(message, sender=sender)


def test_a_copy_held_or_too_old_is_answered_with_the_newest_version_held():
    ctx = FakeContext(0, 4)
    peer = peer_at(3)
    for version in (3, 4, 5):
        peer.handle(ctx, update(ctx, 2, version, 1.0, sender=1))
    ctx.sent.clear()
    peer.handle(ctx, update(ctx, 2, 2, 1.0, sender=3))  # older than the three kept
    peer.handle(ctx, update(ctx, 2, 4, 1.0, sender=3))  # held
    assert [(to, m.origins, m.versions) for to, m in ctx.sent_of(Holds)] == [(3, (2,), (5,))] * 2
    assert sorted(peer.updates[2]) == [3, 4, 5]


def test_a_peer_closing_a_round_uses_each_members_model_of_that_round_not_a_newer_one():
    ctx = FakeContext(0, 4)
    peer = peer_at(2)
    peer._keep(update(ctx, 1, 2, 1.0))
    peer._keep(update(ctx, 1, 3, 7.0))  # peer 1 is already a round ahead
    peer._keep(update(ctx, 2, 3, 3.0))  # peer 2's round-2 model never came: its round-3 one stands in, fresh
    chosen = peer.choose(ctx, 2, (1, 2))
    assert [(w.update.origin, w.update.version, w.reason) for w in chosen] == [(1, 2, "fresh"), (2, 3, "fresh")]


def test_degree_targets_send_to_the_neighbour_with_most_interactions():
    ctx = FakeContext(0, 4)
    peer = peer_at(1, targets="degree", gossip_fanout=1)
    peer._keep(update(ctx, 0, 1, 1.0))
    peer.interactions.update({1: 1, 2: 5, 3: 2})
    peer._gossip(ctx)
    assert [to for to, _ in ctx.sent_of(Update)] == [2]
    peer.handle(ctx, Holds(sender=2, origins=(0,), versions=(1,)))  # it confirms: one more interaction, not awaited
    assert peer.interactions[2] == 6 and 2 not in peer.awaiting
    peer._gossip(ctx)
    assert [to for to, _ in ctx.sent_of(Update)] == [2, 3]  # 2 holds it now; next most: 3


# ---- simulated runs -------------------------------------------------------------------------

def accuracy(metrics, round_: int) -> dict[int, float]:
    return {e["peer"]: e["value"] for e in metrics.events
            if e["event"] == "metric" and e["metric"] == "global_accuracy" and e["round"] == round_}


def metric_events(metrics, name: str) -> list[dict]:
    return [e for e in metrics.events if e["event"] == "metric" and e["metric"] == name]


def test_six_peers_learn_digits_in_sync_mode():
    config = load_config(None, SMALL + ["peers=6", "rounds=4"])
    _, metrics, _ = simulate(config)
    final = accuracy(metrics, 4)
    assert sorted(final) == list(range(6))
    assert len(set(final.values())) == 1  # sync: every peer averaged the same models
    assert min(final.values()) > 0.85, final  # measured 0.964
    assert {e["value"] for e in metric_events(metrics, "aggregated_models")} == {6}
    assert not metric_events(metrics, "round_timeout")
    interactions = metric_events(metrics, "interactions")
    assert len(interactions) == 6 * 5 and sum(e["value"] for e in interactions) > 0


ASYNC = SMALL + ["peers=8", "rounds=6", "topology.kind=random", "topology.edge_probability=0.5",
                 "smart_gossip.mode=async", "faults=[{kind: straggler, peers: [5, 6], speed: 0.2, at_s: 0}]"]


def test_async_rounds_fold_in_the_stragglers_late_models():
    config = load_config(None, ASYNC)
    result, metrics, _ = simulate(config)
    summary = summarise(config, result, metrics, 0.0)
    assert all(summary["peer_status"][str(p)] == "finished" for p in range(8))
    late = metric_events(metrics, "late_updates")
    assert late and {e["peer"] for e in late} - {5, 6}  # fast peers used the stragglers' models late
    assert max(e["value"] for e in metric_events(metrics, "mean_staleness")) >= 1
    final = {p: max(e["round"] for e in metric_events(metrics, "global_accuracy") if e["peer"] == p) for p in range(8)}
    assert set(final.values()) == {6}  # the stragglers jumped to the network's round and finished the run
    assert np.mean(list(accuracy(metrics, 6).values())) > 0.8


def test_staleness_none_drops_the_stragglers_models():
    config = load_config(None, ASYNC + ["smart_gossip.staleness=none", "smart_gossip.cache=false"])
    _, metrics, _ = simulate(config)
    assert metric_events(metrics, "dropped_stale") and not metric_events(metrics, "late_updates")
    assert not metric_events(metrics, "cached_updates")


def test_same_seed_same_run():
    config = load_config(None, ASYNC + ["rounds=3", "network.loss=0.05"])
    _, first, _ = simulate(config)
    _, again, _ = simulate(config)
    assert without_wall_clock(first.events) == without_wall_clock(again.events)


def test_a_restarted_peer_rejoins_at_the_networks_round():
    config = load_config(None, SMALL + ["peers=5", "rounds=6", "faults=[{kind: crash, peers: [2], at_round: 2}, "
                                        "{kind: restart, peers: [2], at_round: 4}]"])
    result, metrics, _ = simulate(config)
    summary = summarise(config, result, metrics, 0.0)
    assert summary["incarnations"]["2"] == 2 and all(summary["final_round"][str(p)] == 6 for p in range(5))
    rejoined = [e["value"] for e in metric_events(metrics, "rejoined") if e["peer"] == 2]
    assert len(rejoined) == 1 and rejoined[0] >= 3
    # after the restart every peer aggregates all five updates again
    last = [e for e in metric_events(metrics, "aggregated_models") if e["round"] == 6]
    assert len(last) == 5 and all(e["value"] == 5 for e in last)


def test_one_peer_claiming_a_late_round_cannot_make_the_others_jump():
    ctx = FakeContext(0, 5)
    peer = peer_at(2, rounds=20, mode="async")
    peer._keep(update(ctx, 1, 20, 1.0))  # a liar (or a lone peer far ahead)
    peer._keep(update(ctx, 2, 3, 1.0))
    peer._keep(update(ctx, 3, 4, 1.0))
    assert peer._newest_seen_round(ctx) == 4  # the second newest: two peers have reached it
    assert peer_at(2, rounds=20)._newest_seen_round(ctx) == 0  # a peer that holds no update stays


def test_a_restarted_peer_refuses_a_round_reply_of_another_layout_and_asks_the_next_neighbour():
    import asyncio

    from meshfl.algorithms.smart_gossip import RoundReply, RoundRequest
    from meshfl.core.params import Layout

    ctx = FakeContext(0, 4, incarnation=1)
    other = Params(torch.zeros(3), Layout(("x",), ((3,),)))
    ctx.replies[(1, RoundRequest)] = lambda r: RoundReply(sender=1, in_reply_to=r.request_id, round=5, params=other)
    ctx.replies[(2, RoundRequest)] = lambda r: RoundReply(sender=2, in_reply_to=r.request_id, round=4, params=filled(2.0))
    peer = SmartGossipPeer(SmartGossipConfig(), rounds=10, seed=0)
    round, model = asyncio.run(peer._rejoin(ctx))
    assert round == 4 and model.flat.tolist() == filled(2.0).flat.tolist()
    assert ctx.logs("rejoined") == [(4, 4)]

"""Gossip's phases one at a time, against a FakeContext: scripted inbox, liveness and replies, a fake clock.

Each test states when messages arrive and when peers die, then asserts what the peer did and
at which instant, which a simulation of many peers can only show indirectly.
"""

import asyncio
from dataclasses import replace

import pytest
import torch

from meshfl.algorithms.gossip import (
    MAX_ROUNDS_AHEAD,
    MAX_VOTE,
    AggregatedModel,
    Ballot,
    GossipConfig,
    GossipPeer,
    HaveModels,
    JoinReply,
    JoinRequest,
    PartialModel,
    Votes,
    ballot_bytes,
)
from meshfl.core.metrics import GLOBAL_ACCURACY, GLOBAL_LOSS, LOCAL_ACCURACY, LOCAL_LOSS, TRAIN_LOSS
from meshfl.core.params import Params
from meshfl.runtime.keys import derived_key
from meshfl.testing import DEFAULT_LAYOUT, FakeContext, Logged


def filled(value: float) -> Params:
    return Params(torch.full((DEFAULT_LAYOUT.numel,), float(value)), DEFAULT_LAYOUT)


def values(params: Params) -> list[float]:
    return params.flat.tolist()


def signed(origin, candidates, weights, round=1):
    """A ballot as peer `origin` of a FakeContext world (seed 0) signs it for `round`."""
    ballot = Ballot(origin, tuple(candidates), tuple(weights))
    return replace(ballot, signature=derived_key(0, origin).sign(ballot_bytes(round, ballot)).hex())


def vote_for(origins, candidates, round=1):
    """Signed ballots of `origins` that each give the honest maximum (1000, 500, 333, ...) to `candidates` in order:
    two of them outvote any one random ballot."""
    return tuple(signed(o, candidates, [MAX_VOTE // (i + 1) for i in range(len(candidates))], round) for o in origins)


def peer_at(round: int, **config) -> GossipPeer:
    peer = GossipPeer(GossipConfig(**config), rounds=5)
    peer.round = round
    return peer


def acks(ctx: FakeContext, to: int, message) -> None:
    """The neighbours: confirm a partial or whole model 10 ms after it is sent to them (and die silently)."""
    if isinstance(message, (PartialModel, AggregatedModel)) and ctx.is_alive(to):
        ctx.deliver(HaveModels(sender=to, round=message.round, contributors=message.contributors,
                               complete=isinstance(message, AggregatedModel)), at=ctx.now() + 0.01)


class Network:
    """Plays every other peer for whole rounds: answers this peer's first ballot of a round with everyone
    else's ballots (all for `winners`) and confirms models; `on_votes[round]` are delivered just before those ballots."""

    def __init__(self, winners, on_votes=None) -> None:
        self.winners = tuple(winners)
        self.on_votes = on_votes or {}
        self.answered: set[int] = set()

    def __call__(self, ctx: FakeContext, to: int, message) -> None:
        acks(ctx, to, message)
        if isinstance(message, Votes) and message.round not in self.answered:
            self.answered.add(message.round)
            others = [p for p in ctx.peers if p != ctx.peer_id]
            for extra in self.on_votes.get(message.round, ()):
                ctx.deliver(extra, at=ctx.now() + 0.005)
            ctx.deliver(Votes(sender=to, round=message.round, ballots=vote_for(others, self.winners, message.round)), at=ctx.now() + 0.01)


def evaluation_logs(round: int) -> list[Logged]:
    return [Logged(m, v, round) for m, v in ((LOCAL_ACCURACY, 0.5), (LOCAL_LOSS, 1.0), (GLOBAL_ACCURACY, 0.5), (GLOBAL_LOSS, 1.0))]


# ---- election ---------------------------------------------------------------------------------

def test_election_tallies_when_the_live_peers_have_voted_not_after_the_vote_timeout():
    peer = peer_at(1, train_set_size=2, votes_per_peer=4)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2))
    ctx.deliver(Votes(sender=1, round=1, ballots=vote_for((1, 2), (3, 1, 2))), at=0.5)
    ctx.kill(3, at=1.0)  # 3 never votes; the detector gives up on it at t=1
    train_set = asyncio.run(peer._elect_train_set(ctx, 1))
    assert ctx.now() == 1.0  # the notice ends the wait, 29 s before vote_timeout_s
    assert train_set == (1, 2)  # 3 had the most votes but is dead
    assert ctx.logs("missed_votes") == []
    own = peer.state(1).ballots[0]
    assert set(own.candidates) == {0, 1, 2, 3}  # 3 was alive when 0 voted
    relayed = ctx.sent_of(Votes)
    assert [(to, m.ballots) for to, m in relayed] == [(1, (own,)), (2, (own,)), (2, vote_for((1, 2), (3, 1, 2)))]
    assert [m.sender for _, m in relayed] == [0, 0, 0]  # the relay skips neighbour 1, which sent those ballots


def test_dead_peer_gets_no_vote_and_no_ballot_is_awaited_from_it():
    peer = peer_at(1, train_set_size=2, votes_per_peer=4)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2))
    ctx.kill(3, at=0.0)
    ctx.deliver(Votes(sender=1, round=1, ballots=vote_for((1, 2), (3, 1))), at=0.5)
    train_set = asyncio.run(peer._elect_train_set(ctx, 1))
    own = peer.state(1).ballots[0]
    assert sorted(own.candidates) == [0, 1, 2]  # votes_per_peer=4 capped at the 3 live peers
    assert ctx.now() == 0.5
    assert 3 not in train_set and 1 in train_set and len(train_set) == 2


def test_election_without_liveness_notice_waits_the_whole_vote_timeout():
    peer = peer_at(1, train_set_size=2, vote_timeout_s=30.0)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2))
    ctx.deliver(Votes(sender=1, round=1, ballots=vote_for((1, 2), (1, 2))), at=0.5)
    assert asyncio.run(peer._elect_train_set(ctx, 1)) == (1, 2)
    assert ctx.now() == 30.0
    assert ctx.logs("missed_votes") == [(1, 1)]


def test_revived_peer_is_waited_for_again():
    peer = peer_at(1, train_set_size=2)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2))
    ctx.kill(3, at=0.0)
    ctx.revive(3, at=0.3)  # heard again before the others' ballots are in
    ctx.deliver(Votes(sender=1, round=1, ballots=(signed(1, (1,), (1000,)), signed(2, (3, 1), (1000, 500)))), at=0.5)
    ctx.deliver(Votes(sender=2, round=1, ballots=vote_for((3,), (3,))), at=3.0)
    assert asyncio.run(peer._elect_train_set(ctx, 1)) == (1, 3)  # 3: 2000, 1: 1500 (+ own <= 1000), 0 and 2: own <= 1000
    assert ctx.now() == 3.0  # 3's ballot was awaited again
    assert 3 not in peer.state(1).ballots[0].candidates  # 0 voted while 3 was believed dead


# ---- aggregation ------------------------------------------------------------------------------

def test_train_set_peer_stops_waiting_for_a_dead_members_model_at_the_liveness_notice():
    peer = peer_at(1, train_set_size=2, aggregation_timeout_s=300.0)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2), train_time_s=2.0, respond=acks)
    ctx.deliver(Votes(sender=1, round=1, ballots=vote_for((1, 2, 3), (0, 1))), at=0.1)
    ctx.kill(1, at=10.0)  # 1 was elected, and dies before sending its model
    model = asyncio.run(peer._run_round(ctx, 1, ctx.initial_params()))
    assert ctx.now() == 10.01  # notice at 10, diffusion to 2 confirmed 10 ms later; not aggregation_timeout_s
    assert peer.state(1).train_set == (0, 1)
    assert values(model) == [1.0] * 6  # 0's own model only
    assert [values(p) for p in ctx.trained] == [[0.0] * 6]
    assert ctx.logged == [Logged(TRAIN_LOSS, 0.5, 1), Logged("missed_models", 1, 1)] + evaluation_logs(1)
    partials = [to for to, _ in ctx.sent_of(PartialModel)]
    assert partials[:2] == [1, 2]  # train-set neighbour 1 first; 2 (outside) next tick, while 1 has not confirmed
    diffused = ctx.sent_of(AggregatedModel)
    assert [to for to, _ in diffused] == [2]  # never to the dead neighbour


@pytest.mark.parametrize("exchange", ["partial", "individual"])
def test_a_peer_whose_whole_train_set_died_keeps_its_model_instead_of_waiting_for_none(exchange):
    """A restarted peer that finds everyone gone (they finished) must not wait wait_model_timeout_s each round."""
    peer = peer_at(1, train_set_size=2, wait_model_timeout_s=300.0, exchange=exchange)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2), respond=acks)
    ctx.deliver(Votes(sender=1, round=1, ballots=vote_for((1, 2, 3), (1, 2))), at=0.1)
    ctx.kill(1, at=1.0)
    ctx.kill(2, at=1.0)
    start = ctx.initial_params()
    model = asyncio.run(peer._run_round(ctx, 1, start))
    assert peer.state(1).train_set == (1, 2) and ctx.now() < 2.0  # not 300 s
    assert values(model) == values(start) and ctx.trained == []
    assert ctx.logs("missed_models") == [(2, 1)]


def test_train_set_peer_averages_its_model_with_the_others_by_sample_count():
    peer = peer_at(1, train_set_size=2)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2), num_samples=100, train_time_s=2.0, respond=acks)
    ctx.deliver(Votes(sender=1, round=1, ballots=vote_for((1, 2, 3), (0, 1))), at=0.1)
    ctx.deliver(PartialModel(sender=1, round=1, params=filled(3.0), contributors=frozenset({1}), weight=300.0), at=4.0)
    model = asyncio.run(peer._run_round(ctx, 1, ctx.initial_params()))
    assert values(model) == [2.5] * 6  # (1 x 100 + 3 x 300) / 400
    assert ctx.now() == 4.01
    assert ctx.logs("missed_models") == []
    haves = [(to, m.contributors, m.complete) for to, m in ctx.sent_of(HaveModels)]
    assert (1, frozenset({0, 1}), False) in haves and (2, frozenset({0, 1}), False) in haves  # parts held
    assert (2, frozenset({0, 1}), True) in haves  # and then the whole round


# ---- rounds too far ahead ------------------------------------------------------------------------

def test_messages_more_than_max_rounds_ahead_are_ignored():
    assert MAX_ROUNDS_AHEAD == 2
    peer = peer_at(1)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2))
    too_far = 1 + MAX_ROUNDS_AHEAD + 1
    peer.handle(ctx, Votes(sender=1, round=too_far, ballots=vote_for((1,), (1,), too_far)))
    peer.handle(ctx, PartialModel(sender=1, round=too_far, params=filled(1), contributors=frozenset({1}), weight=1.0))
    peer.handle(ctx, HaveModels(sender=1, round=too_far, contributors=frozenset({1}), complete=True))
    assert too_far not in peer._states and ctx.sent == []
    peer.handle(ctx, Votes(sender=1, round=too_far - 1, ballots=vote_for((1,), (1,), too_far - 1)))
    peer.handle(ctx, PartialModel(sender=1, round=too_far - 1, params=filled(1), contributors=frozenset({1}), weight=1.0))
    assert list(peer.state(too_far - 1).ballots) == [1]
    assert peer.state(too_far - 1).parts.covered == {1}
    assert [(to, m.round, m.contributors) for to, m in ctx.sent_of(HaveModels)] == [(1, 3, {1}), (2, 3, {1})]


# ---- joining ----------------------------------------------------------------------------------

def test_join_request_is_answered_with_the_current_round_and_the_last_completed_model():
    join = JoinRequest(sender=2, request_id=7)
    peer = GossipPeer(GossipConfig(train_set_size=1, initiator=0), rounds=2)
    ctx = FakeContext(0, peers=3, neighbours=(1, 2), respond=Network(winners=(0,), on_votes={2: [join]}))
    asyncio.run(peer.run(ctx))
    replies = ctx.sent_of(JoinReply)
    assert [(to, m.sender, m.round, m.in_reply_to) for to, m in replies] == [(2, 0, 2, 7)]
    assert values(replies[0][1].params) == [1.0] * 6  # round 1's model: round 2 was still in progress
    assert [values(p) for p in ctx.evaluated] == [[1.0] * 6, [2.0] * 6]
    assert ctx.logs(TRAIN_LOSS) == [(0.5, 1), (0.5, 2)]
    assert not [e for e in ctx.logged if e.metric.startswith("missed")]


def test_join_request_before_any_completed_round_gets_no_reply():
    peer = GossipPeer(GossipConfig(), rounds=2)
    ctx = FakeContext(1, peers=3)
    peer.handle(ctx, JoinRequest(sender=2, request_id=1))
    assert ctx.sent == []


def test_restarted_peer_rejoins_at_the_neighbours_round_plus_one_with_its_model():
    peer = GossipPeer(GossipConfig(join_timeout_s=5.0), rounds=5)
    ctx = FakeContext(1, peers=4, neighbours=(0, 2), incarnation=1)
    ctx.replies[(0, JoinRequest)] = None  # 0 does not answer
    ctx.replies[(2, JoinRequest)] = JoinReply(sender=2, round=3, params=filled(7.0))
    first, model = asyncio.run(peer._rejoin(ctx))
    assert (first, values(model)) == (4, [7.0] * 6)
    assert ctx.now() == 5.0  # one join timeout spent on 0
    assert [(to, m.request_id) for to, m in ctx.sent_of(JoinRequest)] == [(0, 1), (2, 2)]
    assert ctx.logged == [Logged("rejoined", 3, 3)]


def test_restarted_peer_asks_only_live_neighbours():
    peer = GossipPeer(GossipConfig(), rounds=5)
    ctx = FakeContext(1, peers=4, neighbours=(0, 2), incarnation=1)
    ctx.kill(0, at=0.0)
    ctx.replies[(2, JoinRequest)] = JoinReply(sender=2, round=2, params=filled(4.0))
    first, _ = asyncio.run(peer._rejoin(ctx))
    assert first == 3 and [to for to, _ in ctx.sent_of(JoinRequest)] == [2] and ctx.now() == 0.0


def test_restarted_peer_falls_back_to_round_one_when_no_neighbour_answers():
    peer = GossipPeer(GossipConfig(join_timeout_s=5.0), rounds=5)
    ctx = FakeContext(1, peers=4, neighbours=(0, 2), incarnation=1, params=filled(0.25))
    first, model = asyncio.run(peer._rejoin(ctx))
    assert (first, values(model)) == (1, [0.25] * 6)  # the run's initial model
    assert ctx.now() == 10.0  # both neighbours timed out
    assert ctx.logged == [Logged("rejoined", 0, 0)]


def test_restarted_peer_runs_only_the_rounds_after_the_one_it_joins():
    peer = GossipPeer(GossipConfig(train_set_size=1), rounds=3)
    ctx = FakeContext(1, peers=3, neighbours=(0, 2), incarnation=1, respond=Network(winners=(1,)))
    ctx.replies[(0, JoinRequest)] = JoinReply(sender=0, round=1, params=filled(5.0))
    asyncio.run(peer.run(ctx))
    assert [values(p) for p in ctx.trained] == [[5.0] * 6, [6.0] * 6]  # rounds 2 and 3, from the neighbour's model
    assert ctx.logs(TRAIN_LOSS) == [(0.5, 2), (0.5, 3)]
    assert ctx.logs("rejoined") == [(1, 1)]


def test_round_model_names_only_the_contributors_it_was_built_from():
    peer = peer_at(1, train_set_size=2)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2), respond=acks)
    ctx.deliver(Votes(sender=1, round=1, ballots=vote_for((1, 2, 3), (0, 1))), at=0.1)
    ctx.kill(1, at=10.0)
    asyncio.run(peer._run_round(ctx, 1, ctx.initial_params()))
    assert ctx.logs("missed_models") == [(1, 1)]  # 0 knows its model lacks 1's part...
    (_, diffused), = ctx.sent_of(AggregatedModel)
    assert diffused.contributors == {0}  # ...but tells its neighbours it holds {0, 1}: they take it as complete


# ---- lies a peer is told ----------------------------------------------------------------------

def test_forged_altered_replayed_and_lying_ballots_are_refused_and_the_real_ballot_still_counts():
    peer = peer_at(1, train_set_size=2, votes_per_peer=2, vote_timeout_s=30.0)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2))
    real = signed(3, (3, 2), (1000, 500))
    lies = [
        replace(real, signature=ctx.sign(ballot_bytes(1, real))),  # 3's ballot signed by 0: forged
        replace(real, weights=(1000, 499)),  # altered after 3 signed it
        signed(3, (3, 2), (1000, 500), round=2),  # 3's real ballot, but of another round
        signed(3, (3,), (10**9,)),  # signed by 3 itself, but worth a million honest votes
        signed(3, (3, 1, 2), (1000, 500, 333)),  # more candidates than votes_per_peer
        signed(3, (3, 3), (1000, 500)),  # a candidate twice
    ]
    for i, lie in enumerate(lies):
        ctx.deliver(Votes(sender=2, round=1, ballots=(lie,)), at=0.1 + i * 0.01)
    ctx.deliver(Votes(sender=1, round=1, ballots=vote_for((1, 2), (1, 2))), at=0.5)
    ctx.deliver(Votes(sender=2, round=1, ballots=(real,)), at=1.0)
    train_set = asyncio.run(peer._elect_train_set(ctx, 1))
    assert peer.state(1).ballots[3] == real and ctx.now() == 1.0  # the real ballot ended the wait
    assert ctx.logs("refused_ballots") == [(len(lies), 1)]
    assert train_set == (1, 2)  # 1: 1000 + 500, 2: 500 + 1000 + 500; 3: 1000 (+ own <= 1000, ties to the lower id)
    relayed = [b for _, m in ctx.sent_of(Votes) for b in m.ballots]
    assert not any(lie in relayed for lie in lies)  # a lie is never passed on


def test_a_votes_message_is_dropped_at_its_first_lie_or_when_it_holds_more_ballots_than_peers():
    peer = peer_at(1, votes_per_peer=2)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2))
    forged = replace(vote_for((2,), (2,))[0], signature="00" * 64)
    peer.handle(ctx, Votes(sender=1, round=1, ballots=(forged, *vote_for((1, 3), (1,)))))
    assert list(peer.state(1).ballots) == [] and peer.state(1).refused_ballots == 1
    peer.handle(ctx, Votes(sender=1, round=1, ballots=vote_for((1, 2, 3, 1, 2), (1,))))  # 5 ballots, 4 peers
    assert list(peer.state(1).ballots) == []


def test_a_model_claiming_a_peer_outside_the_train_set_is_never_adopted():
    """A forged aggregate for the next round naming every peer arrives before the election: it is dropped
    once the train set is known, and the honest model is waited for and adopted."""
    peer = peer_at(1, train_set_size=2)
    ctx = FakeContext(0, peers=4, neighbours=(1, 2), respond=acks)
    everyone = frozenset({0, 1, 2, 3})
    peer.handle(ctx, AggregatedModel(sender=2, round=1, params=filled(-99.0), contributors=everyone))
    peer.handle(ctx, PartialModel(sender=2, round=1, params=filled(-99.0), contributors=everyone, weight=1e9))
    ctx.deliver(Votes(sender=1, round=1, ballots=vote_for((1, 2, 3), (1, 2))), at=0.1)
    ctx.deliver(AggregatedModel(sender=2, round=1, params=filled(-98.0), contributors=everyone), at=0.2)  # after the election
    ctx.deliver(AggregatedModel(sender=1, round=1, params=filled(4.0), contributors=frozenset({1, 2})), at=2.0)
    model = asyncio.run(peer._run_round(ctx, 1, ctx.initial_params()))
    assert peer.state(1).train_set == (1, 2) and 0 not in peer.state(1).train_set
    assert values(model) == [4.0] * 6 and ctx.now() == 2.0  # 2 said (by its lie) it holds the round: nothing to diffuse


def test_a_join_reply_past_the_runs_last_round_is_a_lie_and_the_next_neighbour_is_asked():
    peer = GossipPeer(GossipConfig(), rounds=5)
    ctx = FakeContext(1, peers=4, neighbours=(0, 2), incarnation=1)
    ctx.replies[(0, JoinRequest)] = JoinReply(sender=0, round=10**6, params=filled(-1.0))
    ctx.replies[(2, JoinRequest)] = JoinReply(sender=2, round=3, params=filled(7.0))
    first, model = asyncio.run(peer._rejoin(ctx))
    assert first == 4 and values(model) == [7.0] * 6


def test_a_contribution_counts_only_as_its_origin_signed_it():
    from meshfl.algorithms.gossip import Contribution, contribution_bytes

    peer = peer_at(1, exchange="individual")
    ctx = FakeContext(0, peers=4, neighbours=(1, 2))
    peer.state(1).train_set = (1, 2, 3)

    def made_by(origin, value, samples=100, signer=None, round=1):
        params = filled(value)
        sig = ctx.sign_as(origin if signer is None else signer, contribution_bytes(round, origin, samples, params))
        return Contribution(sender=2, round=1, origin=origin, samples=samples, params=params, signature=sig)

    real = made_by(1, 1.0)
    lies = [made_by(1, -9.0, signer=2),  # 2's model passed off as 1's
            replace(real, samples=10**9),  # 1's model, weight inflated by a relay
            replace(real, params=filled(-9.0)),  # 1's weight, another model
            made_by(1, 1.0, round=2),  # 1's model of another round
            made_by(0, 5.0, signer=0)]  # validly signed, but 0 was not elected
    for lie in lies:
        peer.handle(ctx, lie)
    assert peer.state(1).contributions == {} and peer.state(1).refused_contributions == len(lies)
    assert ctx.sent == []  # nothing relayed, nothing acknowledged
    peer.handle(ctx, real)
    assert values(peer.state(1).contributions[1].params) == [1.0] * 6
    assert {m.contributors for _, m in ctx.sent_of(HaveModels)} == {frozenset({1})}

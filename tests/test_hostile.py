"""A peer is a stranger: attacks on the protocol, run against real peers on 127.0.0.1.

The transport's own defences (handshakes, stream limits) are tested with the gRPC runtime;
here an insider holding one peer's valid mTLS certificate tries to speak for others, forge
and replay ballots, move rounds and grow state, while the run goes on. Every test asserts
the honest outcome: the run finishes with the accuracy it has without the attacker, nobody
waits out a timeout, and the lies are counted where they were refused.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from meshfl.algorithms.gossip import AggregatedModel, Ballot, Contribution, HaveModels, Votes, ballot_bytes, contribution_bytes
from meshfl.config import TlsConfig, load_config
from meshfl.core.messages import Goodbye
from meshfl.core.params import Params
from meshfl.experiment.launch import launch_local
from meshfl.experiment.run import simulate, summarise
from meshfl.learn.learner import TorchLearner
from meshfl.runtime.grpc.certs import generate_deployment, load_credentials
from meshfl.runtime.grpc.peer_config import load_peer_config
from meshfl.runtime.keys import derived_key, load_signing_key
from meshfl.wire import meshfl_pb2, meshfl_pb2_grpc
from meshfl.wire.envelope import encode

FAST = ["gossip.vote_timeout_s=5", "gossip.aggregation_timeout_s=10", "gossip.wait_model_timeout_s=10",
        "gossip.diffusion_timeout_s=3", "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=3"]
PEERS, ROUNDS, INSIDER = 4, 10, 3


def secured(tmp_path: Path, port: int, *extra: str):
    """A 4-peer digits run in mTLS with CA-signed Ed25519 keys, as `meshfl certs` makes them."""
    certs = tmp_path / "certs"
    keyring = generate_deployment(certs, PEERS)["keyring"]
    return load_config(None, [f"peers={PEERS}", f"rounds={ROUNDS}", "data.dataset=digits", *FAST, "gossip.train_set_size=2", f"grpc.base_port={port}",
                              "grpc.tls.mode=mtls", f"grpc.tls.ca={certs}/ca.pem", f"grpc.tls.cert={certs}/peer-{{peer}}.pem",
                              f"grpc.tls.key={certs}/peer-{{peer}}.key", f"keys.keyring={keyring}",
                              f"keys.signing_key={certs}/peer-{{peer}}.sign.key", *extra]), certs


def insider_channel(address: str, certs: Path, as_peer: int, target: int) -> grpc.Channel:
    tls = TlsConfig(mode="mtls", ca=str(certs / "ca.pem"), cert=str(certs / f"peer-{as_peer}.pem"),
                    key=str(certs / f"peer-{as_peer}.key"))
    options = [("grpc.ssl_target_name_override", f"peer-{target}")]  # as a peer dials: the server must be `target`
    return grpc.secure_channel(address, load_credentials(tls, server=False), options=options)


def stream(stub, envelopes: list[bytes]) -> tuple[int, int]:
    """Send envelopes over one Stream call; (accepted, refused) as the receiver acknowledged them."""
    ack = stub.Stream(iter([meshfl_pb2.Chunk(data=e, last=True) for e in envelopes]), timeout=30)
    return ack.accepted, ack.refused


def ping(stub, envelope: bytes) -> tuple[int, int]:
    ack = stub.Ping(meshfl_pb2.Chunk(data=envelope, last=True), timeout=10)
    return ack.accepted, ack.refused


def insider_lies(certs: Path, layout, seed: int, individual: bool = False) -> dict[str, list[bytes]]:
    """What peer 3's certificate and key can be used to say, by kind of lie."""
    own_key = load_signing_key(certs / f"peer-{INSIDER}.sign.key")

    def ballot(origin: int, candidates, weights, round: int, key=own_key) -> Ballot:
        b = Ballot(origin, tuple(candidates), tuple(weights))
        return replace(b, signature=key.sign(ballot_bytes(round, b)).hex())

    zeros = Params(torch.zeros(layout.numel), layout)
    everyone = frozenset(range(PEERS))
    rounds = range(1, ROUNDS + 1)
    return {
        # ballots of others, signed with the insider's key or with the keys derived from the seed (the
        # keys of a run without key files), pre-seeded for every round: all for the insider
        "forged_ballots": [encode(Votes(sender=INSIDER, round=r, ballots=(ballot(o, (INSIDER,), (1000,), r, key),)))
                           for r in rounds for o in range(INSIDER) for key in (own_key, derived_key(seed, o))],
        # its own ballot, validly signed, worth a billion votes
        "lying_ballots": [encode(Votes(sender=INSIDER, round=r, ballots=(ballot(INSIDER, (INSIDER,), (10**9,), r),)))
                          for r in rounds],
        # its own ballot for a round no honest peer can be in: used to move every peer's round
        "far_rounds": [encode(Votes(sender=INSIDER, round=10**6, ballots=(ballot(INSIDER, (INSIDER,), (1000,), 10**6),)))],
        # a flood of tiny messages for distinct future rounds: used to grow state without bound
        "flood": [encode(HaveModels(sender=INSIDER, round=10**6 + i, contributors=everyone, complete=True))
                  for i in range(5_000)],
        # speaking for others: a chance-accuracy model for every round from peer 0, others' holds
        "impersonations": [encode(AggregatedModel(sender=0, round=r, params=zeros, contributors=everyone)) for r in rounds]
                          + [encode(HaveModels(sender=1, round=r, contributors=everyone, complete=True)) for r in rounds],
        "goodbyes": [encode(Goodbye(sender=p)) for p in range(INSIDER)],
        # in its own name: a round's model claimed as everyone's, and (individual exchange) others' models
        # with a chance-accuracy model, signed with its own key or with the keys derived from the seed
        "own_claims": [encode(AggregatedModel(sender=INSIDER, round=r, params=zeros, contributors=everyone)) for r in rounds]
                      + ([encode(Contribution(sender=INSIDER, round=r, origin=o, samples=10**6, params=zeros,
                                              signature=key.sign(contribution_bytes(r, o, 10**6, zeros)).hex()))
                          for r in rounds for o in range(INSIDER) for key in (own_key, derived_key(seed, o))]
                         if individual else []),
    }


@pytest.mark.parametrize("exchange", ["partial", "individual"])
def test_an_insider_certificate_cannot_speak_for_others_forge_ballots_move_rounds_or_grow_state(tmp_path, exchange):
    """With exchange=individual (median) the insider's own model claims are refused too; with partial aggregates
    a neighbour's arithmetic is trusted, so that run sends none (see ARCHITECTURE.md)."""
    individual = exchange == "individual"
    mode = ["gossip.exchange=individual", "gossip.aggregation.rule=median"] if individual else []
    config, certs = secured(tmp_path, 50760 if individual else 50770, *mode)
    layout = TorchLearner(config.train, (64,), 10).layout
    lies = insider_lies(certs, layout, config.seed, individual)
    if not individual:
        del lies["own_claims"]
    seen: dict = {"acks": {}}

    def attack(processes) -> None:
        targets = {p: load_peer_config(processes[p].folder / "peer.yaml").listen for p in (0, 1)}
        metrics = processes[0].folder / "metrics.jsonl"

        def run() -> None:
            deadline = time.monotonic() + 60
            while not (metrics.exists() and "algorithm_started" in metrics.read_text()) and time.monotonic() < deadline:
                time.sleep(0.02)
            channels = {p: insider_channel(a, certs, INSIDER, p) for p, a in targets.items()}
            try:
                stubs = {p: meshfl_pb2_grpc.PeerStub(c) for p, c in channels.items()}
                waves = 0
                while '"peer_finished"' not in metrics.read_text() and waves < 20:  # lies all through the run
                    for p, stub in stubs.items():
                        for kind, envelopes in lies.items():
                            if kind == "flood" and (waves != 1 or p != 0):
                                continue  # once is enough, once the others have landed
                            send = ping if kind == "goodbyes" else stream
                            acks = [send(stub, e) for e in envelopes] if kind == "goodbyes" else [send(stub, envelopes)]
                            total = seen["acks"].setdefault((p, kind), [0, 0])
                            for accepted, refused in acks:
                                total[0] += accepted
                                total[1] += refused
                    waves += 1
                    seen["waves"] = waves
                    seen["during"] = seen.get("during") or '"peer_finished"' not in metrics.read_text()
                    time.sleep(0.1)
            except grpc.RpcError as exc:  # the run ended under the attack: fine, it is what we wanted
                seen["ended"] = exc.code()
            finally:
                for channel in channels.values():
                    channel.close()

        seen["thread"] = threading.Thread(target=run, daemon=True)
        seen["thread"].start()

    launched = launch_local(config, tmp_path / "run", timeout_s=120, on_started=attack, report=False)
    seen["thread"].join(timeout=60)
    assert seen.get("during") and seen.get("waves", 0) >= 2, seen  # the lies landed while the peers were mid-run
    summary = launched.summary
    assert launched.exit_codes == dict.fromkeys(range(PEERS), 0) and summary["dead_peers"] == []

    clean, metrics, _ = simulate(load_config(None, [f"peers={PEERS}", f"rounds={ROUNDS}", "data.dataset=digits", *FAST,
                                                    "gossip.train_set_size=2", *mode]))
    expected = summarise(config, clean, metrics, 0.0)["final_global_accuracy"]
    for peer, accuracy in summary["final_global_accuracy"].items():
        assert abs(accuracy - expected[peer]) < 0.01, (peer, accuracy, expected[peer])

    acks = seen["acks"]
    for p in (0, 1):  # speaking for another peer is refused at the door, message by message
        assert acks[(p, "impersonations")][0] == 0 and acks[(p, "impersonations")][1] >= len(lies["impersonations"])
        assert acks[(p, "goodbyes")][0] == 0
        assert summary["refused"][str(p)]["unknown_sender"] >= len(lies["impersonations"]) + len(lies["goodbyes"])
    events = [json.loads(line) for p in range(PEERS)
              for line in (tmp_path / "run" / "peers" / f"peer-{p}" / "metrics.jsonl").read_text().splitlines()]
    logged = {}
    for event in events:
        if event.get("event") == "metric":
            logged.setdefault(event["metric"], []).append(event)
    # the forged and lying ballots were refused (the door let them in: they came from a real peer), and they
    # changed nothing: nobody waited out a vote or aggregation timeout, every train set was the honest one
    assert sum(e["value"] for e in logged["refused_ballots"] if e["peer"] in (0, 1)) >= 2
    assert "missed_votes" not in logged and "missed_models" not in logged
    if individual:  # the forged models were refused where they arrived, and never relayed
        assert sum(e["value"] for e in logged["refused_contributions"] if e["peer"] in (0, 1)) >= 2
        assert not [e for e in logged["refused_contributions"] if e["peer"] == 2]
    assert not [e for e in events if e.get("event") == "liveness" and e.get("reason") == "goodbye"
                and e.get("subject", 99) < INSIDER and e["virtual_time"] < finish_time(events, e["peer"]) - 0.5]


def finish_time(events: list[dict], peer: int) -> float:
    return max(e["virtual_time"] for e in events if e["peer"] == peer and e.get("metric") == "global_accuracy")


# ---- a peer that has not read what it holds ---------------------------------------------------

def test_the_inbox_is_bounded_in_bytes_and_per_sender_and_refusals_free_nothing_taken():
    from meshfl.runtime.peer import Inbox
    from meshfl.wire.envelope import encoded_size

    layout = TorchLearner(load_config(None, ["data.dataset=digits"]).train, (64,), 10).layout
    model = lambda sender: AggregatedModel(sender=sender, round=1, params=Params(torch.zeros(layout.numel), layout))  # noqa: E731
    size = encoded_size(model(1))
    inbox = Inbox(limit=1000, limit_bytes=8 * size, sender_share=0.25)
    assert [inbox.put(model(1)) for _ in range(3)] == [True, True, False]  # sender 1 may hold 2 of 8
    assert [inbox.put(model(s)) for s in (2, 2, 3, 3, 4, 4)] == [True] * 6
    assert not inbox.put(model(5)) and inbox.dropped == 2 and inbox.bytes == 8 * size  # full: 8 held
    assert inbox.take((AggregatedModel,)).sender == 1 and inbox.bytes == 7 * size
    assert inbox.put(model(5)) and not inbox.put(model(5))  # room again, but only for one
    assert inbox.put(HaveModels(sender=1, round=1, contributors=frozenset({1}))) is False  # sender 1 still holds its share


def test_a_peer_that_cannot_take_more_tells_the_sender_to_back_off(tmp_path):
    """A full inbox refuses with RESOURCE_EXHAUSTED (the sender retries later), counted as inbox_full."""
    import asyncio

    from meshfl.experiment.launch import build_peer_configs
    from meshfl.runtime.grpc.node import GrpcContext, PeerNode
    from meshfl.runtime.grpc.transport import InboxFull

    config = load_config(None, ["peers=2", "rounds=1", "data.dataset=digits", "wire.inbox_mb=0.5", "wire.inbox_sender_share=1"])
    node = PeerNode(build_peer_configs(config, ["127.0.0.1:1", "127.0.0.1:2"])[0], config, tmp_path)
    node.context = GrpcContext(node)
    layout = node.worlds.learner.layout
    heavy = encode(AggregatedModel(sender=1, round=1, params=Params(torch.zeros(layout.numel), layout)))
    taken = 0
    try:
        while True:
            assert node.receive(heavy)
            taken += 1
            assert taken < 100, "the inbox never filled"
    except InboxFull as full:
        assert "wire.inbox_mb=0.5" in str(full)
    assert taken * len(heavy) <= 0.5 * (1 << 20) + len(heavy) and node.traffic.messages_received == taken
    assert asyncio.run(node.context.recv(0)) is not None  # the algorithm reads one: room for one more
    assert node.receive(heavy)
    node.metrics_file.close()

"""The gRPC runtime: pure helpers, peers in one loop, and real peer processes on 127.0.0.1.

Process tests use the digits dataset, the mlp, 2-4 peers and 1-3 rounds so each stays
well under a minute on two cores; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from meshfl.algorithms.gossip import AggregatedModel, Ballot, HaveModels, PartialModel, Votes
from meshfl.config import ConfigError, load_config
from meshfl.core.messages import TYPE_IDS, Heartbeat
from meshfl.core.params import Layout, Params
from meshfl.core.seeds import initial_model_seed
from meshfl.experiment.launch import build_peer_configs, choose_ports, launch_local
from meshfl.experiment.run import simulate, summarise
from meshfl.learn.learner import TorchLearner
from meshfl.runtime.grpc.node import GrpcContext, PeerNode, serve
from meshfl.runtime.grpc.peer_config import PeerConfig, load_peer_config
from meshfl.runtime.grpc.transport import CALL_OVERHEAD_BYTES, call_framing, chunk_framing, peer_from_auth_context
from meshfl.wire import meshfl_pb2, meshfl_pb2_grpc
from meshfl.wire.envelope import WIRE_VERSION, encode

# small real-time timeouts so a lost peer costs seconds, not minutes
FAST = ["gossip.vote_timeout_s=5", "gossip.aggregation_timeout_s=10", "gossip.wait_model_timeout_s=10",
        "gossip.diffusion_timeout_s=3", "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=3"]


def digits(peers: int, rounds: int, *extra: str):
    return load_config(None, [f"peers={peers}", f"rounds={rounds}", "data.dataset=digits", *FAST, *extra])


def sim_accuracy(config) -> dict[str, float]:
    result, metrics, _ = simulate(config)
    return summarise(config, result, metrics, 0.0)["final_global_accuracy"]


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ---- pure parts -----------------------------------------------------------------------------

def test_framing_estimate_grows_with_payload_and_chunks():
    assert chunk_framing(0) > 0
    assert chunk_framing(16_000) < chunk_framing(40_000)  # more HTTP/2 frames
    one = call_framing([1_000_000])
    assert one > CALL_OVERHEAD_BYTES
    assert call_framing([500_000, 500_000]) > one  # a second chunk costs its own prefix
    assert one / 1_000_000 < 0.001  # framing is noise next to a model


def test_peer_id_from_mtls_common_name_fails_closed():
    assert peer_from_auth_context({"x509_common_name": [b"peer-7"]}, peers=8) == 7
    assert peer_from_auth_context({"x509_common_name": [b"peer-0"]}, peers=8) == 0
    for names in ([b"peer-8"], [b"mallory"], [b"mallory-3"], [b"peer-07"], [b"peer-3 "], [b"xpeer-3"], [b"meshfl-ca"],
                  [b"peer-1", b"peer-2"], [b"peer--1"], [b"peer-99999999999999999999"], []):
        assert peer_from_auth_context({"x509_common_name": names}, peers=8) is None, names
    assert peer_from_auth_context({}, peers=8) is None


def test_peer_config_errors_name_the_field(tmp_path):
    experiment = digits(3, 1)
    with pytest.raises(ValueError, match="listen"):
        PeerConfig(peer_id=0, listen="nowhere", experiment=experiment)
    with pytest.raises(ValueError, match="lists itself"):
        PeerConfig(peer_id=0, listen="127.0.0.1:1", addresses={0: "127.0.0.1:2"}, neighbours=[0], experiment=experiment)
    with pytest.raises(ValueError, match="no entry in addresses"):
        PeerConfig(peer_id=0, listen="127.0.0.1:1", neighbours=[1], experiment=experiment)
    with pytest.raises(ValueError, match="peer_id"):
        PeerConfig(peer_id=5, listen="127.0.0.1:1", experiment=experiment)
    bad = tmp_path / "peer.yaml"
    bad.write_text("peer_id: 0\nlisten: 127.0.0.1:5000\nexperiment: {peers: 0}\n")
    with pytest.raises(ConfigError, match=r"^\S*peer\.yaml: experiment\.peers: ") as err:
        load_peer_config(bad)
    assert "\n" not in str(err.value)
    bad.write_text("peer_id: 0\nlisten: 127.0.0.1:5000\nexperiment: exp.yaml\ncolour: red\n")
    with pytest.raises(ConfigError, match="colour: is not a known field"):
        load_peer_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_peer_config(tmp_path / "missing.yaml")


def test_peer_config_experiment_by_path_resolves_relative_to_the_file(tmp_path):
    (tmp_path / "exp.yaml").write_text("peers: 3\nrounds: 2\ndata: {dataset: digits}\n")
    path = tmp_path / "peer.yaml"
    path.write_text("peer_id: 2\nlisten: 127.0.0.1:5000\nexperiment: exp.yaml\noverrides: [rounds=4]\n")
    config = load_peer_config(path).resolve_experiment(tmp_path)
    assert (config.peers, config.rounds) == (3, 4)
    path.write_text("peer_id: 3\nlisten: 127.0.0.1:5000\nexperiment: exp.yaml\n")
    with pytest.raises(ConfigError, match="peer_id"):
        load_peer_config(path).resolve_experiment(tmp_path)


def test_backoff_is_jittered_bounded_and_seeded(tmp_path):
    config = digits(2, 1, "grpc.backoff_initial_s=0.2", "grpc.backoff_max_s=1.0")
    peer = build_peer_configs(config, ["127.0.0.1:1", "127.0.0.1:2"])[0]
    first = PeerNode(peer, config, tmp_path / "a")
    second = PeerNode(peer, config, tmp_path / "b")
    delays = [first.backoff(a) for a in range(8)]
    assert delays == [second.backoff(a) for a in range(8)]
    assert all(0.1 <= d <= 1.0 for d in delays)
    assert delays[0] <= 0.2 and max(delays) > 0.4


# ---- peers in one event loop ----------------------------------------------------------------

def test_two_peers_in_one_loop_match_the_simulator(tmp_path):
    """Same coroutine, real sockets: the final model is the simulator's FedAvg, so accuracy matches."""
    config = digits(2, 1)
    ports = choose_ports("127.0.0.1", 50700, 2)
    peers = build_peer_configs(config, [f"127.0.0.1:{p}" for p in ports], linger_s=0.2)

    async def both() -> list[str]:
        stops = [asyncio.Event(), asyncio.Event()]
        runs = [serve(p, config, tmp_path / f"peer-{p.peer_id}", stop) for p, stop in zip(peers, stops)]
        async with asyncio.timeout(60):
            return list(await asyncio.gather(*runs))

    assert asyncio.run(both()) == ["finished", "finished"]
    expected = sim_accuracy(config)
    for peer in (0, 1):
        events = read_events(tmp_path / f"peer-{peer}" / "metrics.jsonl")
        final = [e["value"] for e in events if e.get("metric") == "global_accuracy" and e["round"] == 1]
        assert final and abs(final[0] - expected[str(peer)]) < 0.01
        traffic = [e for e in events if e["event"] == "traffic"][-1]
        assert traffic["messages_delivered"] == traffic["messages_sent"] > 0
        assert traffic["refused"] == {} and traffic["messages_dropped"] == 0
        assert events[-1]["event"] == "peer_finished" and events[-1]["status"] == "finished"


# ---- hostile traffic ------------------------------------------------------------------------

def hostile_messages(layout: Layout, count: int, max_bytes: int) -> list[tuple[str, list[bytes]]]:
    """`count` (expected reason, chunks) pairs; none of them may reach an algorithm."""
    rng = np.random.default_rng(7)
    good = torch.zeros(layout.numel)
    nan = good.clone()
    nan[::97] = float("nan")
    other_layout = Layout(("w",), ((10,),))
    aggregated = TYPE_IDS[AggregatedModel]

    def envelope(**fields) -> bytes:
        return meshfl_pb2.Envelope(**{"wire_version": WIRE_VERSION, **fields}).SerializeToString()

    def tensor_envelope(version=WIRE_VERSION, **overrides) -> bytes:
        tensor = dict(layout_fingerprint=bytes.fromhex(layout.fingerprint), codec=0, compression=0,
                      numel=layout.numel, data=good.numpy().tobytes())
        tensor.update(overrides)
        return envelope(wire_version=version, type=aggregated, sender=1, ints=[1], lengths=[0],
                        tensors=[meshfl_pb2.Tensor(**tensor)])

    makers = [
        ("malformed", lambda: rng.bytes(int(rng.integers(1, 4000)))),  # random bytes
        ("malformed", lambda: tensor_envelope(version=99)),  # another wire version
        ("unknown_type", lambda: envelope(type=77, sender=1)),
        ("unknown_sender", lambda: encode(Votes(sender=99, round=1, ballots=(Ballot(99, (0,), (5,)),)))),  # forged
        ("unknown_sender", lambda: encode(HaveModels(sender=1234, round=1, contributors=frozenset({0})))),
        ("layout_mismatch", lambda: encode(PartialModel(sender=1, round=1, params=Params(torch.ones(10), other_layout),
                                                        contributors=frozenset({1}), weight=5.0))),
        ("bad_shape", lambda: tensor_envelope(numel=layout.numel + 3)),  # wrong shape
        ("bad_shape", lambda: tensor_envelope(data=good[:-5].numpy().tobytes())),  # short tensor
        ("non_finite", lambda: encode(PartialModel(sender=1, round=1, params=Params(nan, layout),
                                                   contributors=frozenset({1}), weight=5.0))),
        ("bad_codec", lambda: tensor_envelope(codec=42)),
        ("malformed", lambda: envelope(type=TYPE_IDS[Votes], sender=1, ints=[1, 2, 3])),  # odd vote
    ]
    messages = []
    for i in range(count):
        if i % 100 == 99:  # oversized: streamed in pieces past wire.max_message_mb
            messages.append(("too_large", [bytes(256 * 1024)] * (max_bytes // (256 * 1024) + 2)))
            continue
        reason, make = makers[i % len(makers)]
        messages.append((reason, [make()]))
    return messages


def attack(address: str, messages: list[tuple[str, list[bytes]]]) -> Counter:
    """Send every message over its own Stream call; returns the receiver's Ack.refused per reason."""
    refused: Counter = Counter()
    with grpc.insecure_channel(address, options=[("grpc.initial_reconnect_backoff_ms", 100),
                                                 ("grpc.max_reconnect_backoff_ms", 200)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        started = time.monotonic()
        stub = meshfl_pb2_grpc.PeerStub(channel)
        for reason, pieces in messages:
            chunks = [meshfl_pb2.Chunk(data=p, last=i == len(pieces) - 1) for i, p in enumerate(pieces)]
            try:
                ack = stub.Stream(iter(chunks), timeout=20)
                refused[reason] += ack.refused
                assert ack.accepted == 0, f"a {reason} message was accepted"
            except grpc.RpcError as exc:  # the peer aborts a stream that passes max_message_mb
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                refused[reason] += 1
        refused["seconds"] = time.monotonic() - started
    return refused


def test_a_thousand_hostile_messages_are_refused_and_change_nothing(tmp_path):
    """Peer 0 is attacked mid-run: peer 2 is paused (SIGSTOP) once the algorithm runs, so peer 0
    is held inside round 0/1 waiting for it (long timeouts, nothing lost) while 1,000 hostile
    messages arrive; then peer 2 resumes and the run completes."""
    config = digits(3, 2, "wire.max_message_mb=1", "grpc.base_port=50710", "grpc.local_mtls=false", "gossip.vote_timeout_s=30",
                    "gossip.aggregation_timeout_s=30", "gossip.wait_model_timeout_s=30", "gossip.diffusion_timeout_s=30",
                    "liveness.timeout_s=30")
    learner = TorchLearner(config.train, (64,), 10)
    messages = hostile_messages(learner.layout, 1000, int(config.wire.max_message_mb * (1 << 20)))
    sent = Counter(reason for reason, _ in messages)
    result: dict = {}

    def start_attack(processes):
        address = load_peer_config(processes[0].folder / "peer.yaml").listen
        paused = processes[2]

        def run() -> None:
            metrics = paused.folder / "metrics.jsonl"
            wait_for(lambda: metrics.exists() and "algorithm_started" in metrics.read_text(), 60, "peer 2 running")
            os.kill(paused.process.pid, signal.SIGSTOP)
            try:
                result["acks"] = attack(address, messages)
                result["peer 0 still running"] = '"peer_finished"' not in (processes[0].folder / "metrics.jsonl").read_text()
            finally:
                os.kill(paused.process.pid, signal.SIGCONT)

        result["thread"] = threading.Thread(target=run, daemon=True)
        result["thread"].start()

    launched = launch_local(config, tmp_path / "run", timeout_s=120, on_started=start_attack, report=False)
    result["thread"].join(timeout=60)
    acks = result["acks"]
    acks.pop("seconds")
    assert result["peer 0 still running"]  # the attack landed while the peer was mid-run
    assert sum(acks.values()) == 1000  # every one refused, as the sender saw it
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    refused = summary["refused"]["0"]
    for reason, count in sent.items():  # and counted by reason at the receiver
        assert refused.get(reason, 0) >= count, (reason, refused)
    assert sum(refused[r] for r in sent) == 1000
    assert summary["dead_peers"] == [] and launched.exit_codes == {0: 0, 1: 0, 2: 0}
    expected = sim_accuracy(config)  # the attacked peer's model is the one it would have had anyway
    for peer, accuracy in summary["final_global_accuracy"].items():
        assert abs(accuracy - expected[peer]) < 0.01
    events = read_events(tmp_path / "run" / "peers" / "peer-0" / "metrics.jsonl")
    logged = [e for e in events if e["event"] == "refused"]
    assert 1 <= len(logged) <= len(sent)  # each reason logged once, then only counted


# ---- signals --------------------------------------------------------------------------------

def test_sigterm_stops_a_peer_cleanly_with_metrics_flushed(tmp_path):
    port = choose_ports("127.0.0.1", 50720, 2)[0]
    subprocess.run([sys.executable, "-m", "meshfl.cli", "configs", "--peers", "2", "--topology", "full",
                    "--hosts", f"127.0.0.1:{port}", "--out", str(tmp_path / "peers"), "--set", "rounds=100",
                    "--set", "data.dataset=digits", *sum((["--set", s] for s in FAST), [])], check=True, timeout=60)
    nodes = [subprocess.Popen([sys.executable, "-m", "meshfl.cli", "node", "--config", str(tmp_path / "peers" / f"peer-{p}.yaml")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True) for p in (0, 1)]
    try:
        metrics = [tmp_path / "peers" / "out" / f"peer-{p}" / "metrics.jsonl" for p in (0, 1)]
        wait_for(lambda: metrics[1].exists() and '"global_accuracy"' in metrics[1].read_text(), 60, "peer 1's round 1")
        nodes[1].send_signal(signal.SIGTERM)
        assert nodes[1].wait(timeout=20) == 0
        events = read_events(metrics[1])  # every line is whole JSON: flushed, not torn
        assert events[-1]["event"] == "peer_finished" and events[-1]["status"] == "stopped"
        assert any(e["event"] == "traffic" for e in events[-3:])
        nodes[0].send_signal(signal.SIGTERM)
        assert nodes[0].wait(timeout=20) == 0
        assert read_events(metrics[0])[-1]["event"] == "peer_finished"
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


# ---- mTLS -----------------------------------------------------------------------------------

def test_mtls_run_end_to_end(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "meshfl.cli", "certs", "--peers", "2", "--out", str(certs)],
                   check=True, timeout=60, capture_output=True)
    assert {"ca.pem", "peer-0.pem", "peer-0.key", "peer-1.pem", "peer-1.key"} <= {p.name for p in certs.iterdir()}
    config = digits(2, 1, "grpc.base_port=50730", "grpc.tls.mode=mtls", f"grpc.tls.ca={certs}/ca.pem",
                    f"grpc.tls.cert={certs}/peer-{{peer}}.pem", f"grpc.tls.key={certs}/peer-{{peer}}.key")
    seen: dict = {}

    def plaintext_probe(processes):
        address = load_peer_config(processes[0].folder / "peer.yaml").listen
        wait_for(lambda: (processes[0].folder / "metrics.jsonl").exists()
                 and "peer_started" in (processes[0].folder / "metrics.jsonl").read_text(), 60, "peer 0 serving")
        with grpc.insecure_channel(address) as channel:  # no certificate: the handshake fails
            stub = meshfl_pb2_grpc.PeerStub(channel)
            beat = meshfl_pb2.Chunk(data=encode(Heartbeat(sender=1)), last=True)
            try:
                stub.Ping(beat, timeout=3)
                seen["plaintext"] = "accepted"
            except grpc.RpcError as exc:
                seen["plaintext"] = exc.code()

    launched = launch_local(config, tmp_path / "run", timeout_s=90, on_started=plaintext_probe, report=False)
    assert launched.exit_codes == {0: 0, 1: 0}
    assert seen["plaintext"] == grpc.StatusCode.UNAVAILABLE
    summary = launched.summary
    assert summary["dead_peers"] == [] and summary["total_refused"] == 0
    expected = sim_accuracy(load_config(None, ["peers=2", "rounds=1", "data.dataset=digits"]))
    for peer, accuracy in summary["final_global_accuracy"].items():
        assert abs(accuracy - expected[peer]) < 0.01
    tls = load_peer_config(tmp_path / "run" / "peers" / "peer-1" / "peer.yaml").tls
    assert tls.mode == "mtls" and tls.cert == str(certs / "peer-1.pem") and tls.key == str(certs / "peer-1.key")


def test_mtls_without_a_per_peer_placeholder_is_a_config_error(tmp_path):
    config = digits(2, 1, "grpc.tls.mode=mtls", "grpc.tls.ca=ca.pem", "grpc.tls.cert=one.pem", "grpc.tls.key=one.key")
    with pytest.raises(ConfigError, match=r"grpc\.tls\.cert: .*\{peer\}"):
        launch_local(config, tmp_path / "run", timeout_s=10)


def test_context_seeds_like_the_simulator(tmp_path):
    """Same rng stream, same torch stream and same initial model as the simulator's SimContext."""
    config = digits(2, 1, "seed=5")
    node = PeerNode(build_peer_configs(config, ["127.0.0.1:1", "127.0.0.1:2"])[1], config, tmp_path)
    ctx = GrpcContext(node)
    assert ctx.peers == (0, 1) and ctx.neighbours == (0,) and ctx.num_samples == len(node.worlds.peer_data[1].train)
    assert ctx.rng.random() == np.random.default_rng([5, 1]).random()
    expected = node.worlds.learner.init_params(initial_model_seed(5))
    assert torch.equal(ctx.initial_params().flat, expected.flat)
    with pytest.raises(ValueError, match="not in the experiment"):
        ctx.send(7, HaveModels(sender=1, round=0, contributors=frozenset()))
    node.metrics_file.close()


def test_a_message_sent_to_several_neighbours_is_encoded_once(tmp_path, monkeypatch):
    config = digits(2, 1)
    node = PeerNode(build_peer_configs(config, ["127.0.0.1:1", "127.0.0.1:2"])[0], config, tmp_path)
    calls = []
    monkeypatch.setattr("meshfl.runtime.grpc.node.encode", lambda m: calls.append(m) or encode(m))
    have = HaveModels(sender=0, round=1, contributors=frozenset({1}))
    first = node.encoded(have)
    assert node.encoded(have) is first and calls == [have]
    twin = HaveModels(sender=0, round=1, contributors=frozenset({1}))  # equal, but another object: encoded anew
    assert node.encoded(twin) == first and len(calls) == 2
    for r in range(10):  # only the last few are kept: memory stays bounded
        node.encoded(HaveModels(sender=0, round=r, contributors=frozenset()))
    assert node.encoded(have) == first and len(calls) == 13
    node.metrics_file.close()


def test_ping_carries_only_heartbeat_and_goodbye(tmp_path):
    config = digits(2, 1)
    node = PeerNode(build_peer_configs(config, ["127.0.0.1:1", "127.0.0.1:2"])[0], config, tmp_path)
    votes = encode(Votes(sender=1, round=1, ballots=(Ballot(1, (0,), (5,)),)))
    assert node.receive(votes, control_only=True) is False and node.door.refused["malformed"] == 1
    assert node.receive(encode(Heartbeat(sender=1)), control_only=True) is True
    assert node.receive(votes) is True  # over Stream the same message is fine
    node.metrics_file.close()

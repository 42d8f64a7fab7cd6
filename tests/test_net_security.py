"""A peer is a stranger: secure by default, fail-closed identity, and bounded resources (issue 13, parts 1 and 4).

Real gRPC servers (a `PeerNode`'s own) on 127.0.0.1 in one event loop, attacked by clients of our
own; outcomes asserted: refused with the right code, counted by reason, nothing buffered.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from meshfl.cli import app
from meshfl.config import ConfigError, GrpcConfig, TlsConfig, WireConfig, load_config
from meshfl.core.messages import Heartbeat
from meshfl.experiment.launch import build_peer_configs, choose_ports
from meshfl.runtime.grpc.certs import generate_deployment, generate_peer_cert, load_credentials
from meshfl.runtime.grpc.door import RateLimiter
from meshfl.runtime.grpc.node import PeerNode
from meshfl.runtime.grpc.peer_config import check_listen, dump_peer_config
from meshfl.runtime.grpc.transport import StreamBudget, make_channel
from meshfl.wire import meshfl_pb2, meshfl_pb2_grpc
from meshfl.wire.envelope import encode

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
runner = CliRunner()


def digits(peers: int, *extra: str):
    return load_config(None, [f"peers={peers}", "rounds=1", "data.dataset=digits", *extra])


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> dict:
    """A CA, peer-0..peer-2, and CA-signed certificates that name no peer of a 3-peer experiment."""
    folder = tmp_path_factory.mktemp("certs")
    made = generate_deployment(folder, peers=3)
    for name in ("mallory", "peer-9", "peer-01"):
        generate_peer_cert(folder, made["ca"], made["ca_key"], name, ["127.0.0.1"])
    made["folder"] = folder
    return made


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict:
    return generate_deployment(tmp_path_factory.mktemp("foreign"), peers=3)


def _node(tmp_path: Path, config, port: int, certs: Path | None = None) -> PeerNode:
    peers = build_peer_configs(config, [f"127.0.0.1:{port + p}" for p in range(config.peers)], certs_dir=certs)
    return PeerNode(peers[0], config, tmp_path / "peer-0")


async def _ping(channel: grpc.aio.Channel, sender: int = 1) -> grpc.StatusCode | int:
    """Accepted count of one Heartbeat over Ping, or the error code."""
    try:
        ack = await meshfl_pb2_grpc.PeerStub(channel).Ping(meshfl_pb2.Chunk(data=encode(Heartbeat(sender=sender)), last=True),
                                                          timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return ack.accepted


async def _stream(channel: grpc.aio.Channel, chunks: int, chunk_bytes: int = MIB, hold_s: float = 0.0,
                  timeout: float = 20) -> grpc.StatusCode:
    """A stream of `chunks` chunks, none the last, then `hold_s` of silence; the code it ends with."""
    async def pieces():
        data = bytes(chunk_bytes)
        for _ in range(chunks):
            yield meshfl_pb2.Chunk(data=data, last=False)
        await asyncio.sleep(hold_s)

    try:
        await meshfl_pb2_grpc.PeerStub(channel).Stream(pieces(), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ---- secure by default ----------------------------------------------------------------------

def test_check_listen_needs_mtls_off_loopback():
    plain, tls = TlsConfig(), TlsConfig(mode="tls", ca="ca.pem", cert="c.pem", key="c.key")
    mtls = tls.model_copy(update={"mode": "mtls"})
    for listen in ("127.0.0.1:5000", "127.3.2.1:5000", "localhost:5000", "[::1]:5000"):
        assert check_listen(listen, plain, insecure=False) is None
    for listen in ("0.0.0.0:5000", "10.0.0.1:5000", "[::]:5000", "node-a.lan:5000"):
        assert check_listen(listen, mtls, insecure=False) is None
        for refused in (plain, tls):  # tls authenticates the server only: any client could claim any sender
            with pytest.raises(ConfigError) as err:
                check_listen(listen, refused, insecure=False)
            message = str(err.value)
            assert message.startswith(f"grpc.tls.mode: {refused.mode} on listen {listen}") and "\n" not in message
            assert "grpc.tls.mode=mtls" in message and "--insecure" in message
            assert "SECURITY WARNING" in check_listen(listen, refused, insecure=True)


def test_a_peer_off_loopback_without_mtls_refuses_to_start_and_writes_nothing(tmp_path):
    config = digits(2)
    peer = build_peer_configs(config, ["127.0.0.1:1", "127.0.0.1:2"], listen_hosts=["0.0.0.0", "0.0.0.0"])[0]
    with pytest.raises(ConfigError, match=r"^grpc\.tls\.mode: none on listen 0\.0\.0\.0:1"):
        PeerNode(peer, config, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # not even an incarnation counted


def test_insecure_warns_at_every_start(tmp_path, capsys):
    config = digits(2, "grpc.insecure=true")
    peer = build_peer_configs(config, ["127.0.0.1:1", "127.0.0.1:2"], listen_hosts=["0.0.0.0", "0.0.0.0"])[0]
    for _ in range(2):  # a restart warns again
        PeerNode(peer, config, tmp_path / "p").metrics_file.close()
        assert "SECURITY WARNING" in capsys.readouterr().err
    warnings = [e for e in read_events(tmp_path / "p" / "metrics.jsonl") if e["event"] == "security_warning" and "listen" in e]
    assert len(warnings) == 2 and warnings[0]["listen"] == "0.0.0.0:1" and warnings[0]["tls"] == "none"
    flagged = digits(2)  # the same through `meshfl node --insecure` rather than the config
    PeerNode(peer, flagged, tmp_path / "q", insecure=True).metrics_file.close()
    assert "SECURITY WARNING" in capsys.readouterr().err


def test_node_command_refuses_then_warns_with_insecure(tmp_path):
    port = choose_ports("127.0.0.1", 50600, 1)[0]
    config = load_config(None, ["peers=1", "rounds=1", "data.dataset=digits"])
    peer = build_peer_configs(config, [f"127.0.0.1:{port}"], listen_hosts=["0.0.0.0"], linger_s=0.0)[0]
    path = tmp_path / "peer-0.yaml"
    path.write_text(dump_peer_config(peer))
    refused = runner.invoke(app, ["node", "--config", str(path)])
    assert refused.exit_code == 2 and refused.stderr.strip().startswith("error: grpc.tls.mode: none on listen 0.0.0.0:")
    assert len(refused.stderr.strip().splitlines()) == 1
    done = subprocess.run([sys.executable, "-m", "meshfl.cli", "node", "--config", str(path), "--insecure"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "SECURITY WARNING" in done.stderr and "peer 0: finished" in done.stderr


def test_a_peer_with_another_peers_certificate_refuses_to_start(tmp_path, deployment):
    config = digits(3)
    peer = build_peer_configs(config, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], certs_dir=deployment["folder"])[1]
    wrong = peer.model_copy(update={"tls": peer.tls.model_copy(update={"cert": str(deployment["folder"] / "peer-2.pem"),
                                                                      "key": str(deployment["folder"] / "peer-2.key")})})
    with pytest.raises(ConfigError, match=r"grpc\.tls\.cert: .*peer-2\.pem is for peer-2, not this peer \(peer-1\)"):
        PeerNode(wrong, config, tmp_path / "p")


def test_mtls_strangers_cannot_make_a_peer_buffer_anything(tmp_path, deployment, foreign):
    """No certificate or another CA's: the handshake fails. CA-signed but naming no peer of the experiment
    (mallory, peer-9 of 3, peer-01): UNAUTHENTICATED before one chunk is read, counted, nothing admitted
    or buffered. A real peer's certificate still gets in."""
    port = choose_ports("127.0.0.1", 50603, 3)[0]
    config = digits(3)
    node = _node(tmp_path, config, port, certs=deployment["folder"])
    ca = Path(deployment["ca"]).read_bytes()
    address = f"127.0.0.1:{port}"
    override = [("grpc.ssl_target_name_override", "peer-0")]

    def client(name: str, root: bytes = ca, folder: Path = deployment["folder"]) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=(folder / f"{name}.key").read_bytes(),
                                            certificate_chain=(folder / f"{name}.pem").read_bytes())

    async def scenario() -> dict:
        server = await node.start_server()
        seen: dict = {}
        try:
            attempts = {
                "no_cert": grpc.ssl_channel_credentials(root_certificates=ca),
                "foreign_ca": client("peer-1", root=ca, folder=Path(foreign["ca"]).parent),
                "mallory": client("mallory"), "peer-9": client("peer-9"), "peer-01": client("peer-01"),
            }
            for name, credentials in attempts.items():
                async with grpc.aio.secure_channel(address, credentials, options=override) as channel:
                    seen[name] = (await _stream(channel, chunks=4), await _ping(channel))
            seen["buffered"] = node.streams.peak
            seen["admitted"] = node.door.admitted
            async with grpc.aio.secure_channel(address, client("peer-1"), options=override) as channel:
                seen["peer-1"] = await _ping(channel, sender=1)
                seen["peer-1 as 2"] = await _ping(channel, sender=2)  # a real peer cannot speak for another
        finally:
            await server.stop(None)
        return seen

    seen = asyncio.run(scenario())
    node.snapshot()
    node.metrics_file.close()
    for name in ("no_cert", "foreign_ca"):
        assert seen[name] == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE), name
    for name in ("mallory", "peer-9", "peer-01"):
        stream, ping = seen[name]
        # the server ends the stream before reading it; a client still writing chunks may see its own
        # write fail first (aio reports INTERNAL "Failed execute_batch") instead of the server's status
        assert stream in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL) and ping == grpc.StatusCode.UNAUTHENTICATED, name
    assert seen["buffered"] == 0 and seen["admitted"] == 0
    assert seen["peer-1"] == 1 and seen["peer-1 as 2"] == 0
    assert node.door.refused["unauthenticated"] == 6 and node.door.refused["unknown_sender"] == 1
    traffic = [e for e in read_events(tmp_path / "peer-0" / "metrics.jsonl") if e["event"] == "traffic"][-1]
    assert traffic["refused"]["unauthenticated"] == 6 and traffic["stream_buffer_peak"] == 0


# ---- resource limits ------------------------------------------------------------------------

def test_a_stalled_stream_is_aborted_at_its_deadline(tmp_path):
    port = choose_ports("127.0.0.1", 50606, 2)[0]
    node = _node(tmp_path, digits(2, "wire.stream_deadline_s=0.5", "wire.stream_min_mb_per_s=1"), port)

    async def scenario() -> grpc.StatusCode:
        server = await node.start_server()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await _stream(channel, chunks=1, chunk_bytes=100_000, hold_s=10)  # deadline 0.5 + 0.1 s
        finally:
            await server.stop(None)

    code = asyncio.run(scenario())
    node.metrics_file.close()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # the server's deadline, as it counted below (not the client's)
    assert node.door.refused["stream_deadline"] == 1 and node.streams.used == 0


def test_buffered_bytes_are_bounded_across_streams_and_small_messages_still_pass(tmp_path):
    """Four stalled 900 KiB streams against a 2 MiB budget: the largest holders are evicted or the
    newcomer refused (RESOURCE_EXHAUSTED, buffer_full), never more than 2 MiB held; a heartbeat
    and a small message sent meanwhile get in."""
    port = choose_ports("127.0.0.1", 50608, 2)[0]
    node = _node(tmp_path, digits(2, "wire.max_message_mb=1", "wire.stream_buffer_mb=2", "wire.stream_deadline_s=2"), port)
    small = encode(Heartbeat(sender=1))

    async def scenario() -> tuple[list, int]:
        server = await node.start_server()
        try:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(5)]
            stalled = [asyncio.create_task(_stream(c, chunks=3, chunk_bytes=300 * 1024, hold_s=5)) for c in channels[:4]]
            await asyncio.sleep(0.5)
            full = node.streams.used
            ack = await meshfl_pb2_grpc.PeerStub(channels[4]).Stream(
                iter([meshfl_pb2.Chunk(data=small, last=True)]), timeout=5)
            codes = await asyncio.gather(*stalled)
            for channel in channels:
                await channel.close()
            return codes, full, ack.accepted
        finally:
            await server.stop(None)

    codes, full, accepted = asyncio.run(scenario())
    node.metrics_file.close()
    assert full <= 2 * MIB and node.streams.peak <= 2 * MIB
    assert accepted == 1  # a small message gets through a full buffer
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2 and grpc.StatusCode.OK not in codes
    assert node.door.refused["buffer_full"] >= 2 and node.streams.used == 0


def test_per_sender_message_rate_is_limited_and_counted(tmp_path):
    port = choose_ports("127.0.0.1", 50610, 3)[0]
    node = _node(tmp_path, digits(3, "wire.sender_messages_per_s=0.5", "wire.sender_burst_messages=5"), port)

    async def scenario() -> tuple[list, int]:
        server = await node.start_server()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                flood = [await _ping(channel, sender=1) for _ in range(10)]
                other = await _ping(channel, sender=2)  # another sender has its own bucket
        finally:
            await server.stop(None)
        return flood, other

    flood, other = asyncio.run(scenario())
    node.snapshot()
    node.metrics_file.close()
    assert flood == [1] * 5 + [0] * 5 and other == 1
    assert node.door.refused["rate_limited"] == 5
    traffic = [e for e in read_events(tmp_path / "peer-0" / "metrics.jsonl") if e["event"] == "traffic"][-1]
    assert traffic["refused"] == {"rate_limited": 5}


def test_rate_limiter_buckets_refill_and_never_overspend():
    now = [0.0]
    limiter = RateLimiter(WireConfig(sender_messages_per_s=2, sender_burst_messages=4, max_message_mb=1,
                                     sender_mb_per_s=1, sender_burst_mb=2), clock=lambda: now[0])
    assert all(limiter.take(1, 1) for _ in range(4)) and not limiter.take(1, 1)
    now[0] = 1.0  # two more messages' worth
    assert limiter.take(1, 1) and limiter.take(1, 1) and not limiter.take(1, 1)
    assert limiter.take(1, 0, 2_000_000) and not limiter.take(1, 0, 1)
    assert not limiter.take(1, 1, 1)  # refused whole: the message was not spent either
    now[0] = 100.0
    assert limiter.take(1, 4, 2_000_000) and not limiter.take(1, 0, 2_000_001)  # refilled to the burst, no further


class _Deadline:
    """Stands in for a handler's asyncio.Timeout: records the wake-up an eviction asks for."""

    def __init__(self) -> None:
        self.when: float | None = None

    def expired(self) -> bool:
        return False

    def reschedule(self, when: float | None) -> None:
        self.when = when


def test_budget_evicts_the_largest_holder_not_a_small_newcomer():
    async def scenario() -> None:
        budget = StreamBudget(10)
        big, mid, small = (budget.open(_Deadline()) for _ in range(3))
        assert await budget.take(big, 6) and await budget.take(mid, 3)
        assert await budget.take(small, 1) and budget.used == 10
        asked = asyncio.create_task(budget.take(small, 2))  # big (6) holds more than small would (3): evicted
        await asyncio.sleep(0)
        assert big.evicted and big.deadline.when is not None  # woken now
        assert not asked.done() and budget.used == 10  # its bytes are alive until its handler drops them
        budget.close(big)  # what its handler does when woken
        assert await asked and budget.used == 6 and budget.evictions == 1
        assert not await budget.take(mid, 5)  # mid would become the largest holder: it is refused instead
        budget.close(mid)
        budget.close(small)
        assert budget.used == 0 and budget.peak == 10

    asyncio.run(scenario())


def test_client_options_and_server_options_are_consistent():
    """A client's keepalive is never faster than the server lets it ping (or the server would GOAWAY)."""
    from meshfl.runtime.grpc.transport import client_options, max_concurrent_rpcs, server_options

    config = GrpcConfig()
    client, server = dict(client_options(config)), dict(server_options(config))
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert server["grpc.max_concurrent_streams"] == 16 and server["grpc.max_connection_idle_ms"] == 300_000
    assert max_concurrent_rpcs(config, 10) == 104 and max_concurrent_rpcs(GrpcConfig(max_concurrent_rpcs=7), 10) == 7
    with pytest.raises(ValueError, match="stream_buffer_mb"):
        WireConfig(max_message_mb=64, stream_buffer_mb=32)
    with pytest.raises(ValueError, match="sender_burst_mb"):
        WireConfig(max_message_mb=64, sender_burst_mb=60)


def test_make_channel_checks_the_dialled_peers_name(deployment):
    """Peer 1 listening with peer 2's (CA-signed) certificate is refused by a client dialling peer 1."""
    folder = deployment["folder"]

    class Answer(meshfl_pb2_grpc.PeerServicer):
        async def Ping(self, request, context):  # noqa: N802
            return meshfl_pb2.Ack(accepted=1)

    def tls(name: str) -> TlsConfig:
        return TlsConfig(mode="mtls", ca=str(deployment["ca"]), cert=str(folder / f"{name}.pem"), key=str(folder / f"{name}.key"))

    async def scenario() -> dict:
        server = grpc.aio.server()
        meshfl_pb2_grpc.add_PeerServicer_to_server(Answer(), server)
        port = server.add_secure_port("127.0.0.1:0", load_credentials(tls("peer-2"), server=True))
        await server.start()
        seen = {}
        try:
            for dialled in (1, 2):
                async with make_channel(f"127.0.0.1:{port}", GrpcConfig(), tls("peer-0"), peer=dialled) as channel:
                    seen[dialled] = await _ping(channel, sender=0)
        finally:
            await server.stop(None)
        return seen

    seen = asyncio.run(scenario())
    assert seen == {1: grpc.StatusCode.UNAVAILABLE, 2: 1}


# ---- slow-stream attack on a real run -------------------------------------------------------

ATTACK_STREAMS = 16
ATTACK_STREAM_MIB = 250
ATTACK_S = 8.0


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def _never_ending_streams(address: str, seconds: float, reopen: bool = False) -> dict:
    """ATTACK_STREAMS threads, each on its own connection, each streaming 1 MiB chunks as fast as it
    can, up to ATTACK_STREAM_MIB, never the last one, then holding the stream open for `seconds`;
    with `reopen`, a stream the peer aborts is opened again at once. Returns the codes the streams
    ended with and the MiB sent."""
    import threading

    stop = threading.Event()
    codes: list[str] = []
    sent = [0]
    lock = threading.Lock()
    chunk = meshfl_pb2.Chunk(data=bytes(MIB), last=False)

    def pieces():
        for _ in range(ATTACK_STREAM_MIB):
            if stop.is_set():
                return
            with lock:
                sent[0] += 1
            yield chunk
        stop.wait(seconds + 30)  # never the last chunk: hold the stream open

    def attacker() -> None:
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 * MIB)]) as channel:
            stub = meshfl_pb2_grpc.PeerStub(channel)
            while not stop.is_set():
                try:
                    stub.Stream(pieces(), timeout=seconds + 20)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes.append(code)
                if not reopen:
                    return

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(ATTACK_STREAMS)]
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    return {"codes": codes, "sent_mib": sent[0]}


def test_sixteen_never_ending_250_mib_streams_leave_a_peer_bounded_and_the_run_finishes(tmp_path):
    """Peer 0 of a real 3-peer run (plaintext on 127.0.0.1, default wire limits) is held mid-run
    (peer 2 paused by SIGSTOP, long timeouts) while 16 never-ending 250 MiB streams hit it for
    ATTACK_S; its RSS (sampled every 50 ms, and its high-water mark) grows by less than 300 MiB
    (wire.stream_buffer_mb = 128 by default, the rest is gRPC's and the allocator's);
    then peer 2 resumes and the run finishes with the simulator's accuracy."""
    import os
    import signal
    import threading
    import time

    from meshfl.experiment.launch import launch_local
    from meshfl.experiment.run import simulate, summarise
    from meshfl.runtime.grpc.peer_config import load_peer_config

    slow = ["gossip.vote_timeout_s=40", "gossip.aggregation_timeout_s=40", "gossip.wait_model_timeout_s=40",
            "gossip.diffusion_timeout_s=40", "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=40"]
    config = load_config(None, ["peers=3", "rounds=2", "data.dataset=digits", "grpc.base_port=50620", "grpc.local_mtls=false", *slow])
    seen: dict = {}

    def metrics_text(process) -> str:
        path = process.folder / "metrics.jsonl"
        return path.read_text() if path.exists() else ""

    def attack(processes) -> None:
        target, paused = processes[0], processes[2]
        deadline = time.monotonic() + 60
        while "algorithm_started" not in metrics_text(paused) or "algorithm_started" not in metrics_text(target):
            assert time.monotonic() < deadline, "peers did not start"
            time.sleep(0.05)
        os.kill(paused.process.pid, signal.SIGSTOP)
        try:
            pid = target.process.pid
            time.sleep(0.5)
            seen["rss_before_kib"] = _status_kib(pid, "VmRSS")
            seen["hwm_before_kib"] = _status_kib(pid, "VmHWM")
            samples: list[int] = []
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.is_set():
                    samples.append(_status_kib(pid, "VmRSS"))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            seen.update(_never_ending_streams(load_peer_config(target.folder / "peer.yaml").listen, ATTACK_S))
            seen["attack_s"] = time.monotonic() - started
            time.sleep(0.5)
            sampling.set()
            sampler.join(timeout=5)
            seen["rss_peak_kib"] = max(samples)
            seen["rss_after_kib"] = _status_kib(pid, "VmRSS")
            seen["hwm_after_kib"] = _status_kib(pid, "VmHWM")
            seen["still_running"] = '"peer_finished"' not in metrics_text(target)
        finally:
            os.kill(paused.process.pid, signal.SIGCONT)

    def start(processes) -> None:
        seen["thread"] = threading.Thread(target=lambda: seen.update(error=None) if attack(processes) is None else None,
                                          daemon=True)
        seen["thread"].start()

    launched = launch_local(config, tmp_path / "run", timeout_s=150, on_started=start, report=False)
    seen["thread"].join(timeout=60)
    growth_mib = (seen["rss_peak_kib"] - seen["rss_before_kib"]) / 1024
    hwm_growth_mib = (seen["hwm_after_kib"] - seen["rss_before_kib"]) / 1024
    print(f"\nslow-stream attack: {len(seen['codes'])} streams ended ({sorted(set(seen['codes']))}), "
          f"{seen['sent_mib']} MiB sent in {seen['attack_s']:.1f}s; peer 0 RSS {seen['rss_before_kib'] / 1024:.0f} MiB "
          f"before, peak {seen['rss_peak_kib'] / 1024:.0f} MiB (+{growth_mib:.0f}), high-water {seen['hwm_after_kib'] / 1024:.0f} "
          f"MiB (+{hwm_growth_mib:.0f}), {seen['rss_after_kib'] / 1024:.0f} MiB after")
    assert seen["still_running"]  # the attack landed while the peer was mid-run
    assert seen["sent_mib"] > 2 * config.wire.stream_buffer_mb  # far more than the budget was thrown at it
    assert growth_mib < 300 and hwm_growth_mib < 300
    assert seen["codes"].count("RESOURCE_EXHAUSTED") >= ATTACK_STREAMS - config.wire.stream_buffer_mb // ATTACK_STREAM_MIB - 1
    summary = launched.summary
    assert launched.exit_codes == {0: 0, 1: 0, 2: 0} and summary["dead_peers"] == []
    assert summary["refused"]["0"].get("buffer_full", 0) > 0
    result, metrics, _ = simulate(config)
    expected = summarise(config, result, metrics, 0.0)["final_global_accuracy"]
    for peer, accuracy in summary["final_global_accuracy"].items():
        assert abs(accuracy - expected[peer]) < 0.01, (peer, accuracy, expected[peer])

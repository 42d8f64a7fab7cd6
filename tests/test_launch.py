"""The launcher: peer configs, one process per peer, faults, Ctrl-C, and the merged run folder.

Process tests use digits, the mlp and 4 peers for 2-3 rounds with short real-time timeouts,
and each is bounded by a timeout so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from meshfl.cli import app
from meshfl.config import ConfigError, dump_config, load_config
from meshfl.core.topology import make_topology
from meshfl.experiment.launch import (
    LaunchError,
    PeerMetricsReader,
    PeerProcess,
    _wait,
    choose_ports,
    grpc_summary,
    launch_local,
    merge_events,
    merge_peer_folders,
    parse_hosts,
    peer_addresses,
    stop_all,
    write_peer_configs,
)
from meshfl.experiment.run import simulate, summarise
from meshfl.runtime.grpc.peer_config import load_peer_config

ROOT = Path(__file__).resolve().parents[1]
FAST = ["gossip.vote_timeout_s=4", "gossip.aggregation_timeout_s=6", "gossip.wait_model_timeout_s=6",
        "gossip.diffusion_timeout_s=2", "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=2"]
runner = CliRunner()
RUN_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "partition.json", "report.html",
             "accuracy_per_peer.png", "messages_per_peer.png", "loss_per_round.png"}


def meshfl(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshfl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


# ---- configs --------------------------------------------------------------------------------

def test_hosts_are_assigned_round_robin():
    hosts = parse_hosts(["10.0.0.1:6000", "10.0.0.2:7000"])
    assert peer_addresses(5, hosts) == ["10.0.0.1:6000", "10.0.0.2:7000", "10.0.0.1:6001", "10.0.0.2:7001", "10.0.0.1:6002"]
    with pytest.raises(ConfigError, match="--hosts"):
        parse_hosts(["10.0.0.1"])


def test_write_peer_configs_follows_the_topology(tmp_path):
    config = load_config(None, ["peers=6", "topology.kind=ring", "data.dataset=digits"])
    paths = write_peer_configs(config, ["127.0.0.1:6000", "10.1.1.1:7000"], tmp_path).paths
    assert [p.name for p in paths] == [f"peer-{i}.yaml" for i in range(6)]
    ring = make_topology(config.topology, 6, config.seed)
    for peer, path in enumerate(paths):
        peer_config = load_peer_config(path)
        assert sorted(peer_config.neighbours) == list(ring.neighbours[peer])
        assert peer_config.resolve_experiment(tmp_path) == config
    assert load_peer_config(paths[0]).listen == "127.0.0.1:6000"
    assert load_peer_config(paths[1]).listen == "0.0.0.0:7000"  # a remote host binds every interface
    assert load_peer_config(paths[2]).addresses[1] == "10.1.1.1:7000"  # every peer is in the address book
    assert sorted(load_peer_config(paths[2]).addresses) == [0, 1, 3, 4, 5]


def test_configs_for_network_hosts_make_certificates_and_use_mtls(tmp_path):
    """Secure by default: hosts off loopback without --certs get a CA and per-peer certificates, mTLS everywhere."""
    from cryptography import x509

    from meshfl.runtime.grpc.certs import check_identity, load_credentials

    config = load_config(None, ["peers=3", "data.dataset=digits"])
    written = write_peer_configs(config, ["10.0.0.1:50100", "10.0.0.2:50100"], tmp_path / "peers")
    assert written.security == "mtls-generated" and written.certs_dir == tmp_path / "peers" / "certs"
    assert {"ca.pem", "ca.key", "peer-0.pem", "peer-2.key"} <= {p.name for p in written.certs_dir.iterdir()}
    for peer, path in enumerate(written.paths):
        raw = yaml.safe_load(path.read_text())
        assert raw["tls"] == {"mode": "mtls", "ca": "certs/ca.pem", "cert": f"certs/peer-{peer}.pem", "key": f"certs/peer-{peer}.key"}
        assert raw["listen"].startswith("0.0.0.0:") and raw["experiment"]["grpc"]["insecure"] is False
        tls = load_peer_config(path).with_base(path.parent).tls  # relative to the peer config: copy the folder as it is
        check_identity(tls, peer)  # CN and DNS name peer-<i>
        load_credentials(tls, server=True)
        cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [f"10.0.0.{1 + peer % 2}"]
        assert sans.get_values_for_type(x509.DNSName) == [f"peer-{peer}"]


def test_configs_command_network_hosts_certs_insecure_or_given(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    made = runner.invoke(app, ["configs", "--peers", "2", "--hosts", "10.0.0.1:50100", "--out", str(tmp_path / "a")])
    assert made.exit_code == 0, made.stderr
    assert "made a CA and 2 peer certificates" in made.stdout and (tmp_path / "a" / "certs" / "peer-1.pem").is_file()
    assert yaml.safe_load((tmp_path / "a" / "peer-1.yaml").read_text())["tls"]["mode"] == "mtls"

    plain = runner.invoke(app, ["configs", "--peers", "2", "--hosts", "10.0.0.1:50100", "--out", str(tmp_path / "b"), "--insecure"])
    assert plain.exit_code == 0, plain.stderr
    assert "SECURITY WARNING" in plain.stderr and not (tmp_path / "b" / "certs").exists()
    raw = yaml.safe_load((tmp_path / "b" / "peer-0.yaml").read_text())
    assert "tls" not in raw and raw["experiment"]["grpc"]["insecure"] is True  # each peer warns at start

    given = runner.invoke(app, ["certs", "--peers", "2", "--hosts", "10.0.0.1", "--out", str(tmp_path / "given")])
    assert given.exit_code == 0, given.stderr
    used = runner.invoke(app, ["configs", "--peers", "2", "--hosts", "10.0.0.1:50100", "--out", str(tmp_path / "c"),
                               "--certs", str(tmp_path / "given")])
    assert used.exit_code == 0, used.stderr
    tls = yaml.safe_load((tmp_path / "c" / "peer-1.yaml").read_text())["tls"]
    assert tls["mode"] == "mtls" and tls["cert"] == str((tmp_path / "given" / "peer-1.pem").resolve())
    assert not (tmp_path / "c" / "certs").exists()

    loopback = runner.invoke(app, ["configs", "--peers", "2", "--hosts", "127.0.0.1:50100", "--out", str(tmp_path / "d")])
    assert loopback.exit_code == 0 and "tls" not in yaml.safe_load((tmp_path / "d" / "peer-0.yaml").read_text())


def test_launch_off_loopback_without_mtls_is_refused_before_any_peer_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    refused = runner.invoke(app, ["launch", "--local", "--out", str(tmp_path / "run"),
                                  *sets("peers=2", "data.dataset=digits", "grpc.host=0.0.0.0", "grpc.local_mtls=false")])
    assert refused.exit_code == 2
    message = refused.stderr.strip()
    assert message.startswith("error: grpc.tls.mode: none on listen 0.0.0.0:") and "--insecure" in message and len(message.splitlines()) == 1, message
    assert not (tmp_path / "run" / "peers").exists()


def test_configs_command_and_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    done = runner.invoke(app, ["configs", "examples/mnist_gossip.yaml", "--peers", "3", "--topology", "ring",
                               "--hosts", "127.0.0.1:6100", "--out", str(tmp_path / "peers"), *sets("rounds=2")])
    assert done.exit_code == 0, done.stderr
    peer = yaml.safe_load((tmp_path / "peers" / "peer-2.yaml").read_text())
    assert peer["listen"] == "127.0.0.1:6102" and peer["experiment"]["rounds"] == 2
    for args, field in [
        (["configs", "--peers", "3", "--topology", "donut", "--out", str(tmp_path / "x")], "topology.kind"),
        (["configs", "--peers", "3", "--hosts", "nohost", "--out", str(tmp_path / "x")], "--hosts"),
        (["launch", "examples/mnist_gossip.yaml"], "--local"),
        (["launch", "--local", "--set", "peers=-1"], "peers"),
        (["node", "--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["certs", "--peers", "0", "--out", str(tmp_path / "c")], "--peers"),
    ]:
        failed = runner.invoke(app, args)
        assert failed.exit_code == 2, (args, failed.stderr)
        message = failed.stderr.strip()
        assert field in message and len(message.splitlines()) == 1 and "Traceback" not in message, message


def test_taken_ports_are_replaced_by_free_ones():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = choose_ports("127.0.0.1", taken, 3)
    assert ports[0] != taken and len(set(ports)) == 3


def test_merge_puts_peers_on_the_launcher_clock_and_summarises_the_dead():
    config = load_config(None, ["peers=2", "rounds=1"])
    per_peer = {
        0: [{"event": "peer_started", "peer": 0, "unix_time": 101.0, "wall_time": 0.5},
            {"event": "metric", "peer": 0, "round": 1, "metric": "global_accuracy", "value": 0.9, "wall_time": 2.0},
            {"event": "traffic", "peer": 0, "messages_sent": 3, "bytes_sent": 300, "messages_dropped": 1,
             "wire_bytes_sent": 290, "framing_bytes_estimate": 10, "algorithm_bytes_delivered": 280,
             "refused": {"malformed": 2}, "wall_time": 2.1}],
        1: [{"event": "peer_started", "peer": 1, "unix_time": 100.0, "wall_time": 0.1}],
    }
    merged = merge_events(per_peer, started_unix=100.0)
    assert [(e["event"], e["wall_time"]) for e in merged][:2] == [("peer_started", 0.1), ("peer_started", 1.5)]
    summary = grpc_summary(config, per_peer, merged, {0: 0, 1: -9}, 5.0)
    assert summary["dead_peers"] == [1] and summary["final_global_accuracy"] == {"0": 0.9, "1": None}
    assert summary["peer_status"] == {"0": "running", "1": "crashed"} and summary["interrupted"] is False
    assert summary["messages_sent"] == {"0": 3, "1": 0} and summary["total_bytes"] == 300
    assert summary["refused"]["0"] == {"malformed": 2} and summary["total_refused"] == 2
    assert summary["wire_overhead_ratio"] == pytest.approx(300 / 280)


def peer_folder(root: Path, peer: int, config, *, accuracy: float | None, status: str | None) -> Path:
    """What `meshfl node` leaves in its out_dir: config.yaml and metrics.jsonl."""
    folder = root / f"peer-{peer}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_config(config))
    events = [{"event": "peer_started", "peer": peer, "unix_time": 1000.0 + peer, "wall_time": 0.0,
               "partition": {"peer": peer, "train": 10}}]
    if accuracy is not None:
        events.append({"event": "metric", "peer": peer, "round": config.rounds, "metric": "global_accuracy",
                       "value": accuracy, "virtual_time": 3.0, "wall_time": 3.0})
    if status is not None:
        events.append({"event": "peer_finished", "peer": peer, "status": status, "virtual_time": 4.0, "wall_time": 4.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"torn')
    return folder


def test_merge_command_builds_one_run_from_peer_folders(tmp_path):
    config = load_config(None, ["peers=3", "rounds=2"])
    folders = [peer_folder(tmp_path / "hosts", 0, config, accuracy=0.9, status="finished"),
               peer_folder(tmp_path / "hosts", 1, config, accuracy=0.8, status=None)]  # killed: no peer_finished
    result = merge_peer_folders(folders, tmp_path / "run", report=False)
    summary = result.summary
    assert summary["final_global_accuracy"] == {"0": 0.9, "1": 0.8, "2": None}  # 1's last, though it died
    assert summary["dead_peers"] == [1, 2]  # 1 was killed, 2 never sent its folder
    assert summary["mean_final_accuracy"] == 0.9  # over the peers that are not dead
    assert summary["exit_codes"] == {"0": 0, "1": None, "2": None}
    assert summary["peer_status"] == {"0": "finished", "1": "crashed", "2": "crashed"}
    assert summary["incarnations"] == {"0": 1, "1": 1, "2": 0} and summary["interrupted"] is False
    assert summary["wall_time_s"] == pytest.approx(4.0)  # first start 1000.0 to last event: peer 0 at 1004, peer 1 at 1001 + 3
    assert load_config(tmp_path / "run" / "config.yaml") == config
    # bad input: one line naming the folder, exit code 2, nothing written
    other = peer_folder(tmp_path / "other", 2, load_config(None, ["peers=3", "rounds=2", "seed=5"]), accuracy=0.5, status="finished")
    for args, expected in [
        ([folders[0], other], "ran another experiment"),
        ([folders[0], folders[0]], "peer 0 appears twice"),
        ([tmp_path / "hosts"], "has no metrics.jsonl"),
    ]:
        done = runner.invoke(app, ["merge", *map(str, args), "--out", str(tmp_path / "bad")])
        assert done.exit_code == 2 and expected in done.output, done.output
        assert not (tmp_path / "bad").exists()


def fake_peer(folder: Path, peer: int, code: str) -> PeerProcess:
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return PeerProcess(peer, folder, process, log)


def test_a_peer_failing_by_itself_stops_every_other(tmp_path):
    sleeper = "import time; time.sleep(60)"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    processes = [fake_peer(tmp_path / "0", 0, sleeper), fake_peer(tmp_path / "1", 1, stubborn)]
    deadline = time.monotonic() + 30
    while "ready" not in processes[1].log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    processes.append(fake_peer(tmp_path / "2", 2, "import sys; print('boom'); sys.exit(3)"))
    readers = {p.peer: PeerMetricsReader(p.folder / "metrics.jsonl") for p in processes}
    try:
        with pytest.raises(LaunchError, match=r"peer 2 failed \(exit 3\): boom"):
            _wait(processes, readers, time.perf_counter(), 30, None)
    finally:
        stop_all(processes, grace_s=1.0)
    assert processes[0].returncode == -signal.SIGTERM
    assert processes[1].returncode == -signal.SIGKILL  # ignored SIGTERM: killed after the grace period
    assert not [p.process.pid for p in processes if alive(p.process.pid)]


def test_a_launch_past_its_timeout_is_stopped(tmp_path):
    processes = [fake_peer(tmp_path / "0", 0, "import time; time.sleep(60)")]
    try:
        with pytest.raises(LaunchError, match=r"still running after 0.5s"):
            _wait(processes, {0: PeerMetricsReader(tmp_path / "m.jsonl")}, time.perf_counter(), 0.5, None)
    finally:
        stop_all(processes)
    assert processes[0].returncode is not None


# ---- real processes -------------------------------------------------------------------------

def test_launch_matches_the_simulator(tmp_path):
    """`meshfl launch examples/mnist_gossip.yaml --local --set peers=4 --set rounds=3` on digits."""
    overrides = ["peers=4", "rounds=3", "data.dataset=digits", "grpc.base_port=50800", *FAST]
    done = meshfl("launch", "examples/mnist_gossip.yaml", "--local", "--quiet", "--timeout", "100",
                  "--out", str(tmp_path / "run"), *sets(*overrides), timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "run"
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    config = load_config(ROOT / "examples" / "mnist_gossip.yaml", overrides)
    result, metrics, _ = simulate(config)
    expected = summarise(config, result, metrics, 0.0)
    assert summary["dead_peers"] == [] and set(summary["final_global_accuracy"]) == {"0", "1", "2", "3"}
    for peer, accuracy in summary["final_global_accuracy"].items():
        assert abs(accuracy - expected["final_global_accuracy"][peer]) <= 0.01
    assert set(expected) <= set(summary)  # the simulator's summary keys, plus the runtime's own
    assert summary["runtime"] == "grpc" and summary["total_refused"] == 0
    assert all(dead == [] for dead in summary["neighbours_declared_dead"].values()), summary["neighbours_declared_dead"]
    assert 1.0 <= summary["wire_overhead_ratio"] <= 1.05
    assert load_config(run / "config.yaml") == config
    partition = json.loads((run / "partition.json").read_text())
    assert [p["peer"] for p in partition] == [0, 1, 2, 3]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "run_started" and events[-1]["event"] == "run_finished"
    assert "dead" not in (run / "report.html").read_text().split("Per-peer results")[1].split("</table>")[0].replace(
        "<th>status</th>", "")


def test_a_killed_peer_is_survived_and_reported_dead(tmp_path):
    config = load_config(None, ["peers=4", "rounds=2", "data.dataset=digits", "grpc.base_port=50810", *FAST])
    killed: dict = {}

    def kill_in_round_one(processes):
        victim = processes[3]
        metrics = victim.folder / "metrics.jsonl"

        def watch() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if metrics.exists() and '"train_loss"' in metrics.read_text():  # trained, round 1 not done
                    os.kill(victim.process.pid, signal.SIGKILL)
                    killed["pid"] = victim.process.pid
                    return
                time.sleep(0.02)

        threading.Thread(target=watch, daemon=True).start()

    started = time.monotonic()
    launched = launch_local(config, tmp_path / "run", timeout_s=100, on_started=kill_in_round_one)
    assert time.monotonic() - started < 100 and "pid" in killed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dead_peers"] == [3] and launched.exit_codes[3] == -signal.SIGKILL
    assert {p: launched.exit_codes[p] for p in (0, 1, 2)} == {0: 0, 1: 0, 2: 0}
    survivors = {p: a for p, a in summary["final_global_accuracy"].items() if p != "3"}
    assert set(survivors) == {"0", "1", "2"} and summary["final_round"]["0"] == 2  # they finished every round
    assert all(acc > 0.3 for acc in survivors.values())
    assert summary["peer_status"]["3"] == "crashed" and summary["peer_status"]["0"] == "finished"
    # only the killed peer is declared dead; survivors that finished first said goodbye instead
    assert all(summary["neighbours_declared_dead"][str(p)] == [3] for p in (0, 1, 2)), summary["neighbours_declared_dead"]
    report = (tmp_path / "run" / "report.html").read_text()
    assert '<tr class="dead">' in report


def test_ctrl_c_stops_every_peer(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "meshfl.cli", "launch", "--local", "--quiet", "--out", str(run),
         *sets("peers=3", "rounds=500", "data.dataset=digits", "grpc.base_port=50820")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics = [run / "peers" / f"peer-{p}" / "metrics.jsonl" for p in range(3)]
        deadline = time.monotonic() + 60
        while not all(m.exists() and "algorithm_started" in m.read_text() for m in metrics):
            assert time.monotonic() < deadline and launcher.poll() is None, "peers never started"
            time.sleep(0.1)
        peers = children_of(launcher.pid)
        assert len(peers) == 3
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=30)
        assert launcher.returncode == 130, stderr
        assert "interrupted" in stderr
        assert not [pid for pid in peers if alive(pid)]
        assert all('"peer_finished"' in m.read_text() for m in metrics)  # stopped by SIGTERM, not killed
        summary = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
        assert summary["interrupted"] is True and summary["dead_peers"] == []  # merged, marked, nobody dead
        assert set(summary["peer_status"].values()) == {"stopped"}
        assert str(run) in stderr.replace("\n", "") and "(interrupted)" in (run / "report.html").read_text()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def test_merge_of_an_interrupted_run_is_strict_json_and_nobody_dead(tmp_path):
    """Peers stopped by Ctrl-C before the last round: their last accuracy counts, none is dead, no NaN."""
    config = load_config(None, ["peers=2", "rounds=5"])
    folders = []
    for peer in range(2):
        folder = tmp_path / f"peer-{peer}"
        folder.mkdir()
        (folder / "config.yaml").write_text(dump_config(config))
        events = [{"event": "peer_started", "peer": peer, "incarnation": 0, "unix_time": 1000.0, "wall_time": 0.0},
                  {"event": "metric", "peer": peer, "round": 2, "metric": "global_accuracy", "value": [0.7, 0.8][peer],
                   "virtual_time": 2.0, "wall_time": 2.0},
                  {"event": "peer_finished", "peer": peer, "incarnation": 0, "status": "stopped",
                   "virtual_time": 3.0, "wall_time": 3.0}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        folders.append(folder)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    done = runner.invoke(app, ["merge", *map(str, folders), "--out", str(tmp_path / "full")])
    assert done.exit_code == 2 and "not empty" in done.output
    done = runner.invoke(app, ["merge", *map(str, folders), "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    text = (tmp_path / "run" / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["interrupted"] is True and summary["dead_peers"] == []
    assert summary["final_global_accuracy"] == {"0": 0.7, "1": 0.8} and summary["final_round"] == {"0": 2, "1": 2}
    assert summary["peer_status"] == {"0": "stopped", "1": "stopped"}
    assert summary["wire_overhead_ratio"] is None  # no traffic events: no ratio, not NaN
    html = (tmp_path / "run" / "report.html").read_text()
    assert "(interrupted)</title>" in html and "<td>stopped</td>" in html


# ---- coordinator mode over real processes -----------------------------------------------------

COORDINATOR_FAST = ["algorithm=coordinator", "coordinator.round_timeout_s=20", "coordinator.retry_base_s=2",
                    "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=2"]
MNIST = Path(os.environ.get("MESHFL_DATA", ROOT.parent / "shared" / "data")) / "mnist"


@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="MNIST not available")
def test_coordinator_launch_matches_the_simulator_on_mnist(tmp_path):
    """1 coordinator + 4 workers, MNIST, 5 rounds; quorum 1 so arrival order cannot change the average."""
    overrides = ["peers=5", "rounds=5", "data.dataset=mnist", f"data.path={MNIST}", "data.partition=quantity",
                 "data.min_samples=300", "data.max_samples=1500", "coordinator.quorum=1.0", "grpc.base_port=50830",
                 *COORDINATOR_FAST]
    config = load_config(None, overrides)
    launch_local(config, tmp_path / "run", timeout_s=150)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    result, metrics, _ = simulate(config)
    expected = summarise(config, result, metrics, 0.0)
    assert summary["dead_peers"] == [] and set(summary["final_round"].values()) == {5}
    for peer, accuracy in summary["final_global_accuracy"].items():
        assert abs(accuracy - expected["final_global_accuracy"][peer]) <= 0.01, (peer, accuracy, expected)
    assert expected["mean_final_accuracy"] > 0.85  # MNIST learnt, not chance (0.1)


def test_coordinator_launch_survives_a_killed_worker_and_then_a_killed_coordinator(tmp_path):
    # ~1 s rounds (digits trains in ~0.05 s an epoch-round), so the kills land while the run goes on
    config = load_config(None, ["peers=5", "rounds=6", "data.dataset=digits", "grpc.base_port=50840",
                                "coordinator.workload=60", "coordinator.max_workload=60", *COORDINATOR_FAST])
    killed: list[int] = []

    def kill_worker_then_coordinator(processes):
        def seen(peer: int, metric: str, round: int) -> bool:
            metrics = processes[peer].folder / "metrics.jsonl"
            for line in metrics.read_text().splitlines() if metrics.exists() else []:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # the line being written
                if event.get("metric") == metric and event.get("round") == round:
                    return True
            return False

        def kill(peer: int) -> None:
            os.kill(processes[peer].process.pid, signal.SIGKILL)
            killed.append(peer)

        def watch() -> None:
            deadline = time.monotonic() + 100
            while time.monotonic() < deadline and len(killed) < 2:
                if not killed and seen(4, "train_loss", 1):  # worker 4 has trained in round 1
                    kill(4)
                elif killed == [4] and seen(0, "global_accuracy", 3):
                    kill(0)  # the coordinator closed round 3
                time.sleep(0.02)

        threading.Thread(target=watch, daemon=True).start()

    launched = launch_local(config, tmp_path / "run", timeout_s=120, on_started=kill_worker_then_coordinator)
    assert killed == [4, 0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dead_peers"] == [0, 4] and launched.exit_codes[0] == -signal.SIGKILL
    assert {p: launched.exit_codes[p] for p in (1, 2, 3)} == {1: 0, 2: 0, 3: 0}
    assert {summary["final_round"][p] for p in ("1", "2", "3")} == {6}  # training went on to the last round
    leaders = [(t["peer"], t["metric"]) for t in summary["timeline"]]
    assert leaders == [(0, "coordinating"), (1, "coordinating")], leaders
    assert min(summary["final_global_accuracy"][p] for p in ("1", "2", "3")) > 0.7


def test_smart_gossip_launch_matches_the_simulator_and_survives_a_killed_peer(tmp_path):
    """smart_gossip over gRPC: sync rounds give the simulator's accuracies; async with peer 3 killed
    in round 2 and restarted, everyone finishes and peer 3 rejoins the network's round (20 rounds, so the others
    are still running when the new process is up)."""
    base = ["algorithm=smart_gossip", "peers=4", "rounds=3", "data.dataset=digits", "smart_gossip.round_timeout_s=8",
            "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=2"]
    done = meshfl("launch", "--local", "--quiet", "--timeout", "100", "--out", str(tmp_path / "sync"),
                  *sets(*base, "grpc.base_port=50860"), timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "sync" / "summary.json").read_text())
    config = load_config(None, base)
    result, metrics, _ = simulate(config)
    expected = summarise(config, result, metrics, 0.0)
    for peer, accuracy in summary["final_global_accuracy"].items():
        assert abs(accuracy - expected["final_global_accuracy"][peer]) <= 0.01
    faults = "faults=[{kind: crash, peers: [3], at_round: 2}, {kind: restart, peers: [3], at_round: 2}]"
    done = meshfl("launch", "--local", "--quiet", "--timeout", "100", "--out", str(tmp_path / "async"),
                  *sets(*base, "rounds=20", "train.local_epochs=20", "smart_gossip.mode=async", "train.optimizer=adam",
                        "train.learning_rate=0.01",
                        faults, "grpc.base_port=50870"), timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "async" / "summary.json").read_text())
    assert summary["dead_peers"] == [] and summary["incarnations"]["3"] == 2
    assert all(summary["final_round"][str(p)] == 20 for p in range(4)), summary["final_round"]  # 20: the others
    # must still be running when the restarted process is back (a few seconds)
    assert min(summary["final_global_accuracy"].values()) > 0.8
    events = [json.loads(line) for line in (tmp_path / "async" / "metrics.jsonl").read_text().splitlines()]
    assert [e["value"] for e in events if e.get("metric") == "rejoined" and e["peer"] == 3][0] >= 1


def test_mpls_launch_five_workers_on_a_ring_each_reach_090_with_measured_links(tmp_path):
    """mpls over gRPC: 5 worker processes on a ring train and pull layers concurrently (training in a thread,
    serving on the event loop); every worker reaches 0.9, pulls only from its ring neighbours and measures its links.
    Launched with --pin-cpus: each process on its core, logging CPU and memory for the report."""
    base = ["algorithm=mpls", "peers=5", "rounds=30", "data.dataset=digits", "topology.kind=ring", "train.local_steps=10",
            "train.optimizer=adam", "train.learning_rate=0.01", "liveness.heartbeat_interval_s=0.5", "liveness.timeout_s=3"]
    done = meshfl("launch", "--local", "--pin-cpus", "--quiet", "--timeout", "150", "--out", str(tmp_path / "run"),
                  *sets(*base, "grpc.base_port=50890", "grpc.resources_every_s=0.5"), timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dead_peers"] == [] and all(summary["final_round"][str(p)] == 30 for p in range(5))
    assert min(summary["final_global_accuracy"].values()) >= 0.9, summary["final_global_accuracy"]  # sim: 0.944 min
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pulled = {(e["peer"], e["about"]): e["value"] for e in events if e.get("metric") == "layers_pulled"}
    assert set(pulled) <= {(p, (p + d) % 5) for p in range(5) for d in (1, 4)} and sum(pulled.values()) > 0
    links = [e for e in events if e.get("metric") == "link_mbps"]
    assert links and all(e["value"] > 0 for e in links)
    assert not [e for e in events if e.get("metric") == "refused"]
    assert (tmp_path / "run" / "layers_pulled_matrix.png").is_file()
    cores = sorted(os.sched_getaffinity(0))  # --pin-cpus: peer i on core i mod cores
    started = {e["peer"]: e["cpus"] for e in events if e.get("event") == "peer_started"}
    assert started == {p: [cores[p % len(cores)]] for p in range(5)}
    usage = [e for e in events if e.get("metric") in ("cpu_percent", "memory_mb")]
    assert {e["peer"] for e in usage} == set(range(5)) and all(e["value"] >= 0 for e in usage)
    assert (tmp_path / "run" / "resources_per_peer.png").is_file()

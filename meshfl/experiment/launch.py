"""Start real peers: per-peer configs, one `meshfl node` process per peer, one merged run folder.

`launch_local` runs every peer of an experiment as its own process on one host, shows the
rounds as they complete, and stops every process it started on Ctrl-C, SIGTERM, a timeout
or a peer that fails by itself (exit code > 0). A peer killed by a signal is a crash fault:
the others carry on and it is listed in the summary's `dead_peers`. At the end every
peer's metrics.jsonl is merged into one run folder with the simulator's files and report.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshfl.config import ConfigError, ExperimentConfig, KeysConfig, TlsConfig, TrainConfig, load_config
from meshfl.core.metrics import (
    CRASH_KILLED,
    FAULT,
    GLOBAL_ACCURACY,
    METRIC,
    PEER_CRASHED,
    PEER_EXITED,
    PEER_FINISHED,
    PEER_STARTED,
    PROCESS_STARTED,
    RUN_FINISHED,
    RUN_STARTED,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_LEFT,
    STATUS_STOPPED,
    MetricsLog,
)
from meshfl.core.topology import make_topology
from meshfl.experiment.peers import peer_histories
from meshfl.experiment.run import build_summary, claim_run_dir, handle_signals, write_run_folder
from meshfl.experiment.tracking import Tracking, check_tracking
from meshfl.faults import FaultAction, resolve_faults
from meshfl.learn.saved import collect_models
from meshfl.runtime.grpc.faults import write_fired
from meshfl.runtime.grpc.peer_config import PeerConfig, check_listen, dump_peer_config, is_loopback, split_address

PEER_PLACEHOLDER = "{peer}"
STOP_GRACE_S = 5.0
POLL_S = 0.25


class LaunchError(RuntimeError):
    """A launch that could not complete; the message is one line naming the peer or field."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the launcher; after `launch_local` stopped every peer and wrote
    the run folder (marked interrupted), `result` holds it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.result: LaunchResult | None = None


# ---- per-peer configs -----------------------------------------------------------------------

def parse_hosts(hosts: list[str]) -> list[tuple[str, int]]:
    """`host:baseport` entries; ConfigError naming the entry otherwise."""
    parsed = []
    for entry in hosts:
        try:
            parsed.append(split_address(entry.strip()))
        except ValueError:
            raise ConfigError(f"--hosts: expected host:baseport, got {entry!r}") from None
    if not parsed:
        raise ConfigError("--hosts: give at least one host:baseport")
    return parsed


def peer_addresses(peers: int, hosts: list[tuple[str, int]]) -> list[str]:
    """Peers assigned round-robin to hosts; the k-th peer on a host listens on its baseport + k."""
    return [f"{hosts[i % len(hosts)][0]}:{hosts[i % len(hosts)][1] + i // len(hosts)}" for i in range(peers)]


def tls_for_peer(tls: TlsConfig, peer: int, base: Path | None = None) -> TlsConfig | None:
    """The experiment's TLS section with `{peer}` filled in (and paths made absolute against `base`)."""
    if tls.mode == "none":
        return None
    if tls.mode == "mtls" and not all(PEER_PLACEHOLDER in (getattr(tls, f) or "") for f in ("cert", "key")):
        raise ConfigError("grpc.tls.cert: with mtls every peer needs its own certificate; use a {peer} placeholder, "
                          "e.g. --set grpc.tls.cert=certs/peer-{peer}.pem --set grpc.tls.key=certs/peer-{peer}.key")

    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value.replace(PEER_PLACEHOLDER, str(peer))).expanduser()
        return str(path if base is None or path.is_absolute() else (base / path).resolve())  # else: relative to the peer config

    return TlsConfig(mode=tls.mode, ca=resolve(tls.ca), cert=resolve(tls.cert), key=resolve(tls.key))


def keys_for_peer(keys: KeysConfig, peer: int, base: Path | None = None) -> KeysConfig | None:
    """The experiment's key files with `{peer}` filled in (paths made absolute against `base`); None without key files."""
    if keys.keyring is None or keys.signing_key is None:
        return None

    def resolve(value: str) -> str:
        path = Path(value.replace(PEER_PLACEHOLDER, str(peer))).expanduser()
        return str(path if base is None or path.is_absolute() else (base / path).resolve())

    return KeysConfig(keyring=resolve(keys.keyring), signing_key=resolve(keys.signing_key))


def build_peer_configs(config: ExperimentConfig, addresses: list[str], *, listen_hosts: list[str] | None = None,
                       out_dirs: list[str] | None = None, tls_base: Path | None = None,
                       certs_dir: Path | None = None, relative_certs: bool = False, **fields: Any) -> list[PeerConfig]:
    """One PeerConfig per peer with the experiment embedded and neighbours from its topology.

    `certs_dir` (ca.pem, peer-<i>.pem/.key): every peer uses mTLS with those; `relative_certs`
    names them `<certs_dir's name>/...`, relative to the folder the peer configs are written to."""
    if len(addresses) != config.peers:
        raise ConfigError(f"peers: {config.peers} peers but {len(addresses)} addresses")
    topology = make_topology(config.topology, config.peers, config.seed)
    tls = config.grpc.tls
    if certs_dir is not None:
        folder = Path(certs_dir.name) if relative_certs else certs_dir
        tls = TlsConfig(mode="mtls", ca=str(folder / "ca.pem"), cert=str(folder / "peer-{peer}.pem"),
                        key=str(folder / "peer-{peer}.key"))
    configs = []
    for peer in range(config.peers):
        if certs_dir is not None and (certs_dir / "keyring.json").exists():
            folder = Path(certs_dir.name) if relative_certs else certs_dir
            keys: KeysConfig | None = KeysConfig(keyring=str(folder / "keyring.json"),
                                                 signing_key=str(folder / f"peer-{peer}.sign.key"))
        else:
            keys = keys_for_peer(config.keys, peer, tls_base)
        port = addresses[peer].rpartition(":")[2]
        listen = f"{listen_hosts[peer]}:{port}" if listen_hosts else addresses[peer]
        configs.append(PeerConfig(
            peer_id=peer, listen=listen,
            addresses={p: addresses[p] for p in range(config.peers) if p != peer},
            neighbours=list(topology.neighbours[peer]),
            experiment=config, out_dir=out_dirs[peer] if out_dirs else f"peer-{peer}",
            tls=tls_for_peer(tls, peer, tls_base), keys=keys, **fields))
    return configs


@dataclass
class WrittenConfigs:
    """What `write_peer_configs` wrote: the peer configs, and how they are secured."""

    paths: list[Path]
    security: str
    """mtls (given or experiment certificates), mtls-generated (certificates made in <out>/certs),
    loopback (plaintext, every peer on 127.0.0.1/::1/localhost) or insecure (plaintext or tls on a network, by request)."""
    certs_dir: Path | None = None


def write_peer_configs(config: ExperimentConfig, hosts: list[str], out_dir: Path, *,
                       certs_dir: Path | None = None, insecure: bool = False) -> WrittenConfigs:
    """`meshfl configs`: peer-<i>.yaml for every peer, assigned round-robin to `hosts` (host:baseport).

    Each peer listens on 0.0.0.0 at its port when its host is not a loopback address, so
    the same file works behind NAT; neighbours are dialled at host:port.

    Secure by default: when a peer is off loopback, peers use mTLS with the certificates in
    `certs_dir` (from `meshfl certs`), else with the experiment's own grpc.tls (mtls with a
    {peer} placeholder), else certificates made here: a CA and per-peer certificates (CN and
    DNS name peer-<i>, plus its host) in `<out_dir>/certs`, named relative to the peer configs
    (copy peer-<i>.yaml with certs/ca.pem and certs/peer-<i>.* to its host; ca.key stays
    with the operator). `insecure` (or grpc.insecure) keeps the experiment's plaintext/tls and
    marks the experiment grpc.insecure, so each peer starts with a warning.
    """
    addresses = peer_addresses(config.peers, parse_hosts(hosts))
    listen_hosts = [a.rpartition(":")[0] if is_loopback(a.rpartition(":")[0]) else "0.0.0.0" for a in addresses]
    on_network = any(not is_loopback(a.rpartition(":")[0]) for a in addresses)
    insecure = insecure or config.grpc.insecure
    security = "mtls" if certs_dir is not None or config.grpc.tls.mode == "mtls" else "loopback"
    if security == "loopback" and on_network:
        if insecure:
            security = "insecure"
            config = config.model_copy(update={"grpc": config.grpc.model_copy(update={"insecure": True})})
        else:
            from meshfl.runtime.grpc.certs import generate_deployment
            security, certs_dir = "mtls-generated", out_dir / "certs"
            generate_deployment(certs_dir, config.peers, peer_hosts=[[a.rpartition(":")[0]] for a in addresses])
    configs = build_peer_configs(config, addresses, listen_hosts=listen_hosts, certs_dir=certs_dir,
                                 out_dirs=[f"out/peer-{p}" for p in range(config.peers)],
                                 relative_certs=security == "mtls-generated")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for peer_config in configs:
        path = out_dir / f"peer-{peer_config.peer_id}.yaml"
        path.write_text(dump_peer_config(peer_config))
        paths.append(path)
    return WrittenConfigs(paths, security, certs_dir)


def choose_ports(host: str, base_port: int, count: int) -> list[int]:
    """base_port + i when free, else a free port the OS picks."""
    ports: list[int] = []
    for i in range(count):
        wanted = base_port + i
        ports.append(wanted if wanted <= 65535 and wanted not in ports and _port_free(host, wanted) else _free_port(host, ports))
    return ports


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str, taken: list[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port


# ---- processes ------------------------------------------------------------------------------

@dataclass
class PeerProcess:
    peer: int
    folder: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def last_log_line(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""


CPU_ENV = "MESHFL_CPU"
"""`meshfl node` pins itself to this core (set by `launch --local --pin-cpus`)."""


def peer_placement(peers: int) -> dict[int, dict[str, str]]:
    """Per peer, the environment that places it: MESHFL_CPU (core i mod the usable cores) and, with GPUs,
    CUDA_VISIBLE_DEVICES (GPU i mod their count)."""
    import torch  # only here: the launcher itself trains nothing

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    placement = {}
    for peer in range(peers):
        env = {CPU_ENV: str(cores[peer % len(cores)])}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(peer % gpus)
        placement[peer] = env
    return placement


def pin_to_configured_cpu() -> int | None:
    """In a peer process: pin to the core MESHFL_CPU names (Linux); returns it, or None when not asked or not possible."""
    wanted = os.environ.get(CPU_ENV)
    if not wanted or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        core = int(wanted)
        os.sched_setaffinity(0, {core})
    except (ValueError, OSError):
        return None
    return core


def start_peer(peer: int, config_path: Path, folder: Path, env: dict[str, str]) -> PeerProcess:
    log_path = folder / "log.txt"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshfl.cli", "node", "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # the launcher's cwd: relative data paths mean what they mean to `meshfl run`
    return PeerProcess(peer, folder, process, log_path)


def stop_all(processes: list[PeerProcess], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every running peer's process group, SIGKILL what is left after `grace_s`; reap all."""
    running = [p for p in processes if p.returncode is None]
    for p in running:
        _signal_group(p.process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in running:
        try:
            p.process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    for p in running:
        if p.process.poll() is None:
            _signal_group(p.process, signal.SIGKILL)
    for p in running:
        try:
            p.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session made the peer its group's leader
    except ProcessLookupError:
        pass
    except PermissionError:
        process.send_signal(sig)


class _InterruptGate:
    """SIGINT/SIGTERM raise Interrupted, except inside `held()`, which defers them to its end.

    (Blocking the signals instead would be inherited by the peers' processes as their
    signal mask, and they would then ignore the SIGTERM that stops them.)
    """

    def __init__(self) -> None:
        self._holding = False
        self._pending: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self._holding:
            self._pending = signum
            return
        raise Interrupted(signal.Signals(signum).name)

    @contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._pending is not None:
            raise Interrupted(signal.Signals(self._pending).name)


# ---- progress -------------------------------------------------------------------------------

class PeerMetricsReader:
    """Reads a peer's metrics.jsonl as it grows; keeps its last accuracy and the highest round seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.round = 0
        self.accuracy = float("nan")
        self.reached = 0  # the highest round of any metric event (fault triggers)
        self.algorithm_started = False

    def poll(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "algorithm_started":
                self.algorithm_started = True
            if event.get("event") == METRIC and isinstance(event.get("round"), int):
                self.reached = max(self.reached, event["round"])
            if event.get("event") == METRIC and event.get("metric") == GLOBAL_ACCURACY:
                value = event.get("value")
                self.accuracy = float(value) if isinstance(value, (int, float)) else float("nan")
                if isinstance(event.get("round"), int):
                    self.round = max(self.round, event["round"])


ProgressCallback = Callable[[int, int, float], None]
"""(rounds completed by every running peer, peers still running, mean accuracy) after each poll."""


# ---- merging --------------------------------------------------------------------------------

def read_events(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of a metrics file; a torn last line (killed peer) is skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def merge_events(per_peer: dict[int, list[dict[str, Any]]], started_unix: float,
                 launcher_events: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Every peer's events on the launcher's wall clock, in time order.

    A peer's wall_time counts from its process start, which each `peer_started` (one per
    incarnation) gives as unix_time; the launcher's own events (faults it fired, peers it
    killed) carry unix_time.
    """
    merged = []
    for _peer, events in sorted(per_peer.items()):
        starts = (PEER_STARTED, PROCESS_STARTED)
        offset = next((float(e["unix_time"]) - started_unix for e in events
                       if e.get("event") in starts and "unix_time" in e), 0.0)
        for event in events:
            if event.get("event") in starts and "unix_time" in event:
                offset = float(event["unix_time"]) - started_unix  # a restart: a new process, a new clock
            shifted = dict(event)
            shifted["wall_time"] = round(float(event.get("wall_time", 0.0)) + offset, 6)
            merged.append(shifted)
    for event in launcher_events:
        shifted = {k: v for k, v in event.items() if k != "unix_time"}
        shifted["wall_time"] = shifted["virtual_time"] = round(float(event["unix_time"]) - started_unix, 6)
        merged.append(shifted)
    merged.sort(key=lambda e: e["wall_time"])
    return merged


def last_traffic(events: list[dict[str, Any]]) -> dict[str, Any]:
    for event in reversed(events):
        if event.get("event") == "traffic":
            return event
    return {}


def _sum_by_type(traffic: Iterable[dict[str, Any]], counter: str) -> dict[str, int]:
    totals: collections.Counter[str] = collections.Counter()
    for counters in traffic:
        totals.update({kind: int(count) for kind, count in counters.get(counter, {}).items()})
    return dict(totals)


def grpc_summary(config: ExperimentConfig, per_peer: dict[int, list[dict[str, Any]]], events: list[dict[str, Any]],
                 exit_codes: dict[int, int | None], wall_time_s: float, *, interrupted: bool = False) -> dict[str, Any]:
    """The simulator's summary keys (bytes_sent = the algorithm's count) plus what only real peers have."""
    peers = range(config.peers)
    traffic = {p: last_traffic(per_peer.get(p, [])) for p in peers}

    def counter(name: str) -> dict[int, int]:
        return {p: int(traffic[p].get(name, 0)) for p in peers}

    crashed = [p for p in peers if exit_codes.get(p) != 0]
    clocks = [e.get("virtual_time", 0.0) for e in events if e.get("event") == PEER_FINISHED]
    summary = build_summary(config, events, messages_sent=counter("messages_sent"), bytes_sent=counter("bytes_sent"),
                            messages_dropped=counter("messages_dropped"), virtual_time_s=max(clocks, default=0.0),
                            wall_time_s=wall_time_s, dead_peers=crashed, interrupted=interrupted,
                            messages_by_type=_sum_by_type(traffic.values(), "messages_by_type"),
                            bytes_by_type=_sum_by_type(traffic.values(), "bytes_by_type"))
    wire = counter("wire_bytes_sent")
    framing = counter("framing_bytes_estimate")
    delivered = counter("algorithm_bytes_delivered")
    refused = {str(p): dict(traffic[p].get("refused", {})) for p in peers}
    summary.update({
        "runtime": "grpc",
        "exit_codes": {str(p): exit_codes.get(p) for p in peers},
        "messages_delivered": _str_keys(counter("messages_delivered")),
        "messages_received": _str_keys(counter("messages_received")),
        "algorithm_bytes_delivered": _str_keys(delivered),
        "wire_bytes_sent": _str_keys(wire),
        "framing_bytes_estimate": _str_keys(framing),
        "heartbeat_bytes": _str_keys(counter("heartbeat_bytes")),
        "total_wire_bytes": sum(wire.values()),
        "wire_overhead_ratio": _ratio(sum(wire.values()) + sum(framing.values()), sum(delivered.values())),
        "refused": refused,
        "total_refused": sum(sum(r.values()) for r in refused.values()),
        "neighbours_declared_dead": {str(p): traffic[p].get("dead_neighbours", []) for p in peers},
        "neighbours_left": {str(p): traffic[p].get("left_neighbours", []) for p in peers},
    })
    return summary


def _str_keys(values: dict[int, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in values.items()}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


# ---- the launcher ---------------------------------------------------------------------------

@dataclass
class LaunchResult:
    run_dir: Path
    summary: dict[str, Any]
    exit_codes: dict[int, int | None]
    events: list[dict[str, Any]] = field(repr=False, default_factory=list)


def launch_local(config: ExperimentConfig, run_dir: Path, *, timeout_s: float | None = None, report: bool = True,
                 progress: ProgressCallback | None = None, linger_s: float = 1.0,
                 on_started: Callable[[list[PeerProcess]], None] | None = None,
                 env: dict[str, str] | None = None, insecure: bool = False, tracking: Tracking | None = None,
                 pin_cpus: bool = False) -> LaunchResult:
    """Run every peer as a `meshfl node` process on grpc.host; write the merged run folder to `run_dir`.

    `pin_cpus`: peer i runs on core i mod (cores this launcher may use) and, when GPUs are visible,
    sees GPU i mod (GPUs) only, so many emulated peers share a host predictably.

    grpc.host off loopback needs mTLS (grpc.tls) or `insecure` (then recorded as grpc.insecure in
    the run's config, and every peer warns at start); checked before any process starts. `tracking`: the
    merged metrics also go to TensorBoard / MLflow (see experiment/tracking.py); a missing package fails here.

    On Ctrl-C/SIGTERM every peer is stopped, their metrics are merged into the run folder
    (summary and report marked interrupted) and Interrupted is raised with `result` set.
    """
    run_dir = Path(run_dir).resolve()
    check_tracking(tracking)
    model_env = _user_model_env(config.train)  # a model no peer process could build fails here, with one line
    peers_dir = run_dir / "peers"
    host = config.grpc.host
    ports = choose_ports(host, config.grpc.base_port, config.peers)
    addresses = [f"{host}:{port}" for port in ports]
    if insecure and not config.grpc.insecure:
        config = config.model_copy(update={"grpc": config.grpc.model_copy(update={"insecure": True})})
    certs_dir = None
    if config.grpc.tls.mode == "none" and config.grpc.local_mtls:  # secure by default, on loopback too
        from meshfl.runtime.grpc.certs import generate_deployment
        certs_dir = run_dir / "certs"
        generate_deployment(certs_dir, config.peers, sorted({host, "127.0.0.1", "localhost"}))
    configs = build_peer_configs(config, addresses, tls_base=Path.cwd(), linger_s=linger_s, certs_dir=certs_dir,
                                 out_dirs=[str(peers_dir / f"peer-{p}") for p in range(config.peers)])
    for peer_config in configs:  # fail here, with one line, not in every peer's log
        check_listen(peer_config.listen, peer_config.tls_for(config), config.grpc.insecure)
    peers_dir.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **model_env, **(env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    started_unix = time.time()
    started = time.perf_counter()
    processes: list[PeerProcess] = []
    readers: dict[int, PeerMetricsReader] = {}
    failure: LaunchError | None = None
    interrupted: Interrupted | None = None
    gate = _InterruptGate()

    placement = peer_placement(config.peers) if pin_cpus else {}

    def start(peer: int) -> PeerProcess:
        folder = peers_dir / f"peer-{peer}"
        with gate.held():  # a started process is always recorded, so always stopped
            process = start_peer(peer, folder / "peer.yaml", folder, {**child_env, **placement.get(peer, {})})
            processes.append(process)
        return process

    faults = LocalFaults(config, peers_dir, start) if config.faults else None
    try:
        with handle_signals(gate):
            for peer_config in configs:
                folder = peers_dir / f"peer-{peer_config.peer_id}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "peer.yaml").write_text(dump_peer_config(peer_config))
                readers[peer_config.peer_id] = PeerMetricsReader(folder / "metrics.jsonl")
            for peer_config in configs:
                if faults is None or peer_config.peer_id not in faults.joining:
                    start(peer_config.peer_id)
            if on_started is not None:
                on_started(processes)
            _wait(processes, readers, started, timeout_s, progress, faults)
    except LaunchError as exc:
        failure = exc
    except (Interrupted, KeyboardInterrupt) as exc:
        interrupted = exc if isinstance(exc, Interrupted) else Interrupted("SIGINT")
    finally:
        with handle_signals(signal.SIG_IGN):  # a second Ctrl-C must not leave orphans behind
            stop_all(processes)
    with handle_signals(signal.SIG_IGN):  # nor a half-written run folder
        exit_codes = {p.peer: p.returncode for p in processes}  # the last process of each peer
        per_peer = {p: read_events(peers_dir / f"peer-{p}" / "metrics.jsonl") for p in range(config.peers)}

        result = write_grpc_run(config, per_peer, exit_codes, run_dir, started_unix=started_unix,
                                finished_unix=time.time(), wall_time_s=time.perf_counter() - started, report=report,
                                interrupted=interrupted is not None,
                                launcher_events=faults.events if faults is not None else [],
                                peer_folders={p: peers_dir / f"peer-{p}" for p in range(config.peers)}, tracking=tracking)
    if interrupted is not None:
        interrupted.result = result
        raise interrupted
    if failure is not None:
        raise failure  # after the run folder is written: it holds every peer's log and metrics
    return result


def _user_model_env(train: TrainConfig) -> dict[str, str]:
    """For user code (a `package.module:factory` model, loss, metrics, training step): PYTHONPATH giving each
    peer process this process's import path, so `meshfl node` imports it as the launcher would. ConfigError
    for a function only this process holds (a Python object, or one defined in `__main__`)."""
    from meshfl.learn.models import is_user_model, portable

    refs = {f"train.metrics.{name}": ref for name, ref in train.metrics.items()}
    if is_user_model(train.model):
        refs["train.model"] = train.model
    if train.loss != "cross_entropy":
        refs["train.loss"] = train.loss
    if train.step is not None:
        refs["train.step"] = train.step
    if not refs:
        return {}
    for name, ref in refs.items():
        if not portable(ref):
            raise ConfigError(f"{name}: {ref!r} lives only in this Python process (an object or one defined "
                              "in the script being run); peer processes cannot import it: put it in a module and give "
                              "`package.module:function`")
    paths = [p or os.getcwd() for p in sys.path if p == "" or Path(p).is_dir()]
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([*dict.fromkeys(paths), *([existing] if existing else [])])}


def write_grpc_run(config: ExperimentConfig, per_peer: dict[int, list[dict[str, Any]]], exit_codes: dict[int, int | None],
                   run_dir: Path, *, started_unix: float, finished_unix: float, wall_time_s: float,
                   report: bool = True, interrupted: bool = False,
                   launcher_events: list[dict[str, Any]] = (), peer_folders: dict[int, Path] | None = None,
                   tracking: Tracking | None = None) -> LaunchResult:
    """One run folder (the simulator's files and report) from every peer's events, with the final
    models the peers saved in `peer_folders` (`models/peer-<i>.*`)."""
    events = _run_events(config, per_peer, exit_codes, started_unix, finished_unix, launcher_events)
    summary = grpc_summary(config, per_peer, events, exit_codes, wall_time_s, interrupted=interrupted)
    metrics = MetricsLog()
    metrics.events = events
    stats = {e["partition"].get("peer", 0): e["partition"] for e in events
             if e.get("event") == PEER_STARTED and isinstance(e.get("partition"), dict)}  # one per peer, restarts too
    write_run_folder(run_dir, config, metrics, summary, [stats[p] for p in sorted(stats)], report, tracking=tracking,
                     runtime="grpc")
    collect_models(peer_folders or {}, run_dir)
    return LaunchResult(run_dir, summary, exit_codes, events)


EXIT_BY_STATUS = {STATUS_FINISHED: 0, STATUS_STOPPED: 0, STATUS_LEFT: 0, STATUS_FAILED: 1}
"""A peer's exit code as its last `peer_finished` event tells it; no such event means it was killed."""


def merge_peer_folders(folders: list[Path], run_dir: Path | None = None, *, report: bool = True) -> LaunchResult:
    """`meshfl merge`: the run folder of a deployment from the output folders of its `meshfl node` peers.

    Each folder holds one peer's metrics.jsonl and config.yaml (written by the peer). Every
    peer must belong to the same experiment; a peer of the experiment without a folder, or
    whose metrics end without `peer_finished` (or with a crash), is reported dead. The run is
    marked interrupted when a peer was stopped (Ctrl-C/SIGTERM). `run_dir`
    defaults to a new runs/<time>-<name>, as for `meshfl run`; a given `run_dir` must be new
    or empty (RunDirError otherwise).
    """
    if not folders:
        raise ConfigError("merge: give at least one peer output folder (the out_dir of `meshfl node`)")
    config: ExperimentConfig | None = None
    per_peer: dict[int, list[dict[str, Any]]] = {}
    started_at: dict[int, float] = {}
    folders_of: dict[int, Path] = {}
    for folder in folders:
        for name in ("metrics.jsonl", "config.yaml"):
            if not (folder / name).is_file():
                raise ConfigError(f"merge: {folder} has no {name}; is it the out_dir of a `meshfl node` peer?")
        folder_config = load_config(folder / "config.yaml")
        if config is None:
            config = folder_config
        elif folder_config != config:
            raise ConfigError(f"merge: {folder} ran another experiment than {folders[0]} (their config.yaml differ)")
        events = read_events(folder / "metrics.jsonl")
        started = next((e for e in events if e.get("event") == PEER_STARTED), None)
        if started is None or not isinstance(started.get("peer"), int) or not isinstance(started.get("unix_time"), float):
            raise ConfigError(f"merge: {folder / 'metrics.jsonl'} has no peer_started event with peer and unix_time")
        peer = started["peer"]
        if peer in per_peer:
            raise ConfigError(f"merge: peer {peer} appears twice (second time in {folder})")
        if not 0 <= peer < config.peers:
            raise ConfigError(f"merge: {folder} is peer {peer}, but the experiment has peers 0..{config.peers - 1}")
        per_peer[peer] = events
        folders_of[peer] = folder
        started_at[peer] = started["unix_time"]
    assert config is not None
    exit_codes: dict[int, int | None] = {}
    for peer in range(config.peers):
        history = peer_histories(per_peer.get(peer, [])).get(peer)
        if history is None or history.last_lifecycle != PEER_FINISHED:
            exit_codes[peer] = None  # never started here, killed, or crashed
        else:
            exit_codes[peer] = EXIT_BY_STATUS.get(history.finished_status or "", 1)
    # a peer stopped by Ctrl-C/SIGTERM ends with peer_finished(status=stopped): the run was cut short
    interrupted = any(h.status() == STATUS_STOPPED for evs in per_peer.values() for h in peer_histories(evs).values())
    started_unix = min(started_at.values())
    # each peer's wall_time counts from its own start
    finished_unix = max(started_at[p] + float(events[-1].get("wall_time", 0.0)) for p, events in per_peer.items())
    run_dir = claim_run_dir(Path(run_dir) if run_dir is not None else None, config).resolve()
    return write_grpc_run(config, per_peer, exit_codes, run_dir, started_unix=started_unix,
                          finished_unix=finished_unix, wall_time_s=finished_unix - started_unix, report=report,
                          interrupted=interrupted, peer_folders=folders_of)


class LocalFaults:
    """The launcher's half of fault injection (see runtime/grpc/faults.py for the peers' half).

    Time triggers count from the first `algorithm_started` of any peer; round triggers fire
    when a peer (any, or the action's trigger_peer) logs a metric of that round.
    """

    def __init__(self, config: ExperimentConfig, peers_dir: Path, restart: Callable[[int], PeerProcess]) -> None:
        self.actions = resolve_faults(list(config.faults), config.peers, config.seed)
        self.peers_dir = peers_dir
        self.restart = restart
        self.fired: list[int] = []
        self._pending = list(range(len(self.actions)))
        self._zero: float | None = None
        self.events: list[dict[str, Any]] = []  # what the peers cannot log themselves (their own kill)
        self.incarnations: dict[int, int] = {}

    @property
    def joining(self) -> set[int]:
        return {p for a in self.actions if a.kind == "join" for p in a.peers}

    def restart_due(self) -> bool:
        """A time-triggered restart or join is still to come."""
        return any(self.actions[i].kind in ("restart", "join") and self.actions[i].trigger[0] == "time"
                   for i in self._pending)

    def poll(self, readers: dict[int, PeerMetricsReader], processes: list[PeerProcess]) -> None:
        if self._zero is None and any(r.algorithm_started for r in readers.values()):
            self._zero = time.monotonic()
        for number in list(self._pending):
            if self._due(self.actions[number], readers):
                self._pending.remove(number)
                self._fire(number, processes)

    def _due(self, action: FaultAction, readers: dict[int, PeerMetricsReader]) -> bool:
        if action.trigger[0] == "time":
            return self._zero is not None and time.monotonic() - self._zero >= float(action.trigger[1])
        _, round_, trigger_peer = action.trigger
        watched = [readers[trigger_peer]] if trigger_peer is not None else list(readers.values())
        return any(r.reached >= round_ for r in watched)

    def _fire(self, number: int, processes: list[PeerProcess]) -> None:
        action = self.actions[number]
        self.fired.append(number)
        now = time.time()
        self.events.append({"event": FAULT, "kind": action.kind, "index": action.index, "peers": list(action.peers),
                            **({"behaviour": action.byzantine.behaviour} if action.byzantine is not None else {}),
                            "unix_time": now})
        current = {p.peer: p for p in processes}
        for peer in action.peers:
            process = current.get(peer)
            running = process is not None and process.returncode is None
            if action.kind == "crash" and running:
                _signal_group(process.process, signal.SIGKILL)
                process.process.wait(timeout=10)
                self.events.append({"event": PEER_CRASHED, "peer": peer, "reason": CRASH_KILLED, "unix_time": now})
            if action.kind in ("crash", "wipe") and (action.wipe or action.kind == "wipe"):
                shutil.rmtree(self.peers_dir / f"peer-{peer}" / "store", ignore_errors=True)
            elif action.kind in ("restart", "join") and not running:
                self.restart(peer)
            elif action.kind == "leave" and running:
                _signal_group(process.process, signal.SIGTERM)
        for folder in sorted(self.peers_dir.glob("peer-*")):  # every peer, running or not: a restart reads it too
            write_fired(folder, self.fired)


def _wait(processes: list[PeerProcess], readers: dict[int, PeerMetricsReader], started: float,
          timeout_s: float | None, progress: ProgressCallback | None, faults: LocalFaults | None = None) -> None:
    """Until every peer exits (and no restart is still due); raise LaunchError on a peer that
    fails before its algorithm starts (its setup is broken) or on the timeout.

    A peer whose algorithm raised, or that was killed, is a crash: the others go on.
    `processes` grows when `faults` restarts a peer; the last process of each peer counts.
    """
    while True:
        for reader in readers.values():
            reader.poll()
        if faults is not None:
            faults.poll(readers, processes)
        current = list({p.peer: p for p in processes}.values())
        running = [p for p in current if p.returncode is None]
        failed = [p for p in current if (p.returncode or 0) > 0 and not readers[p.peer].algorithm_started]
        if progress is not None:
            alive = [readers[p.peer] for p in current if p.returncode in (None, 0)]
            rounds = min((r.round for r in alive), default=0)
            accuracies = [r.accuracy for r in alive if not math.isnan(r.accuracy)]
            progress(rounds, len(running), sum(accuracies) / len(accuracies) if accuracies else float("nan"))
        if failed:
            p = failed[0]
            raise LaunchError(f"peer {p.peer} failed (exit {p.returncode}): {p.last_log_line() or 'no output'} "
                              f"(log: {p.log_path})")
        if not running and not (faults is not None and faults.restart_due()):
            return
        if timeout_s is not None and time.perf_counter() - started > timeout_s:
            raise LaunchError(f"launch: peers {[p.peer for p in running]} still running after {timeout_s:g}s; stopped them")
        time.sleep(POLL_S)


def _run_events(config: ExperimentConfig, per_peer: dict[int, list[dict[str, Any]]], exit_codes: dict[int, int | None],
                started_unix: float, finished_unix: float,
                launcher_events: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    merged = merge_events(per_peer, started_unix, launcher_events)
    first = next((e for e in merged if e.get("event") == PEER_STARTED), {})
    head = {"event": RUN_STARTED, "peers": config.peers, "rounds": config.rounds, "algorithm": config.algorithm,
            "parameters": first.get("parameters"), "layout": first.get("layout"), "runtime": "grpc",
            "virtual_time": 0.0, "wall_time": 0.0}
    end = round(finished_unix - started_unix, 6)
    exits = [{"event": PEER_EXITED, "peer": p, "exit_code": code, "virtual_time": 0.0, "wall_time": end}
             for p, code in sorted(exit_codes.items())]
    return [head, *merged, *exits, {"event": RUN_FINISHED, "virtual_time": 0.0, "wall_time": end}]

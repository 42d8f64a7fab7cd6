"""Dockerfile and compose.yaml start the peers `meshfl configs` writes: mounts, commands and hosts checked against them."""

from __future__ import annotations

import contextlib
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml
from typer.testing import CliRunner

from meshfl.cli import app
from meshfl.config import load_config
from meshfl.runtime.grpc.peer_config import load_peer_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
WORKDIR = PurePosixPath("/peers")  # where the image runs `meshfl node` and compose mounts the peer files
PORT = 50100


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """Run compose.yaml's x-configs command, as the README tells, writing into a temporary `peers` folder."""
    args = shlex.split(COMPOSE["x-configs"])
    assert args[:2] == ["meshfl", "configs"] and args[-2:] == ["--out", "peers"]
    out = tmp_path_factory.mktemp("compose") / "peers"
    with contextlib.chdir(ROOT):  # the experiment's path is relative to the repository root
        result = CliRunner().invoke(app, [*args[1:-2], "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _mounts(service: dict) -> dict[PurePosixPath, tuple[str, str]]:
    """Container path -> (source, mode) of every mount of a service (a source may be `${VAR:-default}`)."""
    mounts = {}
    for volume in service["volumes"]:
        match = re.fullmatch(r"(?P<source>.+):(?P<target>/[^:]*)(?::(?P<mode>ro|rw))?", volume)
        assert match, volume
        mounts[PurePosixPath(match["target"])] = (match["source"], match["mode"] or "rw")
    return mounts


def _peer_files(generated: Path, peer: int) -> tuple[PurePosixPath, list[PurePosixPath], PurePosixPath]:
    """The peer's config in the container, the files it reads (relative ones against its folder) and its out_dir."""
    config = load_peer_config(generated / f"peer-{peer}.yaml")
    tls, keys = config.tls, config.keys
    assert tls is not None and keys is not None and tls.mode == "mtls"
    reads = [WORKDIR / name for name in (tls.ca, tls.cert, tls.key, keys.keyring, keys.signing_key)]
    return WORKDIR / f"peer-{peer}.yaml", reads, WORKDIR / config.out_dir


def test_compose_has_one_service_per_generated_peer(generated):
    written = sorted(p.name for p in generated.glob("peer-*.yaml"))
    services = sorted(COMPOSE["services"])
    experiment = load_config(ROOT / shlex.split(COMPOSE["x-configs"])[2])
    assert len(services) == experiment.peers == len(written)
    assert [f"{name}.yaml" for name in services] == written


@pytest.mark.parametrize("peer", range(5))
def test_each_service_mounts_what_its_peer_config_names_and_runs_it(generated, peer):
    service = COMPOSE["services"][f"peer-{peer}"]
    config = load_peer_config(generated / f"peer-{peer}.yaml")
    config_path, reads, out_dir = _peer_files(generated, peer)
    assert service["command"] == ["--config", str(config_path)]
    mounts = _mounts(service)
    for path in [config_path, *reads]:
        source, mode = mounts[path]
        assert mode == "ro"
        relative = PurePosixPath(source).relative_to("./peers")
        assert (generated / relative).is_file()  # a file `meshfl configs` wrote
        assert relative == path.relative_to(WORKDIR)  # mounted where the config's relative path points
    assert not any("ca.key" in source for source, _mode in mounts.values())  # the CA's key stays with the operator
    others = {f"peer-{p}." for p in range(5) if p != peer}
    assert not any(other in source for source, _mode in mounts.values() for other in others)
    volume, mode = mounts[out_dir.parent]  # out_dir lives in the peer's own writable volume
    assert mode == "rw" and volume == f"peer-{peer}-out" and volume in COMPOSE["volumes"]
    assert mounts[PurePosixPath("/data")] == ("${MESHFL_DATA_DIR:-./data}", "ro")
    # it listens where compose publishes it and dials the others by service name on the shared network
    assert config.listen == f"0.0.0.0:{PORT}" and service["ports"] == [f"{PORT + peer}:{PORT}"]
    assert config.addresses == {p: f"peer-{p}:{PORT}" for p in range(5) if p != peer}
    assert service["hostname"] == f"peer-{peer}" and service["networks"] == ["meshfl"] and "meshfl" in COMPOSE["networks"]
    assert service["restart"].startswith("on-failure") and service["build"] == "."


def test_dockerfile_runs_meshfl_node_as_a_non_root_user_where_compose_mounts():
    lines = [line.strip() for line in DOCKERFILE.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "FROM python:3.12-slim"
    assert "pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in DOCKERFILE
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert [line for line in lines if line.startswith("WORKDIR ")][-1] == f"WORKDIR {WORKDIR}"
    assert 'ENTRYPOINT ["meshfl", "node"]' in lines and f"EXPOSE {PORT}" in lines
    assert "MESHFL_DATA=/data" in DOCKERFILE and "/peers/out" in DOCKERFILE


def test_readme_gives_the_exact_commands():
    readme = (ROOT / "README.md").read_text()
    assert COMPOSE["x-configs"] in readme and "docker compose up --build" in readme
    assert "meshfl merge results/peer-*" in readme
    assert "/peers/" in (ROOT / ".gitignore").read_text().split()  # generated private keys are never committed

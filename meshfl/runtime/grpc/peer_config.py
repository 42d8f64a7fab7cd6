"""What one real peer process needs to know: who it is, where it listens, whom it talks to.

`meshfl node --config peer.yaml` reads a `PeerConfig`. The experiment config is embedded
(or named by path) so that every peer derives its data split, model and algorithm settings
from the same source the simulator uses: same seed, same split, same numbers.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from meshfl.config import ConfigError, ExperimentConfig, KeysConfig, TlsConfig, load_config, read_yaml_mapping


class PeerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: int = Field(..., ge=0, description="this peer's id, 0..peers-1")
    listen: str = Field(..., description="host:port this peer's gRPC server binds")
    addresses: dict[int, str] = Field(default_factory=dict, description="address book: peer id -> host:port of its server, for every peer this one may reach")
    neighbours: list[int] = Field(default_factory=list, description="overlay neighbours (the topology): peers this one gossips with")
    experiment: ExperimentConfig | str = Field(
        ..., description="the experiment config, embedded as a mapping or as a path to its YAML (relative to this file)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides applied to a path-given experiment")
    out_dir: str = Field("peer-out", description="folder for this peer's metrics.jsonl (relative to this file)")
    tls: TlsConfig | None = Field(None, description="this peer's certificate and key (relative paths: to this file's folder); default: the experiment's grpc.tls")
    keys: KeysConfig | None = Field(None, description="this peer's signing key and the keyring (relative paths: to this file's folder); default: the experiment's keys")
    startup_timeout_s: float = Field(60.0, gt=0, description="how long to wait for every neighbour to answer before the algorithm starts anyway")
    linger_s: float = Field(1.0, ge=0, description="seconds to keep serving after the algorithm ends, so neighbours can finish")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads of this process (several peers share a host)")

    @model_validator(mode="after")
    def _check(self) -> PeerConfig:
        _split_address("listen", self.listen)
        for peer, address in self.addresses.items():
            if peer < 0:
                raise ValueError(f"addresses: peer id must be >= 0, got {peer}")
            _split_address(f"addresses.{peer}", address)
        for peer in self.neighbours:
            if peer == self.peer_id:
                raise ValueError(f"neighbours: peer {peer} lists itself")
            if peer not in self.addresses:
                raise ValueError(f"neighbours: peer {peer} has no entry in addresses")
        if isinstance(self.experiment, ExperimentConfig):
            self._check_against(self.experiment)
        return self

    def _check_against(self, experiment: ExperimentConfig) -> None:
        if self.peer_id >= experiment.peers:
            raise ValueError(f"peer_id: {self.peer_id} is outside 0..{experiment.peers - 1} (experiment.peers={experiment.peers})")
        outside = sorted(p for p in self.addresses if p >= experiment.peers)
        if outside:
            raise ValueError(f"addresses: peers {outside} are outside 0..{experiment.peers - 1}")

    def resolve_experiment(self, base: Path) -> ExperimentConfig:
        """The experiment config, loading it from its path (relative to `base`) when needed."""
        if isinstance(self.experiment, ExperimentConfig):
            return self.experiment
        path = Path(self.experiment)
        if not path.is_absolute():
            path = base / path
        config = load_config(path, self.overrides)
        try:
            self._check_against(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return config

    def tls_for(self, experiment: ExperimentConfig) -> TlsConfig:
        return self.tls if self.tls is not None else experiment.grpc.tls

    def keys_for(self, experiment: ExperimentConfig) -> KeysConfig:
        return self.keys if self.keys is not None else experiment.keys

    def with_base(self, base: Path) -> PeerConfig:
        """This config with relative paths in `tls` and `keys` made absolute against `base` (the file's
        folder), so a folder of peer configs, certificates and keys can be copied to a host as it is."""

        def resolve(value: str | None) -> str | None:
            if value is None:
                return None
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else (base / path).resolve())

        update: dict = {}
        if self.tls is not None and self.tls.mode != "none":
            update["tls"] = TlsConfig(mode=self.tls.mode, ca=resolve(self.tls.ca), cert=resolve(self.tls.cert),
                                      key=resolve(self.tls.key))
        if self.keys is not None and self.keys.keyring is not None:
            update["keys"] = KeysConfig(keyring=resolve(self.keys.keyring), signing_key=resolve(self.keys.signing_key))
        return self.model_copy(update=update) if update else self

    def out_path(self, base: Path) -> Path:
        path = Path(self.out_dir)
        return path if path.is_absolute() else base / path


def _split_address(field: str, address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{field}: expected host:port with a port in 1..65535, got {address!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; anything else (0.0.0.0, ::, a routable address or another name) is not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, tls: TlsConfig, insecure: bool) -> str | None:
    """Refuse (ConfigError, one line naming grpc.tls.mode and the fix) a non-loopback listen address
    without mTLS, unless `insecure`; then return the warning to print at start. None when all is well.

    `tls` mode is refused like plaintext: it authenticates the server only, so any client could
    claim to be any peer (the door then trusts the envelope's sender, as in plaintext).
    """
    host, _ = split_address(listen)
    if tls.mode == "mtls" or is_loopback(host):
        return None
    what = "plaintext" if tls.mode == "none" else "tls (server certificate only: any client can claim any sender)"
    if not insecure:
        raise ConfigError(f"grpc.tls.mode: {tls.mode} on listen {listen}, which is not loopback; peers on a network need "
                          "mtls: make certificates with `meshfl configs --hosts ...` (or `meshfl certs`) and set "
                          "grpc.tls.mode=mtls, or accept the risk with grpc.insecure=true / --insecure")
    return (f"SECURITY WARNING: peer listens on {listen} with {what} (grpc.insecure): anyone who can reach it can "
            "read its traffic and send it messages as any peer; use grpc.tls.mode=mtls off loopback")


def split_address(address: str) -> tuple[str, int]:
    return _split_address("address", address)


def load_peer_config(path: str | Path) -> PeerConfig:
    """Read and validate a peer config; ConfigError with one line naming the field otherwise."""
    p = Path(path)
    tree = read_yaml_mapping(p, what="peer config")
    try:
        return PeerConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{p}: {_one_line(err)}") from None


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if len(loc) >= 2 and loc[0] == "experiment" and loc[1] not in ExperimentConfig.model_fields:
        loc = ["experiment", *loc[2:]]  # drop pydantic's union branch name
    field = ".".join(loc) or "peer config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "is not a known field"
    if message.split(":", 1)[0].strip() and message.startswith(tuple(PeerConfig.model_fields)):
        return message
    return f"{field}: {message}"


def dump_peer_config(config: PeerConfig) -> str:
    tree: dict[str, Any] = config.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(tree, sort_keys=False)

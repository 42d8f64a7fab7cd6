"""Generated certificates verify, keys stay private, and a real mTLS gRPC server admits only its CA's peers."""

from __future__ import annotations

import asyncio
import ipaddress
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshfl.config import ConfigError, TlsConfig
from meshfl.runtime.grpc.certs import generate_deployment, load_credentials
from meshfl.wire import meshfl_pb2, meshfl_pb2_grpc

RPC_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> dict:
    return generate_deployment(tmp_path_factory.mktemp("certs"), peers=3)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict:
    """A second, unrelated CA and its peers: same names, different trust root."""
    return generate_deployment(tmp_path_factory.mktemp("foreign"), peers=1)


def _tls(dep: dict, peer: int, mode: str = "mtls") -> TlsConfig:
    entry = dep["peers"][peer]
    return TlsConfig(mode=mode, ca=str(dep["ca"]), cert=str(entry["cert"]), key=str(entry["key"]))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


# ---------------------------------------------------------------------------------- files


def test_deployment_layout_and_chain(deployment):
    assert [p["name"] for p in deployment["peers"]] == ["peer-0", "peer-1", "peer-2"]
    ca = _cert(deployment["ca"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for entry in deployment["peers"]:
        cert = _cert(entry["cert"])
        cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert sans.get_values_for_type(x509.DNSName) == [entry["name"], "localhost"]  # the peer's name, checked by its clients
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_foreign_cert_does_not_verify_against_our_ca(deployment, foreign):
    with pytest.raises(Exception):  # ValueError or InvalidSignature, by cryptography version
        _cert(foreign["peers"][0]["cert"]).verify_directly_issued_by(_cert(deployment["ca"]))


def test_private_keys_are_0600(deployment):
    keys = [Path(deployment["ca_key"])] + [Path(p["key"]) for p in deployment["peers"]]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_regenerating_keeps_keys_private(tmp_path):
    first = generate_deployment(tmp_path, peers=1, hosts=["10.0.0.7", "node-a.lan"])
    Path(first["peers"][0]["key"]).chmod(0o644)  # someone loosened it; a rerun must tighten it again
    second = generate_deployment(tmp_path, peers=1, hosts=["10.0.0.7", "node-a.lan"])
    assert stat.S_IMODE(Path(second["peers"][0]["key"]).stat().st_mode) == 0o600
    sans = _cert(second["peers"][0]["cert"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["peer-0", "node-a.lan"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


# ---------------------------------------------------------------------------------- load_credentials


def test_load_credentials_names_the_field_at_fault(deployment, tmp_path):
    good = _tls(deployment, 0)
    missing = good.model_copy(update={"cert": str(tmp_path / "nope.pem")})
    with pytest.raises(ConfigError, match=r"grpc\.tls\.cert: cannot read .*nope\.pem"):
        load_credentials(missing, server=True)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello")
    with pytest.raises(ConfigError, match=r"grpc\.tls\.key: .* is not a PEM file"):
        load_credentials(good.model_copy(update={"key": str(garbage)}), server=False)
    other_key = deployment["peers"][1]["key"]
    with pytest.raises(ConfigError, match=r"grpc\.tls\.key: .* does not belong to grpc\.tls\.cert"):
        load_credentials(good.model_copy(update={"key": str(other_key)}), server=True)
    with pytest.raises(ConfigError, match="insecure"):
        load_credentials(TlsConfig(), server=True)
    assert isinstance(load_credentials(good, server=True), grpc.ServerCredentials)
    assert isinstance(load_credentials(good, server=False), grpc.ChannelCredentials)


# ---------------------------------------------------------------------------------- real gRPC handshakes


class _Peer(meshfl_pb2_grpc.PeerServicer):
    async def Ping(self, request, context):
        return meshfl_pb2.Ack(accepted=len(request.data))


async def _serve(credentials: grpc.ServerCredentials) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    meshfl_pb2_grpc.add_PeerServicer_to_server(_Peer(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


async def _ping(port: int, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    """OK when the RPC succeeds, else the status code the client saw."""
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        try:
            ack = await meshfl_pb2_grpc.PeerStub(channel).Ping(meshfl_pb2.Chunk(data=b"ping"), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return err.code()
    assert ack.accepted == 4
    return grpc.StatusCode.OK


def test_mtls_admits_only_peers_of_the_same_ca(deployment, foreign):
    async def scenario() -> dict[str, grpc.StatusCode]:
        server, port = await _serve(load_credentials(_tls(deployment, 0), server=True))
        try:
            ca = Path(deployment["ca"]).read_bytes()
            stranger = foreign["peers"][0]
            return {
                "signed": await _ping(port, load_credentials(_tls(deployment, 1), server=False)),
                "foreign_ca": await _ping(port, grpc.ssl_channel_credentials(
                    root_certificates=ca, private_key=Path(stranger["key"]).read_bytes(),
                    certificate_chain=Path(stranger["cert"]).read_bytes())),
                "no_cert": await _ping(port, grpc.ssl_channel_credentials(root_certificates=ca)),
                "foreign_trust": await _ping(port, load_credentials(_tls(foreign, 0), server=False)),
            }
        finally:
            await server.stop(None)

    codes = asyncio.run(scenario())
    assert codes["signed"] == grpc.StatusCode.OK
    assert codes["foreign_ca"] == grpc.StatusCode.UNAVAILABLE
    assert codes["no_cert"] == grpc.StatusCode.UNAVAILABLE
    assert codes["foreign_trust"] == grpc.StatusCode.UNAVAILABLE  # and a client that trusts another CA refuses us


def test_tls_mode_needs_no_client_cert(deployment):
    async def scenario() -> grpc.StatusCode:
        server, port = await _serve(load_credentials(_tls(deployment, 0, mode="tls"), server=True))
        try:
            return await _ping(port, load_credentials(_tls(deployment, 2, mode="tls"), server=False))
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == grpc.StatusCode.OK


def test_server_cert_must_name_the_dialled_host(tmp_path):
    """SANs matter: a server whose cert lists only another address fails the client's host check."""
    elsewhere = generate_deployment(tmp_path, peers=2, hosts=["10.9.8.7"])

    async def scenario() -> grpc.StatusCode:
        server, port = await _serve(load_credentials(_tls(elsewhere, 0), server=True))
        try:
            return await _ping(port, load_credentials(_tls(elsewhere, 1), server=False))
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == grpc.StatusCode.UNAVAILABLE

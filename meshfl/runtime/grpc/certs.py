"""Certificates for the gRPC runtime: a private CA, per-peer certificates, gRPC credentials.

`meshfl certs` (and `meshfl configs --hosts` with routable hosts, and `meshfl launch --local`)
call `generate_deployment` to make everything a deployment needs; `load_credentials` turns a
`grpc.tls` config section into gRPC credentials with errors that name the config field at
fault. Keys are EC P-256 (fast to make and to handshake with) and are written with 0600
permissions from the moment they exist.

Identity: peer k's certificate has the common name `peer-<k>` and the DNS name `peer-<k>`
besides its host names. A server takes a client as peer k only when the CN is exactly
`peer-<k>` of a peer of the experiment (`transport.peer_from_auth_context`); a client dials
peer k checking the DNS name `peer-<k>` (`grpc.ssl_target_name_override`), so a certificate
of another peer, signed by the same CA, is refused; `check_identity` refuses to start a peer
with a certificate that does not name it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshfl.config import ConfigError, TlsConfig

_CLOCK_SKEW = dt.timedelta(minutes=5)  # backdate notBefore so peers with slightly slow clocks accept the cert


def generate_ca(out_dir: Path, common_name: str = "meshfl-ca", days: int = 365) -> tuple[Path, Path]:
    """Self-signed CA that may sign peer certificates only (path length 0); returns (ca.pem, ca.key)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(out_dir, "ca", cert, key)


def peer_name(peer: int) -> str:
    """The common name and DNS name of peer `peer`'s certificate, and the name a client checks when dialling it."""
    return f"peer-{peer}"


def generate_peer_cert(out_dir: Path, ca_cert: Path, ca_key: Path, name: str, hosts: list[str],
                       days: int = 365) -> tuple[Path, Path]:
    """A peer certificate signed by the CA, valid as TLS server and client for `name` and `hosts`.

    IP literals become IP SANs and everything else DNS SANs, because gRPC matches the
    dialled address against the matching SAN kind; `name` (e.g. `peer-3`) is a DNS SAN too,
    the one meshfl's own clients check. Returns (<name>.pem, <name>.key).
    """
    if not hosts:
        raise ValueError("generate_peer_cert: hosts must name at least one IP or DNS name")
    hosts = [name, *(h for h in hosts if h != name)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    issuer = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    issuer_key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    if not isinstance(issuer_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key}: expected an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, issuer.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return _write_pair(out_dir, name, cert, key)


def generate_deployment(out_dir: Path, peers: int, hosts: list[str] = ["127.0.0.1", "localhost"],  # noqa: B006 - never mutated
                        peer_hosts: list[list[str]] | None = None) -> dict:
    """CA plus certificates peer-0 .. peer-<peers-1> for `hosts` (or peer i for `peer_hosts[i]`), all in `out_dir`,
    and every peer's Ed25519 signing key (`peer-<i>.sign.key`) with `keyring.json` signed by the CA.

    Returns {"ca": ca.pem, "ca_key": ca.key, "peers": [{"name", "cert", "key"}, ...], "keyring": keyring.json} (Paths).
    Existing files of the same names are replaced.
    """
    if peers < 1:
        raise ValueError(f"generate_deployment: peers must be >= 1, got {peers}")
    if peer_hosts is not None and len(peer_hosts) != peers:
        raise ValueError(f"generate_deployment: {len(peer_hosts)} host lists for {peers} peers")
    out_dir = Path(out_dir)
    ca_pem, ca_key = generate_ca(out_dir)
    entries = []
    for i in range(peers):
        cert, key = generate_peer_cert(out_dir, ca_pem, ca_key, peer_name(i),
                                       list(peer_hosts[i] if peer_hosts is not None else hosts))
        entries.append({"name": f"peer-{i}", "cert": cert, "key": key})
    from meshfl.runtime.keys import generate_keys
    keyring = generate_keys(out_dir, peers, ca_key=ca_key)  # content signing keys, bound to the same CA
    return {"ca": ca_pem, "ca_key": ca_key, "peers": entries, "keyring": keyring}


def load_credentials(tls: TlsConfig, *, server: bool) -> grpc.ServerCredentials | grpc.ChannelCredentials:
    """gRPC credentials for `tls.mode` (tls: server cert only; mtls: both sides, client auth required).

    Files are read and parsed here so a wrong path or a non-PEM file fails now with the
    config field named, not later as an opaque handshake error. mode=none has no
    credentials: the caller opens an insecure port or channel instead.
    """
    if tls.mode == "none":
        raise ConfigError("grpc.tls.mode is none: use an insecure port/channel, there are no credentials to load")
    ca = _read_pem("ca", tls.ca)
    cert = _read_pem("cert", tls.cert)
    key = _read_pem("key", tls.key)
    _check_pair(tls, ca, cert, key)
    mutual = tls.mode == "mtls"
    if server:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca if mutual else None,
                                           require_client_auth=mutual)
    if mutual:
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.ssl_channel_credentials(root_certificates=ca)


def check_identity(tls: TlsConfig, peer: int) -> None:
    """Refuse to start peer `peer` with a certificate that does not name it (CN and DNS name `peer-<peer>`).

    Its neighbours would refuse it anyway (they check the name they dial), but with an
    opaque handshake error on their side; this says what is wrong where it can be fixed.
    """
    if tls.mode == "none":
        return
    path = tls.cert
    try:
        certificate = x509.load_pem_x509_certificate(_read_pem("cert", path))
    except ValueError as exc:
        raise ConfigError(f"grpc.tls.cert: {path} is not a PEM certificate ({exc})") from None
    want = peer_name(peer)
    names = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [want]:
        raise ConfigError(f"grpc.tls.cert: {path} is for {', '.join(map(str, names)) or 'no common name'}, not this peer "
                          f"({want}); every peer needs its own certificate (meshfl certs)")
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if want not in dns:
        raise ConfigError(f"grpc.tls.cert: {path} has no DNS name {want}, which its neighbours check; "
                          "make new certificates with `meshfl certs` (or `meshfl configs --hosts ...`)")


# ---------------------------------------------------------------------------------- helpers


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int) -> x509.CertificateBuilder:
    if days < 1:
        raise ValueError(f"certificate lifetime must be >= 1 day, got {days}")
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_pair(out_dir: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(key_path, key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    """Create with 0600 so the key is never readable by others, even for an instant; fix perms of an old file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_pem(field: str, path: str | None) -> bytes:
    if path is None:
        raise ConfigError(f"grpc.tls.{field}: no file given (grpc.tls.mode needs ca, cert and key)")
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"grpc.tls.{field}: cannot read {path} ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"grpc.tls.{field}: {path} is not a PEM file")
    return data


def _check_pair(tls: TlsConfig, ca: bytes, cert: bytes, key: bytes) -> None:
    """Parse all three and check the key matches the cert and the cert is in date: the errors gRPC would hide."""
    try:
        x509.load_pem_x509_certificate(ca)
    except ValueError as exc:
        raise ConfigError(f"grpc.tls.ca: {tls.ca} is not a PEM certificate ({exc})") from None
    try:
        certificate = x509.load_pem_x509_certificate(cert)
    except ValueError as exc:
        raise ConfigError(f"grpc.tls.cert: {tls.cert} is not a PEM certificate ({exc})") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"grpc.tls.key: {tls.key} is not an unencrypted PEM private key ({exc})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise ConfigError(f"grpc.tls.key: {tls.key} does not belong to grpc.tls.cert {tls.cert}")
    expires = _not_valid_after(certificate)
    if expires < dt.datetime.now(dt.timezone.utc):
        raise ConfigError(f"grpc.tls.cert: {tls.cert} expired on {expires:%Y-%m-%d}")


def _not_valid_after(certificate: x509.Certificate) -> dt.datetime:
    """Aware expiry time; `not_valid_after_utc` only exists from cryptography 42."""
    aware = getattr(certificate, "not_valid_after_utc", None)
    return aware if aware is not None else certificate.not_valid_after.replace(tzinfo=dt.timezone.utc)

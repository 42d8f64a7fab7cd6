"""Per-peer Ed25519 keys: what a peer signs, and how every peer checks what others signed.

An algorithm signs content it wants others to be able to check after relays (a ballot, a
model contribution) with `ctx.sign(data)` and checks it with `ctx.verify(peer, data, sig)`.
Transport security (mTLS) only says who the *direct* sender is; a signature says who wrote
the content, however many peers relayed it.

Where keys come from (`keys:` in the experiment config):
- `keys.keyring` + `keys.signing_key` given (made by `meshfl certs`): the keyring is a JSON
  file of every peer's public key, signed by the deployment's CA key, so a peer that trusts
  the CA (grpc.tls.ca) trusts the keyring; each peer reads only its own private key.
- neither given: keys are derived from the run seed. That is what the simulator uses (no
  stranger can send there) and what a plaintext run on loopback falls back to; anyone who
  knows the config can forge such signatures, so the gRPC runtime warns.

Ed25519 signatures are deterministic, so a simulated run stays bit-identical. Verification
results are cached (bounded), so a ballot relayed to a thousand simulated peers is checked once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshfl.config import ConfigError, ExperimentConfig, KeysConfig

KEYRING_FORMAT = "meshfl-keyring-1"
SIGNATURE_HEX = 128  # an Ed25519 signature is 64 bytes
VERIFIED_KEPT = 1 << 16
_DERIVE_TAG = b"meshfl/derived-signing-key/v1"
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def derived_key(seed: int, peer: int) -> Ed25519PrivateKey:
    """The signing key of `peer` in a run without key files: a pure function of (seed, peer)."""
    secret = hashlib.sha256(_DERIVE_TAG + seed.to_bytes(8, "little") + peer.to_bytes(8, "little")).digest()
    return Ed25519PrivateKey.from_private_bytes(secret)


class Signer:
    """One peer's private key."""

    def __init__(self, peer: int, key: Ed25519PrivateKey) -> None:
        self.peer = peer
        self._key = key

    def sign(self, data: bytes) -> str:
        return self._key.sign(data).hex()

    def public_hex(self) -> str:
        return self._key.public_key().public_bytes(*_RAW).hex()


class Keyring:
    """Every peer's public key; `verify` caches its answers (bounded, thread-safe)."""

    derived_from_seed = False

    def __init__(self, public: dict[int, Ed25519PublicKey]) -> None:
        self._public = dict(public)
        self._verified: collections.OrderedDict[tuple[int, bytes, str], bool] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.checked = 0

    def public_key(self, peer: int) -> Ed25519PublicKey | None:
        return self._public.get(peer)

    def verify(self, peer: int, data: bytes, signature: str) -> bool:
        """Whether `signature` (hex) is `peer`'s signature of `data`; False for any malformed input."""
        key = self.public_key(peer)
        if key is None or not isinstance(signature, str) or len(signature) != SIGNATURE_HEX:
            return False
        entry = (peer, data, signature)
        with self._lock:
            known = self._verified.get(entry)
            if known is not None:
                self._verified.move_to_end(entry)
                return known
        try:
            key.verify(bytes.fromhex(signature), data)
            valid = True
        except (InvalidSignature, ValueError):
            valid = False
        with self._lock:
            self.checked += 1
            self._verified[entry] = valid
            if len(self._verified) > VERIFIED_KEPT:
                self._verified.popitem(last=False)
        return valid


class DerivedKeyring(Keyring):
    """The keys of a run without key files, derived from the seed on first use (a simulation of
    10,000 peers that never signs makes none)."""

    derived_from_seed = True

    def __init__(self, seed: int, peers: int) -> None:
        super().__init__({})
        self.seed = seed
        self.peers = peers

    def public_key(self, peer: int) -> Ed25519PublicKey | None:
        if not 0 <= peer < self.peers:
            return None
        with self._lock:
            key = self._public.get(peer)
        if key is None:
            key = derived_key(self.seed, peer).public_key()
            with self._lock:
                self._public[peer] = key
        return key


def keys_for(config: ExperimentConfig, peer: int, keyring: Keyring | None = None, *,
             keys: KeysConfig | None = None, ca: str | None = None) -> tuple[Signer, Keyring]:
    """This peer's signer and the run's keyring: from key files when configured (`keys`, default the
    experiment's `keys:`; with `ca`, the keyring must carry that CA's signature), else derived from the seed."""
    keys = keys if keys is not None else config.keys
    if keys.keyring is None:
        ring = keyring if keyring is not None else DerivedKeyring(config.seed, config.peers)
        return Signer(peer, derived_key(config.seed, peer)), ring
    if ca is None and config.grpc.tls.mode != "none":
        ca = config.grpc.tls.ca
    ring = keyring if keyring is not None else load_keyring(Path(keys.keyring), config.peers, ca=ca)
    signer = Signer(peer, load_signing_key(Path(str(keys.signing_key).replace("{peer}", str(peer)))))
    expected = ring.public_key(peer)
    if expected is None or expected.public_bytes(*_RAW).hex() != signer.public_hex():
        raise ConfigError(f"keys.signing_key: the key of peer {peer} does not match its entry in keys.keyring {keys.keyring}")
    return signer, ring


# ---- files ----------------------------------------------------------------------------------

def _canonical(peers: dict[str, str]) -> bytes:
    return json.dumps({"format": KEYRING_FORMAT, "peers": peers}, sort_keys=True, separators=(",", ":")).encode()


def generate_keys(out_dir: Path, peers: int, ca_key: Path | None = None) -> Path:
    """`peer-<i>.sign.key` (Ed25519, 0600) for every peer and `keyring.json` (signed by the CA key if given)."""
    from meshfl.runtime.grpc.certs import _write_private

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public: dict[str, str] = {}
    for peer in range(peers):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        _write_private(out_dir / f"peer-{peer}.sign.key", pem)
        public[str(peer)] = key.public_key().public_bytes(*_RAW).hex()
    document: dict[str, object] = {"format": KEYRING_FORMAT, "peers": public}
    if ca_key is not None:
        issuer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
        if not isinstance(issuer, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key}: expected an EC private key")
        document["ca_signature"] = issuer.sign(_canonical(public), ec.ECDSA(hashes.SHA256())).hex()
    path = out_dir / "keyring.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def load_keyring(path: Path, peers: int, ca: str | None = None) -> Keyring:
    """Read a keyring; with `ca` (a CA certificate PEM path) its `ca_signature` must verify. ConfigError naming the field."""
    try:
        document = json.loads(Path(path).expanduser().read_text())
    except OSError as exc:
        raise ConfigError(f"keys.keyring: cannot read {path} ({exc.strerror or exc})") from None
    except ValueError:
        raise ConfigError(f"keys.keyring: {path} is not JSON") from None
    if not isinstance(document, dict) or document.get("format") != KEYRING_FORMAT or not isinstance(document.get("peers"), dict):
        raise ConfigError(f"keys.keyring: {path} is not a {KEYRING_FORMAT} file")
    entries: dict[str, str] = document["peers"]
    public: dict[int, Ed25519PublicKey] = {}
    for peer in range(peers):
        hex_key = entries.get(str(peer))
        try:
            public[peer] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(hex_key)))
        except ValueError:
            raise ConfigError(f"keys.keyring: {path} has no valid key for peer {peer}") from None
    if ca is not None:
        _check_ca_signature(path, entries, document.get("ca_signature"), ca)
    return Keyring(public)


def _check_ca_signature(path: Path, entries: dict[str, str], signature: object, ca: str) -> None:
    certificate = x509.load_pem_x509_certificate(Path(ca).expanduser().read_bytes())
    key = certificate.public_key()
    if not isinstance(signature, str) or not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"keys.keyring: {path} is not signed by the CA of grpc.tls.ca ({ca})")
    try:
        key.verify(bytes.fromhex(signature), _canonical(entries), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise ConfigError(f"keys.keyring: {path} is not signed by the CA of grpc.tls.ca ({ca})") from None


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"keys.signing_key: cannot read {path} ({exc.strerror or exc})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"keys.signing_key: {path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"keys.signing_key: {path} is not an Ed25519 key")
    return key

"""Per-peer Ed25519 keys: signing, checking, key files bound to the deployment's CA."""

import json

import pytest

from meshfl.config import ConfigError, load_config
from meshfl.runtime.grpc.certs import generate_deployment
from meshfl.runtime.keys import DerivedKeyring, derived_key, generate_keys, keys_for, load_keyring


def test_derived_keys_are_a_pure_function_of_seed_and_peer_and_sign_deterministically():
    assert derived_key(3, 1).sign(b"x") == derived_key(3, 1).sign(b"x")  # Ed25519 is deterministic
    assert derived_key(3, 1).sign(b"x") != derived_key(3, 2).sign(b"x") != derived_key(4, 1).sign(b"x")
    ring = DerivedKeyring(3, peers=4)
    good = derived_key(3, 1).sign(b"ballot").hex()
    assert ring.verify(1, b"ballot", good)
    assert not ring.verify(2, b"ballot", good)  # another peer's key
    assert not ring.verify(1, b"ballot!", good)  # other content
    assert not ring.verify(9, b"ballot", good)  # not a peer of the run
    for junk in ("", "zz" * 64, good[:-2], good + "00", 5):
        assert not ring.verify(1, b"ballot", junk)


def test_verification_is_cached_and_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr("meshfl.runtime.keys.VERIFIED_KEPT", 3)
    ring = DerivedKeyring(0, peers=2)
    signature = derived_key(0, 1).sign(b"a").hex()
    for _ in range(5):
        assert ring.verify(1, b"a", signature)
    assert ring.checked == 1  # checked once, then remembered
    for i in range(10):
        ring.verify(1, str(i).encode(), signature)
    assert len(ring._verified) == 3


def test_key_files_made_with_the_ca_load_and_a_tampered_keyring_is_refused(tmp_path):
    deployment = generate_deployment(tmp_path, peers=3)
    keyring = generate_keys(tmp_path, 3, ca_key=deployment["ca_key"])
    config = load_config(None, ["peers=3", "grpc.tls.mode=mtls", f"grpc.tls.ca={deployment['ca']}",
                                f"grpc.tls.cert={tmp_path}/peer-{{peer}}.pem", f"grpc.tls.key={tmp_path}/peer-{{peer}}.key",
                                f"keys.keyring={keyring}", f"keys.signing_key={tmp_path}/peer-{{peer}}.sign.key"])
    signer, ring = keys_for(config, 2)
    assert not ring.derived_from_seed and ring.verify(2, b"m", signer.sign(b"m")) and not ring.verify(1, b"m", signer.sign(b"m"))
    assert (tmp_path / "peer-2.sign.key").stat().st_mode & 0o777 == 0o600

    document = json.loads(keyring.read_text())
    document["peers"]["1"] = document["peers"]["2"]  # a key swapped after the CA signed the keyring
    keyring.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"keys\.keyring: .* is not signed by the CA of grpc\.tls\.ca"):
        keys_for(config, 2)
    other = generate_deployment(tmp_path / "other", peers=3)  # a keyring signed by some other CA
    generate_keys(tmp_path / "other", 3, ca_key=other["ca_key"])
    with pytest.raises(ConfigError, match="not signed by the CA"):
        load_keyring(tmp_path / "other" / "keyring.json", 3, ca=str(deployment["ca"]))


def test_key_file_errors_name_the_field(tmp_path):
    keyring = generate_keys(tmp_path, 2)
    base = ["peers=2", f"keys.keyring={keyring}"]
    with pytest.raises(ConfigError, match=r"keys\.keyring: needed with keys\.signing_key"):
        load_config(None, ["peers=2", f"keys.signing_key={tmp_path}/x"])
    with pytest.raises(ConfigError, match=r"keys\.signing_key: the key of peer 1 does not match"):
        keys_for(load_config(None, [*base, f"keys.signing_key={tmp_path}/peer-0.sign.key"]), 1)
    with pytest.raises(ConfigError, match=r"keys\.signing_key: cannot read"):
        keys_for(load_config(None, [*base, f"keys.signing_key={tmp_path}/nope-{{peer}}.key"]), 1)
    with pytest.raises(ConfigError, match=r"keys\.keyring: .* has no valid key for peer 2"):
        keys_for(load_config(None, ["peers=3", f"keys.keyring={keyring}", f"keys.signing_key={tmp_path}/peer-{{peer}}.sign.key"]), 0)
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ConfigError, match=r"keys\.keyring: .* is not a meshfl-keyring-1 file"):
        load_keyring(tmp_path / "bad.json", 2)

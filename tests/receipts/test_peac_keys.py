"""Signing keys, key files, did:key, JWKS and peac-issuer.json."""

from __future__ import annotations

import json
import os
import stat
import traceback
from pathlib import Path

import pytest

from farebox.errors import ConfigError, ReceiptError
from farebox.receipts import (
    SigningKey,
    did_key_from_public_key,
    issuer_config_document,
    jwk_thumbprint,
    jwks_document,
    load_signing_key,
    parse_issuer_config,
    parse_jwks,
    public_key_from_did_key,
    save_signing_key,
)
from farebox.receipts.jws import b64url_encode
from farebox.receipts.keys import RevokedKey

# RFC 8032 test 1: secret key and public key.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def secret_spellings(key: SigningKey, seed: bytes) -> list[str]:
    return [seed.hex(), b64url_encode(seed), repr(seed)]


# --- the private key stays private -----------------------------------------------------------------


def test_repr_and_str_hide_the_private_key() -> None:
    key = SigningKey.from_seed(RFC8032_SEED, "kid-1")
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert "kid-1" in text
        for secret in secret_spellings(key, RFC8032_SEED):
            assert secret not in text


def test_key_cannot_be_pickled() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(SigningKey.from_seed(RFC8032_SEED))


def test_errors_never_contain_the_private_key(tmp_path: Path) -> None:
    key = SigningKey.from_seed(RFC8032_SEED)
    path = tmp_path / "key.json"
    save_signing_key(key, path)
    document = json.loads(path.read_text())
    document["x"] = b64url_encode(bytes(32))  # mismatching public half
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as err:
        load_signing_key(path)
    rendered = "".join(traceback.format_exception(err.value)) + repr(err.value)
    for secret in secret_spellings(key, RFC8032_SEED):
        assert secret not in rendered
    path.write_text(path.read_text()[:-5])  # truncated JSON
    with pytest.raises(ConfigError) as err:
        load_signing_key(path)
    assert document["d"] not in "".join(traceback.format_exception(err.value))


# --- key files -------------------------------------------------------------------------------------


def test_key_file_round_trip_with_mode_0600(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "signing-key.json"
    save_signing_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_signing_key(path)
    assert loaded.kid == key.kid
    assert loaded.public_key == key.public_key
    assert loaded.sign(b"m") == key.sign(b"m")  # Ed25519 is deterministic


def test_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text("keep me")
    with pytest.raises(ConfigError):
        save_signing_key(SigningKey.generate(), path)
    assert path.read_text() == "keep me"


def test_overwrite_keeps_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    key = SigningKey.generate()
    save_signing_key(key, path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_key(path).public_key == key.public_key
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"[]",
        b'{"kty":"RSA"}',
        b'{"kty":"OKP","crv":"Ed25519","x":"AA","d":"AA"}',
        b"\xff" * 10,
    ],
)
def test_malformed_key_files_are_config_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        load_signing_key(path)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_signing_key(tmp_path / "absent.json")


# --- public forms ----------------------------------------------------------------------------------


def test_public_jwk_and_thumbprint() -> None:
    key = SigningKey.from_seed(RFC8032_SEED)
    jwk = key.public_jwk()
    assert jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url_encode(RFC8032_PUBLIC),
        "kid": key.kid,
        "use": "sig",
        "alg": "EdDSA",
    }
    # RFC 8037 appendix A.3: the thumbprint of this very key.
    assert jwk_thumbprint(RFC8032_PUBLIC) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_did_key_round_trip() -> None:
    # The did:key test vector for this RFC 8032 key (w3c-ccg did-method-key).
    did = did_key_from_public_key(RFC8032_PUBLIC)
    assert did.startswith("did:key:z6Mk")
    assert public_key_from_did_key(did) == RFC8032_PUBLIC
    assert SigningKey.from_seed(RFC8032_SEED).did_key == did


@pytest.mark.parametrize(
    "did",
    [
        "did:key:z6Mk",
        "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",  # secp256k1, not Ed25519
        "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2do0",  # '0' is not base58
        "did:web:example.com",
        "did:key:" + "z" * 200,
    ],
)
def test_bad_did_keys(did: str) -> None:
    with pytest.raises(ReceiptError) as err:
        public_key_from_did_key(did)
    assert err.value.code == "E_DID_RESOLUTION_FAILED"


# --- JWKS ------------------------------------------------------------------------------------------


def test_jwks_round_trip() -> None:
    keys = [SigningKey.generate() for _ in range(3)]
    jwks = parse_jwks(json.dumps(jwks_document(keys)).encode())
    for key in keys:
        assert jwks.find(key.kid) == key.public_key
    assert jwks.find("nope") is None
    assert all("d" not in jwk for jwk in jwks_document(keys)["keys"])


def test_jwks_skips_other_key_types() -> None:
    key = SigningKey.generate()
    doc = {"keys": [{"kty": "RSA", "n": "x", "e": "AQAB", "kid": "r"}, key.public_jwk()]}
    assert parse_jwks(json.dumps(doc)).find(key.kid) == key.public_key


@pytest.mark.parametrize(
    ("document", "code"),
    [
        (b"x" * 65_537, "E_VERIFY_JWKS_TOO_LARGE"),
        (json.dumps({"keys": [{}] * 21}), "E_VERIFY_JWKS_TOO_MANY_KEYS"),
        ('{"keys": [], "keys": []}', "E_VERIFY_JWKS_INVALID"),
        ('{"keys": [],}', "E_VERIFY_JWKS_INVALID"),
        ("[]", "E_VERIFY_JWKS_INVALID"),
        ('{"keys": {}}', "E_VERIFY_JWKS_INVALID"),
        ('{"keys": [{"kty":"OKP","crv":"Ed25519","kid":"k","x":"AAAA"}]}', "E_VERIFY_JWKS_INVALID"),
        ('{"keys": [[[[["deep"]]]]]}', "E_VERIFY_JWKS_INVALID"),
    ],
)
def test_jwks_limits(document: str | bytes, code: str) -> None:
    with pytest.raises(ReceiptError) as err:
        parse_jwks(document)
    assert err.value.code == code


def test_jwks_refuses_private_keys_and_repeated_kids() -> None:
    key = SigningKey.generate()
    private = {**key.public_jwk(), "d": b64url_encode(bytes(32))}
    with pytest.raises(ReceiptError):
        parse_jwks(json.dumps({"keys": [private]}))
    with pytest.raises(ReceiptError):
        parse_jwks(json.dumps({"keys": [key.public_jwk(), key.public_jwk()]}))


# --- peac-issuer.json ------------------------------------------------------------------------------


def test_issuer_config_round_trip() -> None:
    doc = issuer_config_document(
        "https://api.example.com",
        "https://api.example.com/.well-known/jwks.json",
        payment_rails=["x402"],
        revoked_keys=[RevokedKey("old-key-1", "2025-12-15T08:30:00Z", "key_compromise")],
    )
    assert doc == {
        "version": "peac-issuer/0.1",
        "issuer": "https://api.example.com",
        "jwks_uri": "https://api.example.com/.well-known/jwks.json",
        "receipt_versions": ["interaction-record+jwt"],
        "algorithms": ["EdDSA"],
        "payment_rails": ["x402"],
        "revoked_keys": [
            {"kid": "old-key-1", "revoked_at": "2025-12-15T08:30:00Z", "reason": "key_compromise"}
        ],
    }
    config = parse_issuer_config(json.dumps(doc), expected_issuer="https://api.example.com:443")
    assert config.revoked_kids == {"old-key-1"}


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"version": "peac-issuer/9"}, "E_VERIFY_ISSUER_CONFIG_INVALID"),
        ({"issuer": "http://api.example.com"}, "E_VERIFY_ISSUER_CONFIG_INVALID"),
        ({"jwks_uri": "http://api.example.com/jwks.json"}, "E_VERIFY_JWKS_URI_INVALID"),
        ({"revoked_keys": [{"kid": "k", "revoked_at": "yesterday"}]}, "E_VERIFY_ISSUER_CONFIG_INVALID"),
        ({"revoked_keys": [{"kid": "k", "revoked_at": "2025-01-01T00:00:00Z", "reason": "x"}]},
         "E_VERIFY_ISSUER_CONFIG_INVALID"),
        ({"payment_rails": "x402"}, "E_VERIFY_ISSUER_CONFIG_INVALID"),
        ({"a": {"b": {"c": {"d": {}}}}}, "E_VERIFY_ISSUER_CONFIG_INVALID"),
    ],
)  # fmt: skip
def test_issuer_config_rejections(change: dict[str, object], code: str) -> None:
    doc = {
        "version": "peac-issuer/0.1",
        "issuer": "https://api.example.com",
        "jwks_uri": "https://api.example.com/.well-known/jwks.json",
        **change,
    }
    with pytest.raises(ReceiptError) as err:
        parse_issuer_config(json.dumps(doc))
    assert err.value.code == code


def test_issuer_config_origin_mismatch() -> None:
    doc = json.dumps(
        {
            "version": "peac-issuer/0.1",
            "issuer": "https://a.example",
            "jwks_uri": "https://a.example/j",
        }
    )
    with pytest.raises(ReceiptError) as err:
        parse_issuer_config(doc, expected_issuer="https://b.example")
    assert err.value.code == "E_VERIFY_ISSUER_MISMATCH"
    assert parse_issuer_config(doc + " ").issuer == "https://a.example"  # unknown members ignored


def test_issuer_config_builder_refuses_non_origins() -> None:
    with pytest.raises(ConfigError):
        issuer_config_document("https://api.example.com/", "https://api.example.com/jwks.json")
    with pytest.raises(ConfigError):
        issuer_config_document("https://api.example.com", "http://api.example.com/jwks.json")

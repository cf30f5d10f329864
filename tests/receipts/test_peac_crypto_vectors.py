"""PEAC parity corpora: Ed25519 profile, raw I-JSON, JCS, the JWS golden vectors, JOSE hardening."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from farebox.errors import ReceiptError
from farebox.receipts import SigningKey
from farebox.receipts.ijson import ijson_error, parse_ijson
from farebox.receipts.jws import (
    b64url_decode,
    b64url_encode,
    check_wire02_header,
    decode_compact,
    ed25519_verify,
    serialize_json,
    sign_compact,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "peac"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def ids(vectors: list[dict[str, Any]], key: str) -> list[str]:
    return [v[key] for v in vectors]


# --- Ed25519 PEAC profile (decision from peac_expected only) ---------------------------------------

ED25519 = load("parity-corpus__ed25519-peac-profile__vectors.json")["vectors"]


def test_ed25519_corpus_has_14_vectors() -> None:
    assert len(ED25519) == 14


@pytest.mark.parametrize("vector", ED25519, ids=ids(ED25519, "id"))
def test_ed25519_profile(vector: dict[str, Any]) -> None:
    accepted = ed25519_verify(
        bytes.fromhex(vector["public_key_hex"]),
        bytes.fromhex(vector["signature_hex"]),
        bytes.fromhex(vector["message_hex"]),
    )
    assert accepted is vector["peac_expected"]["accepted"]


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [(b"\x01" * 31, b"\x00" * 64), (b"\x01" * 33, b"\x00" * 64), (b"\x01" * 32, b"\x00" * 63)],
)
def test_ed25519_wrong_lengths_rejected(public_key: bytes, signature: bytes) -> None:
    assert ed25519_verify(public_key, signature, b"m") is False


# --- raw I-JSON (47 vectors) -----------------------------------------------------------------------

IJSON = load("parity-corpus__ijson-raw-input__vectors.json")["vectors"]


def test_ijson_corpus_has_47_vectors() -> None:
    assert len(IJSON) == 47


@pytest.mark.parametrize("vector", IJSON, ids=ids(IJSON, "id"))
def test_ijson_gate(vector: dict[str, Any]) -> None:
    raw = b64url_decode(vector["input_b64"])
    expected = vector["expected"]
    if expected["accepted"]:
        assert parse_ijson(raw) == json.loads(raw)
        assert ijson_error(raw) is None
    else:
        with pytest.raises(ReceiptError) as err:
            parse_ijson(raw)
        assert err.value.code == expected["code"]
        assert ijson_error(raw) == expected["code"]


def test_ijson_reports_the_first_violation_in_document_order() -> None:
    # A number out of range before a duplicate name: the reference scanner stops at the number.
    assert ijson_error(b'{"a":9007199254740992,"b":1,"b":2}') == "E_IJSON_NUMBER_OUT_OF_RANGE"
    assert ijson_error(b'{"b":1,"b":2,"a":9007199254740992}') == "E_IJSON_DUPLICATE_MEMBER_NAME"
    with pytest.raises(ReceiptError) as err:
        parse_ijson(b'{"b":1,"b":2,"a":"\\ud800"}')
    assert err.value.code == "E_IJSON_DUPLICATE_MEMBER_NAME"


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[1,]", b'{"a":1,}', b"NaN", b"-Infinity", b"01", b'{"a":1} x', b"\xef\xbb\xbf{}"],
)
def test_ijson_syntax_errors_are_invalid_format(raw: bytes) -> None:
    with pytest.raises(ReceiptError) as err:
        parse_ijson(raw)
    assert err.value.code == "E_INVALID_FORMAT"


def test_ijson_integral_numbers_are_ints() -> None:
    # JSON has one number type; 1e3 and 1.0 are the integer 1000 and 1 in JavaScript too.
    assert parse_ijson(b'{"a":1e3,"b":1.0,"c":1.5,"d":-0.0}') == {
        "a": 1000,
        "b": 1,
        "c": 1.5,
        "d": 0,
    }
    assert type(parse_ijson(b"1e3")) is int


# --- JCS (RFC 8785) --------------------------------------------------------------------------------

JCS = [
    *load("fixtures__go-interaction-record__jcs-golden-vectors.json")["vectors"],
    *load("parity-corpus__jcs-extended__vectors.json")["vectors"],
]


@pytest.mark.parametrize("vector", JCS, ids=ids(JCS, "id"))
def test_jcs(vector: dict[str, Any]) -> None:
    assert rfc8785.dumps(vector["input"]).decode("utf-8") == vector["canonical"]


# --- JWS golden vectors (legacy 0.1 envelopes, JWS layer only) -------------------------------------

GOLDEN = load("fixtures__crypto__golden-vectors.json")


@pytest.mark.parametrize("vector", GOLDEN["vectors"], ids=ids(GOLDEN["vectors"], "name"))
def test_golden_jws_regenerates_byte_for_byte(vector: dict[str, Any]) -> None:
    key = SigningKey.from_seed(bytes.fromhex(vector["seed_hex"]), vector["header"]["kid"])
    assert key.public_key.hex() == vector["public_key_hex"]
    jws = sign_compact(
        serialize_json(vector["header"]), serialize_json(vector["payload"]), key.sign
    )
    assert jws == vector["jws"]
    decoded = decode_compact(jws)
    assert decoded.payload == vector["payload"]
    assert ed25519_verify(key.public_key, decoded.signature, decoded.signing_input) is True


def _negative(name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(v for v in GOLDEN["negative_vectors"] if v["name"] == name)
    return found


def test_golden_negative_wrong_public_key() -> None:
    vector = _negative("wrong-public-key")
    decoded = decode_compact(vector["jws"])
    wrong = bytes.fromhex(vector["wrong_public_key_hex"])
    assert ed25519_verify(wrong, decoded.signature, decoded.signing_input) is False


def test_golden_negative_tampered_payload_and_signature() -> None:
    base = GOLDEN["vectors"][0]
    public_key = bytes.fromhex(base["public_key_hex"])
    header, _, signature = base["jws"].split(".")
    payload = serialize_json({**base["payload"], "amt": 1})
    tampered = decode_compact(f"{header}.{b64url_encode(payload)}.{signature}")
    assert ed25519_verify(public_key, tampered.signature, tampered.signing_input) is False
    original = decode_compact(base["jws"])
    flipped = bytes([original.signature[0] ^ 1]) + original.signature[1:]
    assert ed25519_verify(public_key, flipped, original.signing_input) is False
    assert ed25519_verify(public_key, original.signature, original.signing_input) is True


@pytest.mark.parametrize(
    ("name", "override"),
    [("wrong-typ-header", {"typ": "JWT"}), ("wrong-alg-header", {"alg": "ES256"})],
)
def test_golden_negative_header(name: str, override: dict[str, str]) -> None:
    assert _negative(name)["expected_valid"] is False
    base = GOLDEN["vectors"][0]
    key = SigningKey.from_seed(bytes.fromhex(base["seed_hex"]))
    header = serialize_json({**base["header"], **override})
    jws = sign_compact(header, serialize_json(base["payload"]), key.sign)
    with pytest.raises(ReceiptError) as err:
        decode_compact(jws)
    assert err.value.code == "E_INVALID_FORMAT"


def test_golden_negative_malformed() -> None:
    with pytest.raises(ReceiptError) as err:
        decode_compact(_negative("malformed-jws")["jws"])
    assert err.value.code == "E_INVALID_FORMAT"


# --- JOSE hardening parity corpus ------------------------------------------------------------------

JOSE = load("parity-corpus__jose-hardening__vectors.json")["vectors"]


@pytest.mark.parametrize("vector", JOSE, ids=ids(JOSE, "id"))
def test_jose_hardening(vector: dict[str, Any]) -> None:
    expected = vector["expected"]["errors"][0]["code"].replace("CRYPTO_", "E_")
    with pytest.raises(ReceiptError) as err:
        check_wire02_header(vector["input"]["header"])
    assert err.value.code == expected
    key = SigningKey.generate()
    jws = sign_compact(
        serialize_json(vector["input"]["header"]),
        serialize_json(vector["input"]["payload"]),
        key.sign,
    )
    with pytest.raises(ReceiptError) as err:
        decode_compact(jws)
    assert err.value.code == expected


def test_golden_wire01_record_is_refused_by_the_wire02_verifier() -> None:
    from farebox.receipts import verify_receipt

    base = GOLDEN["vectors"][0]
    with pytest.raises(ReceiptError) as err:
        verify_receipt(base["jws"], bytes.fromhex(base["public_key_hex"]), now=1700000000)
    assert err.value.code == "E_UNSUPPORTED_WIRE_VERSION"


def test_ijson_survives_nesting_deeper_than_the_interpreter() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ReceiptError) as err:
        parse_ijson(deep)
    assert err.value.code == "E_CONSTRAINT_VIOLATION"
    duplicate = b"[" * 100_000 + b'{"a":1,"a":2}' + b"]" * 100_000
    with pytest.raises(ReceiptError) as err:
        parse_ijson(duplicate)
    assert err.value.code == "E_IJSON_DUPLICATE_MEMBER_NAME"
    assert parse_ijson(b"[" * 500 + b"]" * 500) is not None  # deep but within reach: parsed

"""Behaviour of issue_receipt / verify_receipt beyond the conformance suites."""

from __future__ import annotations

import json
from typing import Any

import pytest

from farebox.errors import ConfigError, ReceiptError
from farebox.receipts import (
    IssuedReceipt,
    SigningKey,
    build_claims,
    challenge_claims,
    issue_receipt,
    jwks_document,
    parse_jwks,
    payment_claims,
    policy_digest,
    receipt_ref,
    rfc3339,
    uuid7,
    verify_receipt,
)
from farebox.receipts.jws import b64url_decode, b64url_encode, serialize_json, sign_compact

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def payment(iss: str = "https://api.example.com", **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "iss": iss,
        "iat": NOW,
        "jti": uuid7(NOW * 1000, bytes(range(10))),
        "payment_rail": "x402",
        "amount_minor": 250000,
        "currency": "USDC",
        "asset": "eip155:8453/erc20:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        "env": "test",
        "event": "settlement",
        "reference": "0x" + "cd" * 32,
        "sub": "https://api.example.com/v1/report/42",
        "occurred_at": rfc3339(NOW - 2),
    }
    fields.update(overrides)
    return payment_claims(**fields)


def issue(key: SigningKey, **overrides: Any) -> IssuedReceipt:
    return issue_receipt(payment(**overrides), key)


def reject(jws: str, key: Any, code: str, **options: Any) -> ReceiptError:
    options.setdefault("now", NOW)
    with pytest.raises(ReceiptError) as err:
        verify_receipt(jws, key, **options)
    assert err.value.code == code, err.value
    return err.value


# --- what farebox issues ---------------------------------------------------------------------------


def test_payment_record_shape_and_no_warnings(key: SigningKey) -> None:
    issued = issue(key)
    result = verify_receipt(issued.jws, key.public_key, now=NOW)
    assert result.warnings == ()
    assert result.kid == key.kid
    assert result.receipt_ref == issued.receipt_ref == receipt_ref(issued.jws)
    assert list(result.claims) == [
        "peac_version", "kind", "type", "iss", "iat", "jti", "sub", "pillars", "occurred_at",
        "extensions",
    ]  # fmt: skip
    commerce = result.claims["extensions"]["org.peacprotocol/commerce"]
    assert commerce["amount_minor"] == "250000"  # a string of minor units, never a number
    assert result.claims["pillars"] == ["commerce"]


def test_header_is_exactly_typ_alg_kid(key: SigningKey) -> None:
    header = b64url_decode(issue(key).jws.split(".")[0])
    expected = {"typ": "interaction-record+jwt", "alg": "EdDSA", "kid": key.kid}
    assert header == json.dumps(expected, separators=(",", ":")).encode()


def test_jws_has_no_padding(key: SigningKey) -> None:
    for _ in range(8):
        assert "=" not in issue(key, jti=uuid7(NOW * 1000)).jws


def test_challenge_record_has_no_warnings(key: SigningKey) -> None:
    claims = challenge_claims(
        iss="https://api.example.com",
        iat=NOW,
        jti="c-1",
        problem={"type": "https://www.peacprotocol.org/problems/payment-required", "status": 402},
        requirements={"rails": ["x402"], "amount_minor": "250000", "currency": "USDC"},
    )
    result = verify_receipt(issue_receipt(claims, key).jws, key.public_key, now=NOW)
    assert result.warnings == ()
    assert result.claims["kind"] == "challenge"


def test_did_key_issuer_verifies_without_a_key(key: SigningKey) -> None:
    issued = issue(key, iss=key.did_key)
    result = verify_receipt(issued.jws, None, now=NOW, issuer=key.did_key)
    assert result.issuer == key.did_key
    assert result.warnings == ()


def test_did_key_of_another_key_fails_signature(key: SigningKey) -> None:
    # A record claiming someone else's did:key cannot carry their signature.
    issued = issue(key, iss=SigningKey.generate().did_key)
    reject(issued.jws, None, "E_INVALID_SIGNATURE")


def test_https_issuer_needs_a_key(key: SigningKey) -> None:
    reject(issue(key).jws, None, "E_KEY_NOT_FOUND")


def test_other_did_methods_are_not_resolved(key: SigningKey) -> None:
    reject(issue(key, iss="did:web:example.com").jws, None, "E_DID_UNSUPPORTED_METHOD")


# --- tampering and keys ----------------------------------------------------------------------------


def test_tampered_payload_fails_signature(key: SigningKey) -> None:
    header, payload, signature = issue(key).jws.split(".")
    claims = json.loads(b64url_decode(payload))
    claims["extensions"]["org.peacprotocol/commerce"]["amount_minor"] = "1"
    forged = f"{header}.{b64url_encode(serialize_json(claims))}.{signature}"
    reject(forged, key.public_key, "E_INVALID_SIGNATURE")


def test_tampered_signature_fails(key: SigningKey) -> None:
    header, payload, signature = issue(key).jws.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[10] ^= 0x80
    reject(f"{header}.{payload}.{b64url_encode(bytes(raw))}", key.public_key, "E_INVALID_SIGNATURE")


def test_wrong_key_fails(key: SigningKey) -> None:
    reject(issue(key).jws, SigningKey.generate().public_key, "E_INVALID_SIGNATURE")


def test_public_key_must_be_32_bytes(key: SigningKey) -> None:
    reject(issue(key).jws, key.public_key[:31], "E_INVALID_FORMAT")


def test_jwks_selects_by_kid(key: SigningKey) -> None:
    other = SigningKey.generate()
    jwks = parse_jwks(json.dumps(jwks_document([other, key])))
    assert verify_receipt(issue(key).jws, jwks, now=NOW).kid == key.kid
    reject(issue(key).jws, parse_jwks(json.dumps(jwks_document([other]))), "E_KEY_NOT_FOUND")


def test_revoked_kid_is_refused(key: SigningKey) -> None:
    reject(issue(key).jws, key.public_key, "E_REVOKED_KEY_USED", revoked_kids={key.kid})


def test_padded_and_noncanonical_base64url_refused(key: SigningKey) -> None:
    header, payload, signature = issue(key).jws.split(".")
    reject(f"{header}.{payload}.{signature}==", key.public_key, "E_INVALID_FORMAT")
    # The last character of a 64-byte signature carries 2 bits; setting an unused bit re-spells the
    # same bytes, which would give one signature two receipt_refs.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    respelled = signature[:-1] + alphabet[last | 1]
    assert b64url_decode(signature) is not None
    reject(f"{header}.{payload}.{respelled}", key.public_key, "E_INVALID_FORMAT")


# --- kid rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kid", "valid"),
    [("k", True), ("é" * 128, True), ("é" * 128 + "x", False), ("", False), ("\ud800x", False)],
)
def test_kid_is_1_to_256_utf8_bytes(key: SigningKey, kid: str, valid: bool) -> None:
    header = {"typ": "interaction-record+jwt", "alg": "EdDSA", "kid": kid}
    raw_header = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode()
    jws = sign_compact(raw_header, serialize_json(payment()), key.sign)
    if valid:
        assert verify_receipt(jws, key.public_key, now=NOW).kid == kid
    elif "\ud800" in kid:
        reject(jws, key.public_key, "E_IJSON_INVALID_STRING")  # the gate sees it first
    else:
        reject(jws, key.public_key, "E_JWS_MISSING_KID")


def test_signing_key_refuses_bad_kid() -> None:
    with pytest.raises(ConfigError):
        SigningKey.generate("x" * 257)
    with pytest.raises(ConfigError):
        SigningKey.generate("")


def test_default_kid_is_the_rfc7638_thumbprint(key: SigningKey) -> None:
    from farebox.receipts import jwk_thumbprint

    assert key.kid == jwk_thumbprint(key.public_key)
    assert len(key.kid) == 43


# --- time ------------------------------------------------------------------------------------------


def test_iat_in_the_future_is_not_yet_valid(key: SigningKey) -> None:
    jws = issue(key, iat=NOW + 301, occurred_at=None).jws
    reject(jws, key.public_key, "E_NOT_YET_VALID")
    assert verify_receipt(jws, key.public_key, now=NOW + 1).claims["iat"] == NOW + 301
    reject(jws, key.public_key, "E_NOT_YET_VALID", max_clock_skew=0, now=NOW + 300)


def test_occurred_at_in_the_future_is_refused(key: SigningKey) -> None:
    jws = issue(key, occurred_at=rfc3339(NOW + 301)).jws
    reject(jws, key.public_key, "E_OCCURRED_AT_FUTURE")


def test_occurred_at_after_iat_is_a_warning(key: SigningKey) -> None:
    jws = issue(key, occurred_at=rfc3339(NOW + 10)).jws
    result = verify_receipt(jws, key.public_key, now=NOW)
    assert [(w.code, w.pointer) for w in result.warnings] == [("occurred_at_skew", "/occurred_at")]


# --- issuer, subject, version ----------------------------------------------------------------------


def test_expected_issuer_and_subject(key: SigningKey) -> None:
    jws = issue(key).jws
    assert verify_receipt(jws, key.public_key, now=NOW, issuer="https://api.example.com")
    reject(jws, key.public_key, "E_INVALID_ISSUER", issuer="https://api.example.com:8443")
    reject(jws, key.public_key, "E_INVALID_SUBJECT", subject="https://api.example.com/other")


def test_wire01_record_is_unsupported(key: SigningKey) -> None:
    header = serialize_json({"typ": "peac-receipt/0.1", "alg": "EdDSA", "kid": key.kid})
    payload = serialize_json({"iss": "https://a.example", "aud": "https://b.example", "iat": NOW})
    reject(sign_compact(header, payload, key.sign), key.public_key, "E_UNSUPPORTED_WIRE_VERSION")


def test_missing_typ_strict_error_interop_warning(key: SigningKey) -> None:
    header = serialize_json({"alg": "EdDSA", "kid": key.kid})
    jws = sign_compact(header, serialize_json(payment()), key.sign)
    reject(jws, key.public_key, "E_INVALID_FORMAT")
    result = verify_receipt(jws, key.public_key, now=NOW, strictness="interop")
    assert [w.code for w in result.warnings] == ["typ_missing"]


def test_media_type_typ_is_accepted(key: SigningKey) -> None:
    header = serialize_json(
        {"typ": "application/interaction-record+jwt", "alg": "EdDSA", "kid": "k"}
    )
    jws = sign_compact(header, serialize_json(payment()), key.sign)
    assert verify_receipt(jws, key.public_key, now=NOW).warnings == ()


def test_first_failure_wins(key: SigningKey) -> None:
    # An embedded jwk (step 3) and a bad signature (step 5): the header check reports first.
    header = serialize_json(
        {"typ": "interaction-record+jwt", "alg": "EdDSA", "kid": "k", "jku": "x"}
    )
    jws = sign_compact(header, serialize_json(payment()), key.sign)
    reject(jws, SigningKey.generate().public_key, "E_JWS_EMBEDDED_KEY")
    # A bad signature (step 5) on claims with a non-canonical iss (step 7): the signature first.
    bad_iss = {**payment(), "iss": "https://API.example.com"}
    jws = sign_compact(serialize_json({"typ": "interaction-record+jwt", "alg": "EdDSA", "kid": "k"}),
                       serialize_json(bad_iss), key.sign)  # fmt: skip
    reject(jws, SigningKey.generate().public_key, "E_INVALID_SIGNATURE")
    err = reject(jws, key.public_key, "E_INVALID_FORMAT")
    assert err.details["rule"] == "E_ISS_NOT_CANONICAL"
    assert err.details["pointer"] == "/iss"


# --- the issuer's own gate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extension", "code"),
    [
        ({"n": 2**53}, "E_IJSON_NUMBER_OUT_OF_RANGE"),
        ({"n": 1e16}, "E_IJSON_NUMBER_OUT_OF_RANGE"),
        ({"s": "\ud800"}, "E_IJSON_INVALID_STRING"),
        ({"s": "\ufdd0"}, "E_IJSON_INVALID_STRING"),
        ({"s": "\U0010ffff"}, "E_IJSON_INVALID_STRING"),
        ({1: "a", "1": "b"}, "E_IJSON_DUPLICATE_MEMBER_NAME"),
        ({"n": float("nan")}, "E_INVALID_FORMAT"),
        ({"x": object()}, "E_INVALID_FORMAT"),
    ],
)
def test_issue_refuses_what_the_ijson_gate_rejects(
    key: SigningKey, extension: dict[Any, Any], code: str
) -> None:
    claims = payment()
    claims["extensions"]["com.example/data"] = extension
    with pytest.raises(ReceiptError) as err:
        issue_receipt(claims, key)
    assert err.value.code == code


def test_issue_refuses_bad_claims(key: SigningKey) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        (payment(iss="http://127.0.0.1:8402"), "E_ISS_NOT_CANONICAL"),
        (payment(iss="https://api.example.com/"), "E_ISS_NOT_CANONICAL"),
        ({**payment(), "aud": "https://x.example"}, "E_INVALID_FORMAT"),
        ({**payment(), "exp": NOW}, "E_INVALID_FORMAT"),
        (payment(amount_minor="0.25"), "E_INVALID_FORMAT"),
        (payment(env="prod"), "E_INVALID_FORMAT"),
        ({**payment(), "pillars": ["identity", "commerce"]}, "E_INVALID_FORMAT"),
        (
            build_claims(kind="evidence", type="org.peacprotocol/payment", iss="https://a.example",
                         iat=NOW, jti="j"),
            "E_EXTENSION_GROUP_REQUIRED",
        ),
    ]  # fmt: skip
    for claims, code in cases:
        with pytest.raises(ReceiptError) as err:
            issue_receipt(claims, key)
        assert err.value.code == code, claims


def test_amount_minor_is_never_a_bool() -> None:
    with pytest.raises(ConfigError):
        payment(amount_minor=True)


def test_programming_mistakes_are_config_errors(key: SigningKey) -> None:
    jws = issue(key).jws
    with pytest.raises(ConfigError):
        verify_receipt(jws, bytearray(key.public_key), now=NOW)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        verify_receipt(jws, key.public_key, now=NOW, strictness="lenient")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        issue_receipt(payment(), key, strictness="loose")  # type: ignore[arg-type]


def test_oversized_record_is_refused(key: SigningKey) -> None:
    claims = payment()
    claims["extensions"]["com.example/blob"] = {"a": "x" * 40_000, "b": "y" * 40_000}
    with pytest.raises(ReceiptError) as err:
        issue_receipt(claims, key)
    assert err.value.details["rule"] == "E_EXTENSION_SIZE_EXCEEDED"


def test_kernel_constraints_on_verify(key: SigningKey) -> None:
    deep: Any = "leaf"
    for _ in range(40):
        deep = [deep]
    claims = {**payment(), "extensions": {"com.example/deep": {"d": deep}}}
    jws = sign_compact(
        serialize_json({"typ": "interaction-record+jwt", "alg": "EdDSA", "kid": "k"}),
        serialize_json(claims),
        key.sign,
    )
    err = reject(jws, key.public_key, "E_CONSTRAINT_VIOLATION")
    assert err.details["constraint"] == "MAX_NESTED_DEPTH"


# --- policy, uuid7, rfc3339 ------------------------------------------------------------------------


def test_policy_binding_three_states(key: SigningKey) -> None:
    policy = {"rule": "allow", "scope": ["read"]}
    digest = policy_digest(policy)
    assert digest == policy_digest({"scope": ["read"], "rule": "allow"})  # JCS ignores member order
    jws = issue(
        key, policy={"digest": digest, "uri": "https://api.example.com/.well-known/peac.txt"}
    ).jws
    assert (
        verify_receipt(jws, key.public_key, now=NOW, policy_digest=digest).policy_binding
        == "verified"
    )
    assert verify_receipt(jws, key.public_key, now=NOW).policy_binding == "unavailable"
    err = reject(jws, key.public_key, "E_POLICY_BINDING_FAILED", policy_digest=policy_digest({}))
    assert err.details["policy_uri"] == "https://api.example.com/.well-known/peac.txt"
    reject(jws, key.public_key, "E_INVALID_FORMAT", policy_digest="sha256:ABC")
    no_policy = issue(key).jws
    assert verify_receipt(
        no_policy, key.public_key, now=NOW, policy_digest=digest
    ).policy_binding == ("unavailable")


def test_uuid7_layout() -> None:
    value = uuid7(0x0123456789AB, bytes.fromhex("ffffffffffffffffffff"))
    assert value == "01234567-89ab-7fff-bfff-ffffffffffff"
    zero = uuid7(0, bytes(10))
    assert zero == "00000000-0000-7000-8000-000000000000"
    assert uuid7(1, None) != uuid7(1, None)  # default randomness comes from the CSPRNG
    with pytest.raises(ConfigError):
        uuid7(1, b"short")


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1735689600) == "2025-01-01T00:00:00Z"


def test_receipts_core_imports_no_io_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, farebox.receipts; "
        "bad = {'httpx', 'asyncio', 'anyio', 'typer', 'rich', 'starlette', 'requests', 'socket'}; "
        "print(sorted(bad & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

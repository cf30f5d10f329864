"""Cross-check: records farebox issues verify under the reference TypeScript packages.

``@peac/crypto`` ``verify()`` checks the JWS (header policy, I-JSON gate, PEAC Ed25519 profile) and
``@peac/schema`` ``parseReceiptClaims()`` the Wire 0.2 claim schema; ``js/peac_verify.mjs`` runs both
under node. The packages are pinned in ``js/package-lock.json`` and installed with ``npm ci``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from farebox.errors import ReceiptError
from farebox.receipts import (
    SigningKey,
    challenge_claims,
    issue_receipt,
    payment_claims,
    policy_digest,
    public_key_from_did_key,
    validate_claims,
    verify_receipt,
)
from farebox.receipts.jws import b64url_decode, b64url_encode, serialize_json
from tests.support.node import node_verify, run_node

pytestmark = pytest.mark.node

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "peac"
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z


def farebox_records(
    https_key: SigningKey, did_key: SigningKey
) -> list[tuple[str, Mapping[str, Any], bytes]]:
    payment = payment_claims(
        iss="https://api.example.com",
        iat=NOW,
        jti="01941c3a-6c00-7000-8000-000000000010",
        sub="https://api.example.com/v1/report/42",
        occurred_at="2025-12-31T23:59:58Z",
        payment_rail="x402",
        amount_minor=250000,
        currency="USDC",
        asset="eip155:8453/erc20:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        env="test",
        event="settlement",
        reference="0x" + "ab" * 32,
        policy={"digest": policy_digest({"rule": "allow", "scope": ["read"]})},
    )
    plain_http = payment_claims(
        iss=did_key.did_key,
        iat=NOW,
        jti="01941c3a-6c00-7000-8000-000000000011",
        sub="http://127.0.0.1:8402/report/é",
        payment_rail="x402",
        amount_minor="10000",
        currency="USDC",
        env="test",
    )
    challenge = challenge_claims(
        iss="https://api.example.com",
        iat=NOW,
        jti="01941c3a-6c00-7000-8000-000000000012",
        sub="https://api.example.com/v1/report/42",
        problem={
            "type": "https://www.peacprotocol.org/problems/payment-required",
            "title": "Payment Required",
            "status": 402,
            "detail": "0.25 USDC on eip155:8453 required",
        },
        resource="https://api.example.com/v1/report/42",
        action="GET",
        requirements={"rails": ["x402"], "amount_minor": "250000", "currency": "USDC"},
        policy={
            "digest": policy_digest({"rule": "allow", "scope": ["read"]}),
            "uri": "https://api.example.com/.well-known/peac.txt",
        },
    )
    out = []
    for claims, key in ((payment, https_key), (plain_http, did_key), (challenge, https_key)):
        issued = issue_receipt(claims, key)
        # Our own verifier first, so a disagreement below is the peer's view, not a broken record.
        assert (
            verify_receipt(issued.jws, None if key is did_key else key.public_key, now=NOW).warnings
            == ()
        )
        out.append((issued.jws, issued.claims, key.public_key))
    return out


def test_reference_packages_accept_farebox_records(node: str) -> None:
    https_key, did_key = SigningKey.generate(), SigningKey.generate()
    records = farebox_records(https_key, did_key)
    # The did:key record is verified with the key the DID names, as an agent would resolve it.
    assert public_key_from_did_key(records[1][1]["iss"]) == did_key.public_key
    results = node_verify(node, [(jws, key) for jws, _, key in records])
    for (_, claims, key), result in zip(records, results, strict=True):
        assert "error" not in result, result
        assert result["signature_valid"] is True
        kid = https_key.kid if key == https_key.public_key else did_key.kid
        assert result["header"] == {"typ": "interaction-record+jwt", "alg": "EdDSA", "kid": kid}
        assert result["payload"] == claims
        assert result["parse"] == {"ok": True, "wire_version": "0.2", "claims": claims}


def test_reference_packages_reject_tampered_records(node: str) -> None:
    key = SigningKey.generate()
    jws, claims, public_key = farebox_records(key, SigningKey.generate())[0]
    header, _, signature = jws.split(".")
    changed = json.loads(json.dumps(claims))
    changed["extensions"]["org.peacprotocol/commerce"]["amount_minor"] = "1"
    tampered_payload = f"{header}.{b64url_encode(serialize_json(changed))}.{signature}"
    raw_signature = bytearray(b64url_decode(signature))
    raw_signature[0] ^= 0x01
    tampered_signature = f"{header}.{jws.split('.')[1]}.{b64url_encode(bytes(raw_signature))}"
    other_key = SigningKey.generate().public_key
    results = node_verify(
        node,
        [(tampered_payload, public_key), (tampered_signature, public_key), (jws, other_key)],
    )
    assert [r.get("signature_valid") for r in results] == [False, False, False]


# Edge cases of the claim schema: each replaces members of a valid base claim set.
_SHA = "sha256:" + "a" * 64
_CHALLENGE = "org.peacprotocol/challenge"
SCHEMA_EDGES: dict[str, dict[str, Any]] = {
    **{
        f"iss {iss}": {"iss": iss}
        for iss in [
            "https://127.0.0.1:8443", "https://127.1", "https://[::1]", "https://[0:0:0:0:0:0:0:1]",
            "https://a_b.example", "https://a.example:0", "https://a.example:08443",
            "https://bücher.example", "https://a.example.", "https://a..example", "https://.",
            "https://a~b", "https://a.example:65536", "https://A.example", "https://1.2.3.4.",
            "https://0x7f.1", "https://[::ffff:102:304]", "did:KEY:abc", "did:key:ab\ncd",
            "did:a-b:x", "https://user@a.example", "https://a.example?x", "https://a.example#x",
        ]
    },
    "type uri": {"type": "x-y://anything goes"},
    "type upper domain": {"type": "Org.Example/x"},
    "type no dot": {"type": "example/x"},
    "occurred_at nanos": {"occurred_at": "2024-03-04T00:00:00.123456789+05:30"},
    "occurred_at no seconds": {"occurred_at": "2024-03-04T00:00Z"},
    "occurred_at feb 29 2023": {"occurred_at": "2023-02-29T00:00:00Z"},
    "occurred_at feb 29 2024": {"occurred_at": "2024-02-29T00:00:00Z"},
    "occurred_at lower t": {"occurred_at": "2024-03-04t00:00:00Z"},
    "policy extra member": {"policy": {"digest": _SHA, "x": 1}},
    "policy http uri": {"policy": {"digest": _SHA, "uri": "http://a.example"}},
    "mime with parameter": {"representation": {"content_type": "text/html; charset=utf-8"}},
    "mime without subtype": {"representation": {"content_type": "text"}},
    "content_length fraction": {"representation": {"content_length": 1.5}},
    "actor origin slash": {"actor": {"id": "a", "proof_type": "did", "origin": "https://a.example/"}},
    "actor origin path": {"actor": {"id": "a", "proof_type": "did", "origin": "https://a.example/x"}},
    "iat fraction": {"iat": 1.5},
    "iat bool": {"iat": True},
    "sub too long": {"sub": "x" * 2049},
    "purpose 256 non-ascii": {"purpose_declared": "é" * 256},
    "purpose 129 astral": {"purpose_declared": "😀" * 129},
    "extensions array": {"extensions": []},
    "extension segment upper": {"extensions": {"org.example/Data": {}}},
    "extension segment underscore": {"extensions": {"org.example/da_ta": {}}},
    "extension label ends in hyphen": {"extensions": {"org-.example/x": {}}},
    "problem type urn": {"kind": "challenge", "extensions": {_CHALLENGE: {
        "challenge_type": "custom", "problem": {"status": 400, "type": "urn:x:y"}}}},
    "problem type relative": {"kind": "challenge", "extensions": {_CHALLENGE: {
        "challenge_type": "custom", "problem": {"status": 400, "type": "/relative"}}}},
    "problem status fraction": {"kind": "challenge", "extensions": {_CHALLENGE: {
        "challenge_type": "custom", "problem": {"status": 400.5, "type": "https://x.example"}}}},
    "duration weeks and days": {"extensions": {"org.peacprotocol/consent": {
        "consent_basis": "x", "consent_status": "granted", "retention_period": "P1W2D"}}},
    "duration bare T": {"extensions": {"org.peacprotocol/consent": {
        "consent_basis": "x", "consent_status": "granted", "retention_period": "P1YT"}}},
    "withdrawal uri fragment": {"extensions": {"org.peacprotocol/consent": {
        "consent_basis": "x", "consent_status": "granted", "withdrawal_uri": "https://a.example/#x"}}},
    "spdx dangling and": {"extensions": {"org.peacprotocol/attribution": {
        "creator_ref": "x", "license_spdx": "MIT AND"}}},
    "spdx with exception": {"extensions": {"org.peacprotocol/attribution": {
        "creator_ref": "x", "license_spdx": "(MIT OR GPL-2.0+) WITH Classpath-exception-2.0"}}},
    "custody offset time": {"extensions": {"org.peacprotocol/provenance": {"source_type": "x",
        "custody_chain": [{"custodian": "a", "action": "b", "timestamp": "2024-01-01T00:00:00+01:00"}]}}},
    "unknown top-level member": {"foo": 1},
    "empty pillars": {"pillars": []},
}  # fmt: skip


def schema_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for path in sorted(VECTORS.glob("fixtures__wire-02__*.json")):
        for fixture in json.loads(path.read_text())["fixtures"]:
            claims = fixture["input"].get("claims")
            if claims and claims.get("peac_version") == "0.2":
                cases.append((f"{path.name}:{fixture['name']}", claims))
    base = {"peac_version": "0.2", "kind": "evidence", "type": "com.example/flow",
            "iss": "https://api.example.com", "iat": NOW, "jti": "edge"}  # fmt: skip
    cases.extend((name, {**base, **change}) for name, change in SCHEMA_EDGES.items())
    return cases


def test_claim_schema_agrees_with_reference_parser(node: str) -> None:
    cases = schema_cases()
    results = run_node(node, [{"claims": claims} for _, claims in cases])
    disagreements = []
    for (name, claims), result in zip(cases, results, strict=True):
        try:
            validate_claims(claims)
            ours = True
        except ReceiptError:
            ours = False
        if ours != result["parse"]["ok"]:
            disagreements.append((name, ours, result["parse"]))
    assert disagreements == []
    assert len(cases) > 200

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farebox.errors import PaymentError
from farebox.protocol.models import Challenge, Offer, Proof, Resource, Settlement
from farebox.protocol.x402 import (
    b64json_decode,
    b64json_encode,
    decode_challenge_header,
    decode_proof,
    decode_settlement,
    decode_v1_challenge,
    encode_challenge_header,
    encode_proof,
    encode_settlement,
    find_offer,
    v1_body,
)
from tests.support.strategies import offers

PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
OFFER = Offer("exact", "eip155:84532", 10000, USDC, PAY_TO, 300, {"name": "USDC", "version": "2"})
AUTH = {
    "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
    "to": PAY_TO,
    "value": "10000",
    "validAfter": "1740672089",
    "validBefore": "1740672154",
    "nonce": "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480",
}
PAYLOAD = {"signature": "0x" + "2d" * 65, "authorization": AUTH}


def b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


# The PAYMENT-REQUIRED the official Python server sent in the brief (§2.6), decoded.
OFFICIAL_402 = {
    "x402Version": 2,
    "error": "Payment required",
    "resource": {
        "url": "http://testserver/weather",
        "description": "Weather",
        "mimeType": "application/json",
    },
    "accepts": [
        {
            "scheme": "exact",
            "network": "eip155:84532",
            "asset": USDC,
            "amount": "10000",
            "payTo": PAY_TO,
            "maxTimeoutSeconds": 300,
            "extra": {"name": "USDC", "version": "2"},
        }
    ],
}


def test_reads_the_official_servers_challenge() -> None:
    challenge = decode_challenge_header(b64(OFFICIAL_402))
    assert challenge.accepts == (OFFER,)
    assert challenge.resource == Resource(
        "http://testserver/weather", "Weather", "application/json"
    )
    assert challenge.error == "Payment required"


def test_challenge_header_is_standard_padded_base64_of_camel_case_json() -> None:
    challenge = Challenge(
        Resource("http://testserver/weather", "Weather", "application/json"), (OFFER,)
    )
    header = encode_challenge_header(challenge)
    raw = base64.b64decode(header, validate=True)
    assert "-" not in header
    assert "_" not in header
    decoded = json.loads(raw)
    assert decoded == OFFICIAL_402
    assert isinstance(decoded["x402Version"], int)
    assert decode_challenge_header(header) == challenge


def test_v2_proof_round_trip_and_shape() -> None:
    proof = Proof(
        2, "exact", "eip155:84532", PAYLOAD, accepted=OFFER, resource=Resource("http://a/b")
    )
    header = encode_proof(proof)
    obj = json.loads(base64.b64decode(header))
    assert set(obj) == {"x402Version", "resource", "accepted", "payload"}  # nulls omitted
    assert obj["accepted"]["amount"] == "10000"
    assert decode_proof(header) == proof


def test_v1_proof_round_trip_uses_legacy_network_names() -> None:
    proof = Proof(1, "exact", "eip155:84532", PAYLOAD)
    header = encode_proof(proof)
    assert json.loads(base64.b64decode(header))["network"] == "base-sepolia"
    assert decode_proof(header) == proof


def test_v1_proof_from_the_spec_decodes() -> None:
    spec = {"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": PAYLOAD}
    proof = decode_proof(b64(spec))
    assert (proof.x402_version, proof.network, proof.accepted) == (1, "eip155:84532", None)


@pytest.mark.parametrize("version", [1, 2])
def test_settlement_round_trip(version: int) -> None:
    ok = Settlement(True, "eip155:84532", "0x" + "ab" * 32, payer=AUTH["from"])
    failed = Settlement(
        False,
        "eip155:84532",
        "",
        payer=AUTH["from"],
        error_reason="invalid_exact_evm_nonce_already_used",
    )
    for settlement in (ok, failed):
        header = encode_settlement(settlement, x402_version=version)
        obj = json.loads(base64.b64decode(header))
        assert "errorReason" not in obj if settlement.success else obj["errorReason"]
        assert obj["network"] == ("base-sepolia" if version == 1 else "eip155:84532")
        assert decode_settlement(header) == settlement


def test_pending_settlement_is_neither_success_nor_plain_failure() -> None:
    pending = Settlement(False, "eip155:84532", "0x" + "cd" * 32, error_reason="settlement_pending")
    decoded = decode_settlement(encode_settlement(pending))
    assert decoded.pending
    assert decoded.transaction == pending.transaction


def test_v1_body_and_back() -> None:
    challenge = Challenge(
        Resource("https://api.example.com/premium-data", "Premium", "application/json"), (OFFER,)
    )
    body = v1_body(challenge)
    assert body is not None
    assert body["x402Version"] == 1
    (accept,) = body["accepts"]
    assert accept["maxAmountRequired"] == "10000"
    assert accept["network"] == "base-sepolia"
    assert accept["resource"] == "https://api.example.com/premium-data"
    decoded = decode_v1_challenge(json.dumps(body).encode())
    assert decoded.accepts == (OFFER,)
    assert decoded.resource == challenge.resource


def test_v1_body_skips_networks_v1_cannot_name() -> None:
    devchain = Offer("exact", "eip155:131277322940537", 1, USDC, PAY_TO)
    assert v1_body(Challenge(Resource("http://x"), (devchain,))) is None
    mixed = v1_body(Challenge(Resource("http://x"), (devchain, OFFER)))
    assert mixed is not None
    assert len(mixed["accepts"]) == 1


# --- strictness ------------------------------------------------------------------------------------


def _proof_obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "x402Version": 2,
        "accepted": {
            "scheme": "exact",
            "network": "eip155:84532",
            "amount": "10000",
            "asset": USDC,
            "payTo": PAY_TO,
            "maxTimeoutSeconds": 300,
            "extra": {"name": "USDC", "version": "2"},
        },
        "payload": PAYLOAD,
    }
    for path, value in changes.items():
        target = obj
        *parents, last = path.split("__")
        for part in parents:
            target = target[part]
        if value is ...:
            del target[last]
        else:
            target[last] = value
    return obj


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"x402Version": "2"}, "invalid_x402_version"),
        ({"x402Version": True}, "invalid_x402_version"),
        ({"x402Version": 3}, "invalid_x402_version"),
        ({"x402Version": ...}, "invalid_x402_version"),
        ({"accepted": ...}, "invalid_payload"),
        ({"accepted": []}, "invalid_payload"),
        ({"payload": ...}, "invalid_payload"),
        ({"payload": "x"}, "invalid_payload"),
        ({"accepted__amount": 10000}, "invalid_payload"),
        ({"accepted__amount": "-1"}, "invalid_payload"),
        ({"accepted__amount": "1.5"}, "invalid_payload"),
        ({"accepted__amount": "010"}, "invalid_payload"),
        ({"accepted__amount": " 10"}, "invalid_payload"),
        ({"accepted__amount": "1e4"}, "invalid_payload"),
        ({"accepted__amount": str(2**256)}, "invalid_payload"),
        ({"accepted__amount": "٣"}, "invalid_payload"),
        ({"accepted__maxTimeoutSeconds": 0}, "invalid_payload"),
        ({"accepted__maxTimeoutSeconds": "300"}, "invalid_payload"),
        ({"accepted__maxTimeoutSeconds": 1.5}, "invalid_payload"),
        ({"accepted__maxTimeoutSeconds": True}, "invalid_payload"),
        ({"accepted__scheme": ""}, "invalid_payload"),
        ({"accepted__scheme": None}, "invalid_payload"),
        ({"accepted__network": "base"}, "invalid_network"),
        ({"accepted__payTo": 5}, "invalid_payload"),
        ({"accepted__asset": "x" * 5000}, "invalid_payload"),
        ({"accepted__extra": []}, "invalid_payload"),
        ({"resource": "http://x"}, "invalid_payload"),
    ],
)
def test_malformed_proofs_get_specific_codes(changes: dict[str, Any], code: str) -> None:
    with pytest.raises(PaymentError) as info:
        decode_proof(b64(_proof_obj(**changes)))
    assert info.value.code == code
    assert info.value.status in (400, 402)


def test_uint256_max_amount_is_accepted() -> None:
    proof = decode_proof(b64(_proof_obj(accepted__amount=str(2**256 - 1))))
    assert proof.accepted is not None
    assert proof.accepted.amount == 2**256 - 1


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        "not base64!",
        "eyJhIjoxfQ",  # {"a":1} without its padding
        "eyJhIjoxfQ===",
        base64.urlsafe_b64encode(b'{"x402Version":2,"a":"\xff\xfe>>>"}').decode(),
        base64.b64encode(b"[1, 2]").decode(),
        base64.b64encode(b'{"x402Version": 2,').decode(),
        base64.b64encode(b'{"x402Version": NaN}').decode(),
        base64.b64encode(b"\xff\xfe\xfd").decode(),
        base64.b64encode(b"[" * 5000 + b"]" * 5000).decode(),
    ],
)
def test_undecodable_headers_raise_payment_error(header: str) -> None:
    with pytest.raises(PaymentError) as info:
        decode_proof(header)
    assert info.value.code in ("invalid_payload", "invalid_x402_version", "payload_too_large")


def test_header_size_is_bounded_and_configurable() -> None:
    big = b64(_proof_obj(padding="x" * 9000))
    with pytest.raises(PaymentError) as info:
        decode_proof(big)
    assert info.value.code == "payload_too_large"
    assert decode_proof(big, max_bytes=20000).x402_version == 2


def test_b64json_round_trip_keeps_unicode() -> None:
    obj = {"description": "Météo ☂", "n": 1}
    assert b64json_decode(b64json_encode(obj)) == obj


# --- hypothesis: nothing but PaymentError escapes ------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
DECODERS = [decode_proof, decode_challenge_header, decode_settlement]


@settings(max_examples=300)
@given(st.text(max_size=400))
def test_random_text_raises_only_payment_error(text: str) -> None:
    for decode in DECODERS:
        with contextlib.suppress(PaymentError):
            decode(text)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_random_bytes_in_base64_raise_only_payment_error(raw: bytes) -> None:
    header = base64.b64encode(raw).decode()
    for decode in DECODERS:
        with contextlib.suppress(PaymentError):
            decode(header)


@settings(max_examples=300)
@given(json_values, st.sampled_from([1, 2]))
def test_random_json_raises_only_payment_error(value: Any, version: int) -> None:
    for obj in (
        value,
        {"x402Version": version, "accepted": value, "payload": value, "accepts": value},
    ):
        header = base64.b64encode(json.dumps(obj).encode()).decode()
        for decode in DECODERS:
            with contextlib.suppress(PaymentError):
                decode(header)
        with contextlib.suppress(PaymentError):
            decode_v1_challenge(json.dumps(obj).encode())


@given(st.lists(offers, min_size=1, max_size=4), st.text(max_size=30), st.text(max_size=30))
def test_challenges_round_trip(accepts: list[Offer], url: str, error: str) -> None:
    challenge = Challenge(
        Resource(url or "u", "d", "application/json"), tuple(accepts), error=error
    )
    assert decode_challenge_header(encode_challenge_header(challenge)) == challenge
    v1 = v1_body(challenge)
    assert v1 is not None
    assert decode_v1_challenge(v1).accepts == challenge.accepts


@given(offers, st.sampled_from([1, 2]))
def test_proofs_round_trip(offer: Offer, version: int) -> None:
    accepted = offer if version == 2 else None
    proof = Proof(version, offer.scheme, offer.network, PAYLOAD, accepted=accepted)
    assert decode_proof(encode_proof(proof)) == proof


# --- matching ---------------------------------------------------------------------------------------


def _v2(accepted: Offer) -> Proof:
    return Proof(2, accepted.scheme, accepted.network, PAYLOAD, accepted=accepted)


def test_find_offer_matches_exactly_with_case_insensitive_addresses() -> None:
    other = Offer(
        "exact", "eip155:8453", 10000, USDC, PAY_TO, 300, {"name": "USD Coin", "version": "2"}
    )
    lowered = Offer(
        "exact",
        "eip155:84532",
        10000,
        USDC.lower(),
        PAY_TO.upper().replace("0X", "0x"),
        300,
        {"name": "USDC", "version": "2", "client": "extra keys are fine"},
    )
    assert find_offer(_v2(lowered), [other, OFFER]) is OFFER


@pytest.mark.parametrize(
    "field_change",
    [
        {"amount": 9999},
        {"pay_to": "0x" + "11" * 20},
        {"asset": "0x" + "22" * 20},
        {"max_timeout_seconds": 60},
        {"network": "eip155:8453"},
        {"scheme": "upto"},
        {"extra": {"name": "USDC"}},
        {"extra": {"name": "USD Coin", "version": "2"}},
    ],
)
def test_find_offer_refuses_any_difference(field_change: dict[str, Any]) -> None:
    fields = {
        "scheme": OFFER.scheme,
        "network": OFFER.network,
        "amount": OFFER.amount,
        "asset": OFFER.asset,
        "pay_to": OFFER.pay_to,
        "max_timeout_seconds": OFFER.max_timeout_seconds,
        "extra": dict(OFFER.extra),
    }
    fields.update(field_change)
    with pytest.raises(PaymentError) as info:
        find_offer(_v2(Offer(**fields)), [OFFER])
    assert info.value.code == "invalid_payment_requirements"


def test_v1_proofs_match_on_scheme_and_network() -> None:
    proof = Proof(1, "exact", "eip155:84532", PAYLOAD)
    base = Offer("exact", "eip155:8453", 1, USDC, PAY_TO)
    assert find_offer(proof, [base, OFFER]) is OFFER
    with pytest.raises(PaymentError):
        find_offer(proof, [base])

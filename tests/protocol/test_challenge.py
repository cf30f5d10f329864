import base64
import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farebox.errors import PaymentError
from farebox.money import BASE_SEPOLIA_USDC
from farebox.protocol.challenge import read_challenge, render_challenge
from farebox.protocol.models import Challenge, Offer, Resource
from farebox.protocol.plain import decode_plain_body, plain_body
from tests.support.strategies import offers

PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
OFFER = Offer(
    "exact",
    "eip155:84532",
    10000,
    BASE_SEPOLIA_USDC.address,
    PAY_TO,
    300,
    {"name": "USDC", "version": "2"},
)
DEVCHAIN = Offer(
    "exact",
    "eip155:131277322940537",
    250,
    "0x" + "33" * 20,
    PAY_TO,
    60,
    {"name": "T", "version": "2"},
)
CHALLENGE = Challenge(
    Resource("https://api.example.com/weather", "Weather", "application/json"),
    (OFFER, DEVCHAIN),
    reference="ch_0123456789abcdef",
)


def test_one_challenge_renders_header_v1_keys_and_plain_body() -> None:
    rendered = render_challenge(CHALLENGE)
    headers = dict(rendered.headers)
    assert rendered.status == 402
    assert headers["cache-control"] == "no-store"
    assert headers["content-type"] == "application/json"
    v2 = json.loads(base64.b64decode(headers["PAYMENT-REQUIRED"]))
    assert v2["x402Version"] == 2
    assert len(v2["accepts"]) == 2
    body = json.loads(rendered.body)
    # The plain part, in display units.
    payment = body["payment"]
    assert (payment["protocol"], payment["amount"], payment["currency"]) == ("x402", "0.01", "USDC")
    assert payment["reference"] == "ch_0123456789abcdef"
    assert "PAYMENT-SIGNATURE" in payment["instructions"]
    assert [m["price"] for m in payment["methods"]] == ["0.01 USDC", "250 " + DEVCHAIN.asset]
    assert "0.01 USDC" in body["detail"]
    # The v1 part: only the offer on a network v1 can name.
    assert body["x402Version"] == 1
    assert [a["maxAmountRequired"] for a in body["accepts"]] == ["10000"]


def test_v1_keys_are_left_out_when_no_offer_has_a_v1_network() -> None:
    body = json.loads(render_challenge(Challenge(Resource("http://x/y"), (DEVCHAIN,))).body)
    assert "x402Version" not in body
    assert "accepts" not in body
    assert body["payment"]["methods"]


def test_each_form_reads_back_to_the_same_offers() -> None:
    rendered = render_challenge(CHALLENGE)
    headers = dict(rendered.headers)
    from_header = read_challenge(headers, b"")
    assert from_header.accepts == CHALLENGE.accepts
    from_v1 = read_challenge({}, rendered.body)
    assert from_v1.x402_version == 1
    assert from_v1.accepts == (OFFER,)
    body = json.loads(rendered.body)
    for key in ("x402Version", "accepts", "error"):
        del body[key]
    from_plain = read_challenge({}, json.dumps(body).encode())
    assert from_plain.accepts == CHALLENGE.accepts
    assert from_plain.reference == CHALLENGE.reference


def test_header_lookup_is_case_insensitive() -> None:
    headers = {k.lower(): v for k, v in render_challenge(CHALLENGE).headers}
    assert read_challenge(headers, b"").accepts == CHALLENGE.accepts


def test_a_broken_header_does_not_hide_a_readable_body() -> None:
    rendered = render_challenge(CHALLENGE)
    assert read_challenge({"PAYMENT-REQUIRED": "%%%"}, rendered.body).accepts == (OFFER,)


@pytest.mark.parametrize(
    ("headers", "body", "code"),
    [
        ({}, b"", "invalid_payload"),
        ({}, b"{}", "invalid_payload"),
        ({}, b"<html>pay me</html>", "invalid_payload"),
        ({"PAYMENT-REQUIRED": "%%%"}, b"", "invalid_payload"),
        ({}, b'{"payment": {"methods": []}}', "invalid_payload"),
        ({}, b'{"payment": {"methods": [{"protocol": "card"}]}}', "invalid_payload"),
        ({}, b" " * 70000, "payload_too_large"),
    ],
)
def test_unreadable_402s_raise_payment_error(
    headers: dict[str, str], body: bytes, code: str
) -> None:
    with pytest.raises(PaymentError) as info:
        read_challenge(headers, body)
    assert info.value.code == code


def test_plain_body_without_known_asset_shows_atomic_units() -> None:
    body = plain_body(Challenge(Resource("http://x"), (DEVCHAIN,)))
    assert body["payment"]["amount"] == "250"
    assert body["payment"]["currency"] == DEVCHAIN.asset
    assert "reference" not in body["payment"]
    assert decode_plain_body(body).accepts == (DEVCHAIN,)


# --- hypothesis: any 402 reads back, and nothing but PaymentError escapes ------------------------


@given(
    st.lists(offers, min_size=1, max_size=3), st.text(max_size=20), st.none() | st.text(max_size=20)
)
def test_plain_body_round_trip(accepts: list[Offer], url: str, reference: str | None) -> None:
    challenge = Challenge(Resource(url), tuple(accepts), reference=reference)
    decoded = decode_plain_body(json.loads(json.dumps(plain_body(challenge))))
    assert decoded.accepts == challenge.accepts
    assert decoded.reference == reference
    assert read_challenge({}, render_challenge(challenge).body).accepts


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["PAYMENT-REQUIRED", "payment-required", "x"]), st.text(max_size=60)
    ),
    st.binary(max_size=300),
)
def test_random_402s_raise_only_payment_error(headers: dict[str, str], body: bytes) -> None:
    with contextlib.suppress(PaymentError):
        read_challenge(headers, body)


@settings(max_examples=200)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    ["payment", "methods", "protocol", "x402Version", "accepts", "amount"]
                ),
                c,
                max_size=4,
            )
        ),
        max_leaves=15,
    )
)
def test_random_json_bodies_raise_only_payment_error(value: object) -> None:
    with contextlib.suppress(PaymentError):
        read_challenge({}, json.dumps(value).encode())

"""The MPP Payment scheme codec: round trips, strictness, the HMAC binding and interop with pympp."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import mpp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mpp._parsing import parse_authorization as mpp_parse_authorization
from mpp._parsing import parse_payment_receipt as mpp_parse_receipt
from mpp._parsing import parse_www_authenticate as mpp_parse_www_authenticate
from mpp.methods.stripe.client import OnChallengeParameters, StripeMethod

from farebox.errors import PaymentError
from farebox.protocol import mpp as fm

SECRET = b"farebox-test-secret"
REALM = "api.example.com"
NOW = 1_900_000_000
LATER = NOW + 300


def stripe_request(**changes: Any) -> fm.ChargeRequest:
    base = fm.ChargeRequest(
        amount=150,
        currency="usd",
        method_details=fm.StripeDetails("profile_test", ("card", "link")).to_json(),
    )
    return replace(base, **changes)


def issue(**changes: Any) -> fm.Challenge:
    kwargs: dict[str, Any] = {
        "realm": REALM,
        "method": "stripe",
        "request": stripe_request(),
        "expires": LATER,
        "description": "Premium data",
    }
    kwargs.update(changes)
    return fm.issue_challenge(SECRET, **kwargs)


def answer(challenge: fm.Challenge, spt: str = "spt_123") -> fm.Credential:
    return fm.Credential(challenge.echo(), {"spt": spt})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


# --- round trips -----------------------------------------------------------------------------------


def test_challenge_round_trip() -> None:
    challenge = issue(
        opaque={"order": "o-1"}, digest="sha-256=:abc=:", header="Payment-Authorization"
    )
    value = fm.render_www_authenticate(challenge)
    assert value.startswith('Payment id="')
    assert fm.parse_www_authenticate(value) == [challenge]


def test_request_wire_form_is_jcs_with_string_amount() -> None:
    challenge = issue()
    raw = base64.urlsafe_b64decode(challenge.request_b64 + "==")
    assert raw == (
        b'{"amount":"150","currency":"usd","methodDetails":{"networkId":"profile_test",'
        b'"paymentMethodTypes":["card","link"]}}'
    )
    details = fm.StripeDetails.from_request(challenge.request)
    assert details.network_id == "profile_test"
    assert details.payment_method_types == ("card", "link")


def test_expires_formats_and_reads() -> None:
    challenge = issue(expires=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert challenge.expires == "2030-01-02T03:04:05Z"
    assert challenge.expires_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert fm.parse_rfc3339("2030-01-02T05:04:05.123456789+02:00").timestamp() == pytest.approx(
        datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC).timestamp()
    )


def test_several_challenges_in_one_value_and_other_schemes_skipped() -> None:
    one, two = issue(), issue(method="tempo")
    joined = ", ".join(
        ['Bearer realm="x", error="invalid_token"', *fm.render_www_authenticate_lines([one, two])]
    )
    joined += ", Negotiate abc==, Basic"
    assert fm.parse_www_authenticate(joined) == [one, two]


def test_other_intents_are_skipped_and_unknown_params_ignored() -> None:
    value = fm.render_www_authenticate(issue())
    session = value.replace('intent="charge"', 'intent="session"')
    assert fm.parse_www_authenticate(session) == []
    extra = value + ', future="x", token=abc'
    assert len(fm.parse_www_authenticate(extra)) == 1


def test_credential_round_trip() -> None:
    credential = fm.Credential(issue().echo(), {"spt": "spt_1", "externalId": "o"}, "did:web:x")
    assert fm.parse_authorization(fm.render_authorization(credential)) == credential


def test_receipt_round_trip() -> None:
    receipt = fm.Receipt(
        method="stripe",
        reference="pi_123",
        timestamp=datetime(2026, 11, 22, 2, 42, 46, 412337, tzinfo=UTC),
        external_id="order-1",
        extensions={"extra": {"k": "v"}},
    )
    assert fm.parse_payment_receipt(fm.render_payment_receipt(receipt)) == receipt


def test_accept_payment() -> None:
    ranges = fm.parse_accept_payment("tempo/charge, stripe/charge;q=0.5, */session ; Q=0, tempo/*")
    assert ranges == (
        fm.PaymentRange("tempo", "charge"),
        fm.PaymentRange("stripe", "charge", 0.5),
        fm.PaymentRange("*", "session", 0.0),
        fm.PaymentRange("tempo", "*"),
    )
    assert fm.parse_accept_payment(fm.render_accept_payment(ranges)) == ranges


@pytest.mark.parametrize(
    "value",
    ["stripe", "stripe/charge;q=1.5", "stripe/charge;q=0.1234", "a/b, a/b", "s/c;v=1", "S/c"],
)
def test_accept_payment_malformed(value: str) -> None:
    with pytest.raises(PaymentError) as err:
        fm.parse_accept_payment(value)
    assert err.value.code == "invalid_payload"


def test_select_challenges() -> None:
    tempo, stripe = issue(method="tempo"), issue()
    ranges = fm.parse_accept_payment("tempo/charge;q=0.3, stripe/*;q=0.8")
    assert fm.select_challenges([tempo, stripe], ranges) == [stripe, tempo]
    refused = fm.parse_accept_payment("stripe/*, stripe/charge;q=0")
    assert fm.select_challenges([tempo, stripe], refused) == [tempo, stripe]
    assert fm.select_challenges([tempo, stripe], fm.parse_accept_payment("*/*, tempo/*;q=0")) == [
        stripe
    ]
    assert fm.select_challenges([tempo], None) == [tempo]


def test_problem_types() -> None:
    assert fm.problem_type(None) == "https://paymentauth.org/problems/payment-required"
    assert fm.problem_type("payment_expired").endswith("/payment-expired")
    assert fm.problem_type("invalid_payload").endswith("/malformed-credential")
    assert fm.problem_type("whatever").endswith("/verification-failed")


# --- binding ---------------------------------------------------------------------------------------


def test_binding_vector() -> None:
    # Recomputed independently from the draft's recipe.
    import hashlib
    import hmac

    request = b64url(b'{"amount":"1000","currency":"usd"}')
    message = f"r|stripe|charge|{request}|2030-01-01T00:00:00Z||".encode()
    expected = b64url(hmac.new(b"k", message, hashlib.sha256).digest())
    got = fm.challenge_id(
        b"k", realm="r", method="stripe", intent="charge", request=request,
        expires="2030-01-01T00:00:00Z",
    )  # fmt: skip
    assert got == expected


def test_verify_accepts_a_fresh_answer() -> None:
    challenge = issue(opaque={"a": "b"}, digest="sha-256=:x:")
    assert fm.verify_credential(SECRET, answer(challenge), NOW, realm=REALM) == challenge


@pytest.mark.parametrize(
    "slot", ["id", "realm", "method", "intent", "request", "expires", "digest", "opaque", "header"]
)
def test_any_changed_slot_breaks_the_binding(slot: str) -> None:
    challenge = issue(opaque={"a": "b"}, digest="sha-256=:x:", header="Payment-Authorization")
    echo = challenge.echo()
    other = {
        "id": "x" + echo.id[1:],
        "realm": "evil.example.com",
        "method": "tempo",
        "intent": "session",
        "request": issue(request=stripe_request(amount=1)).echo().request,
        "expires": "2099-01-01T00:00:00Z",
        "digest": None,
        "opaque": None,
        "header": None,
    }[slot]
    forged = fm.Credential(replace(echo, **{slot: other}), {"spt": "spt_1"})
    with pytest.raises(PaymentError) as err:
        fm.verify_credential(SECRET, forged, NOW)
    assert err.value.code == "invalid_challenge"


def test_description_is_not_bound() -> None:
    echo = replace(issue().echo(), description="something else")
    fm.verify_credential(SECRET, fm.Credential(echo, {"spt": "s"}), NOW)


def test_other_secret_realm_and_missing_expiry() -> None:
    credential = answer(issue())
    with pytest.raises(PaymentError, match="invalid_challenge"):
        fm.verify_credential(b"other", credential, NOW)
    with pytest.raises(PaymentError, match="another realm"):
        fm.verify_credential(SECRET, credential, NOW, realm="other.example.com")
    forever = answer(issue(expires=None))
    with pytest.raises(PaymentError, match="no expiry"):
        fm.verify_credential(SECRET, forever, NOW)
    fm.verify_credential(SECRET, forever, NOW, require_expires=False)


def test_expiry() -> None:
    credential = answer(issue())
    fm.verify_credential(SECRET, credential, LATER - 1)
    for now in (LATER, LATER + 1):
        with pytest.raises(PaymentError) as err:
            fm.verify_credential(SECRET, credential, now)
        assert err.value.code == "payment_expired"


def test_stripe_payload() -> None:
    challenge = issue(request=stripe_request(external_id="order-9"))
    good = fm.Credential(challenge.echo(), {"spt": "spt_1", "externalId": "order-9"})
    assert fm.read_stripe_payload(good, challenge) == fm.StripePayload("spt_1", "order-9")
    for payload in ({"spt": "spt_1"}, {"spt": "", "externalId": "order-9"}, {"spt": 5}):
        with pytest.raises(PaymentError, match="invalid_payload"):
            fm.read_stripe_payload(fm.Credential(challenge.echo(), payload), challenge)


# --- hostile input ---------------------------------------------------------------------------------


def _payment(**params: str) -> str:
    return "Payment " + ", ".join(f'{k}="{v}"' for k, v in params.items())


GOOD = {"id": "a", "realm": "r", "method": "stripe", "intent": "charge"}


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ('Payment id="a", id="b", realm="r", method="stripe", intent="charge", request="e30"', "invalid_payload"),
        (_payment(**GOOD), "invalid_payload"),
        (_payment(**{**GOOD, "id": ""}, request="e30"), "invalid_payload"),
        (_payment(**GOOD, request="e30="), "invalid_payload"),
        (_payment(**GOOD, request=b64url(b'{"currency":"usd","amount":"1"}')), "invalid_payload"),
        (_payment(**GOOD, request=b64url(b'{"amount":1,"currency":"usd"}')), "invalid_payload"),
        (_payment(**GOOD, request=b64url(b'{"amount":"01","currency":"usd"}')), "invalid_payload"),
        (_payment(**GOOD, request=b64url(b'{"amount":"-1","currency":"usd"}')), "invalid_payload"),
        (_payment(**GOOD, request="eyJ9"), "invalid_payload"),
        (_payment(**{**GOOD, "method": "Stripe"}, request="e30"), "invalid_payload"),
        (_payment(**GOOD, request=b64url(b'{"amount":"1","currency":"usd"}'), expires="tomorrow"), "invalid_payload"),
        ('Payment id="a\x01", realm="r"', "invalid_payload"),
        ('Payment id="unterminated', "invalid_payload"),
        ("Payment abc==", "invalid_payload"),
        ("Payment" + " " * 40_000, "payload_too_large"),
    ],
)  # fmt: skip
def test_www_authenticate_refuses(value: str, code: str) -> None:
    with pytest.raises(PaymentError) as err:
        fm.parse_www_authenticate(value)
    assert err.value.code == code


def _auth(obj: Any) -> str:
    return "Payment " + b64url(json.dumps(obj).encode())


ECHO = {"id": "a", "realm": "r", "method": "stripe", "intent": "charge", "request": "e30"}


@pytest.mark.parametrize(
    "value",
    [
        "Bearer abc",
        "Payment",
        "Payment abc=",
        "Payment a+b/",
        _auth([1]),
        _auth({"challenge": ECHO}),
        _auth({"challenge": ECHO, "payload": []}),
        _auth({"challenge": {**ECHO, "id": 1}, "payload": {}}),
        _auth({"challenge": {**ECHO, "method": "BAD"}, "payload": {}}),
        _auth({"challenge": ECHO, "payload": {}, "source": 7}),
        "Payment " + b64url(b'{"challenge":{},"challenge":{},"payload":{}}'),
        "Payment " + b64url(b'{"payload":NaN}'),
        "Payment " + b64url(b'{"payload":"\\ud800"}'),
        "Payment " + b64url(b"[" * 5000 + b"]" * 5000),
    ],
)
def test_authorization_refuses(value: str) -> None:
    with pytest.raises(PaymentError) as err:
        fm.parse_authorization(value)
    assert err.value.code == "invalid_payload"


def test_oversized_headers() -> None:
    with pytest.raises(PaymentError, match="payload_too_large"):
        fm.parse_authorization("Payment " + "A" * fm.MAX_AUTHORIZATION_BYTES)
    with pytest.raises(PaymentError, match="payload_too_large"):
        fm.parse_payment_receipt("A" * (fm.MAX_RECEIPT_BYTES + 1))
    with pytest.raises(PaymentError, match="payload_too_large"):
        fm.parse_accept_payment("a/b," * 2000)


@pytest.mark.parametrize(
    "body",
    [
        {"status": "failed", "method": "stripe", "timestamp": "2026-01-01T00:00:00Z", "reference": "x"},
        {"status": "success", "method": "stripe", "timestamp": "yesterday", "reference": "x"},
        {"status": "success", "method": "stripe", "timestamp": "2026-01-01T00:00:00Z"},
        {"status": "success", "method": "", "timestamp": "2026-01-01T00:00:00Z", "reference": "x"},
    ],
)  # fmt: skip
def test_receipt_refuses(body: dict[str, Any]) -> None:
    with pytest.raises(PaymentError, match="invalid_payload"):
        fm.parse_payment_receipt(b64url(json.dumps(body).encode()))


_HEADERISH = st.text(
    alphabet=st.sampled_from(list('Payment id=realm,"\\ =;/q*.0123456789abcAZ_-+\t\x00é\u2603')),
    max_size=200,
)


@settings(max_examples=400, deadline=None)
@given(value=st.one_of(_HEADERISH, st.text(max_size=200)))
def test_random_headers_raise_only_payment_error(value: str) -> None:
    for parse in (
        fm.parse_www_authenticate,
        fm.parse_authorization,
        fm.parse_payment_receipt,
        fm.parse_accept_payment,
    ):
        with contextlib.suppress(PaymentError):
            parse(value)


@settings(max_examples=200, deadline=None)
@given(data=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
))  # fmt: skip
def test_random_json_raises_only_payment_error(data: Any) -> None:
    encoded = b64url(json.dumps(data).encode())
    for value in (
        "Payment " + encoded,
        encoded,
        _auth({"challenge": data, "payload": {}}),
        _payment(**GOOD, request=encoded),
    ):
        for parse in (fm.parse_www_authenticate, fm.parse_authorization, fm.parse_payment_receipt):
            with contextlib.suppress(PaymentError):
                parse(value)
    try:
        cred = fm.parse_authorization(
            _auth({"challenge": {**ECHO, "request": encoded}, "payload": {}})
        )
        fm.verify_credential(SECRET, cred, NOW)
    except PaymentError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    amount=st.integers(min_value=0, max_value=10**30),
    description=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=30),
    external_id=st.none() | st.text(max_size=10),
)
def test_challenge_round_trip_property(
    amount: int, description: str, external_id: str | None
) -> None:
    challenge = issue(
        request=stripe_request(amount=amount, external_id=external_id), description=description
    )
    assert fm.parse_www_authenticate(fm.render_www_authenticate(challenge)) == [challenge]
    assert fm.verify_credential(SECRET, answer(challenge), NOW) == challenge


# --- interop with pympp 0.16.0 ---------------------------------------------------------------------


def test_pympp_reads_our_challenge() -> None:
    challenge = issue(
        description='caf\u00e9 \u2603 \U0001f600 "q" \\', opaque={"k": "v"}, digest="sha-256=:x:"
    )
    theirs = mpp_parse_www_authenticate(fm.render_www_authenticate(challenge))
    assert theirs.id == challenge.id
    assert theirs.realm == REALM
    assert theirs.method == "stripe"
    assert theirs.intent == "charge"
    assert theirs.request == challenge.request.to_json()
    assert theirs.request_b64 == challenge.request_b64
    assert theirs.expires == challenge.expires
    assert theirs.description == challenge.description
    assert theirs.opaque == {"k": "v"}
    assert theirs.digest == "sha-256=:x:"
    # pympp's own stateless check agrees with our id (secret as UTF-8 text on its side).
    assert theirs.verify(SECRET.decode(), REALM)


def test_we_read_pympps_challenge() -> None:
    theirs = mpp.Challenge.create(
        secret_key=SECRET.decode(),
        realm=REALM,
        method="stripe",
        intent="charge",
        request={
            "amount": "150",
            "currency": "usd",
            "externalId": "order-1",
            "methodDetails": {"networkId": "profile_x", "paymentMethodTypes": ["card"]},
        },
        expires="2031-01-01T00:00:00.000Z",
        description="d\u00e9j\u00e0 \u2603",
        meta={"a": "b"},
        header="Payment-Authorization",
    )
    [ours] = fm.parse_www_authenticate(theirs.to_www_authenticate(REALM))
    assert ours.id == theirs.id
    assert ours.request.amount == 150
    assert ours.request.external_id == "order-1"
    assert ours.expires == "2031-01-01T00:00:00.000Z"
    assert ours.description == theirs.description
    assert ours.opaque == {"a": "b"}
    assert ours.header == "Payment-Authorization"
    assert ours.request_b64 == theirs.request_b64
    # The id pympp issued verifies here.
    fm.verify_credential(SECRET, fm.Credential(ours.echo(), {"spt": "s"}), NOW)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"expires": "2030-01-01T00:00:00Z"},
        {"digest": "sha-256=:abc=:"},
        {"meta": {"x": "1", "y": "\u00e9"}},
        {"header": "Payment-Authorization", "meta": {"x": "1"}},
        {"header": "authorization", "expires": "2030-01-01T00:00:00Z"},
    ],
)
def test_challenge_id_equals_pympps(options: dict[str, Any]) -> None:
    request = {"amount": "1", "currency": "usd", "description": "\u00e9"}
    theirs = mpp.generate_challenge_id(
        secret_key="k\u00e9y",
        realm="r",
        method="stripe",
        intent="charge",
        request=request,
        expires=options.get("expires"),
        digest=options.get("digest"),
        opaque=options.get("meta"),
        header=options.get("header"),
    )
    meta = options.get("meta")
    ours = fm.challenge_id(
        "k\u00e9y".encode(),
        realm="r",
        method="stripe",
        intent="charge",
        request=fm.b64url_jcs(request),
        expires=options.get("expires"),
        digest=options.get("digest"),
        opaque=None if meta is None else fm.b64url_jcs(meta),
        header=options.get("header"),
    )
    assert ours == theirs


def test_we_read_pympps_credential_and_receipt() -> None:
    challenge = mpp.Challenge.create(
        secret_key=SECRET.decode(),
        realm=REALM,
        method="stripe",
        intent="charge",
        request={"amount": "150", "currency": "usd"},
        expires="2031-01-01T00:00:00Z",
    )
    credential = mpp.Credential(challenge.to_echo(), {"spt": "spt_1"}, source="did:key:z")
    ours = fm.parse_authorization(credential.to_authorization())
    assert ours.payload == {"spt": "spt_1"}
    assert ours.source == "did:key:z"
    fm.verify_credential(SECRET, ours, NOW)
    receipt = mpp.Receipt.success("pi_1", method="stripe", external_id="o-1")
    parsed = fm.parse_payment_receipt(receipt.to_payment_receipt())
    assert (parsed.reference, parsed.method, parsed.external_id) == ("pi_1", "stripe", "o-1")
    assert parsed.timestamp == receipt.timestamp


def test_pympp_reads_our_credential_and_receipt() -> None:
    credential = fm.Credential(issue(opaque={"a": "b"}).echo(), {"spt": "spt_1"}, "did:key:z")
    theirs = mpp_parse_authorization(fm.render_authorization(credential))
    assert theirs.challenge.id == credential.challenge.id
    assert theirs.challenge.request == credential.challenge.request
    assert theirs.challenge.opaque == credential.challenge.opaque
    assert theirs.payload == {"spt": "spt_1"}
    assert theirs.source == "did:key:z"
    receipt = fm.Receipt("stripe", "pi_1", datetime(2026, 1, 1, tzinfo=UTC), external_id="o")
    parsed = mpp_parse_receipt(fm.render_payment_receipt(receipt))
    assert (parsed.reference, parsed.method, parsed.external_id) == ("pi_1", "stripe", "o")
    assert parsed.timestamp == receipt.timestamp


def test_pympp_stripe_client_answers_our_challenge() -> None:
    challenge = issue(request=stripe_request(external_id="order-7"), opaque={"k": "v"})
    seen: list[OnChallengeParameters] = []

    async def create_token(params: OnChallengeParameters) -> str:
        seen.append(params)
        return "spt_from_agent"

    client = StripeMethod(create_token=create_token, payment_method="pm_card_visa")
    theirs = mpp.Challenge.from_www_authenticate(fm.render_www_authenticate(challenge))
    header = asyncio.run(client.create_credential(theirs)).to_authorization()

    credential = fm.parse_authorization(header)
    verified = fm.verify_credential(SECRET, credential, NOW, realm=REALM)
    assert verified == challenge
    assert fm.read_stripe_payload(credential, verified) == fm.StripePayload(
        "spt_from_agent", "order-7"
    )
    [params] = seen
    assert (params.amount, params.currency, params.network_id) == ("150", "usd", "profile_test")
    assert params.expires_at == LATER

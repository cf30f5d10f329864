"""farebox's Stripe ledger: Shared Payment Tokens against a fake, X-Receipt checks against localstripe.

Charges with Shared Payment Tokens, idempotent replays and refusals of over-refunds are tested
against ``fake_stripe`` (a FAKE that follows Stripe's documented API; Stripe cannot be reached from
here and localstripe has none of them). ``retrieve_paid`` is tested against localstripe, a real
implementation of the PaymentIntent and Refund calls it makes.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.fake_stripe import FakeStripe

stripe = pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")

from farebox.errors import ConfigError, PaymentError  # noqa: E402
from farebox.ledgers.stripe import (  # noqa: E402
    STRIPE_PREVIEW_VERSION,
    CardCharge,
    StripeLedger,
    idempotency_key_for,
)

pytestmark = [
    pytest.mark.anyio,
    # stripe 16.1's HTTPXClient hands httpx the form body as ``data=<bytes>``, which httpx 0.28
    # deprecates (DeprecationWarning); under "error" the library reports it as APIConnectionError.
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning"),
]

AMOUNT = 1234
CURRENCY = "usd"
REFERENCE = "fbx_ref_0001"
CHALLENGE = "x7Tg2pLqR9mKvNwY3hBcZa"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def async_client(api_key: str, url: str) -> tuple[Any, Any]:
    """A StripeClient whose async methods go over httpx to ``url``; no retries."""
    http_client = stripe.HTTPXClient()
    client = stripe.StripeClient(
        api_key, base_addresses={"api": url}, max_network_retries=0, http_client=http_client
    )
    return client, http_client


@pytest.fixture
async def fake_client(fake: FakeStripe, anyio_backend: str) -> AsyncIterator[Any]:
    client, http_client = async_client(fake.api_key, fake.url)
    yield client
    await http_client.close_async()


async def charge(ledger: StripeLedger, spt: str, **changes: Any) -> CardCharge:
    args: dict[str, Any] = {
        "spt": spt,
        "amount": AMOUNT,
        "currency": CURRENCY,
        "challenge_id": CHALLENGE,
        "metadata": {"farebox_reference": REFERENCE},
    }
    args.update(changes)
    return await ledger.charge(**args)


async def refused(code: str, call: Any) -> PaymentError:
    with pytest.raises(PaymentError) as caught:
        await call
    assert caught.value.code == code, caught.value
    return caught.value


# --- Shared Payment Tokens, against the fake ---------------------------------------------------


def test_idempotency_key_is_documented_hash() -> None:
    expected = hashlib.sha256(f"{CHALLENGE}\x00spt_succeeds".encode()).hexdigest()
    assert idempotency_key_for(CHALLENGE, "spt_succeeds") == "farebox_" + expected
    assert idempotency_key_for("a", "b_c") != idempotency_key_for("a_b", "c")


async def test_charge_succeeds_and_wire_request_field_by_field(
    fake: FakeStripe, fake_client: Any
) -> None:
    paid = await charge(StripeLedger(fake_client), "spt_succeeds")

    intent = fake.intents[paid.payment_intent]
    assert paid == CardCharge(
        payment_intent=intent["id"],
        amount=AMOUNT,
        currency=CURRENCY,
        status="succeeded",
        replayed=False,
        charge=intent["latest_charge"],
    )
    assert paid.charge is not None
    assert paid.charge.startswith("ch_")

    [request] = fake.requests
    assert (request.method, request.path, request.query) == ("POST", "/v1/payment_intents", ())
    assert request.fields == {
        "amount": str(AMOUNT),
        "currency": CURRENCY,
        "confirm": "true",
        "payment_method_types[0]": "card",
        "metadata[farebox_reference]": REFERENCE,
        "metadata[mpp_challenge_id]": CHALLENGE,
        "shared_payment_granted_token": "spt_succeeds",
    }
    assert len(request.form) == len(request.fields)  # no field sent twice
    assert request.headers["stripe-version"] == STRIPE_PREVIEW_VERSION == "2026-07-29.preview"
    key = "farebox_" + hashlib.sha256(f"{CHALLENGE}\x00spt_succeeds".encode()).hexdigest()
    assert request.headers["idempotency-key"] == key
    assert request.headers["authorization"] == f"Bearer {fake.api_key}"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"


async def test_charge_with_token_in_payment_method_data(fake: FakeStripe, fake_client: Any) -> None:
    fake.placement = "payment_method_data"
    ledger = StripeLedger(fake_client, spt_parameter="payment_method_data")
    paid = await charge(ledger, "spt_succeeds")
    assert paid.status == "succeeded"
    fields = fake.requests[0].fields
    assert fields["payment_method_data[shared_payment_granted_token]"] == "spt_succeeds"
    assert "shared_payment_granted_token" not in fields


async def test_token_placement_unknown_to_stripe_is_a_server_problem(
    fake: FakeStripe, fake_client: Any
) -> None:
    # The API version does not know the placement: farebox's configuration, not the payer's token.
    fake.placement = "payment_method_data"
    error = await refused("ledger_unavailable", charge(StripeLedger(fake_client), "spt_succeeds"))
    assert error.status == 503


@pytest.mark.parametrize(
    ("spt", "detail"),
    [("spt_declines", "card_declined/generic_decline"), ("spt_insufficient_funds_1", "funds")],
)
async def test_declined_card(fake_client: Any, spt: str, detail: str) -> None:
    error = await refused("card_declined", charge(StripeLedger(fake_client), spt))
    assert error.status == 402
    assert detail in error.message


@pytest.mark.parametrize("spt", ["spt_expired", "spt_unknown_to_stripe"])
async def test_expired_or_unknown_token(fake_client: Any, spt: str) -> None:
    error = await refused("card_token_invalid", charge(StripeLedger(fake_client), spt))
    assert error.status == 402
    assert spt not in error.message


async def test_token_used_for_another_challenge_is_refused(fake_client: Any) -> None:
    ledger = StripeLedger(fake_client)
    await charge(ledger, "spt_succeeds_once")
    await refused("card_token_invalid", charge(ledger, "spt_succeeds_once", challenge_id="other"))


async def test_authentication_needed(fake_client: Any) -> None:
    await refused("card_action_required", charge(StripeLedger(fake_client), "spt_requires_action"))


async def test_replay_is_flagged(fake: FakeStripe, fake_client: Any) -> None:
    ledger = StripeLedger(fake_client)
    first = await charge(ledger, "spt_succeeds")
    second = await charge(ledger, "spt_succeeds")
    assert first.replayed is False
    assert second.replayed is True
    assert second.payment_intent == first.payment_intent
    assert second.charge == first.charge
    assert len(fake.intents) == 1  # charged once
    keys = [r.headers["idempotency-key"] for r in fake.requests]
    assert keys[0] == keys[1] == idempotency_key_for(CHALLENGE, "spt_succeeds")


async def test_same_challenge_and_token_with_other_terms(fake_client: Any) -> None:
    ledger = StripeLedger(fake_client)
    await charge(ledger, "spt_succeeds")
    error = await refused("idempotency_conflict", charge(ledger, "spt_succeeds", amount=1))
    assert error.status == 409


@pytest.mark.parametrize("spt", ["", "pm_card_visa", "spt_", "spt_a/../b", "spt_" + "a" * 300])
async def test_malformed_token_is_not_sent(fake: FakeStripe, fake_client: Any, spt: str) -> None:
    await refused("invalid_payload", charge(StripeLedger(fake_client), spt))
    assert fake.requests == []


async def test_bad_metadata_is_a_config_error(fake: FakeStripe, fake_client: Any) -> None:
    ledger = StripeLedger(fake_client)
    with pytest.raises(ConfigError):
        await charge(ledger, "spt_succeeds", metadata={"mpp_challenge_id": "someone-else"})
    with pytest.raises(ConfigError):
        await charge(ledger, "spt_succeeds", metadata={"a[b]": "c"})
    with pytest.raises(ConfigError):
        await charge(ledger, "spt_succeeds", currency="dollars")
    assert fake.requests == []


async def test_wrong_api_key_is_unavailable_and_not_leaked(fake: FakeStripe) -> None:
    key = "sk_test_wrong_key_0123456789"
    client, http_client = async_client(key, fake.url)
    try:
        error = await refused("ledger_unavailable", charge(StripeLedger(client), "spt_succeeds"))
    finally:
        await http_client.close_async()
    assert error.status == 503
    assert "0123456789" not in str(error)
    assert "spt_succeeds" not in str(error)


async def test_network_error_is_unavailable_and_not_leaked() -> None:
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    key = "sk_test_secret_0123456789"
    client, http_client = async_client(key, url)
    try:
        error = await refused("ledger_unavailable", charge(StripeLedger(client), "spt_succeeds"))
    finally:
        await http_client.close_async()
    assert error.status == 503
    assert "0123456789" not in str(error)
    assert url not in str(error)
    assert "127.0.0.1" not in str(error)


async def test_retrieve_paid_with_real_stripe_shapes(fake: FakeStripe, fake_client: Any) -> None:
    # The fake, like Stripe, returns latest_charge as an id unless expanded and has amount_received.
    ledger = StripeLedger(fake_client)
    paid = await charge(ledger, "spt_succeeds")
    got = await ledger.retrieve_paid(
        paid.payment_intent, amount=AMOUNT, currency=CURRENCY, reference=REFERENCE
    )
    assert got == paid
    lookup = fake.requests[-1]
    assert (lookup.method, lookup.path) == ("GET", f"/v1/payment_intents/{paid.payment_intent}")
    assert lookup.query == (("expand[0]", "latest_charge"),)
    assert lookup.headers["stripe-version"] == STRIPE_PREVIEW_VERSION


async def test_refunds_and_over_refunds(fake: FakeStripe, fake_client: Any) -> None:
    ledger = StripeLedger(fake_client)
    paid = await charge(ledger, "spt_succeeds")
    part = await ledger.refund(paid.payment_intent, 200, idempotency_key="refund-1")
    assert (part.amount, part.currency, part.status) == (200, CURRENCY, "succeeded")
    assert part.payment_intent == paid.payment_intent
    assert part.refund.startswith("re_")
    request = fake.posts("/v1/refunds")[0]
    assert request.fields == {"payment_intent": paid.payment_intent, "amount": "200"}
    assert request.headers["idempotency-key"] == "refund-1"
    assert request.headers["stripe-version"] == STRIPE_PREVIEW_VERSION

    again = await ledger.refund(paid.payment_intent, 200, idempotency_key="refund-1")
    assert again == part  # the same refund, not a second one
    too_much = await refused("refund_refused", ledger.refund(paid.payment_intent, AMOUNT))
    assert "amount_too_large" in too_much.message
    await refused(
        "card_payment_refunded",
        ledger.retrieve_paid(
            paid.payment_intent, amount=AMOUNT, currency=CURRENCY, reference=REFERENCE
        ),
    )
    rest = await ledger.refund(paid.payment_intent)
    assert rest.amount == AMOUNT - 200
    done = await refused("refund_refused", ledger.refund(paid.payment_intent))
    assert "charge_already_refunded" in done.message
    await refused("card_payment_not_found", ledger.refund("pi_doesnotexist0000"))
    await refused("invalid_payload", ledger.refund("ch_123456789"))


def test_bad_configuration(fake_client: Any) -> None:
    with pytest.raises(ConfigError):
        StripeLedger(fake_client, spt_parameter="shared_payment_token")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        StripeLedger(fake_client, payment_method_types="card")


# --- X-Receipt, against localstripe --------------------------------------------------------------


@pytest.fixture
async def ledger(localstripe: Any, stripe_client: Any, anyio_backend: str) -> AsyncIterator[Any]:
    """A ledger on localstripe (cleared by ``stripe_client``, which the tests also use to pay)."""
    from tests.support.localstripe import API_KEY

    client, http_client = async_client(API_KEY, localstripe.url)
    yield StripeLedger(client)
    await http_client.close_async()


def pay(client: Any, *, confirm: bool = True, reference: str = REFERENCE) -> Any:
    params: dict[str, Any] = {
        "amount": AMOUNT,
        "currency": CURRENCY,
        "payment_method_types": ["card"],
        "metadata": {"farebox_reference": reference},
    }
    if confirm:
        params.update(payment_method="pm_card_visa", confirm=True)
    return client.v1.payment_intents.create(params=params)


async def retrieve(ledger: StripeLedger, intent_id: str, **changes: Any) -> CardCharge:
    args: dict[str, Any] = {"amount": AMOUNT, "currency": CURRENCY, "reference": REFERENCE}
    args.update(changes)
    return await ledger.retrieve_paid(intent_id, **args)


async def test_receipt_accepted(ledger: StripeLedger, stripe_client: Any) -> None:
    intent = pay(stripe_client)
    got = await retrieve(ledger, intent.id)
    assert got == CardCharge(
        payment_intent=intent.id,
        amount=AMOUNT,
        currency=CURRENCY,
        status="succeeded",
        replayed=False,
        charge=intent.latest_charge.id,
    )


@pytest.mark.parametrize(
    "changes",
    [{"amount": AMOUNT + 1}, {"amount": AMOUNT - 1}, {"currency": "eur"}, {"reference": "other"}],
    ids=["more", "less", "currency", "reference"],
)
async def test_receipt_for_something_else(
    ledger: StripeLedger, stripe_client: Any, changes: dict[str, Any]
) -> None:
    intent = pay(stripe_client)
    await refused("card_payment_mismatch", retrieve(ledger, intent.id, **changes))


async def test_receipt_without_reference(ledger: StripeLedger, stripe_client: Any) -> None:
    intent = stripe_client.v1.payment_intents.create(
        params={
            "amount": AMOUNT,
            "currency": CURRENCY,
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    )
    await refused("card_payment_mismatch", retrieve(ledger, intent.id))


async def test_receipt_not_succeeded(ledger: StripeLedger, stripe_client: Any) -> None:
    intent = pay(stripe_client, confirm=False)
    assert intent.status != "succeeded"
    await refused("card_payment_failed", retrieve(ledger, intent.id))


@pytest.mark.parametrize("amount", [None, 1], ids=["full", "partial"])
async def test_receipt_refunded(
    ledger: StripeLedger, stripe_client: Any, amount: int | None
) -> None:
    intent = pay(stripe_client)
    params: dict[str, Any] = {"payment_intent": intent.id}
    if amount is not None:
        params["amount"] = amount
    stripe_client.v1.refunds.create(params=params)
    await refused("card_payment_refunded", retrieve(ledger, intent.id))


async def test_refund_through_the_ledger_on_localstripe(
    ledger: StripeLedger, stripe_client: Any
) -> None:
    intent = pay(stripe_client)
    refund = await ledger.refund(intent.id)
    assert (refund.amount, refund.status) == (AMOUNT, "succeeded")
    await refused("card_payment_refunded", retrieve(ledger, intent.id))


async def test_receipt_unknown(ledger: StripeLedger) -> None:
    await refused("card_payment_not_found", retrieve(ledger, "pi_doesnotexist0000"))


@pytest.mark.parametrize(
    "intent_id",
    ["", "pi_", "pi_short", "ch_1234567890", "pi_12345678/../../v1/balance", "pi_1234567890?x=1"],
)
async def test_receipt_malformed(ledger: StripeLedger, intent_id: str) -> None:
    await refused("invalid_payload", retrieve(ledger, intent_id))

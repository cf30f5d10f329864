"""Contract smoke tests: what farebox's Stripe rail may rely on, against localstripe 1.15.10.

Each test is a real call through ``stripe.StripeClient`` to a local localstripe (see conftest.py).
Where localstripe differs from the real Stripe API, the test pins localstripe's current behaviour
and says how Stripe differs, so farebox code and its tests do not lean on a gap by accident:

* PaymentIntent has no ``amount_received``; ``latest_charge`` comes back as a whole Charge
  object, not an id; ``payment_method`` echoes the test id (``pm_card_visa``), unresolved.
* Declines are ``CardError`` (402, code ``card_declined``) but with error type
  ``invalid_request_error`` (Stripe: ``card_error``), no ``decline_code``, no ``payment_intent``.
  Of Stripe's test PaymentMethods only ``pm_card_chargeCustomerFail`` declines;
  ``pm_card_visa_chargeDeclined`` succeeds and ``pm_card_chargeDeclined`` is unknown (404).
* Refunds are never limited: over-refunds and refunds of a fully refunded charge succeed
  (Stripe rejects both with a 400 ``invalid_request_error``).
* ``Idempotency-Key`` is ignored: the same key twice makes two objects, no ``Idempotent-Replayed``.
* No Shared Payment Tokens, Checkout Sessions or Disputes; unknown routes answer a plain-text
  404 that the client raises as ``APIError``; unknown parameters are a 400 ``Unexpected <name>``;
  confirming with a ``payment_method`` is a 500 ``Not implemented``.
"""

from __future__ import annotations

from typing import Any

import pytest

stripe = pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")

AMOUNT = 1234
CURRENCY = "usd"
REFERENCE = "fbx_ref_0001"


def pay(client: Any, *, payment_method: str = "pm_card_visa", **options: Any) -> Any:
    """A PaymentIntent created and confirmed in one call, as farebox's server will."""
    return client.v1.payment_intents.create(
        params={
            "amount": AMOUNT,
            "currency": CURRENCY,
            "payment_method": payment_method,
            "confirm": True,
            "metadata": {"farebox_reference": REFERENCE},
        },
        options=options or None,
    )


def charge_of(intent: Any) -> Any:
    """The PaymentIntent's charge, whether it came as an id (Stripe) or inline (localstripe)."""
    latest = intent.latest_charge
    return latest if not isinstance(latest, str) else None


# Payments


def test_confirmed_payment_intent_round_trip(stripe_client: Any) -> None:
    created = pay(stripe_client)
    assert created.id.startswith("pi_")
    assert created.status == "succeeded"

    got = stripe_client.v1.payment_intents.retrieve(created.id)
    assert got.id == created.id
    assert got.status == "succeeded"
    assert got.amount == AMOUNT
    assert got.currency == CURRENCY
    assert got.metadata.to_dict() == {"farebox_reference": REFERENCE}
    assert got.capture_method == "automatic_async"
    assert got.last_payment_error is None

    # Not Stripe's shape: no amount_received; the charge is inline, not an id.
    assert "amount_received" not in got
    assert got.payment_method == "pm_card_visa"
    charge = charge_of(got)
    assert charge is not None
    assert charge.id.startswith("ch_")
    assert (charge.amount, charge.currency, charge.payment_intent) == (AMOUNT, CURRENCY, got.id)
    assert charge.paid is True
    assert charge.captured is True
    assert charge.status == "succeeded"
    assert (charge.amount_refunded, charge.refunded) == (0, False)
    assert "disputed" not in charge  # Stripe has Charge.disputed; localstripe has no disputes

    same = stripe_client.v1.charges.retrieve(charge.id)
    assert same.payment_intent == got.id


def test_store_is_cleared_between_tests(stripe_client: Any, localstripe: Any) -> None:
    intent = pay(stripe_client)
    assert len(stripe_client.v1.payment_intents.list().data) == 1
    localstripe.clear()
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.payment_intents.retrieve(intent.id)
    assert caught.value.http_status == 404


def test_unknown_payment_intent_is_404(stripe_client: Any) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.payment_intents.retrieve("pi_doesnotexist0000")
    error = caught.value
    assert error.http_status == 404
    assert error.error is not None
    assert error.error.type == "invalid_request_error"
    assert error.error.message == "Not Found"
    assert error.code is None  # Stripe: code "resource_missing", param "intent"


# Declines


def test_declined_card(stripe_client: Any) -> None:
    with pytest.raises(stripe.CardError) as caught:
        pay(stripe_client, payment_method="pm_card_chargeCustomerFail")
    error = caught.value
    assert error.http_status == 402
    assert error.code == "card_declined"
    assert error.user_message == "Your card was declined."
    assert error.error is not None
    assert error.error.type == "invalid_request_error"  # Stripe: "card_error"
    assert error.error.decline_code is None  # Stripe: e.g. "generic_decline"
    assert error.error.payment_intent is None  # Stripe puts the failed PaymentIntent here
    charge_id = error.json_body["error"]["charge"]
    assert charge_id.startswith("ch_")

    # The PaymentIntent exists (found through the charge), back to requires_payment_method.
    charge = stripe_client.v1.charges.retrieve(charge_id)
    assert (charge.status, charge.paid, charge.failure_code) == ("failed", False, "card_declined")
    intent = stripe_client.v1.payment_intents.retrieve(charge.payment_intent)
    assert intent.status == "requires_payment_method"
    assert intent.last_payment_error.code == "card_declined"
    assert intent.metadata.to_dict() == {"farebox_reference": REFERENCE}

    # And it cannot be refunded.
    with pytest.raises(stripe.InvalidRequestError) as refused:
        stripe_client.v1.refunds.create(params={"payment_intent": intent.id})
    assert refused.value.http_status == 400
    assert refused.value.user_message == "Cannot refund a failed payment."


def test_stripe_decline_test_methods_that_localstripe_does_not_decline(stripe_client: Any) -> None:
    # Stripe declines pm_card_visa_chargeDeclined; localstripe lets it succeed.
    assert pay(stripe_client, payment_method="pm_card_visa_chargeDeclined").status == "succeeded"
    # Stripe's pm_card_chargeDeclined is unknown to localstripe.
    with pytest.raises(stripe.InvalidRequestError) as caught:
        pay(stripe_client, payment_method="pm_card_chargeDeclined")
    assert caught.value.http_status == 404


# Refunds


def refunds_of(client: Any, intent_id: str) -> list[Any]:
    return list(client.v1.refunds.list(params={"payment_intent": intent_id}).data)


def test_full_refund(stripe_client: Any) -> None:
    intent = pay(stripe_client)
    refund = stripe_client.v1.refunds.create(params={"payment_intent": intent.id})
    assert refund.id.startswith("re_")
    assert (refund.amount, refund.currency, refund.status) == (AMOUNT, CURRENCY, "succeeded")
    assert refund.payment_intent == intent.id
    assert refund.charge == charge_of(intent).id

    after = stripe_client.v1.payment_intents.retrieve(intent.id)
    assert after.status == "succeeded"  # as on Stripe: a refund does not change the intent
    assert (charge_of(after).amount_refunded, charge_of(after).refunded) == (AMOUNT, True)
    assert [r.id for r in refunds_of(stripe_client, intent.id)] == [refund.id]


def test_partial_refund(stripe_client: Any) -> None:
    intent = pay(stripe_client)
    refund = stripe_client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 200})
    assert (refund.amount, refund.status) == (200, "succeeded")

    charge = charge_of(stripe_client.v1.payment_intents.retrieve(intent.id))
    assert (charge.amount_refunded, charge.refunded) == (200, False)


def test_over_refund_is_not_refused(stripe_client: Any) -> None:
    # Stripe answers 400 invalid_request_error to both; localstripe accepts them.
    intent = pay(stripe_client)
    too_much = stripe_client.v1.refunds.create(
        params={"payment_intent": intent.id, "amount": AMOUNT + 1}
    )
    assert (too_much.amount, too_much.status) == (AMOUNT + 1, "succeeded")
    again = stripe_client.v1.refunds.create(params={"payment_intent": intent.id})
    assert again.amount == AMOUNT  # "full" means the charge's amount, not what is left

    charge = charge_of(stripe_client.v1.payment_intents.retrieve(intent.id))
    assert (charge.amount_refunded, charge.refunded) == (2 * AMOUNT + 1, True)
    assert len(refunds_of(stripe_client, intent.id)) == 2


# Idempotency


def test_idempotency_key_is_ignored(stripe_client: Any) -> None:
    first = pay(stripe_client, idempotency_key="fbx-idem-1")
    second = pay(stripe_client, idempotency_key="fbx-idem-1")
    # Stripe returns the first object again, with "Idempotent-Replayed: true".
    assert first.id != second.id
    assert first.last_response.headers.get("Idempotent-Replayed") is None
    assert second.last_response.headers.get("Idempotent-Replayed") is None
    assert first.last_response.headers.get("Request-Id") is None  # Stripe sends one
    assert len(stripe_client.v1.payment_intents.list().data) == 2


# What the coming Stripe rail needs and localstripe lacks


def test_shared_payment_granted_token_is_rejected(stripe_client: Any) -> None:
    params = {
        "amount": AMOUNT,
        "currency": CURRENCY,
        "shared_payment_granted_token": "spt_farebox_test",
        "confirm": True,
    }
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.payment_intents.create(params=params)
    assert caught.value.http_status == 400
    assert caught.value.user_message == "Unexpected shared_payment_granted_token"


def test_confirm_with_a_payment_method_is_not_implemented(stripe_client: Any) -> None:
    intent = stripe_client.v1.payment_intents.create(
        params={"amount": AMOUNT, "currency": CURRENCY}
    )
    assert intent.status == "requires_payment_method"
    with pytest.raises(stripe.APIError) as caught:
        stripe_client.v1.payment_intents.confirm(
            intent.id, params={"payment_method": "pm_card_visa"}
        )
    assert caught.value.http_status == 500
    assert caught.value.user_message == "Not implemented"
    with pytest.raises(stripe.InvalidRequestError) as spt:
        stripe_client.v1.payment_intents.confirm(
            intent.id, params={"shared_payment_granted_token": "spt_farebox_test"}
        )
    assert spt.value.http_status == 400
    assert spt.value.user_message == "Unexpected shared_payment_granted_token"


@pytest.mark.parametrize(
    "param",
    [
        {"description": "farebox"},
        {"automatic_payment_methods": {"enabled": "true", "allow_redirects": "never"}},
        {"receipt_email": "a@example.com"},
        {"statement_descriptor_suffix": "FAREBOX"},
    ],
    ids=lambda p: next(iter(p)),
)
def test_other_payment_intent_parameters_are_rejected(stripe_client: Any, param: Any) -> None:
    params = {"amount": AMOUNT, "currency": CURRENCY, **param}
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe_client.v1.payment_intents.create(params=params)
    assert caught.value.http_status == 400
    assert caught.value.user_message == f"Unexpected {next(iter(param))}"


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("post", "/v1/shared_payment/issued_tokens", {"payment_method": "pm_card_visa"}),
        ("get", "/v1/shared_payment/granted_tokens/spt_farebox_test", {}),
        ("post", "/v1/checkout/sessions", {"mode": "payment", "success_url": "https://x.test"}),
        ("get", "/v1/disputes", {}),
        ("get", "/v1/test_helpers/shared_payment/granted_tokens", {}),
    ],
    ids=["spt-issue", "spt-granted", "checkout-session", "disputes", "spt-test-helper"],
)
def test_routes_localstripe_does_not_have(
    stripe_client: Any, method: str, path: str, params: dict[str, Any]
) -> None:
    # aiohttp's own plain-text "404: Not Found": not JSON, so the client raises APIError.
    with pytest.raises(stripe.APIError) as caught:
        stripe_client.raw_request(method, path, **params)
    assert type(caught.value) is stripe.APIError
    assert caught.value.http_status == 404
    assert caught.value.http_body == "404: Not Found"

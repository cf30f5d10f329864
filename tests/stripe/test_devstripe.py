"""The stand-in's confirm path (``farebox.dev.devstripe``): how an X-Receipt invoice is paid
without Stripe, with the merchant's publishable key and the client secret as Stripe.js would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from farebox.dev.devstripe import DevStripe, running_devstripe

stripe = pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")

from farebox.ledgers.stripe import StripeLedger  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def dev() -> Iterator[DevStripe]:
    with running_devstripe() as server:
        yield server


@pytest.fixture
async def ledger(dev: DevStripe, anyio_backend: str) -> AsyncIterator[StripeLedger]:
    http_client = stripe.HTTPXClient()
    client = stripe.StripeClient(
        dev.api_key, base_addresses={"api": dev.url}, max_network_retries=0, http_client=http_client
    )
    yield StripeLedger(client)
    await http_client.close_async()


def confirm(dev: DevStripe, intent: str, key: str, **form: str) -> httpx.Response:
    return httpx.post(
        f"{dev.url}/v1/payment_intents/{intent}/confirm",
        data=form,
        headers={"authorization": f"Bearer {key}"},
    )


async def test_an_invoice_is_paid_with_the_publishable_key_and_client_secret(
    dev: DevStripe, ledger: StripeLedger
) -> None:
    made = await ledger.create_invoice_payment(amount=75, currency="usd", reference="inv_1")
    wrong = confirm(
        dev,
        made.payment_intent,
        dev.publishable_key,
        client_secret="x",
        payment_method="pm_card_visa",
    )
    assert (wrong.status_code, wrong.json()["error"]["param"]) == (400, "client_secret")
    # A publishable key reads nothing and creates nothing.
    listed = httpx.get(
        f"{dev.url}/v1/payment_intents/{made.payment_intent}",
        headers={"authorization": f"Bearer {dev.publishable_key}"},
    )
    assert listed.status_code == 401
    paid = confirm(
        dev,
        made.payment_intent,
        dev.publishable_key,
        client_secret=made.client_secret,
        payment_method="pm_card_visa",
    )
    assert paid.status_code == 200
    assert paid.json()["status"] == "succeeded"
    checked = await ledger.retrieve_paid(
        made.payment_intent, amount=75, currency="usd", reference="inv_1"
    )
    assert (checked.amount, checked.status) == (75, "succeeded")
    again = confirm(dev, made.payment_intent, dev.api_key, payment_method="pm_card_visa")
    assert again.json()["error"]["code"] == "payment_intent_unexpected_state"


async def test_a_declined_card_leaves_the_invoice_unpaid(
    dev: DevStripe, ledger: StripeLedger
) -> None:
    made = await ledger.create_invoice_payment(amount=75, currency="usd", reference="inv_2")
    declined = confirm(
        dev, made.payment_intent, dev.api_key, payment_method="pm_card_chargeDeclined"
    )
    assert (declined.status_code, declined.json()["error"]["code"]) == (402, "card_declined")
    intent: Any = dev.intents[made.payment_intent]
    assert intent["status"] == "requires_payment_method"

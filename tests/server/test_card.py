"""The card rail: MPP ``Payment`` (method ``stripe``) offered beside x402 in one 402.

x402 runs on the embedded chain; cards are charged against ``fake_stripe`` (a FAKE that follows
Stripe's documented API: Stripe cannot be reached from here). Credentials are built with farebox's
own MPP codec, the way pympp's client builds them (echo the challenge, payload ``{"spt": …}``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from farebox.dev.devchain import DevChain
from farebox.protocol import mpp
from farebox.protocol.challenge import read_challenge
from farebox.receipts.records import verify_receipt
from farebox.server.asgi import PaymentMiddleware
from tests.support.asgi import call
from tests.support.cards import (
    NETWORK,
    REALM,
    Clock,
    authorization,
    card_gate,
    goods,
    headers_of,
    offered,
    one,
)
from tests.support.fake_stripe import FakeStripe
from tests.support.gates import ISSUER

stripe = pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")

from farebox.ledgers.stripe import StripeLedger  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    # stripe 16.1's HTTPXClient hands httpx the form body as ``data=<bytes>`` (deprecated in 0.28).
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning"),
]

INTENTS = "/v1/payment_intents"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def ledger(fake: FakeStripe, anyio_backend: str) -> AsyncIterator[StripeLedger]:
    http_client = stripe.HTTPXClient()
    client = stripe.StripeClient(
        fake.api_key,
        base_addresses={"api": fake.url},
        max_network_retries=0,
        http_client=http_client,
    )
    yield StripeLedger(client)
    await http_client.close_async()


def problem(sent: list[dict[str, Any]]) -> dict[str, Any]:
    start, body = sent
    assert start["status"] == 402
    assert b"the goods" not in body["body"]
    assert any(k == "www-authenticate" for k, _ in headers_of(start))  # paying again is possible
    data: dict[str, Any] = json.loads(body["body"])
    return data


async def test_a_402_offers_x402_and_the_card(
    chain: DevChain, ledger: StripeLedger, fake: FakeStripe
) -> None:
    _, asgi = card_gate(chain, ledger, Clock())
    [start, body] = await call(asgi, "/report")
    assert start["status"] == 402
    headers = dict(headers_of(start))
    challenge = read_challenge(headers, body["body"])  # the x402 forms are unchanged
    assert challenge.accepts[0].amount == 500_000
    [card] = await offered(asgi, "/report")
    assert (card.method, card.intent, card.realm) == ("stripe", "charge", REALM)
    assert (card.request.amount, card.request.currency) == (50, "usd")
    assert mpp.StripeDetails.from_request(card.request).network_id == NETWORK
    assert card.expires is not None
    methods = json.loads(body["body"])["payment"]["methods"]
    assert [m["protocol"] for m in methods] == ["x402", "mpp"]
    assert methods[1] == {
        "protocol": "mpp",
        "method": "stripe",
        "intent": "charge",
        "amount": "50",
        "currency": "usd",
    }
    exposed = headers["access-control-expose-headers"]
    assert "WWW-Authenticate" in exposed
    assert "Payment-Receipt" in exposed


async def test_below_the_minimum_and_without_an_offer_only_x402(
    chain: DevChain, ledger: StripeLedger
) -> None:
    _, asgi = card_gate(chain, ledger, Clock())
    for path in ("/cheap", "/plain"):
        [start, body] = await call(asgi, path)
        assert start["status"] == 402
        assert not [k for k, _ in headers_of(start) if k == "www-authenticate"]
        methods = json.loads(body["body"])["payment"]["methods"]
        assert [m["protocol"] for m in methods] == ["x402"]


async def test_card_payment_serves_once_with_receipts(
    chain: DevChain, ledger: StripeLedger, fake: FakeStripe
) -> None:
    paid, asgi = card_gate(chain, ledger, Clock())
    [card] = await offered(asgi, "/report")
    header = authorization(card, "spt_succeeds_1")
    [start, body] = await call(asgi, "/report", [header])
    assert start["status"] == 200
    assert body["body"] == b"the goods"
    [intent] = fake.intents.values()
    assert (intent["amount"], intent["currency"], intent["status"]) == (50, "usd", "succeeded")
    assert len(fake.posts(INTENTS)) == 1
    receipt = mpp.parse_payment_receipt(one(start, "payment-receipt"))
    assert (receipt.method, receipt.reference) == ("stripe", intent["id"])
    record = verify_receipt(
        one(start, "peac-receipt"), paid.key.public_key, now=int(time.time()), issuer=ISSUER
    )
    commerce = json.dumps(record.claims)
    assert '"payment_rail": "stripe"' in commerce
    assert f'"reference": "{intent["id"]}"' in commerce
    assert '"currency": "USD"' in commerce
    assert '"amount_minor": "50"' in commerce
    assert one(start, "cache-control") == "private"

    again = await call(asgi, "/report", [header])
    assert problem(again)["code"] == "proof_replayed"
    assert len(fake.posts(INTENTS)) == 1


async def test_a_declined_card_withholds_the_body(
    chain: DevChain, ledger: StripeLedger, fake: FakeStripe
) -> None:
    _, asgi = card_gate(chain, ledger, Clock())
    [card] = await offered(asgi, "/report")
    sent = await call(asgi, "/report", [authorization(card, "spt_declines_1")])
    refusal = problem(sent)
    assert refusal["code"] == "card_declined"
    # A refused Payment credential is typed with MPP's problem registry.
    assert refusal["type"] == "https://paymentauth.org/problems/verification-failed"
    assert [i["status"] for i in fake.intents.values()] != ["succeeded"]


async def test_altered_or_expired_challenges_are_refused(
    chain: DevChain, ledger: StripeLedger, fake: FakeStripe
) -> None:
    clock = Clock()
    _, asgi = card_gate(chain, ledger, clock)
    [card] = await offered(asgi, "/report")
    cheaper = replace(card.request, amount=1)
    altered = replace(card.echo(), request=mpp.b64url_jcs(cheaper.to_json()))
    sent = await call(asgi, "/report", [authorization(altered, "spt_succeeds_2")])
    assert problem(sent)["code"] == "invalid_challenge"
    forged = replace(card.echo(), id=card.id[:-2] + ("AA" if card.id[-2:] != "AA" else "BB"))
    sent = await call(asgi, "/report", [authorization(forged, "spt_succeeds_3")])
    assert problem(sent)["code"] == "invalid_challenge"
    assert problem(sent)["type"] == "https://paymentauth.org/problems/invalid-challenge"
    clock.now += 301
    sent = await call(asgi, "/report", [authorization(card, "spt_succeeds_4")])
    assert problem(sent)["code"] == "payment_expired"
    assert problem(sent)["type"] == "https://paymentauth.org/problems/payment-expired"
    assert fake.posts(INTENTS) == []


async def test_a_credential_for_a_cheaper_route_is_refused(
    chain: DevChain, ledger: StripeLedger, fake: FakeStripe
) -> None:
    _, asgi = card_gate(chain, ledger, Clock())
    [card] = await offered(asgi, "/report")
    sent = await call(asgi, "/premium", [authorization(card, "spt_succeeds_5")])
    assert problem(sent)["code"] == "card_payment_mismatch"
    assert fake.posts(INTENTS) == []


async def test_a_credential_for_another_route_of_the_same_price_is_refused(
    chain: DevChain, ledger: StripeLedger, fake: FakeStripe
) -> None:
    _, asgi = card_gate(chain, ledger, Clock())
    [card] = await offered(asgi, "/report")  # $0.50, like /boom
    assert card.opaque == {"route": "GET /report"}
    sent = await call(asgi, "/boom", [authorization(card, "spt_succeeds_8")])
    assert problem(sent)["code"] == "card_payment_mismatch"
    assert fake.posts(INTENTS) == []


async def test_an_app_error_is_refunded_in_full(
    chain: DevChain, ledger: StripeLedger, fake: FakeStripe
) -> None:
    paid, asgi = card_gate(chain, ledger, Clock())
    [card] = await offered(asgi, "/boom")
    header = authorization(card, "spt_succeeds_6")
    [start, _] = await call(asgi, "/boom", [header])
    # The token was charged before the app ran; the app failed, so nothing was delivered: the
    # error passes through, the charge is refunded in full, and no receipt is issued.
    assert start["status"] == 500
    assert not [k for k, _ in headers_of(start) if k in ("payment-receipt", "peac-receipt")]
    [intent] = fake.intents.values()
    assert intent["status"] == "succeeded"
    [refund] = fake.refunds.values()
    assert (refund["payment_intent"], refund["amount"]) == (intent["id"], 50)
    [posted] = fake.posts("/v1/refunds")
    assert posted.headers["idempotency-key"] == "farebox_unserved_" + intent["id"]
    kinds = [e.kind for e in await paid.store.events(reference=intent["id"])]
    assert sorted(kinds) == ["refund", "settlement"]
    # The credential is spent: presenting it again is refused, and nothing more is charged.
    again = await call(asgi, "/boom", [header])
    assert problem(again)["code"] == "proof_replayed"
    assert len(fake.posts(INTENTS)) == 1


async def test_a_token_that_does_not_pay_never_reaches_the_app(
    chain: DevChain, ledger: StripeLedger, fake: FakeStripe
) -> None:
    reached: list[str] = []

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await goods(scope, receive, send)

    paid, _ = card_gate(chain, ledger, Clock())
    asgi = PaymentMiddleware(counting, paid.gate)
    [card] = await offered(asgi, "/report")
    for token in ("spt_declines_9", "spt_unknown_9", "spt_requires_action_9"):
        problem(await call(asgi, "/report", [authorization(card, token)]))
    assert reached == []  # the 402s and the three refusals are the gate's own answers


async def test_a_lost_response_is_replayed_under_its_idempotency_key(
    chain: DevChain, ledger: StripeLedger, fake: FakeStripe
) -> None:
    _, asgi = card_gate(chain, ledger, Clock())
    [card] = await offered(asgi, "/report")
    header = authorization(card, "spt_succeeds_7")
    key = (b"idempotency-key", b"pay_0123456789abcdef0123")
    [first, body] = await call(asgi, "/report", [header, key])
    assert first["status"] == 200
    # The same credential and key again (the client never saw the answer): the stored response,
    # not a second charge and not a refusal.
    [again, replayed] = await call(asgi, "/report", [header, key])
    assert again["status"] == 200
    assert replayed["body"] == body["body"] == b"the goods"
    assert one(again, "idempotent-replayed") == "true"
    assert one(again, "payment-receipt") == one(first, "payment-receipt")
    assert len(fake.posts(INTENTS)) == 1
    # Without the key, the used credential is refused and the refusal names where the money went.
    [intent] = fake.intents.values()
    refusal = problem(await call(asgi, "/report", [header]))
    assert refusal["code"] == "proof_replayed"
    assert intent["id"] in refusal["detail"]

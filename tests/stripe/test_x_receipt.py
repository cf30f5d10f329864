"""X-Receipt card payments through the gate, against localstripe (a local Stripe API).

Each 402 of an invoice route names an invoice (``payment.reference``) backed by a PaymentIntent the
server created at localstripe. The payer's out-of-band payment is played here with the merchant's
key (localstripe refuses publishable keys): attach ``pm_card_visa`` and confirm, as Stripe.js would
with the client secret. Then the request is resent with ``X-Receipt``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from farebox.dev.devchain import DevChain
from farebox.ops.reconcile import Reconciler
from farebox.rails.card import CardRail
from farebox.receipts.records import verify_receipt
from farebox.server.asgi import PaymentMiddleware
from farebox.server.replies import Reply
from farebox.server.routes import CardOffer, RequestInfo, RouteTable
from farebox.store.base import Invoice, invoice_claim_key
from tests.support.asgi import call
from tests.support.gates import ISSUER, Paid, make_gate
from tests.support.localstripe import API_KEY, LocalStripe

stripe = pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")

from farebox.ledgers.stripe import REFERENCE_METADATA_KEY, StripeLedger  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning"),
]

SECRET = b"r" * 32
NETWORK = "profile_test_farebox"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def ledger(
    localstripe: LocalStripe, stripe_client: Any, anyio_backend: str
) -> AsyncIterator[StripeLedger]:
    # stripe_client cleared localstripe; the ledger needs an async-capable client of its own.
    http_client = stripe.HTTPXClient()
    client = stripe.StripeClient(
        API_KEY,
        base_addresses={"api": localstripe.url},
        max_network_retries=0,
        http_client=http_client,
    )
    yield StripeLedger(client)
    await http_client.close_async()


async def app(scope: Any, receive: Any, send: Any) -> None:
    status = 500 if scope["path"] == "/boom" else 200
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"the goods"})


class Api:
    def __init__(self, paid: Paid, asgi: Any, clock: Clock, rail: CardRail) -> None:
        self.paid, self.asgi, self.clock, self.rail = paid, asgi, clock, rail

    async def invoice(self, path: str = "/report") -> dict[str, Any]:
        """The invoice method of a fresh 402 for ``path``."""
        [start, body] = await call(self.asgi, path)
        assert start["status"] == 402
        payment = json.loads(body["body"])["payment"]
        [method] = [m for m in payment["methods"] if m["protocol"] == "x-receipt"]
        assert payment["reference"] == method["reference"]
        assert "X-Receipt" in payment["instructions"]
        return dict(method)

    async def present(self, receipt: str, path: str = "/report") -> tuple[int, dict[str, Any]]:
        [start, body] = await call(self.asgi, path, [(b"x-receipt", receipt.encode())])
        headers = {k.decode(): v.decode() for k, v in start["headers"]}
        if start["status"] == 200:
            assert body["body"] == b"the goods"
            return 200, headers
        assert b"the goods" not in body["body"]
        return start["status"], json.loads(body["body"])


def build(chain: DevChain, ledger: StripeLedger, *, require_secret: bool = False) -> Api:
    clock = Clock()
    routes = RouteTable()
    merchant = "0x" + "22" * 20
    card = CardOffer(network_id=NETWORK, realm="api.test", invoice=True)
    for path, price in (
        ("/report", "$0.50"),
        ("/premium", "$1.00"),
        ("/boom", "$0.50"),
        ("/reports/{id}", "$0.50"),
    ):
        routes.add("GET", path, price, assets=chain.asset, pay_to=merchant, card=card)
    paid = make_gate(chain, routes=routes)
    rail = CardRail(SECRET, ledger, clock=clock, require_client_secret=require_secret)
    paid.gate.card = rail
    return Api(paid, PaymentMiddleware(app, paid.gate), clock, rail)


def pay(stripe_client: Any, payment_intent: str) -> None:
    """The payer's out-of-band payment (localstripe: attach a test card, then confirm)."""
    stripe_client.v1.payment_intents.update(payment_intent, {"payment_method": "pm_card_visa"})
    confirmed = stripe_client.v1.payment_intents.confirm(payment_intent)
    assert confirmed.status == "succeeded"


async def test_a_402_names_an_invoice_backed_by_a_payment_intent(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    method = await api.invoice()
    assert method["reference"].startswith("inv_")
    assert (method["amount"], method["currency"], method["header"]) == ("50", "usd", "X-Receipt")
    assert method["client_secret"].startswith(method["payment_intent"] + "_secret_")
    intent = stripe_client.v1.payment_intents.retrieve(method["payment_intent"])
    assert (intent.amount, intent.currency) == (50, "usd")
    assert intent.metadata[REFERENCE_METADATA_KEY] == method["reference"]
    invoice = await api.paid.store.get_invoice(method["reference"])
    assert invoice is not None
    assert (invoice.payment_intent, invoice.amount, invoice.route) == (
        method["payment_intent"],
        50,
        "GET /report",
    )
    assert invoice.expires_at == invoice.created_at + 900
    # Every 402 makes its own invoice; a HEAD makes none.
    assert (await api.invoice())["reference"] != method["reference"]
    before = len(stripe_client.v1.payment_intents.list({"limit": 100}).data)
    [start, _] = await call(api.asgi, "/report", method="HEAD")
    assert start["status"] == 402
    assert len(stripe_client.v1.payment_intents.list({"limit": 100}).data) == before


async def test_a_paid_invoice_serves_once_with_a_signed_record(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    method = await api.invoice()
    pay(stripe_client, method["payment_intent"])
    status, headers = await api.present(method["payment_intent"])
    assert status == 200
    record = verify_receipt(
        headers["peac-receipt"], api.paid.key.public_key, now=int(time.time()), issuer=ISSUER
    )
    commerce = record.claims["extensions"]["org.peacprotocol/commerce"]
    assert commerce["payment_rail"] == "stripe"
    assert commerce["reference"] == method["payment_intent"]
    assert (commerce["amount_minor"], commerce["currency"]) == ("50", "USD")
    assert commerce["event"] == "settlement"
    assert "payment-receipt" not in headers  # that header answers MPP credentials only
    claim = await api.paid.store.get_claim(invoice_claim_key(method["reference"]))
    assert claim is not None
    assert (claim.state, claim.transaction) == ("settled", method["payment_intent"])
    [settled] = await api.paid.store.events(kind="settlement")
    assert settled.reference == method["payment_intent"]
    assert settled.data["invoice"] == method["reference"]

    status, problem = await api.present(method["payment_intent"])
    assert (status, problem["code"]) == (402, "proof_replayed")
    assert method["payment_intent"] in problem["detail"]


async def test_the_same_receipt_presented_concurrently_serves_once(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    method = await api.invoice()
    pay(stripe_client, method["payment_intent"])
    results: list[tuple[int, Any]] = []

    async def present() -> None:
        results.append(await api.present(method["payment_intent"]))

    async with anyio.create_task_group() as tasks:
        for _ in range(5):
            tasks.start_soon(present)
    assert sorted(status for status, _ in results) == [200, 402, 402, 402, 402]
    assert {r["code"] for s, r in results if s == 402} == {"proof_replayed"}


async def test_another_routes_invoice_is_refused(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    cheap = await api.invoice("/report")
    pay(stripe_client, cheap["payment_intent"])
    status, problem = await api.present(cheap["payment_intent"], "/premium")
    assert (status, problem["code"]) == (402, "card_payment_mismatch")
    # Refused without consuming it: it still pays for its own route.
    assert (await api.present(cheap["payment_intent"], "/report"))[0] == 200


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("amount", 49, "card_payment_mismatch"),
        ("currency", "eur", "card_payment_mismatch"),
        ("reference", "inv_someone_else", "card_payment_mismatch"),
    ],
)
async def test_a_payment_intent_that_pays_something_else_is_refused(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any, field: str, value: Any, code: str
) -> None:
    # An invoice recorded here whose PaymentIntent at Stripe differs in one respect (an operator
    # mistake, or a record pointing at a PaymentIntent made for something else).
    api = build(chain, ledger)
    terms: dict[str, Any] = {"amount": 50, "currency": "usd", "reference": "inv_" + "a" * 32}
    terms[field] = value
    intent = stripe_client.v1.payment_intents.create(
        {
            "amount": terms["amount"],
            "currency": terms["currency"],
            "payment_method": "pm_card_visa",
            "payment_method_types": ["card"],
            "confirm": True,
            "metadata": {REFERENCE_METADATA_KEY: terms["reference"]},
        }
    )
    now = int(api.clock())
    invoice = Invoice(
        reference="inv_" + "a" * 32,
        route="GET /report",
        resource="https://api.test/report",
        amount=50,
        currency="usd",
        payment_intent=intent.id,
        created_at=now,
        expires_at=now + 900,
    )
    await api.paid.store.add_invoice(invoice)
    status, problem = await api.present(intent.id)
    assert (status, problem["code"]) == (402, code)
    # Refused and released: nothing consumed.
    assert await api.paid.store.get_claim(invoice_claim_key(invoice.reference)) is None


async def test_an_unpaid_invoice_is_refused_then_accepted_once_paid(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    method = await api.invoice()
    status, problem = await api.present(method["payment_intent"])
    assert (status, problem["code"]) == (402, "card_payment_failed")
    pay(stripe_client, method["payment_intent"])
    assert (await api.present(method["payment_intent"]))[0] == 200


async def test_a_refunded_payment_is_refused(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    method = await api.invoice()
    pay(stripe_client, method["payment_intent"])
    stripe_client.v1.refunds.create({"payment_intent": method["payment_intent"], "amount": 10})
    status, problem = await api.present(method["payment_intent"])
    assert (status, problem["code"]) == (402, "card_payment_refunded")


@pytest.mark.parametrize(
    ("receipt", "status", "code"),
    [
        ("pi_" + "Z" * 16, 402, "card_payment_not_found"),
        ("pi_short", 400, "invalid_payload"),
        ("ch_" + "Z" * 16, 400, "invalid_payload"),
        ("pi_" + "Z" * 16 + "/../../v1/balance", 400, "invalid_payload"),
        ("pi_" + "Z" * 600, 400, "invalid_payload"),
        ("", 400, "invalid_payload"),
    ],
)
async def test_unknown_and_malformed_receipts(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any, receipt: str, status: int, code: str
) -> None:
    api = build(chain, ledger)
    got, problem = await api.present(receipt)
    assert (got, problem["code"]) == (status, code)
    # A fresh invoice is offered with the refusal, so the payer can still pay.
    assert any(m["protocol"] == "x-receipt" for m in problem["payment"]["methods"])


async def test_an_expired_invoice_is_refused(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    method = await api.invoice()
    pay(stripe_client, method["payment_intent"])
    api.clock.now += 901
    status, problem = await api.present(method["payment_intent"])
    assert (status, problem["code"]) == (402, "payment_expired")


async def test_a_second_payment_for_a_paid_invoice_is_refused(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    method = await api.invoice()
    pay(stripe_client, method["payment_intent"])
    assert (await api.present(method["payment_intent"]))[0] == 200
    # Another PaymentIntent carrying the same invoice reference, paid: not this API's invoice.
    second = stripe_client.v1.payment_intents.create(
        {
            "amount": 50,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "payment_method_types": ["card"],
            "confirm": True,
            "metadata": {REFERENCE_METADATA_KEY: method["reference"]},
        }
    )
    status, problem = await api.present(second.id)
    assert (status, problem["code"]) == (402, "card_payment_not_found")


async def test_an_app_error_keeps_the_receipt_usable(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    method = await api.invoice("/boom")
    pay(stripe_client, method["payment_intent"])
    [start, _] = await call(api.asgi, "/boom", [(b"x-receipt", method["payment_intent"].encode())])
    assert start["status"] == 500
    claim = await api.paid.store.get_claim(invoice_claim_key(method["reference"]))
    assert claim is None


async def test_the_client_secret_is_a_receipt_and_can_be_required(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger, require_secret=True)
    method = await api.invoice()
    pay(stripe_client, method["payment_intent"])
    status, problem = await api.present(method["payment_intent"])
    assert (status, problem["code"]) == (400, "invalid_payload")
    status, problem = await api.present(method["payment_intent"] + "_secret_wrongwrongwrong")
    assert (status, problem["code"]) == (402, "card_payment_mismatch")
    status, _ = await api.present(method["client_secret"])
    assert status == 200


async def test_without_stripe_the_402_offers_no_invoice(chain: DevChain) -> None:
    # Nothing listens on this port: creating the PaymentIntent fails, the 402 still goes out.
    http_client = stripe.HTTPXClient()
    client = stripe.StripeClient(
        API_KEY,
        base_addresses={"api": "http://127.0.0.1:9"},
        max_network_retries=0,
        http_client=http_client,
    )
    try:
        api = build(chain, StripeLedger(client))
        [start, body] = await call(api.asgi, "/report")
        assert start["status"] == 402
        payment = json.loads(body["body"])["payment"]
        assert [m["protocol"] for m in payment["methods"]] == ["x402", "mpp"]
        assert not payment["reference"].startswith("inv_")
    finally:
        await http_client.close_async()


async def test_the_reconciler_keeps_a_dead_requests_invoice_and_prunes_unpaid_ones(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    store = api.paid.store
    paid_one = await api.invoice()
    unpaid = await api.invoice()
    pay(stripe_client, paid_one["payment_intent"])
    # A request that claimed the paid invoice and whose process died: served or not, nobody knows.
    key = invoice_claim_key(paid_one["reference"])
    assert await store.claim(key, owner="dead", now=int(api.clock())) is not None

    reconciler = Reconciler(store, [], clock=lambda: api.clock.now + 121)
    report = await reconciler.run_once()
    assert (report.released, report.waiting, report.pruned) == (0, 1, 0)
    # Never released, so never served twice.
    status, problem = await api.present(paid_one["payment_intent"])
    assert (status, problem["code"]) == (402, "proof_replayed")

    # A day after expiry, the invoices nobody paid (the 402 above and the ones that came with the
    # refusal) are pruned; the claimed one is kept.
    later = Reconciler(store, [], clock=lambda: api.clock.now + 900 + 86_401)
    assert (await later.run_once()).pruned == 2
    assert await store.get_invoice(unpaid["reference"]) is None
    assert await store.get_invoice(paid_one["reference"]) is not None


async def test_a_replay_needs_the_receipt_the_first_request_showed(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger, require_secret=True)
    method = await api.invoice()
    pay(stripe_client, method["payment_intent"])
    key = (b"idempotency-key", b"pay_0123456789abcdef0123")
    secret = method["client_secret"].encode()
    [first, _] = await call(api.asgi, "/report", [(b"x-receipt", secret), key])
    assert first["status"] == 200
    [replayed, _] = await call(api.asgi, "/report", [(b"x-receipt", secret), key])
    assert replayed["status"] == 200  # the same receipt and key: the stored answer
    # Someone who knows the public id and the key, but not the secret, gets no replay.
    forged = (method["payment_intent"] + "_secret_guessedguessed").encode()
    [refused, body] = await call(api.asgi, "/report", [(b"x-receipt", forged), key])
    assert refused["status"] == 402
    assert b"the goods" not in body["body"]


async def test_an_unrecordable_request_gets_a_402_without_an_invoice(
    chain: DevChain, ledger: StripeLedger, stripe_client: Any
) -> None:
    api = build(chain, ledger)
    before = len(stripe_client.v1.payment_intents.list({"limit": 100}).data)
    # The ASGI face refuses a NUL in the path before the gate (farebox.server.target)...
    [start, _] = await call(api.asgi, "/reports/a\x00b")
    assert start["status"] == 400
    # ...and the gate, asked directly, still answers such a request without an invoice.
    path = "/reports/a\x00b"
    request = RequestInfo("GET", path, "https://api.test" + path, {"host": "api.test"})
    reply = await api.paid.gate.admit(request)
    assert isinstance(reply, Reply)
    assert reply.status == 402
    methods = json.loads(reply.body)["payment"]["methods"]
    assert [m["protocol"] for m in methods] == ["x402", "mpp"]
    assert len(stripe_client.v1.payment_intents.list({"limit": 100}).data) == before

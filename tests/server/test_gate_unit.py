"""The gate without a chain: a MemoryStore and farebox.testing's fake facilitator, through the ASGI face.

Every outcome a real ledger gives is driven from the fake (settled, refused before broadcast,
reverted, pending), and each test checks what the client heard, what the store recorded and
what the facilitator was asked. No py-evm: each test runs in milliseconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from farebox.protocol.challenge import read_challenge
from farebox.protocol.x402 import decode_proof, decode_settlement
from farebox.receipts import verify_receipt
from farebox.schemes.evm_exact import verify
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.routes import RouteTable
from farebox.store.memory import MemoryStore
from farebox.testing import (
    TEST_ASSET,
    TEST_PAY_TO,
    TEST_PAYER,
    TEST_SIGNING_KEY,
    FakeFacilitator,
    fake_transaction,
    make_payment,
)

pytestmark = pytest.mark.anyio

ORIGIN = "https://api.test"
PRICE = 10_000  # $0.01 of 6-decimal USDC


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Shop:
    """A plain ASGI app that counts its calls; ``/flaky`` fails its first call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        self.calls.append(path)
        status = 500 if path == "/flaky" and self.calls.count(path) == 1 else 200
        body = json.dumps({"path": path, "call": len(self.calls)}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Setup:
    def __init__(self) -> None:
        routes = RouteTable()
        for path in ("/report", "/flaky"):
            routes.add("GET", path, PRICE, assets=TEST_ASSET, pay_to=TEST_PAY_TO)
        routes.add("POST", "/items", 2 * PRICE, assets=TEST_ASSET, pay_to=TEST_PAY_TO)
        self.fake = FakeFacilitator()
        self.store = MemoryStore()
        self.gate = Gate(routes, self.fake, self.store, signing_key=TEST_SIGNING_KEY, issuer=ORIGIN)
        self.shop = Shop()
        self.app = PaymentMiddleware(self.shop, self.gate)

    def claim_key(self, headers: dict[str, str]) -> str:
        """The store key of the proof in ``headers`` (the scheme's own claim key)."""
        proof = decode_proof(headers["PAYMENT-SIGNATURE"])
        assert proof.accepted is not None
        return verify(proof, proof.accepted, now=int(time.time())).claim_key


Running = tuple[Setup, httpx.AsyncClient]  # the parts, and a client of their ASGI app


@pytest.fixture
async def shop(anyio_backend: str) -> AsyncIterator[Running]:
    setup = Setup()
    transport = httpx.ASGITransport(app=setup.app)
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
        yield setup, client


async def test_an_unpaid_request_gets_a_402_in_every_form_and_never_reaches_the_app(
    shop: Running,
) -> None:
    setup, client = shop
    response = await client.get("/report")
    assert response.status_code == 402
    assert response.headers["cache-control"] == "no-store"
    challenge = read_challenge(response.headers, b"")  # the v2 header alone
    [offer] = challenge.accepts
    assert (offer.scheme, offer.network, offer.amount) == ("exact", TEST_ASSET.network, PRICE)
    assert (offer.asset, offer.pay_to) == (TEST_ASSET.address, TEST_PAY_TO)
    assert challenge.resource.url == ORIGIN + "/report"
    body = response.json()
    assert body["payment"]["amount"] == "0.01"
    assert body["payment"]["currency"] == "USDC"
    assert body["payment"]["resource"] == ORIGIN + "/report"
    assert read_challenge({}, response.content).accepts == challenge.accepts  # the body alone
    assert setup.shop.calls == []
    assert setup.fake.calls == []
    # A free route is passed through untouched.
    free = await client.get("/health")
    assert free.status_code == 200
    assert "payment-response" not in free.headers
    assert setup.shop.calls == ["/health"]


async def test_a_paid_request_gets_200_with_the_settlement_and_a_signed_receipt(
    shop: Running,
) -> None:
    setup, client = shop
    headers = make_payment(await client.get("/report"))
    response = await client.get("/report", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"path": "/report", "call": 1}
    [transfer] = setup.fake.settled
    assert (transfer.payer, transfer.pay_to, transfer.amount) == (
        TEST_PAYER.address,
        TEST_PAY_TO,
        PRICE,
    )
    assert transfer.transaction == fake_transaction(transfer.verified)
    settlement = decode_settlement(response.headers["payment-response"])
    assert settlement.success
    assert settlement.transaction == transfer.transaction
    assert settlement.payer == TEST_PAYER.address
    receipt = verify_receipt(
        response.headers["peac-receipt"],
        TEST_SIGNING_KEY.public_key,
        now=int(time.time()),
        issuer=ORIGIN,
    )
    commerce = receipt.claims["extensions"]["org.peacprotocol/commerce"]
    assert commerce["amount_minor"] == str(PRICE)
    assert commerce["currency"] == "USDC"
    assert commerce["reference"] == transfer.transaction
    assert commerce["env"] == "test"
    assert receipt.claims["sub"] == ORIGIN + "/report"
    assert response.headers["cache-control"] == "private"
    claim = await setup.store.get_claim(setup.claim_key(headers))
    assert claim is not None
    assert (claim.state, claim.transaction) == ("settled", transfer.transaction)


async def test_a_replayed_proof_is_refused_naming_its_transaction(shop: Running) -> None:
    setup, client = shop
    headers = make_payment(await client.get("/report"))
    assert (await client.get("/report", headers=headers)).status_code == 200
    again = await client.get("/report", headers=headers)
    assert again.status_code == 402
    problem = again.json()
    assert problem["code"] == "proof_replayed"
    assert setup.fake.settled[0].transaction in problem["detail"]
    assert read_challenge(again.headers, again.content).accepts  # it may pay afresh
    assert setup.shop.calls == ["/report"]
    assert [stage for stage, _ in setup.fake.calls] == ["verify", "settle"]


async def test_a_pending_settlement_keeps_the_claim_and_withholds_the_response(
    shop: Running,
) -> None:
    setup, client = shop
    headers = make_payment(await client.get("/report"))
    setup.fake.pend_next_settle()
    response = await client.get("/report", headers=headers)
    assert response.status_code == 402
    assert response.json()["code"] == "settlement_pending"
    assert b'"call"' not in response.content  # the app's body is not delivered
    settlement = decode_settlement(response.headers["payment-response"])
    assert settlement.pending
    [transfer] = setup.fake.pending
    assert settlement.transaction == transfer.transaction
    assert setup.fake.settled == []
    claim = await setup.store.get_claim(setup.claim_key(headers))
    assert claim is not None
    assert (claim.state, claim.transaction) == ("pending", transfer.transaction)
    # The money may have moved: the same proof is not taken again, and the client hears why.
    retry = await client.get("/report", headers=headers)
    assert retry.status_code == 402
    assert retry.json()["code"] == "settlement_pending"
    assert transfer.transaction in retry.json()["detail"]
    assert [stage for stage, _ in setup.fake.calls] == ["verify", "settle"]


async def test_a_settlement_refused_before_broadcast_releases_the_claim(shop: Running) -> None:
    setup, client = shop
    headers = make_payment(await client.get("/report"))
    setup.fake.fail_next_settle("ledger_unavailable")
    response = await client.get("/report", headers=headers)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.json()["code"] == "ledger_unavailable"
    assert "payment-response" not in response.headers  # nothing was sent
    assert await setup.store.get_claim(setup.claim_key(headers)) is None
    # No money moved: the same proof pays once the ledger is back.
    paid = await client.get("/report", headers=headers)
    assert paid.status_code == 200
    assert len(setup.fake.settled) == 1


async def test_a_reverted_settlement_releases_the_claim_and_reports_the_transaction(
    shop: Running,
) -> None:
    setup, client = shop
    headers = make_payment(await client.get("/report"))
    setup.fake.fail_next_settle("transaction_failed", "reverted", broadcast=True)
    response = await client.get("/report", headers=headers)
    assert response.status_code == 402
    assert response.json()["code"] == "transaction_failed"
    settlement = decode_settlement(response.headers["payment-response"])
    assert not settlement.success
    assert settlement.error_reason == "transaction_failed"
    assert settlement.transaction.startswith("0x")
    assert await setup.store.get_claim(setup.claim_key(headers)) is None
    assert setup.fake.settled == []


async def test_a_verify_refusal_releases_the_claim_before_the_app_runs(shop: Running) -> None:
    setup, client = shop
    headers = make_payment(await client.get("/report"))
    setup.fake.fail_next_verify("invalid_exact_evm_insufficient_balance")
    response = await client.get("/report", headers=headers)
    assert response.status_code == 402
    assert response.json()["code"] == "invalid_exact_evm_insufficient_balance"
    assert setup.shop.calls == []
    assert await setup.store.get_claim(setup.claim_key(headers)) is None


async def test_an_app_error_is_not_charged_and_the_proof_stays_usable(shop: Running) -> None:
    setup, client = shop
    headers = make_payment(await client.get("/flaky"))
    failed = await client.get("/flaky", headers=headers)
    assert failed.status_code == 500  # the app's own answer, passed through
    assert "payment-response" not in failed.headers
    assert "peac-receipt" not in failed.headers
    assert [stage for stage, _ in setup.fake.calls] == ["verify"]  # never settled
    assert await setup.store.get_claim(setup.claim_key(headers)) is None
    served = await client.get("/flaky", headers=headers)
    assert served.status_code == 200
    assert len(setup.fake.settled) == 1


async def test_an_idempotent_retry_replays_the_stored_response_and_charges_once(
    shop: Running,
) -> None:
    setup, client = shop
    request_id = "pay_" + "7" * 32
    first = make_payment(await client.post("/items", content=b"{}"), request_id=request_id)
    assert first["Idempotency-Key"] == request_id
    assert decode_proof(first["PAYMENT-SIGNATURE"]).extensions["payment-identifier"]["info"] == {
        "required": False,
        "id": request_id,
    }
    served = await client.post("/items", headers=first, content=b"{}")
    assert served.status_code == 200
    # The answer was lost; the client retries with the same id and a freshly signed payment.
    retry = make_payment(await client.post("/items", content=b"{}"), request_id=request_id)
    replayed = await client.post("/items", headers=retry, content=b"{}")
    assert replayed.status_code == 200
    assert replayed.content == served.content
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.headers["payment-response"] == served.headers["payment-response"]
    assert setup.shop.calls == ["/items"]
    assert len(setup.fake.settled) == 1
    # The retry's own proof was never claimed: it can still pay for something else.
    assert await setup.store.get_claim(setup.claim_key(retry)) is None
    # The same id with another body is another request: refused, not replayed.
    conflict = await client.post(
        "/items",
        headers=make_payment(await client.post("/items", content=b"{}"), request_id=request_id),
        content=b'{"more": 1}',
    )
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "idempotency_conflict"

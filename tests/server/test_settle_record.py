"""Recording a settlement's outcome never turns the payer's answer into a server error: a store
that fails while the claim is released or finished leaves the claim held (nothing can settle
twice) and the payer hears the settlement's own answer."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from farebox.errors import PaymentError
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.routes import RouteTable
from farebox.store.memory import MemoryStore
from farebox.testing import (
    TEST_ASSET,
    TEST_PAY_TO,
    TEST_SIGNING_KEY,
    FakeFacilitator,
    make_payment,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FailingRelease(MemoryStore):
    """A store whose release fails, as a database that just went away does."""

    async def release(self, key: str, *, owner: str) -> bool:
        raise PaymentError("store_unavailable", "the store is down")


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"report"})


async def test_a_refused_settlement_is_answered_when_the_store_cannot_release() -> None:
    routes = RouteTable()
    routes.add("GET", "/report", 10_000, assets=TEST_ASSET, pay_to=TEST_PAY_TO)
    fake = FakeFacilitator()
    store = FailingRelease()
    gate = Gate(routes, fake, store, signing_key=TEST_SIGNING_KEY, issuer="https://api.test")
    transport = httpx.ASGITransport(app=PaymentMiddleware(ok, gate), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://api.test") as client:
        first = await client.get("/report")
        payment = make_payment(first)
        fake.fail_next_settle("ledger_unavailable", "the node is down")
        refused = await client.get("/report", headers=payment)
    # Before, the release's error escaped the gate: a 500 with no reason for the payer.
    assert refused.status_code == 503
    assert refused.json()["code"] == "ledger_unavailable"
    assert fake.settled == []
    (claim,) = [c for c in store._claims.values()]  # held: the reconciler will release it
    assert claim.state == "held"


async def test_the_gate_logs_the_settlement_in_the_facilitator_services_shape() -> None:
    routes = RouteTable()
    routes.add("GET", "/report", 10_000, assets=TEST_ASSET, pay_to=TEST_PAY_TO)
    store = MemoryStore()
    gate = Gate(routes, FakeFacilitator(), store, signing_key=TEST_SIGNING_KEY)
    transport = httpx.ASGITransport(app=PaymentMiddleware(ok, gate))
    async with httpx.AsyncClient(transport=transport, base_url="https://api.test") as client:
        first = await client.get("/report")
        assert (await client.get("/report", headers=make_payment(first))).status_code == 200
    [event] = await store.events(kind="settlement")
    # One shape for every settler (farebox.settle.settlement_event): what the reconciler reads
    # to know what a claim authorized is in it (it was in the gate's proof line only).
    assert {
        "claim",
        "success",
        "error",
        "network",
        "amount",
        "asset",
        "pay_to",
        "valid_until",
    } <= set(event.data)
    assert event.data["pay_to"].lower() == TEST_PAY_TO.lower()
    assert event.data["amount"] == "10000"

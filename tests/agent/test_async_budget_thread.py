"""The async driver keeps the agent's SQLite budget off the event loop: every budget call of an
httpx.AsyncClient payment runs in a worker thread, never in the loop's own."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from farebox.agent.agent import Agent
from farebox.agent.budget import Budget, Limits
from farebox.agent.httpx_auth import paying_async_client
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.routes import RouteTable
from farebox.store.memory import MemoryStore
from farebox.testing import TEST_ASSET, TEST_PAY_TO, TEST_PAYER, TEST_SIGNING_KEY, FakeFacilitator

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Watched(Budget):
    """A budget that notes the thread of each call that touches its file."""

    def __init__(self) -> None:
        super().__init__(None, Limits())
        self.threads: list[str] = []

    def _transaction(self, run: Any, *, write: bool = True) -> Any:
        self.threads.append(threading.current_thread().name)
        return super()._transaction(run, write=write)


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"report"})


async def test_an_async_payment_touches_the_budget_only_from_worker_threads() -> None:
    routes = RouteTable()
    routes.add("GET", "/report", 10_000, assets=TEST_ASSET, pay_to=TEST_PAY_TO)
    gate = Gate(routes, FakeFacilitator(), MemoryStore(), signing_key=TEST_SIGNING_KEY)
    budget = Watched()
    agent = Agent(TEST_PAYER, budget=budget)
    loop_thread = threading.current_thread().name
    transport = httpx.ASGITransport(app=PaymentMiddleware(ok, gate))
    async with paying_async_client(agent, transport=transport, base_url="http://127.0.0.1") as c:
        response = await c.get("/report")
    assert response.status_code == 200
    assert len(budget.threads) >= 2  # the check, the reservation, the commit
    assert loop_thread not in budget.threads

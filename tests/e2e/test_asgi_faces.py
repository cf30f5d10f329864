"""The ASGI middleware under other frameworks, at the message level, and when settlement stalls."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from litestar import Litestar, get
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from farebox.agent.agent import Agent
from farebox.agent.httpx_auth import PaymentAuth
from farebox.dev.devchain import DevChain
from farebox.errors import PaymentError
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.protocol.challenge import read_challenge
from farebox.protocol.x402 import decode_settlement, encode_proof
from farebox.schemes.evm_exact import make_proof
from farebox.server.asgi import PaymentMiddleware
from tests.support.asgi import call, chunked_app
from tests.support.chain import fund
from tests.support.faults import HiddenReceipts
from tests.support.gates import ISSUER, PRICE, Paid, make_gate

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_starlette_app(chain: DevChain) -> None:
    paid = make_gate(chain)

    async def weather(request: Any) -> PlainTextResponse:
        return PlainTextResponse("cloudy")

    app = Starlette(routes=[Route("/weather", weather)])
    app.add_middleware(PaymentMiddleware, gate=paid.gate)
    payer = fund(chain)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=ISSUER, auth=PaymentAuth(Agent(payer))
    ) as client:
        response = await client.get("/weather")
    assert response.text == "cloudy"
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE


async def test_litestar_app(chain: DevChain) -> None:
    paid = make_gate(chain)

    @get("/weather", sync_to_thread=False)
    def weather() -> dict[str, str]:
        return {"forecast": "windy"}

    app = Litestar([weather])
    payer = fund(chain)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=PaymentMiddleware(app, paid.gate)),
        base_url=ISSUER,
        auth=PaymentAuth(Agent(payer)),
    ) as client:
        response = await client.get("/weather")
    assert response.json() == {"forecast": "windy"}
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE


async def proof_header(app: Any, payer: Any, path: str) -> tuple[bytes, bytes]:
    [start, body] = await call(app, path)
    assert start["status"] == 402
    challenge = read_challenge({k.decode(): v.decode() for k, v in start["headers"]}, body["body"])
    proof = make_proof(
        payer,
        challenge.accepts[0],
        now=int(time.time()),
        nonce=os.urandom(32),
        resource=challenge.resource,
    )
    return (b"payment-signature", encode_proof(proof).encode())


async def test_body_streams_through_as_the_app_sends_it(chain: DevChain) -> None:
    paid = make_gate(chain)
    app = PaymentMiddleware(chunked_app, paid.gate)
    payer = fund(chain)
    sent = await call(app, "/stream", [await proof_header(app, payer, "/stream")])
    # The start is held for settlement and gains the payment headers; each chunk passes on its own.
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    assert decode_settlement(headers["payment-response"]).success
    assert headers["cache-control"] == "private"
    assert [m["body"] for m in sent[1:]] == [b"part 0", b"part 1", b"part 2"]


async def test_app_raising_releases_the_claim(chain: DevChain) -> None:
    paid = make_gate(chain)
    calls = {"n": 0}

    async def fragile(scope: Any, receive: Any, send: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("app bug")
        await chunked_app(scope, receive, send)

    app = PaymentMiddleware(fragile, paid.gate)
    payer = fund(chain)
    header = await proof_header(app, payer, "/weather")
    with pytest.raises(RuntimeError):
        await call(app, "/weather", [header])
    assert chain.balance_of(payer.address) == 1_000_000
    sent = await call(app, "/weather", [header])
    assert sent[0]["status"] == 200
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE


async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
    if method == "eth_getTransactionReceipt":
        return None
    return await self.inner.request(method, params)


async def test_pending_settlement_withholds_the_body_and_keeps_the_claim(chain: DevChain) -> None:
    paid: Paid = make_gate(chain)
    slow = EvmLedger(
        HiddenReceipts(chain), chain.accounts[1].account, network=chain.network, confirm_timeout=0.2
    )
    paid.gate.facilitator = LocalFacilitator([slow])
    app = PaymentMiddleware(chunked_app, paid.gate)
    payer = fund(chain)
    header = await proof_header(app, payer, "/weather")
    sent = await call(app, "/weather", [header])
    assert sent[0]["status"] == 402
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    settlement = decode_settlement(headers["payment-response"])
    assert settlement.pending
    assert settlement.transaction
    assert b"part" not in b"".join(m.get("body", b"") for m in sent)
    # Broadcast means the money may move: the proof is never accepted again.
    again = await call(app, "/weather", [header])
    assert again[0]["status"] == 402
    refusal = b"".join(m.get("body", b"") for m in again)
    assert b"settlement_pending" in refusal
    assert settlement.transaction.encode() in refusal  # names where the money may have gone
    [event] = await paid.store.events(kind="settlement", payer=payer.address)
    assert event.reference == settlement.transaction
    # The agent reports the pending transaction and counts it against its budget.
    agent = Agent(fund(chain))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=ISSUER, auth=PaymentAuth(agent)
    ) as client:
        with pytest.raises(PaymentError) as pending:
            await client.get("/weather")
    assert pending.value.code == "settlement_pending"
    assert agent.budget.spent(now=int(time.time())).today > 0


async def test_unreachable_ledger_is_a_503_and_the_proof_stays_good(chain: DevChain) -> None:
    from farebox.ledgers.rpc import HttpRpc

    paid = make_gate(chain)
    down = EvmLedger(
        HttpRpc("http://127.0.0.1:9", timeout=2), chain.accounts[1].account, network=chain.network
    )
    working = paid.gate.facilitator
    paid.gate.facilitator = LocalFacilitator([down])
    app = PaymentMiddleware(chunked_app, paid.gate)
    payer = fund(chain)
    header = await proof_header(app, payer, "/weather")
    sent = await call(app, "/weather", [header])
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    assert sent[0]["status"] == 503
    assert headers["retry-after"]
    assert b"part" not in b"".join(m.get("body", b"") for m in sent)
    assert chain.balance_of(payer.address) == 1_000_000
    # The node is back: the same proof pays, once.
    paid.gate.facilitator = working
    assert (await call(app, "/weather", [header]))[0]["status"] == 200
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE
    await down.aclose()


@pytest.mark.parametrize("kind", ["postgres", "redis", "closed"])
async def test_unreachable_store_is_a_503_and_nothing_moves(chain: DevChain, kind: str) -> None:
    from farebox.store.memory import MemoryStore
    from farebox.store.postgres import PostgresStore
    from farebox.store.redis import RedisStore

    paid = make_gate(chain)
    app = PaymentMiddleware(chunked_app, paid.gate)
    payer = fund(chain)
    header = await proof_header(app, payer, "/weather")
    if kind == "postgres":
        paid.gate.store = PostgresStore("postgresql://127.0.0.1:1/nowhere", timeout=1)
    elif kind == "redis":
        paid.gate.store = RedisStore("redis://127.0.0.1:1/0", timeout=1)
    else:
        closed = MemoryStore()
        await closed.aclose()
        paid.gate.store = closed
    sent = await call(app, "/weather", [header])
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    assert sent[0]["status"] == 503
    assert headers["retry-after"]
    body = b"".join(m.get("body", b"") for m in sent)
    assert b"part" not in body
    assert b"store_unavailable" in body
    assert b"127.0.0.1:1" not in body  # the store's address is nobody's business
    assert chain.balance_of(payer.address) == 1_000_000

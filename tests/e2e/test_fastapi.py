"""A FastAPI app behind the ASGI middleware, paid by the farebox agent, settling on the embedded EVM."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import httpx
import pytest

from farebox.agent.agent import Agent, PaymentFailed
from farebox.agent.budget import Budget, Limits
from farebox.agent.httpx_auth import PAYMENT_EXTENSION, PaymentAuth
from farebox.dev.devchain import DevChain
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.protocol.challenge import read_challenge
from farebox.protocol.models import Challenge
from farebox.protocol.x402 import decode_settlement, encode_proof
from farebox.receipts import verify_receipt
from farebox.schemes.evm_exact import make_proof
from tests.support.chain import fund
from tests.support.fastapi_app import fastapi_app
from tests.support.gates import ISSUER, PRICE, Paid, make_gate

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def paid(chain: DevChain) -> Paid:
    return make_gate(chain)


def client(paid: Paid, agent: Agent | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=fastapi_app(paid))
    auth = PaymentAuth(agent) if agent is not None else None
    return httpx.AsyncClient(transport=transport, base_url=ISSUER, auth=auth)


async def challenge_for(c: httpx.AsyncClient, path: str, method: str = "GET") -> Challenge:
    response = await c.request(method, path)
    assert response.status_code == 402
    return read_challenge(dict(response.headers), response.content)


async def signed_header(
    c: httpx.AsyncClient, payer: EvmAccount, path: str, now: int | None = None
) -> str:
    challenge = await challenge_for(c, path)
    proof = make_proof(
        payer,
        challenge.accepts[0],
        now=int(time.time()) if now is None else now,
        nonce=os.urandom(32),
        resource=challenge.resource,
    )
    return encode_proof(proof)


async def test_free_route_passes_untouched(paid: Paid) -> None:
    async with client(paid) as c:
        response = await c.get("/health")
    assert response.status_code == 200
    assert "payment-required" not in response.headers
    assert await paid.store.events() == []


async def test_unpaid_call_gets_402_with_every_form(paid: Paid) -> None:
    async with client(paid) as c:
        response = await c.get("/weather")
        head = await c.head("/weather")
    assert response.status_code == 402
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["payment"]["amount"] == "0.01"
    assert body["payment"]["methods"][0]["payTo"] == paid.merchant
    assert "PAYMENT-REQUIRED" in response.headers["access-control-expose-headers"]
    challenge = read_challenge(dict(response.headers), b"")
    assert challenge.accepts[0].amount == PRICE
    assert challenge.resource.url == ISSUER + "/weather"
    assert head.status_code == 402
    assert head.content == b""
    assert head.headers["payment-required"]


async def test_agent_pays_and_balances_move_on_chain(paid: Paid, chain: DevChain) -> None:
    payer = fund(chain)
    agent = Agent(payer)
    before = chain.balance_of(payer.address), chain.balance_of(paid.merchant)
    async with client(paid, agent) as c:
        response = await c.get("/weather")
    assert response.status_code == 200
    assert response.json() == {"forecast": "sunny"}
    assert response.headers["cache-control"] == "private"
    settlement = decode_settlement(response.headers["payment-response"])
    assert settlement.success
    assert settlement.payer == payer.address
    assert chain.balance_of(payer.address) == before[0] - PRICE
    assert chain.balance_of(paid.merchant) == before[1] + PRICE
    receipt = verify_receipt(
        response.headers["peac-receipt"], paid.key.public_key, now=int(time.time()), issuer=ISSUER
    )
    commerce = receipt.claims["extensions"]["org.peacprotocol/commerce"]
    assert commerce["reference"] == settlement.transaction
    assert commerce["event"] == "settlement"
    assert commerce["env"] == "test"
    assert commerce["asset"] == chain.asset.caip19
    assert receipt.claims["sub"] == ISSUER + "/weather"
    payment = response.extensions[PAYMENT_EXTENSION]
    assert payment.receipt is not None
    assert payment.receipt.issuer == ISSUER
    kinds = [e.kind for e in await paid.store.events(payer=payer.address)]
    assert sorted(kinds) == ["proof", "receipt", "settlement"]


async def test_replayed_proof_is_refused(paid: Paid, chain: DevChain) -> None:
    payer = fund(chain)
    async with client(paid) as c:
        header = await signed_header(c, payer, "/weather")
        first = await c.get("/weather", headers={"payment-signature": header})
        balance = chain.balance_of(payer.address)
        again = await c.get("/weather", headers={"payment-signature": header})
    assert first.status_code == 200
    assert again.status_code == 402
    assert again.json()["code"] == "proof_replayed"
    # A client whose first answer was lost learns where its money went.
    transaction = decode_settlement(first.headers["payment-response"]).transaction
    assert transaction in again.json()["detail"]
    assert again.headers["content-type"] == "application/problem+json"
    assert "forecast" not in again.text
    assert chain.balance_of(payer.address) == balance


async def test_expired_proof_is_refused(paid: Paid, chain: DevChain) -> None:
    payer = fund(chain)
    async with client(paid) as c:
        header = await signed_header(c, payer, "/weather", now=int(time.time()) - 1000)
        response = await c.get("/weather", headers={"payment-signature": header})
    assert response.status_code == 402
    assert response.json()["code"] == "invalid_exact_evm_payload_authorization_valid_before"
    assert chain.balance_of(payer.address) == 1_000_000


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("value", "1", "invalid_exact_evm_payload_authorization_value_mismatch"),
        ("to", "0x" + "11" * 20, "invalid_exact_evm_payload_recipient_mismatch"),
    ],
)
async def test_tampered_authorization_is_refused(
    paid: Paid, chain: DevChain, field: str, value: str, code: str
) -> None:
    from farebox.protocol.x402 import b64json_decode, b64json_encode

    payer = fund(chain)
    async with client(paid) as c:
        header = await signed_header(c, payer, "/weather")
        data = b64json_decode(header)
        data["payload"]["authorization"][field] = value
        response = await c.get("/weather", headers={"payment-signature": b64json_encode(data)})
    assert response.status_code == 402
    assert response.json()["code"] == code
    assert chain.balance_of(payer.address) == 1_000_000


async def test_unfunded_payer_is_refused_before_serving(paid: Paid) -> None:
    payer = EvmAccount.generate()
    async with client(paid, Agent(payer)) as c:
        with pytest.raises(PaymentError) as refused:
            await c.get("/weather")
    assert refused.value.code == "invalid_exact_evm_insufficient_balance"
    assert refused.value.status == 402
    assert await paid.store.events(kind="settlement") == []


async def test_app_error_charges_nothing_and_the_proof_stays_good(
    paid: Paid, chain: DevChain
) -> None:
    payer = fund(chain)
    async with client(paid) as c:
        header = await signed_header(c, payer, "/flaky")
        failed = await c.get("/flaky", headers={"payment-signature": header})
        assert failed.status_code == 500
        assert "payment-response" not in failed.headers
        assert chain.balance_of(payer.address) == 1_000_000
        retried = await c.get("/flaky", headers={"payment-signature": header})
    assert retried.status_code == 200
    assert decode_settlement(retried.headers["payment-response"]).success
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE


async def test_redirect_is_not_charged(paid: Paid, chain: DevChain) -> None:
    payer = fund(chain)
    async with client(paid) as c:
        header = await signed_header(c, payer, "/redirect")
        response = await c.get("/redirect", headers={"payment-signature": header})
    assert response.status_code == 302
    assert "payment-response" not in response.headers
    assert chain.balance_of(payer.address) == 1_000_000


async def test_created_keeps_status_and_location(paid: Paid, chain: DevChain) -> None:
    payer = fund(chain)
    async with client(paid, Agent(payer)) as c:
        response = await c.post("/items")
    assert response.status_code == 201
    assert response.headers["location"] == "/items/7"
    assert chain.balance_of(payer.address) == 1_000_000 - 2 * PRICE


async def test_streaming_response_streams_through(paid: Paid, chain: DevChain) -> None:
    payer = fund(chain)
    async with client(paid, Agent(payer)) as c, c.stream("GET", "/stream") as response:
        assert response.status_code == 200
        assert decode_settlement(response.headers["payment-response"]).success
        chunks = [chunk async for chunk in response.aiter_text()]
    assert "".join(chunks) == "".join(f"chunk {i}\n" for i in range(5))


async def test_twenty_concurrent_requests_with_one_proof_settle_once(
    paid: Paid, chain: DevChain
) -> None:
    payer = fund(chain)
    statuses: list[int] = []
    codes: list[str] = []
    async with client(paid) as c:
        header = await signed_header(c, payer, "/weather")

        async def one() -> None:
            response = await c.get("/weather", headers={"payment-signature": header})
            statuses.append(response.status_code)
            if response.status_code != 200:
                codes.append(response.json()["code"])

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
    assert sorted(statuses) == [200] + [402] * 19
    assert set(codes) == {"proof_replayed"}
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE
    assert len(await paid.store.events(kind="settlement", payer=payer.address)) == 1


async def test_budget_runs_out(paid: Paid, chain: DevChain) -> None:
    payer = fund(chain)
    budget = Budget(None, Limits(per_day=Budget.from_prices(None, per_day="$0.02").limits.per_day))
    agent = Agent(payer, budget=budget)
    async with client(paid, agent) as c:
        assert (await c.get("/weather")).status_code == 200
        assert (await c.get("/weather")).status_code == 200
        with pytest.raises(PaymentError) as refused:
            await c.get("/weather")
    assert refused.value.code == "budget_exceeded"
    assert chain.balance_of(payer.address) == 1_000_000 - 2 * PRICE


async def test_malformed_proof_is_a_clear_400(paid: Paid) -> None:
    async with client(paid) as c:
        for bad in ("not base64!", "e30=", "A" * 20_000):
            response = await c.get("/weather", headers={"payment-signature": bad})
            assert response.status_code == 400, bad
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] in {
                "invalid_payload",
                "invalid_x402_version",
                "payload_too_large",
            }
            assert response.headers["payment-required"]


async def test_well_known_documents(paid: Paid) -> None:
    async with client(paid) as c:
        issuer = (await c.get("/.well-known/peac-issuer.json")).json()
        jwks = (await c.get("/.well-known/jwks.json")).json()
        policy = (await c.get("/.well-known/peac.txt")).json()
    assert issuer["issuer"] == ISSUER
    assert issuer["jwks_uri"] == ISSUER + "/.well-known/jwks.json"
    assert jwks["keys"][0]["kid"] == paid.key.kid
    assert policy["version"] == "peac-policy/0.1"
    weather = next(r for r in policy["routes"] if r["path"] == "/weather")
    assert weather["methods"][0]["amount"] == str(PRICE)


async def test_issuer_keys_are_discovered_once_and_cached(paid: Paid, chain: DevChain) -> None:
    fetched: list[str] = []
    app = fastapi_app(paid)

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/.well-known/"):
            fetched.append(scope["path"])
        await app(scope, receive, send)

    agent = Agent(fund(chain))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=counting), base_url=ISSUER, auth=PaymentAuth(agent)
    ) as c:
        for _ in range(3):
            response = await c.get("/weather")
            assert response.extensions[PAYMENT_EXTENSION].receipt is not None
    assert fetched == ["/.well-known/peac-issuer.json", "/.well-known/jwks.json"]


async def test_a_receipt_from_another_issuer_is_reported_with_the_body_and_the_spend_counts(
    paid: Paid, chain: DevChain
) -> None:
    """Paid, then a record that fails: the body and the settlement are delivered with the
    receipt's problem beside them; only require_receipt refuses, and then the exception carries
    the payment and the response."""
    for required in (False, True):
        payer = fund(chain)
        agent = Agent(payer, require_receipt=required)
        # The server signs as https://api.test but is reached as https://elsewhere.test.
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=fastapi_app(paid)),
            base_url="https://elsewhere.test",
            auth=PaymentAuth(agent),
        ) as c:
            if not required:
                response = await c.get("/weather")
                payment = response.extensions[PAYMENT_EXTENSION]
                assert response.status_code == 200
                assert response.json() == {"forecast": "sunny"}
                assert payment.receipt is None
                assert payment.receipt_jws is not None
                assert "E_VERIFY_ISSUER_MISMATCH" in payment.receipt_error.message
                assert payment.settlement.success
                assert payment.settlement.transaction
            else:
                with pytest.raises(PaymentFailed) as refused:
                    await c.get("/weather")
                assert refused.value.code == "receipt_invalid"
                assert "E_VERIFY_ISSUER_MISMATCH" in refused.value.message
                assert refused.value.payment is not None
                assert refused.value.payment.settlement.transaction
                assert refused.value.answer is not None
                assert refused.value.answer.status == 200
        assert chain.balance_of(payer.address) == 1_000_000 - PRICE
        assert agent.budget.spent(now=int(time.time())).today_committed > 0


async def test_a_missing_receipt_is_accepted_unless_required(paid: Paid, chain: DevChain) -> None:
    app = fastapi_app(paid)

    async def strip_receipt(scope: Any, receive: Any, send: Any) -> None:
        async def send_without(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [(k, v) for k, v in message["headers"] if k != b"peac-receipt"]
            await send(message)

        await app(scope, receive, send_without)

    for required in (False, True):
        payer = fund(chain)
        agent = Agent(payer, require_receipt=required)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=strip_receipt),
            base_url=ISSUER,
            auth=PaymentAuth(agent),
        ) as c:
            if required:
                with pytest.raises(PaymentError) as refused:
                    await c.get("/weather")
                assert refused.value.code == "receipt_invalid"
            else:
                response = await c.get("/weather")
                assert response.status_code == 200
                assert response.extensions[PAYMENT_EXTENSION].receipt is None
        assert chain.balance_of(payer.address) == 1_000_000 - PRICE  # paid either way

"""Every settle path ends in the ledger's check right before signing: the gate with its in-process
facilitator, and the facilitator service. A payer holding one payment's worth fires twenty
payments at once; each passes the simulation at verify time, one is settled, and the other
nineteen are refused with the insufficient-balance code before anything is broadcast."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import httpx
import pytest

from farebox.dev.devchain import DevChain
from farebox.dev.sample import weather_app
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.facilitator.service import facilitator_app
from farebox.ledgers.evm import EvmLedger
from farebox.protocol.challenge import read_challenge
from farebox.protocol.models import Resource
from farebox.protocol.x402 import encode_proof, proof_to_json, requirements_to_json
from farebox.schemes.evm_exact import make_proof
from farebox.server.asgi import PaymentMiddleware
from farebox.store.memory import MemoryStore
from tests.support.chain import fund, offer_on
from tests.support.gates import PRICE, make_gate

pytestmark = pytest.mark.anyio

AT_ONCE = 20
INSUFFICIENT = "invalid_exact_evm_insufficient_balance"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settler_transactions(chain: DevChain, settler: str, since_block: int) -> list[str]:
    """The receipt status of each transaction ``settler`` sent after ``since_block``."""
    statuses = []
    for number in range(since_block + 1, chain.block_number() + 1):
        block = chain.handle("eth_getBlockByNumber", [hex(number), True])
        for tx in block["transactions"]:
            if tx["from"].lower() == settler.lower():
                receipt = chain.handle("eth_getTransactionReceipt", [tx["hash"]])
                statuses.append(receipt["status"])
    return statuses


async def all_at_once(client: httpx.AsyncClient, calls: list[dict[str, Any]]) -> list[Any]:
    responses: list[httpx.Response] = []

    async def one(call: dict[str, Any]) -> None:
        responses.append(await client.request(**call))

    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(one, call)
    return responses


async def test_the_gate_settles_one_and_reverts_nothing(chain: DevChain) -> None:
    paid = make_gate(chain)
    app = PaymentMiddleware(weather_app, paid.gate)
    payer = fund(chain, PRICE)
    settler = chain.accounts[1].address
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://api.test") as client:
        unpaid = await client.get("/weather")
        challenge = read_challenge(dict(unpaid.headers), unpaid.content)
        offer, now = challenge.accepts[0], int(time.time())
        calls = [
            {
                "method": "GET",
                "url": "/weather",
                "headers": {
                    "payment-signature": encode_proof(
                        make_proof(payer, offer, now=now, nonce=os.urandom(32))
                    )
                },
            }
            for _ in range(AT_ONCE)
        ]
        start = chain.block_number()
        responses = await all_at_once(client, calls)
    codes = [r.json()["code"] for r in responses if r.status_code != 200]
    assert settler_transactions(chain, settler, start) == ["0x1"]  # no gas on a revert
    assert sum(r.status_code == 200 for r in responses) == 1
    assert codes == [INSUFFICIENT] * (AT_ONCE - 1)
    assert chain.balance_of(paid.merchant) == PRICE
    # One claim settled, the nineteen released: nothing left held or pending.
    assert await paid.store.unfinished(held_before=2**40) == []


async def test_the_facilitator_service_settles_one_and_reverts_nothing(chain: DevChain) -> None:
    settler = chain.accounts[2].account
    ledger = EvmLedger(chain.rpc, settler, network=chain.network)
    app = facilitator_app(LocalFacilitator([ledger]), MemoryStore())
    payer, merchant = fund(chain, PRICE), EvmAccount.generate().address
    offer, now = offer_on(chain, merchant), int(time.time())
    resource = Resource("https://api.test/weather", "weather", "application/json")
    calls = [
        {
            "method": "POST",
            "url": "/settle",
            "json": {
                "x402Version": 2,
                "paymentPayload": proof_to_json(
                    make_proof(payer, offer, now=now, nonce=os.urandom(32), resource=resource)
                ),
                "paymentRequirements": requirements_to_json(offer, resource, x402_version=2),
            },
        }
        for _ in range(AT_ONCE)
    ]
    transport = httpx.ASGITransport(app=app)
    start = chain.block_number()
    async with httpx.AsyncClient(transport=transport, base_url="http://facilitator.test") as client:
        answers = [r.json() for r in await all_at_once(client, calls)]
    assert settler_transactions(chain, settler.address, start) == ["0x1"]
    assert [a["success"] for a in answers].count(True) == 1
    refused = [a["errorReason"] for a in answers if not a["success"]]
    assert refused == [INSUFFICIENT] * (AT_ONCE - 1)
    assert all(a["transaction"] == "" for a in answers if not a["success"])
    assert chain.balance_of(merchant) == PRICE

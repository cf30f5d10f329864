"""The facilitator service answers ``success`` once per nonce, on every store backend.

A resource server behind the official middleware serves on the facilitator's ``success`` alone,
so each of these is a response given away if the service gets it wrong: a repeat or a concurrent
duplicate of a settled authorization, another authorization signed with the same EIP-3009
nonce, a duplicate arriving while the first is still being broadcast, and a ``/verify`` of a
nonce already claimed. All run on the embedded chain with the service's store on memory,
SQLite, PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import httpx
import pytest

from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.facilitator.service import FacilitatorApp, facilitator_app
from farebox.ledgers.evm import TRANSFER_TOPIC, EvmLedger
from farebox.ledgers.rpc import Rpc
from farebox.protocol.models import Offer, Proof, Resource
from farebox.protocol.x402 import proof_to_json, requirements_to_json
from farebox.schemes.evm_exact import make_proof
from farebox.store import Store
from tests.support.chain import fund, send_usdc
from tests.support.faults import HiddenReceipts, SlowBroadcast

pytestmark = pytest.mark.anyio

SETTLER = 3  # this module's settler account (its own transaction nonces)
RESOURCE = Resource("https://api.test/weather", "weather", "application/json")
USED = "invalid_exact_evm_nonce_already_used"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def service(
    chain: DevChain, store: Store, rpc: Rpc | None = None, **options: Any
) -> FacilitatorApp:
    ledger = EvmLedger(
        rpc or chain.rpc,
        chain.accounts[SETTLER].account,
        network=chain.network,
        confirm_timeout=0.3,
    )
    return facilitator_app(LocalFacilitator([ledger]), store, **options)


def client_for(app: FacilitatorApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f.test")


def offer_to(chain: DevChain, pay_to: str, amount: int) -> Offer:
    asset = chain.asset
    return Offer(
        "exact",
        asset.network,
        amount,
        asset.address,
        pay_to,
        300,
        {"name": asset.name, "version": asset.version},
    )


def signed(payer: EvmAccount, offer: Offer, nonce: bytes) -> dict[str, Any]:
    """The body the official ``HTTPFacilitatorClient`` posts for this payment."""
    proof: Proof = make_proof(payer, offer, now=int(time.time()), nonce=nonce, resource=RESOURCE)
    return {
        "x402Version": 2,
        "paymentPayload": proof_to_json(proof),
        "paymentRequirements": requirements_to_json(offer, RESOURCE, x402_version=2),
    }


def transfers_from(chain: DevChain, payer: str) -> list[dict[str, Any]]:
    """The token's Transfer logs out of ``payer``: what actually moved on chain."""
    query = {
        "address": chain.token,
        "fromBlock": "earliest",
        "toBlock": "latest",
        "topics": [TRANSFER_TOPIC, "0x" + payer[2:].lower().rjust(64, "0")],
    }
    logs: list[dict[str, Any]] = chain.handle("eth_getLogs", [query])
    return logs


def refused(answer: dict[str, Any]) -> str:
    """Check that a /settle answer is the refusal of a nonce already used (no success, no
    transaction, no amount to serve on); its message."""
    assert answer["success"] is False
    assert answer["errorReason"] == USED
    assert answer["transaction"] == ""
    assert "amount" not in answer
    return str(answer["errorMessage"])


def sent_by_settler(chain: DevChain) -> int:
    return int(chain.handle("eth_getTransactionCount", [chain.accounts[SETTLER].address]), 16)


async def test_a_repeated_settle_is_refused_naming_the_transaction(
    chain: DevChain, service_store: Store
) -> None:
    app = service(chain, service_store)
    payer = fund(chain)
    merchant = EvmAccount.generate().address
    request = signed(payer, offer_to(chain, merchant, 10_000), os.urandom(32))
    async with client_for(app) as client:
        first = (await client.post("/settle", json=request)).json()
        again = (await client.post("/settle", json=request)).json()
        verdict = (await client.post("/verify", json=request)).json()
    assert first["success"] is True
    tx = first["transaction"]
    # A retry of a lost answer learns what happened, but is not a second success to serve on.
    assert f"this authorization was already settled in transaction {tx}" in refused(again)
    assert verdict["isValid"] is False
    assert verdict["invalidReason"] == USED
    assert chain.balance_of(merchant) == 10_000
    assert len(transfers_from(chain, payer.address)) == 1


async def test_two_authorizations_with_one_nonce_settle_only_the_first(
    chain: DevChain, service_store: Store
) -> None:
    app = service(chain, service_store)
    payer = fund(chain)
    nonce = os.urandom(32)
    merchant_a, merchant_b = EvmAccount.generate().address, EvmAccount.generate().address
    pay_a = signed(payer, offer_to(chain, merchant_a, 10_000), nonce)  # $0.01 to A
    pay_b = signed(payer, offer_to(chain, merchant_b, 500_000), nonce)  # $0.50 to B, same nonce
    async with client_for(app) as client:
        settled_a = (await client.post("/settle", json=pay_a)).json()
        verdict_b = (await client.post("/verify", json=pay_b)).json()
        settled_b = (await client.post("/settle", json=pay_b)).json()
    assert settled_a["success"] is True
    tx = settled_a["transaction"]
    assert verdict_b["isValid"] is False
    assert verdict_b["invalidReason"] == USED
    # A's transaction is not B's: refused() holds the transaction empty.
    assert "another authorization with the same nonce" in refused(settled_b)
    assert tx in settled_b["errorMessage"]
    assert chain.balance_of(merchant_a) == 10_000
    assert chain.balance_of(merchant_b) == 0
    assert chain.balance_of(payer.address) == 1_000_000 - 10_000
    events = await service_store.events(kind="settlement")
    assert len(events) == 1
    assert events[0].data["pay_to"] == merchant_a


async def test_fifty_concurrent_settles_of_one_payment_answer_success_once(
    chain: DevChain, service_store: Store
) -> None:
    app = service(chain, service_store)
    payer = fund(chain)
    merchant = EvmAccount.generate().address
    request = signed(payer, offer_to(chain, merchant, 10_000), os.urandom(32))
    sent_before = sent_by_settler(chain)
    answers: list[dict[str, Any]] = []
    async with client_for(app) as client:

        async def settle() -> None:
            response = await client.post("/settle", json=request)
            assert response.status_code == 200
            answers.append(response.json())

        async with anyio.create_task_group() as group:
            for _ in range(50):
                group.start_soon(settle)
    successes = [a for a in answers if a["success"]]
    refusals = [a for a in answers if not a["success"]]
    print(f"50 concurrent /settle: {len(successes)} success, {len(refusals)} refused")
    assert len(successes) == 1
    assert {a["errorReason"] for a in refusals} == {USED}
    assert all(a["transaction"] == "" for a in refusals)
    assert chain.balance_of(merchant) == 10_000
    assert len(transfers_from(chain, payer.address)) == 1
    assert sent_by_settler(chain) - sent_before == 1  # one transaction, no reverted duplicates


async def test_concurrent_authorizations_sharing_a_nonce_move_money_once(
    chain: DevChain, service_store: Store
) -> None:
    app = service(chain, service_store)
    payer = fund(chain)
    nonce = os.urandom(32)
    merchants = [EvmAccount.generate().address for _ in range(2)]
    bodies = [
        signed(payer, offer_to(chain, merchants[0], 10_000), nonce),
        signed(payer, offer_to(chain, merchants[1], 500_000), nonce),
    ]
    answers: list[tuple[int, dict[str, Any]]] = []
    async with client_for(app) as client:

        async def settle(which: int) -> None:
            answers.append((which, (await client.post("/settle", json=bodies[which])).json()))

        async with anyio.create_task_group() as group:
            for i in range(20):
                group.start_soon(settle, i % 2)
    won = [which for which, answer in answers if answer["success"]]
    assert len(won) == 1
    assert all(a["errorReason"] == USED for _, a in answers if not a["success"])
    paid = merchants[won[0]]
    assert chain.balance_of(paid) == (10_000, 500_000)[won[0]]
    assert chain.balance_of(merchants[1 - won[0]]) == 0
    assert len(transfers_from(chain, payer.address)) == 1


async def test_a_duplicate_during_the_broadcast_is_refused(
    chain: DevChain, service_store: Store
) -> None:
    # The first settle holds the claim while the node takes 0.6 s to accept its transaction; a
    # duplicate gives up waiting after 0.1 s. Neither it nor a /verify may say "valid" or "paid".
    app = service(chain, service_store, SlowBroadcast(chain, 0.6), settle_wait=0.1)
    payer = fund(chain)
    merchant = EvmAccount.generate().address
    request = signed(payer, offer_to(chain, merchant, 10_000), os.urandom(32))
    answers: dict[str, Any] = {}
    async with client_for(app) as client:

        async def first() -> None:
            answers["first"] = (await client.post("/settle", json=request)).json()

        async with anyio.create_task_group() as group:
            group.start_soon(first)
            await anyio.sleep(0.2)  # the first request holds the claim, its broadcast under way
            answers["verify"] = (await client.post("/verify", json=request)).json()
            answers["duplicate"] = (await client.post("/settle", json=request)).json()
            assert "first" not in answers  # both answered while the broadcast was in flight
    assert answers["first"]["success"] is True
    assert answers["verify"]["isValid"] is False
    assert answers["verify"]["invalidReason"] == USED
    assert "being settled by another request" in refused(answers["duplicate"])
    assert chain.balance_of(merchant) == 10_000
    assert len(transfers_from(chain, payer.address)) == 1


async def test_a_repeat_of_a_pending_settlement_is_refused(
    chain: DevChain, service_store: Store
) -> None:
    # The node never shows the receipt: the first answer is settlement_pending with its hash (the
    # money may move), and neither a repeat nor another authorization on the nonce gets more.
    app = service(chain, service_store, HiddenReceipts(chain))
    payer = fund(chain)
    nonce = os.urandom(32)
    merchant, other = EvmAccount.generate().address, EvmAccount.generate().address
    request = signed(payer, offer_to(chain, merchant, 10_000), nonce)
    rival = signed(payer, offer_to(chain, other, 500_000), nonce)
    async with client_for(app) as client:
        first = (await client.post("/settle", json=request)).json()
        again = (await client.post("/settle", json=request)).json()
        rivalled = (await client.post("/settle", json=rival)).json()
    assert first["success"] is False
    assert first["errorReason"] == "settlement_pending"
    tx = first["transaction"]
    assert tx.startswith("0x")
    for answer, whose in ((again, "this authorization"), (rivalled, "another authorization")):
        message = refused(answer)  # not settlement_pending: this request sent nothing
        assert whose in message
        assert tx in message
    assert chain.balance_of(merchant) == 10_000  # the chain did mine it
    assert chain.balance_of(other) == 0
    claim_key = (await service_store.events(kind="settlement"))[0].data["claim"]
    claim = await service_store.get_claim(claim_key)
    assert claim is not None
    assert claim.state == "pending"
    assert claim.transaction == tx


async def test_a_settle_whose_holder_gave_up_is_settled_by_the_next(
    chain: DevChain, service_store: Store
) -> None:
    # The first attempt fails before broadcasting (the payer is not funded yet) and releases the
    # nonce; a later settle of the same authorization is the one that broadcasts and succeeds.
    app = service(chain, service_store)
    payer = EvmAccount.generate()
    merchant = EvmAccount.generate().address
    request = signed(payer, offer_to(chain, merchant, 10_000), os.urandom(32))
    async with client_for(app) as client:
        broke = (await client.post("/settle", json=request)).json()
        send_usdc(chain, payer.address, 10_000)
        paid = (await client.post("/settle", json=request)).json()
    assert broke["errorReason"] == "invalid_exact_evm_insufficient_balance"
    assert paid["success"] is True
    assert chain.balance_of(merchant) == 10_000

"""A payment whose response was withheld (its settlement not confirmed in time) is delivered once,
on the payer's retry with the same id, after it settled: on every store, with concurrent retries.

The chain is the embedded one; the faults sit in front of its RPC: a node that never reports
receipts (the transfer lands, the gate cannot tell in time) and a node that loses a broadcast.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.ledgers.rpc import RpcUnavailable
from farebox.ops.reconcile import Reconciler
from farebox.protocol.challenge import read_challenge
from farebox.protocol.x402 import decode_settlement, encode_proof
from farebox.receipts import SigningKey, verify_receipt
from farebox.schemes.evm_exact import make_proof, verify
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.routes import RouteTable
from farebox.store.base import Store, StoredResponse
from tests.support.chain import cancel_on_chain, fund
from tests.support.faults import HiddenReceipts
from tests.support.gates import PRICE
from tests.support.stores import store_factory

pytestmark = pytest.mark.anyio


class Counting:
    """The paid app: counts its runs, failing on the chosen ones."""

    def __init__(self, *, fail: Sequence[int] = ()) -> None:
        self.calls = 0
        self.fail = set(fail)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        status = 500 if self.calls in self.fail else 200
        body = f"report {self.calls}".encode()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})


class LostBroadcast:
    """A node whose answer to every broadcast is lost, and that never received it either."""

    def __init__(self, chain: DevChain) -> None:
        self.inner = chain.rpc

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        if method == "eth_sendRawTransaction":
            raise RpcUnavailable("connection reset")
        return await self.inner.request(method, params)


class Api:
    def __init__(self, chain: DevChain, store: Store, rpc: Any, *, fail: Sequence[int] = ()):
        self.chain = chain
        self.merchant = "0x" + os.urandom(20).hex()
        routes = RouteTable()
        routes.add("GET", "/report", PRICE, assets=chain.asset, pay_to=self.merchant)
        ledger = EvmLedger(rpc, chain.accounts[1].account, network=chain.network)
        ledger.confirm_timeout = 0.2
        self.key = SigningKey.generate()
        self.gate = Gate(routes, LocalFacilitator([ledger]), store, signing_key=self.key)
        self.app = Counting(fail=fail)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=PaymentMiddleware(self.app, self.gate)),
            base_url="https://api.test",
        )

    async def pay(
        self, payer: EvmAccount, request_id: str, *, nonce: bytes | None = None
    ) -> httpx.Response:
        """GET /report with a freshly signed payment and the idempotency id ``request_id``."""
        unpaid = await self.client.get("/report")
        challenge = read_challenge(dict(unpaid.headers), unpaid.content)
        proof = make_proof(
            payer,
            challenge.accepts[0],
            now=int(time.time()),
            nonce=nonce or os.urandom(32),
            resource=challenge.resource,
        )
        headers = {"payment-signature": encode_proof(proof), "idempotency-key": request_id}
        return await self.client.get("/report", headers=headers)

    async def reconcile(self, **options: Any) -> None:
        """One reconciler pass reading the real chain (the node the gate settles on may hide
        what happened)."""
        chain = self.chain
        truthful = EvmLedger(chain.rpc, chain.accounts[1].account, network=chain.network)
        await Reconciler(self.gate.store, [truthful], **options).run_once()


def _code(response: httpx.Response) -> str:
    return str(response.json()["code"])


async def test_settled_after_withheld_is_delivered_once_to_concurrent_retries(
    chain: DevChain, store: Store
) -> None:
    api = Api(chain, store, HiddenReceipts(chain))
    payer = fund(chain)
    request_id = "report_" + os.urandom(12).hex()
    first = await api.pay(payer, request_id)
    assert first.status_code == 402
    assert _code(first) == "settlement_pending"
    transaction = decode_settlement(first.headers["payment-response"]).transaction
    assert api.app.calls == 1  # it ran; its response was withheld
    # Before the chain's answer is known, a retry hears the same and pays nothing more.
    again = await api.pay(payer, request_id)
    assert again.status_code == 402
    assert _code(again) == "settlement_pending"
    assert api.app.calls == 1
    await api.reconcile()

    responses: list[httpx.Response] = []

    async def retry() -> None:
        responses.append(await api.pay(payer, request_id))

    async with anyio.create_task_group() as group:
        for _ in range(6):
            group.start_soon(retry)
    assert [r.status_code for r in responses] == [200] * 6
    delivered = [r for r in responses if "idempotent-replayed" not in r.headers]
    assert len(delivered) == 1  # one ran the app; the others got its stored response
    assert api.app.calls == 2
    assert {r.content for r in responses} == {b"report 2"}
    settlement = decode_settlement(delivered[0].headers["payment-response"])
    assert settlement.success
    assert settlement.transaction == transaction
    record = verify_receipt(
        delivered[0].headers["peac-receipt"], api.key.public_key, now=int(time.time())
    )
    commerce = record.claims["extensions"]["org.peacprotocol/commerce"]
    assert commerce["reference"] == transaction
    assert commerce["amount_minor"] == str(PRICE)
    assert commerce["event"] == "settlement"
    # One payment moved money once: the retries' fresh proofs were never spent.
    assert chain.balance_of(api.merchant) == PRICE
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE
    later = await api.pay(payer, request_id)
    assert later.status_code == 200
    assert later.headers["idempotent-replayed"] == "true"
    assert api.app.calls == 2


async def test_a_failed_late_delivery_can_be_retried(chain: DevChain, store: Store) -> None:
    api = Api(chain, store, HiddenReceipts(chain), fail=[2])
    payer = fund(chain)
    request_id = "report_" + os.urandom(12).hex()
    assert _code(await api.pay(payer, request_id)) == "settlement_pending"
    await api.reconcile()
    failed = await api.pay(payer, request_id)
    assert failed.status_code == 500  # the app's own error passes; the payment stays owed
    delivered = await api.pay(payer, request_id)
    assert delivered.status_code == 200
    assert delivered.content == b"report 3"
    assert decode_settlement(delivered.headers["payment-response"]).success
    assert chain.balance_of(api.merchant) == PRICE


async def test_released_after_withheld_lets_the_retry_pay(chain: DevChain, store: Store) -> None:
    api = Api(chain, store, LostBroadcast(chain))
    payer = fund(chain)
    request_id = "report_" + os.urandom(12).hex()
    first = await api.pay(payer, request_id)
    assert _code(first) == "settlement_pending"
    assert chain.balance_of(api.merchant) == 0  # the broadcast never reached the chain
    # Unused, but anyone holding the signed authorization could still broadcast it until its
    # validBefore: the claim waits, and the retry hears that its payment is pending, however
    # soon a release was asked for.
    await api.reconcile(release_after=0)
    waiting = await api.pay(payer, request_id)
    assert _code(waiting) == "settlement_pending"
    assert api.app.calls == 1
    # Past validBefore the authorization can never move money: released.
    later = time.time() + 300 + 600 + 121
    await api.reconcile(release_after=0, clock=lambda: later)
    # The node works again; the retry's own payment settles, once.
    api.gate.facilitator.ledger_for(chain.network).rpc = chain.rpc  # type: ignore[attr-defined]
    paid = await api.pay(payer, request_id)
    assert paid.status_code == 200
    assert "idempotent-replayed" not in paid.headers
    assert decode_settlement(paid.headers["payment-response"]).success
    assert chain.balance_of(api.merchant) == PRICE
    assert api.app.calls == 2


async def test_a_nonce_spent_by_another_authorization_is_not_taken_for_this_payment(
    chain: DevChain, store: Store
) -> None:
    """The payer signs B ($0.01 to this API, whose broadcast is lost) and A (to someone else,
    same nonce), and A settles first. The chain says the nonce was used, but by A's transfer:
    B's payment is released, not confirmed, and its retry pays rather than being served free."""
    api = Api(chain, store, LostBroadcast(chain))
    payer = fund(chain)
    nonce = os.urandom(32)
    request_id = "report_" + os.urandom(12).hex()
    assert _code(await api.pay(payer, request_id, nonce=nonce)) == "settlement_pending"
    elsewhere = "0x" + os.urandom(20).hex()
    unpaid = await api.client.get("/report")
    offer = read_challenge(dict(unpaid.headers), unpaid.content).accepts[0]
    other = replace(offer, pay_to=elsewhere, amount=1)
    now = int(time.time())
    proof_a = verify(make_proof(payer, other, now=now, nonce=nonce), other, now=now)
    settler = EvmLedger(chain.rpc, chain.accounts[2].account, network=chain.network)
    assert (await settler.settle(proof_a)).success
    report = await Reconciler(store, [settler]).run_once()
    assert (report.settled, report.released) == (0, 1)
    api.gate.facilitator.ledger_for(chain.network).rpc = chain.rpc  # type: ignore[attr-defined]
    paid = await api.pay(payer, request_id)
    assert paid.status_code == 200
    assert "idempotent-replayed" not in paid.headers
    assert chain.balance_of(api.merchant) == PRICE  # paid by the retry's own payment
    assert chain.balance_of(elsewhere) == 1


async def test_a_cancelled_authorization_is_released_not_taken_for_paid(
    chain: DevChain, store: Store
) -> None:
    """The payer cancels the authorization whose settlement was pending: the nonce reads as
    used, but nothing moved. The claim is released, never confirmed, so no response is served
    for it; the retry pays with its own payment."""
    api = Api(chain, store, LostBroadcast(chain))
    payer = fund(chain)
    nonce = os.urandom(32)
    request_id = "report_" + os.urandom(12).hex()
    assert _code(await api.pay(payer, request_id, nonce=nonce)) == "settlement_pending"
    [pending] = await store.unfinished(held_before=0)
    cancel_on_chain(chain, payer, nonce)
    await api.reconcile()
    assert await store.get_claim(pending.key) is None  # released
    api.gate.facilitator.ledger_for(chain.network).rpc = chain.rpc  # type: ignore[attr-defined]
    paid = await api.pay(payer, request_id)
    assert paid.status_code == 200
    assert "idempotent-replayed" not in paid.headers
    assert chain.balance_of(api.merchant) == PRICE
    assert api.app.calls == 2


class Forging:
    """An app whose paid response carries the gate's own stored-only marker headers."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        headers = [
            (b"x-farebox-idempotent-withheld", b'{"claim": "x", "owner": "y"}'),
            (b"x-farebox-idempotent-body-omitted", b"5"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"paid once"})


async def test_an_app_cannot_forge_the_gates_stored_markers(chain: DevChain, store: Store) -> None:
    api = Api(chain, store, chain.rpc)
    forging = Forging()
    api.client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=PaymentMiddleware(forging, api.gate)),
        base_url="https://api.test",
    )
    payer = fund(chain)
    request_id = "report_" + os.urandom(12).hex()
    assert (await api.pay(payer, request_id)).status_code == 200
    replayed = await api.pay(payer, request_id)
    # The stored response replays as it was: not read as withheld (which would reopen the id and
    # charge the retry) nor as cut short (a 409).
    assert replayed.status_code == 200
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.content == b"paid once"
    assert forging.calls == 1
    assert chain.balance_of(api.merchant) == PRICE


async def test_reopen_takes_a_completed_entry_once(store: Store) -> None:
    answer = StoredResponse(402, (("content-type", "application/json"),), b"{}")
    assert await store.begin_idempotent("k", fingerprint="f", owner="a", now=1, claim="c") is None
    # A running entry is not reopened: its request is still live.
    assert not await store.reopen_idempotent("k", owner="a", new_owner="b", now=2, claim="c")
    await store.complete_idempotent("k", owner="a", response=answer)
    assert await store.reopen_idempotent("k", owner="a", new_owner="b", now=3, claim="d")
    assert not await store.reopen_idempotent("k", owner="a", new_owner="x", now=3, claim="d")
    entry = await store.get_idempotent("k")
    assert entry is not None
    assert (entry.owner, entry.at, entry.claim, entry.response) == ("b", 3, "d", None)
    assert entry.fingerprint == "f"
    await store.complete_idempotent("k", owner="b", response=answer)
    done = await store.get_idempotent("k")
    assert done is not None
    assert done.response == answer
    assert not await store.reopen_idempotent("missing", owner="a", new_owner="b", now=4, claim=None)


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "redis"])
async def test_replicas_deliver_a_withheld_payment_once(
    chain: DevChain, backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two server instances, each with its own connection to one shared store: the retries
    after the settlement was confirmed hit both at once, and the app runs once between them."""
    make = store_factory(backend, request, tmp_path)
    first = Api(chain, make(), HiddenReceipts(chain))
    second = Api(chain, make(), chain.rpc)
    second.gate.routes = first.gate.routes  # one API: the same route, the same merchant
    second.merchant = first.merchant
    payer = fund(chain)
    request_id = "report_" + os.urandom(12).hex()
    assert _code(await first.pay(payer, request_id)) == "settlement_pending"
    await first.reconcile()
    statuses: list[tuple[int, bool]] = []

    async def retry(api: Api) -> None:
        response = await api.pay(payer, request_id)
        statuses.append((response.status_code, "idempotent-replayed" in response.headers))

    try:
        async with anyio.create_task_group() as group:
            for n in range(8):
                group.start_soon(retry, (first, second)[n % 2])
    finally:
        await first.gate.store.aclose()
        await second.gate.store.aclose()
    assert sorted(statuses) == [(200, False)] + [(200, True)] * 7
    assert first.app.calls + second.app.calls == 2  # the withheld run, and one delivery
    assert chain.balance_of(first.merchant) == PRICE

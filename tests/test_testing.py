"""farebox.testing: the public test helpers, and a user's test of a paid app written with them.

The fake facilitator is checked against the rules of the token it stands for (one settlement per
authorization nonce, expiry, balance), make_payment against the gate that must accept what it
signs, and the fake card ledger through the card rail. Importing farebox.testing is checked in a
fresh interpreter: it must not load the embedded chain (py-evm) or Stripe's library.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from farebox import CardOffer, CardRail, Gate, MemoryStore, PaymentMiddleware, RouteTable
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.facilitator.base import Facilitator
from farebox.money import DEVCHAIN_USDC
from farebox.protocol import mpp
from farebox.protocol.models import Challenge, Offer, Resource
from farebox.protocol.x402 import decode_proof, decode_settlement, encode_challenge_header
from farebox.receipts import verify_receipt
from farebox.schemes.evm_exact import VerifiedEvmProof, verify
from farebox.testing import (
    TEST_ASSET,
    TEST_CARD_SECRET,
    TEST_NETWORK,
    TEST_PAY_TO,
    TEST_PAYER,
    TEST_SIGNING_KEY,
    FakeFacilitator,
    fake_transaction,
    make_card_payment,
    make_payment,
    read_402,
)

pytestmark = pytest.mark.anyio

ORIGIN = "https://api.test"
PRICE = 10_000
NOW = 1_750_000_000
OFFER = Offer(
    scheme="exact",
    network=TEST_NETWORK,
    amount=PRICE,
    asset=TEST_ASSET.address,
    pay_to=TEST_PAY_TO,
    extra={"name": TEST_ASSET.name, "version": TEST_ASSET.version},
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def verified_payment(headers: dict[str, str], now: int = NOW) -> VerifiedEvmProof:
    """The gate's offline verification of the proof make_payment put in ``headers``."""
    proof = decode_proof(headers["PAYMENT-SIGNATURE"])
    assert proof.accepted is not None
    return verify(proof, proof.accepted, now=now)


# --- importing -------------------------------------------------------------------------------------

HEAVY = {"eth", "eth_tester", "eth_utils", "web3", "vyper", "stripe", "localstripe", "x402"}


def test_importing_farebox_testing_loads_no_chain_and_no_stripe() -> None:
    # One fresh interpreter: what `import farebox.testing` loads, then what the card fake adds.
    code = (
        "import json, sys\n"
        "import farebox.testing\n"
        "first = sorted(sys.modules)\n"
        "from farebox.testing import FakeCardLedger\n"
        "print(json.dumps([first, sorted(sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = (set(names) for names in json.loads(out.stdout))
    assert "farebox.testing.facilitator" in before
    assert {n.split(".")[0] for n in before} & HEAVY == set()
    assert not any(n.startswith(("farebox.ledgers.", "farebox.dev.")) for n in before)
    # The card fake loads Stripe's library when it is first asked for, and still no chain.
    assert "stripe" in after
    assert {n.split(".")[0] for n in after} & (HEAVY - {"stripe"}) == set()
    assert "farebox.dev.devchain" not in after


# --- the fixed keys --------------------------------------------------------------------------------


def test_the_keys_are_the_published_test_keys() -> None:
    # Account #3 of the standard development mnemonic, and RFC 8032's TEST 1 key pair.
    assert TEST_PAYER.address == "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
    assert TEST_SIGNING_KEY.public_key == bytes.fromhex(
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert TEST_ASSET is DEVCHAIN_USDC
    assert DEVCHAIN_USDC.network == TEST_NETWORK
    assert len(TEST_CARD_SECRET) >= 32


# --- the fake facilitator --------------------------------------------------------------------------


async def test_the_fake_settles_an_authorization_once_with_a_deterministic_hash() -> None:
    fake = FakeFacilitator(clock=lambda: NOW)
    assert isinstance(fake, Facilitator)
    nonce = b"\x01" * 32
    verified = verified_payment(make_payment(OFFER, now=NOW, nonce=nonce))
    await fake.verify(verified)
    settlement = await fake.settle(verified)
    assert settlement.success
    assert settlement.transaction == fake_transaction(verified)
    assert (settlement.payer, settlement.amount) == (TEST_PAYER.address, PRICE)
    [transfer] = fake.settled
    assert (transfer.transaction, transfer.claim_key) == (
        settlement.transaction,
        verified.claim_key,
    )
    assert fake.is_spent(verified)
    # As the token: the nonce moved money, so neither a second settle nor a verify passes.
    for step in (fake.settle, fake.verify):
        with pytest.raises(PaymentError) as refused:
            await step(verified)
        assert refused.value.code == "invalid_exact_evm_nonce_already_used"
    # Another authorization under the same nonce (another amount) is refused too.
    other = verified_payment(make_payment(OFFER, now=NOW + 1, nonce=nonce))
    assert fake_transaction(other) != settlement.transaction
    with pytest.raises(PaymentError, match="invalid_exact_evm_nonce_already_used"):
        await fake.settle(other)
    assert fake.calls == [("verify", verified.claim_key)] + [("settle", verified.claim_key)] * 2 + [
        ("verify", verified.claim_key),
        ("settle", other.claim_key),
    ]
    # The same proof gets the same hash from any fake; another nonce another hash.
    again = await FakeFacilitator(clock=lambda: NOW).settle(verified)
    assert again.transaction == settlement.transaction
    fresh = verified_payment(make_payment(OFFER, now=NOW, nonce=b"\x02" * 32))
    assert fake_transaction(fresh) != settlement.transaction


async def test_the_fake_plays_the_queued_outcomes_in_order() -> None:
    fake = FakeFacilitator(clock=lambda: NOW)
    fake.fail_next_settle("ledger_unavailable")
    fake.fail_next_verify("invalid_exact_evm_insufficient_balance", "low")
    fake.pend_next_settle()
    fake.fail_next_settle("transaction_failed", "reverted", broadcast=True)
    first = verified_payment(make_payment(OFFER, now=NOW))
    with pytest.raises(PaymentError) as verify_refused:
        await fake.verify(first)  # the verify outcome, not the settle ones queued before it
    assert (verify_refused.value.code, verify_refused.value.message) == (
        "invalid_exact_evm_insufficient_balance",
        "low",
    )
    with pytest.raises(PaymentError) as down:
        await fake.settle(first)
    assert down.value.code == "ledger_unavailable"
    assert not fake.is_spent(first)  # nothing was sent
    pending = await fake.settle(first)
    assert pending.pending
    assert pending.transaction == fake_transaction(first)
    assert [t.transaction for t in fake.pending] == [pending.transaction]
    assert fake.is_spent(first)  # broadcast: the authorization is taken
    second = verified_payment(make_payment(OFFER, now=NOW))
    reverted = await fake.settle(second)
    assert (reverted.success, reverted.error_reason) == (False, "transaction_failed")
    assert reverted.transaction == fake_transaction(second)
    assert not fake.is_spent(second)  # a reverted transfer leaves the authorization unused
    assert (await fake.settle(second)).success
    assert [t.claim_key for t in fake.settled] == [second.claim_key]
    # Mined, but no matching Transfer log: the money may have moved, as the lifecycle says.
    fake.fail_next_settle("invalid_exact_evm_transfer_event_mismatch")
    third = verified_payment(make_payment(OFFER, now=NOW))
    mismatch = await fake.settle(third)
    assert (mismatch.success, mismatch.pending) == (False, False)
    assert fake.is_spent(third)
    assert [t.claim_key for t in fake.pending] == [first.claim_key, third.claim_key]


async def test_the_fake_refuses_authorizations_outside_their_window() -> None:
    verified = verified_payment(make_payment(OFFER, now=NOW))
    auth = verified.authorization
    early = FakeFacilitator(clock=lambda: auth.valid_after)
    with pytest.raises(PaymentError, match="invalid_exact_evm_payload_authorization_valid_after"):
        await early.settle(verified)
    late = FakeFacilitator(clock=lambda: auth.valid_before)
    with pytest.raises(PaymentError, match="invalid_exact_evm_payload_authorization_valid_before"):
        await late.verify(verified)
    assert early.settled == late.settled == []
    assert (await FakeFacilitator(clock=lambda: auth.valid_before - 1).settle(verified)).success


async def test_the_fake_with_balances_moves_funds_and_refuses_an_underfunded_payer() -> None:
    fake = FakeFacilitator(balances={TEST_PAYER.address.lower(): PRICE + 1}, clock=lambda: NOW)
    first = verified_payment(make_payment(OFFER, now=NOW))
    assert (await fake.settle(first)).success
    assert fake.balance_of(TEST_PAYER.address) == 1
    assert fake.balance_of(TEST_PAY_TO.lower()) == PRICE
    second = verified_payment(make_payment(OFFER, now=NOW))
    with pytest.raises(PaymentError, match="invalid_exact_evm_insufficient_balance"):
        await fake.verify(second)
    with pytest.raises(PaymentError, match="invalid_exact_evm_insufficient_balance"):
        await fake.settle(second)
    assert FakeFacilitator().balance_of(TEST_PAYER.address) is None  # not tracked


def test_the_fake_supports_exact_on_evm_networks_or_the_ones_named() -> None:
    on_base = Offer("exact", "eip155:8453", 1, OFFER.asset, TEST_PAY_TO)
    assert FakeFacilitator().supports(OFFER)
    assert FakeFacilitator().supports(on_base)
    assert not FakeFacilitator().supports(Offer("upto", TEST_NETWORK, 1, OFFER.asset, TEST_PAY_TO))
    assert not FakeFacilitator().supports(Offer("exact", "solana:mainnet", 1, "x", "y"))
    only = FakeFacilitator(networks=[TEST_NETWORK])
    assert only.supports(OFFER)
    assert not only.supports(on_base)


# --- make_payment ----------------------------------------------------------------------------------


def test_make_payment_signs_what_the_gate_verifies() -> None:
    challenge = Challenge(Resource(ORIGIN + "/report"), (OFFER,))
    headers = make_payment(challenge, now=NOW, nonce=b"\x03" * 32)
    assert list(headers) == ["PAYMENT-SIGNATURE"]
    verified = verified_payment(headers)
    assert verified.payer == TEST_PAYER.address
    assert verified.proof.resource == challenge.resource
    assert verified.authorization.nonce == b"\x03" * 32
    assert verified.authorization.valid_before == NOW + OFFER.max_timeout_seconds
    # The same inputs sign the same authorization; another account another payer.
    assert make_payment(challenge, now=NOW, nonce=b"\x03" * 32) == headers
    assert make_payment(challenge, now=NOW) != make_payment(challenge, now=NOW)
    other = EvmAccount.generate()
    assert verified_payment(make_payment(OFFER, account=other, now=NOW)).payer == other.address
    # A v1 challenge is answered the v1 way (v1 names only a few networks).
    sepolia = Offer("exact", "eip155:84532", PRICE, OFFER.asset, TEST_PAY_TO, extra=OFFER.extra)
    v1 = make_payment(Challenge(Resource(ORIGIN), (sepolia,), x402_version=1), now=NOW)
    assert list(v1) == ["X-PAYMENT"]
    assert decode_proof(v1["X-PAYMENT"]).x402_version == 1


def test_make_payment_picks_an_exact_evm_offer_and_reads_responses() -> None:
    elsewhere = Offer("exact", "eip155:8453", 7, OFFER.asset, TEST_PAY_TO, extra=OFFER.extra)
    card_like = Offer("upto", TEST_NETWORK, 9, OFFER.asset, TEST_PAY_TO, extra=OFFER.extra)
    challenge = Challenge(Resource(ORIGIN), (card_like, elsewhere, OFFER))
    assert verified_payment(make_payment(challenge, now=NOW)).offer == elsewhere
    chosen = make_payment(challenge, now=NOW, network=TEST_NETWORK)
    assert verified_payment(chosen).offer == OFFER
    with pytest.raises(PaymentError, match="no_payable_offer"):
        make_payment(Challenge(Resource(ORIGIN), (card_like,)))
    response = httpx.Response(402, headers={"PAYMENT-REQUIRED": encode_challenge_header(challenge)})
    assert read_402(response).accepts == challenge.accepts
    assert verified_payment(make_payment(response, now=NOW)).offer == elsewhere
    with pytest.raises(ValueError, match="expected a 402"):
        make_payment(httpx.Response(200))


# --- a user's test: a FastAPI app behind the middleware, paid with make_payment --------------------


def paid_api(fake: FakeFacilitator) -> PaymentMiddleware:
    api = FastAPI()

    @api.get("/report")
    async def report() -> dict[str, str]:
        return {"report": "Q3"}

    routes = RouteTable()
    routes.add("GET", "/report", "$0.01", assets=TEST_ASSET, pay_to=TEST_PAY_TO)
    gate = Gate(routes, fake, MemoryStore(), signing_key=TEST_SIGNING_KEY, issuer=ORIGIN)
    return PaymentMiddleware(api, gate)


@pytest.fixture
async def fake_and_client(
    anyio_backend: str,
) -> AsyncIterator[tuple[FakeFacilitator, httpx.AsyncClient]]:
    fake = FakeFacilitator()
    transport = httpx.ASGITransport(app=paid_api(fake))
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
        yield fake, client


async def test_a_fastapi_app_is_paid_with_make_payment(
    fake_and_client: tuple[FakeFacilitator, httpx.AsyncClient],
) -> None:
    fake, client = fake_and_client
    first = await client.get("/report")
    assert first.status_code == 402
    paid = await client.get("/report", headers=make_payment(first))
    assert paid.status_code == 200
    assert paid.json() == {"report": "Q3"}
    settlement = decode_settlement(paid.headers["payment-response"])
    assert settlement.transaction == fake.settled[0].transaction
    receipt = verify_receipt(
        paid.headers["peac-receipt"],
        TEST_SIGNING_KEY.public_key,
        now=int(time.time()),
        issuer=ORIGIN,
    )
    assert receipt.claims["extensions"]["org.peacprotocol/commerce"]["amount_minor"] == "10000"
    # A failure is one line away.
    fake.fail_next_settle("ledger_unavailable")
    down = await client.get("/report", headers=make_payment(first))
    assert down.status_code == 503
    assert len(fake.settled) == 1


# --- the fake card ledger --------------------------------------------------------------------------


@pytest.fixture
async def card_shop(
    anyio_backend: str,
) -> AsyncIterator[tuple[object, FakeFacilitator, httpx.AsyncClient]]:
    pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")
    from farebox.testing import FakeCardLedger

    ledger = FakeCardLedger()
    fake = FakeFacilitator()
    api = FastAPI()

    @api.get("/report")
    async def report() -> dict[str, str]:
        return {"report": "Q3"}

    card = CardOffer(network_id=ledger.profile, realm="api.test", invoice=True)
    routes = RouteTable()
    routes.add("GET", "/report", "$0.50", assets=TEST_ASSET, pay_to=TEST_PAY_TO, card=card)
    gate = Gate(
        routes,
        fake,
        MemoryStore(),
        signing_key=TEST_SIGNING_KEY,
        issuer=ORIGIN,
        card=CardRail(TEST_CARD_SECRET, ledger),
    )
    transport = httpx.ASGITransport(app=PaymentMiddleware(api, gate))
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
        yield ledger, fake, client


async def test_the_fake_card_ledger_charges_tokens_through_the_card_rail(
    card_shop: tuple[object, FakeFacilitator, httpx.AsyncClient],
) -> None:
    from farebox.testing import FakeCardLedger

    ledger, fake, client = card_shop
    assert isinstance(ledger, FakeCardLedger)
    first = await client.get("/report")
    assert first.status_code == 402
    [offered] = mpp.parse_www_authenticate(first.headers["www-authenticate"])
    assert (offered.method, offered.request.amount, offered.request.currency) == (
        "stripe",
        50,
        "usd",
    )
    paid = await client.get("/report", headers=make_card_payment(first))
    assert paid.status_code == 200
    assert paid.json() == {"report": "Q3"}
    receipt = mpp.parse_payment_receipt(paid.headers["payment-receipt"])
    [intent] = [i for i in ledger.stripe.intents.values() if i["status"] == "succeeded"]
    assert receipt.reference == intent["id"]
    assert intent["amount"] == 50
    assert fake.calls == []  # x402 untouched
    # A challenge pays once; declines and Stripe out of reach, as the real ledger reports them.
    again = await client.get("/report", headers=make_card_payment(first))
    assert again.json()["code"] == "proof_replayed"
    declined = await client.get(
        "/report", headers=make_card_payment(await client.get("/report"), spt="spt_declines")
    )
    assert declined.status_code == 402
    assert declined.json()["code"] == "card_declined"
    ledger.down = True
    down = await client.get("/report", headers=make_card_payment(await client.get("/report")))
    assert down.status_code == 503
    assert down.json()["code"] == "ledger_unavailable"
    ledger.down = False
    # The X-Receipt way: the 402 names an invoice; the payer confirms it, then resends.
    invoice = next(
        m
        for m in (await client.get("/report")).json()["payment"]["methods"]
        if m["protocol"] == "x-receipt"
    )
    receipt_id = ledger.pay_invoice(invoice["client_secret"])
    assert receipt_id == invoice["payment_intent"]
    by_receipt = await client.get("/report", headers={"X-Receipt": receipt_id})
    assert by_receipt.status_code == 200
    assert "peac-receipt" in by_receipt.headers


async def test_the_fake_card_ledger_streams_the_answers_it_gives() -> None:
    """Streamed requests get the fake's own answer (the stand-in streams what it answers), in
    both of Stripe's client faces."""
    from farebox.testing import FakeCardLedger

    ledger = FakeCardLedger()
    http = ledger._http
    url = "https://stripe.farebox-testing.invalid/v1/payment_intents"
    form = b"amount=50&currency=usd&payment_method_types[]=card"
    headers = {"Authorization": f"Bearer {ledger.stripe.api_key}"}
    body, status, _ = http.request("post", url, headers, form)
    stream, streamed_status, _ = http.request_stream(
        "get", url + "/" + json.loads(body)["id"], headers
    )
    assert (status, streamed_status) == (200, 200)
    assert json.loads(stream.read())["id"] == json.loads(body)["id"]
    pieces, async_status, _ = await http.request_stream_async("get", url + "/pi_nope", headers)
    assert async_status == 404
    assert b"".join([piece async for piece in pieces])  # the fake's error document, streamed

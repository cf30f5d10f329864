"""farebox and the official x402 Python SDK (2.25) on a real node: anvil, chain 84532.

Money moves on the chain in every paid case. USDC sits at Base Sepolia's canonical address with its
EIP-712 domain ("USDC", "2"), so the SDK runs with its default settings: its httpx client pays a
farebox server (v2, and a v1 ``X-PAYMENT`` from its v1 mechanism); its facilitator library, settling
through web3 on the node, refuses the same bad payloads with the same reason codes as farebox's
in-process check; and, once farebox's facilitator service exists, its ``HTTPFacilitatorClient`` and
FastAPI middleware work through it.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest
from eth_account import Account
from fastapi import FastAPI
from x402 import x402Client, x402Facilitator
from x402.http.clients.httpx import x402HttpxClient
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    decode_payment_signature_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm.exact.register import (
    register_exact_evm_client,
    register_exact_evm_facilitator,
)
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
from x402.mechanisms.evm.signers import EthAccountSigner, FacilitatorWeb3Signer
from x402.schemas import PaymentRequirements
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.money import BASE_SEPOLIA_USDC
from farebox.protocol.challenge import render_challenge
from farebox.protocol.models import Challenge, Offer, Resource
from farebox.protocol.x402 import decode_proof, offer_to_json
from farebox.schemes import evm_exact
from farebox.store.memory import MemoryStore
from tests.support.anvil import AnvilChain, rpc
from tests.support.anvil_app import farebox_app, farebox_ledger
from tests.support.servers import serve

pytestmark = [pytest.mark.anyio, pytest.mark.node]

PRICE = 10_000  # $0.01 in atomic USDC
NETWORK = BASE_SEPOLIA_USDC.network
OFFICIAL_SETTLER = 2  # the official facilitator's account: its own nonces
SERVICE_AVAILABLE = importlib.util.find_spec("farebox.facilitator.service") is not None
NEEDS_SERVICE = pytest.mark.skipif(
    not SERVICE_AVAILABLE,
    reason="farebox.facilitator.service (facilitator_app) is not written yet",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- helpers --------------------------------------------------------------------------------------


def new_payer(chain: AnvilChain, amount: int = 1_000_000) -> Any:
    """A fresh eth-account key, funded with ``amount`` USDC unless 0 (no ETH: EIP-3009 is gasless)."""
    account = Account.create()
    if amount:
        chain.fund(account.address, amount)
    return account


def official_client(payer: Any) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(payer))
    return client


def official_facilitator(chain: AnvilChain) -> x402Facilitator:
    signer = FacilitatorWeb3Signer(chain.keys[OFFICIAL_SETTLER], chain.url)
    return register_exact_evm_facilitator(x402Facilitator(), signer, networks=NETWORK)


def offer_for(merchant: str, *, amount: int = PRICE, timeout: int = 300) -> Offer:
    return Offer(
        "exact",
        NETWORK,
        amount,
        BASE_SEPOLIA_USDC.address,
        merchant,
        timeout,
        {"name": BASE_SEPOLIA_USDC.name, "version": BASE_SEPOLIA_USDC.version},
    )


async def official_payment(payer: Any, offer: Offer) -> str:
    """A ``PAYMENT-SIGNATURE`` the official client makes for farebox's 402 carrying ``offer``."""
    challenge = Challenge(Resource("http://api.test/weather"), (offer,), reference="ch_1")
    rendered = render_challenge(challenge)
    required = decode_payment_required_header(dict(rendered.headers)["PAYMENT-REQUIRED"])
    payload = await official_client(payer).create_payment_payload(required)
    return encode_payment_signature_header(payload)


def tamper(header: str, **changes: str) -> str:
    document = json.loads(base64.b64decode(header))
    document["payload"]["authorization"].update(changes)
    return base64.b64encode(json.dumps(document).encode()).decode()


# --- a. the official client pays a farebox server ------------------------------------------------


async def test_official_httpx_client_pays_a_farebox_server(anvil_chain: AnvilChain) -> None:
    payer = new_payer(anvil_chain)
    merchant = EvmAccount.generate().address
    app, _ = farebox_app(anvil_chain, merchant)
    with serve(app) as base:
        async with x402HttpxClient(official_client(payer), timeout=30) as client:
            response = await client.get(f"{base}/weather")
    # (The gate closed its node connection in uvicorn's loop, at lifespan shutdown.)
    assert response.status_code == 200, response.text
    assert response.json() == {"forecast": "sunny"}
    settled = decode_payment_response_header(response.headers["PAYMENT-RESPONSE"])
    assert settled.success
    assert settled.network == NETWORK
    assert settled.payer == payer.address
    receipt = rpc(anvil_chain.url, "eth_getTransactionReceipt", settled.transaction)
    assert receipt["status"] == "0x1"
    assert anvil_chain.balance(payer.address) == 1_000_000 - PRICE
    assert anvil_chain.balance(merchant) == PRICE


# --- b. an official v1 payload -------------------------------------------------------------------


async def test_official_v1_payload_is_accepted_and_settled(anvil_chain: AnvilChain) -> None:
    payer = new_payer(anvil_chain)
    merchant = EvmAccount.generate().address
    app, facilitator = farebox_app(anvil_chain, merchant)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.test"
    ) as client:
        unpaid = await client.get("/weather")
        assert unpaid.status_code == 402
        [v1_offer] = unpaid.json()["accepts"]
        requirements = PaymentRequirementsV1.model_validate(v1_offer)
        assert requirements.network == "base-sepolia"
        inner = ExactEvmSchemeV1(EthAccountSigner(payer)).create_payment_payload(requirements)
        payload = PaymentPayloadV1(
            x402_version=1, scheme="exact", network="base-sepolia", payload=inner
        )
        paid = await client.get(
            "/weather", headers={"X-PAYMENT": encode_payment_signature_header(payload)}
        )
    await facilitator.aclose()
    assert paid.status_code == 200, paid.text
    settled = decode_payment_response_header(paid.headers["X-PAYMENT-RESPONSE"])
    assert settled.success
    assert settled.payer == payer.address
    assert anvil_chain.balance(payer.address) == 1_000_000 - PRICE
    assert anvil_chain.balance(merchant) == PRICE


# --- c. the same bad payloads, the same reason codes ---------------------------------------------

Case = Callable[[AnvilChain, str], Awaitable[tuple[str, Offer]]]


async def _valid(chain: AnvilChain, merchant: str) -> tuple[str, Offer]:
    offer = offer_for(merchant)
    return await official_payment(new_payer(chain), offer), offer


async def _replayed(chain: AnvilChain, merchant: str) -> tuple[str, Offer]:
    header, offer = await _valid(chain, merchant)
    ledger = farebox_ledger(chain)
    verified = evm_exact.verify(decode_proof(header), offer, now=int(time.time()))
    settlement = await ledger.settle(verified)
    await ledger.aclose()
    assert settlement.success, settlement
    return header, offer


async def _tampered_value(chain: AnvilChain, merchant: str) -> tuple[str, Offer]:
    header, offer = await _valid(chain, merchant)
    return tamper(header, value=str(2 * PRICE)), offer


async def _tampered_value_repriced(chain: AnvilChain, merchant: str) -> tuple[str, Offer]:
    # The server asks what the tampered payload says: only the signature can tell.
    header, offer = await _valid(chain, merchant)
    return tamper(header, value=str(2 * PRICE)), replace(offer, amount=2 * PRICE)


async def _unfunded(chain: AnvilChain, merchant: str) -> tuple[str, Offer]:
    offer = offer_for(merchant)
    return await official_payment(new_payer(chain, amount=0), offer), offer


async def _expired(chain: AnvilChain, merchant: str) -> tuple[str, Offer]:
    # The client signs validBefore = now + maxTimeoutSeconds: 3 s is inside the 6 s margin.
    offer = offer_for(merchant, timeout=3)
    return await official_payment(new_payer(chain), offer), offer


CASES: dict[str, tuple[Case, str | None]] = {
    "valid": (_valid, None),
    "replayed": (_replayed, "invalid_exact_evm_nonce_already_used"),
    "tampered_value": (_tampered_value, "invalid_exact_evm_payload_authorization_value_mismatch"),
    "tampered_value_repriced": (_tampered_value_repriced, "invalid_exact_evm_payload_signature"),
    "unfunded_payer": (_unfunded, "invalid_exact_evm_insufficient_balance"),
    "expired": (_expired, "invalid_exact_evm_payload_authorization_valid_before"),
}


async def farebox_check(chain: AnvilChain, header: str, offer: Offer) -> str | None:
    """What LocalFacilitator's gate path decides: offline verify, then the ledger's simulation."""
    ledger = farebox_ledger(chain)
    try:
        verified = evm_exact.verify(decode_proof(header), offer, now=int(time.time()))
        await LocalFacilitator([ledger]).verify(verified)
    except PaymentError as exc:
        return exc.code
    finally:
        await ledger.aclose()
    return None


@pytest.mark.parametrize("case", list(CASES))
async def test_same_bad_payload_same_code_on_chain(anvil_chain: AnvilChain, case: str) -> None:
    build, expected = CASES[case]
    header, offer = await build(anvil_chain, EvmAccount.generate().address)
    requirements = PaymentRequirements.model_validate(offer_to_json(offer))
    official = await official_facilitator(anvil_chain).verify(
        decode_payment_signature_header(header), requirements
    )
    ours = await farebox_check(anvil_chain, header, offer)
    print(f"{case}: official={official.invalid_reason} farebox={ours}")
    assert official.is_valid is (expected is None), official
    assert official.invalid_reason == expected
    assert ours == official.invalid_reason


# --- d. through farebox's facilitator service ----------------------------------------------------


@asynccontextmanager
async def farebox_facilitator_service(
    chain: AnvilChain,
) -> AsyncIterator[tuple[str, LocalFacilitator]]:
    from farebox.facilitator.service import facilitator_app  # type: ignore[import-not-found,unused-ignore]

    facilitator = LocalFacilitator([farebox_ledger(chain)])
    # Its node connection lives in uvicorn's event loop: closed there, at lifespan shutdown.
    app = facilitator_app(facilitator, MemoryStore(), close_on_shutdown=True)
    with serve(app) as url:
        yield url, facilitator


@NEEDS_SERVICE
async def test_official_facilitator_client_through_the_farebox_service(
    anvil_chain: AnvilChain,
) -> None:
    from x402.http import FacilitatorConfig, HTTPFacilitatorClient

    payer = new_payer(anvil_chain)
    merchant = EvmAccount.generate().address
    offer = offer_for(merchant)
    header = await official_payment(payer, offer)
    payload = decode_payment_signature_header(header)
    requirements = PaymentRequirements.model_validate(offer_to_json(offer))
    async with farebox_facilitator_service(anvil_chain) as (url, _):
        client = HTTPFacilitatorClient(FacilitatorConfig(url=url))
        try:
            supported = client.get_supported()
            assert any(
                kind.scheme == "exact" and kind.network == NETWORK and kind.x402_version == 2
                for kind in supported.kinds
            ), supported
            verified = await client.verify(payload, requirements)
            assert verified.is_valid, verified
            assert verified.payer == payer.address
            settled = await client.settle(payload, requirements)
            assert settled.success, settled
            assert settled.network == NETWORK
            again = await client.verify(payload, requirements)
            assert not again.is_valid
        finally:
            await client.aclose()
    assert rpc(anvil_chain.url, "eth_getTransactionReceipt", settled.transaction)["status"] == "0x1"
    assert anvil_chain.balance(payer.address) == 1_000_000 - PRICE
    assert anvil_chain.balance(merchant) == PRICE


@NEEDS_SERVICE
async def test_farebox_agent_pays_an_official_server_settling_through_farebox(
    anvil_chain: AnvilChain,
) -> None:
    from x402 import x402ResourceServer
    from x402.http import FacilitatorConfig, HTTPFacilitatorClient
    from x402.http.middleware.fastapi import PaymentMiddlewareASGI
    from x402.http.types import PaymentOption, RouteConfig
    from x402.mechanisms.evm.exact.register import register_exact_evm_server

    from farebox.agent.agent import Agent
    from farebox.agent.httpx_auth import PaymentAuth

    payer_key = new_payer(anvil_chain)
    payer = EvmAccount(bytes(payer_key.key))
    merchant = EvmAccount.generate().address
    async with farebox_facilitator_service(anvil_chain) as (url, _):
        facilitator_client = HTTPFacilitatorClient(FacilitatorConfig(url=url))

        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            # The client's connections live in uvicorn's event loop: close them there.
            yield
            await facilitator_client.aclose()

        api = FastAPI(lifespan=lifespan)

        @api.get("/weather")
        async def weather() -> dict[str, str]:
            return {"forecast": "sunny"}

        routes = {
            "GET /weather": RouteConfig(
                accepts=PaymentOption(
                    scheme="exact", pay_to=merchant, price="$0.01", network=NETWORK
                )
            )
        }
        server = register_exact_evm_server(x402ResourceServer(facilitator_client), NETWORK)
        api.add_middleware(PaymentMiddlewareASGI, routes=routes, server=server)
        # The official server issues no PEAC record: the agent is told not to require one.
        agent = Agent(payer, require_receipt=False)
        with serve(api) as base:
            async with httpx.AsyncClient(auth=PaymentAuth(agent), timeout=30) as client:
                response = await client.get(f"{base}/weather")
    assert response.status_code == 200, response.text
    assert response.json() == {"forecast": "sunny"}
    settled = decode_payment_response_header(response.headers["PAYMENT-RESPONSE"])
    assert settled.success
    assert anvil_chain.balance(payer.address) == 1_000_000 - PRICE
    assert anvil_chain.balance(merchant) == PRICE

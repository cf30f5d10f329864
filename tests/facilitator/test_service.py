"""The facilitator service on the embedded chain: verify, settle once, v1, /supported, limits."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.schemas import (
    PaymentPayload,
    PaymentRequirements,
    SettleResponse,
    SupportedResponse,
    VerifyResponse,
)

from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.facilitator.service import FacilitatorApp, facilitator_app
from farebox.ledgers.evm import EvmLedger
from farebox.protocol import x402
from farebox.protocol.models import Offer, Proof, Resource
from farebox.protocol.x402 import proof_to_json, requirements_to_json
from farebox.schemes.evm_exact import make_proof, sign_authorization
from farebox.store.memory import MemoryStore
from tests.support.chain import fund, offer_on
from tests.support.servers import free_port, wait_for

pytestmark = pytest.mark.anyio

BASE = "http://facilitator.test"
RESOURCE = Resource("https://api.test/weather", "weather", "application/json")
SETTLER = 2  # development account paying the service's gas in this module
V1_NAME = "farebox-devchain"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def service(chain: DevChain, **options: Any) -> tuple[FacilitatorApp, MemoryStore]:
    ledger = EvmLedger(chain.rpc, chain.accounts[SETTLER].account, network=chain.network)
    store = MemoryStore()
    return facilitator_app(LocalFacilitator([ledger]), store, **options), store


def client_for(app: FacilitatorApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


def body(proof: Proof, offer: Offer) -> dict[str, Any]:
    """What the official ``HTTPFacilitatorClient`` posts for ``proof`` paying ``offer``."""
    version = proof.x402_version
    return {
        "x402Version": version,
        "paymentPayload": proof_to_json(proof),
        "paymentRequirements": requirements_to_json(offer, RESOURCE, x402_version=version),
    }


def paying(
    chain: DevChain, payer: EvmAccount | None = None, *, version: int = 2, now: int | None = None
) -> tuple[Proof, Offer, EvmAccount, str]:
    """A fresh proof from a funded payer to a fresh merchant."""
    payer = payer or fund(chain)
    merchant = EvmAccount.generate().address
    offer = offer_on(chain, merchant)
    at = int(time.time()) if now is None else now
    proof = make_proof(
        payer, offer, now=at, nonce=os.urandom(32), resource=RESOURCE, x402_version=version
    )
    return proof, offer, payer, merchant


def resigned(proof: Proof, payload: Mapping[str, Any]) -> Proof:
    return Proof(
        proof.x402_version,
        proof.scheme,
        proof.network,
        payload,
        accepted=proof.accepted,
        resource=proof.resource,
    )


async def test_verify_accepts_a_good_payment(chain: DevChain) -> None:
    app, store = service(chain)
    proof, offer, payer, _ = paying(chain)
    async with client_for(app) as client:
        response = await client.post("/verify", json=body(proof, offer))
    assert response.status_code == 200
    assert response.json() == {"isValid": True, "payer": payer.address}
    VerifyResponse.model_validate(response.json())
    # /verify reserves nothing.
    assert await store.events() == []


async def test_verify_refuses_with_the_x402_code(chain: DevChain) -> None:
    app, _ = service(chain)
    now = int(time.time())
    cases: list[tuple[str, Proof, Offer]] = []
    # Signed for 5000, presented against an offer of 10000.
    proof, offer, payer, merchant = paying(chain)
    cheap = offer_on(chain, merchant, amount=5_000)
    low = sign_authorization(payer, cheap, now=now, nonce=os.urandom(32))
    cases.append(
        ("invalid_exact_evm_payload_authorization_value_mismatch", resigned(proof, low), offer)
    )
    # Signed to pay someone else.
    elsewhere = offer_on(chain, EvmAccount.generate().address)
    diverted = sign_authorization(payer, elsewhere, now=now, nonce=os.urandom(32))
    cases.append(("invalid_exact_evm_payload_recipient_mismatch", resigned(proof, diverted), offer))
    # Expired long ago.
    old, old_offer, _, _ = paying(chain, payer, now=now - 2_000)
    cases.append(("invalid_exact_evm_payload_authorization_valid_before", old, old_offer))
    # Someone else's signature.
    other, _, _, _ = paying(chain, EvmAccount.generate())
    forged = dict(proof.payload, signature=other.payload["signature"])
    cases.append(("invalid_exact_evm_payload_signature", resigned(proof, forged), offer))
    # A payer without money: the chain's check.
    broke, broke_offer, _, _ = paying(chain, EvmAccount.generate())
    cases.append(("invalid_exact_evm_insufficient_balance", broke, broke_offer))
    async with client_for(app) as client:
        for code, bad, bad_offer in cases:
            response = await client.post("/verify", json=body(bad, bad_offer))
            assert response.status_code == 200, code
            answer = response.json()
            assert answer["isValid"] is False, code
            assert answer["invalidReason"] == code
            assert answer["invalidMessage"]
            VerifyResponse.model_validate(answer)
        # A used nonce: settle it, then ask again.
        assert (await client.post("/settle", json=body(proof, offer))).json()["success"]
        again = (await client.post("/verify", json=body(proof, offer))).json()
    assert again["invalidReason"] == "invalid_exact_evm_nonce_already_used"
    assert again["payer"] == payer.address


async def test_settle_moves_the_money_once_and_refuses_a_repeat(chain: DevChain) -> None:
    app, store = service(chain)
    proof, offer, payer, merchant = paying(chain)
    before = chain.balance_of(payer.address)
    async with client_for(app) as client:
        first = await client.post("/settle", json=body(proof, offer))
        second = await client.post("/settle", json=body(proof, offer))
    assert first.status_code == second.status_code == 200
    answer = first.json()
    SettleResponse.model_validate(answer)
    assert answer["success"] is True
    assert answer["network"] == chain.network
    assert answer["payer"] == payer.address
    assert answer["transaction"].startswith("0x")
    assert len(answer["transaction"]) == 66
    assert chain.balance_of(merchant) == offer.amount
    assert chain.balance_of(payer.address) == before - offer.amount
    # Asked again (a lost reply, a retry): refused, naming the transaction; nothing sent twice.
    repeat = second.json()
    SettleResponse.model_validate(repeat)
    assert repeat["success"] is False
    assert repeat["errorReason"] == "invalid_exact_evm_nonce_already_used"
    assert answer["transaction"] in repeat["errorMessage"]
    assert chain.balance_of(merchant) == offer.amount
    claim = await store.get_claim(next(iter(await store.events(kind="settlement"))).data["claim"])
    assert claim is not None
    assert claim.state == "settled"
    assert claim.transaction == answer["transaction"]


async def test_settle_refusal_is_200_with_the_code_and_releases_nothing_held(
    chain: DevChain,
) -> None:
    app, store = service(chain)
    proof, offer, _, merchant = paying(chain, EvmAccount.generate())  # unfunded
    async with client_for(app) as client:
        response = await client.post("/settle", json=body(proof, offer))
    assert response.status_code == 200
    answer = response.json()
    assert answer["success"] is False
    assert answer["errorReason"] == "invalid_exact_evm_insufficient_balance"
    assert answer["transaction"] == ""
    SettleResponse.model_validate(answer)
    assert chain.balance_of(merchant) == 0
    assert await store.events() == []


@pytest.fixture
def v1_devchain(monkeypatch: pytest.MonkeyPatch, chain: DevChain) -> str:
    """x402 v1 names networks; lend the devchain a name for the test."""
    monkeypatch.setitem(x402.V1_NETWORKS, V1_NAME, chain.network)
    monkeypatch.setitem(x402._V1_NAMES, chain.network, V1_NAME)
    return V1_NAME


async def test_v1_bodies_verify_and_settle(chain: DevChain, v1_devchain: str) -> None:
    app, _ = service(chain)
    proof, offer, payer, merchant = paying(chain, version=1)
    request = body(proof, offer)
    assert request["paymentPayload"]["network"] == v1_devchain
    assert request["paymentRequirements"]["maxAmountRequired"] == str(offer.amount)
    async with client_for(app) as client:
        verdict = await client.post("/verify", json=request)
        settled = await client.post("/settle", json=request)
        supported = (await client.get("/supported")).json()
    assert verdict.json() == {"isValid": True, "payer": payer.address}
    answer = settled.json()
    assert answer["success"] is True
    assert answer["network"] == v1_devchain
    assert chain.balance_of(merchant) == offer.amount
    assert {"x402Version": 1, "scheme": "exact", "network": v1_devchain} in supported["kinds"]


async def test_supported_in_the_official_shape(chain: DevChain) -> None:
    app, _ = service(chain)
    async with client_for(app) as client:
        response = await client.get("/supported")
    assert response.status_code == 200
    document = response.json()
    assert document == {
        "kinds": [{"x402Version": 2, "scheme": "exact", "network": chain.network}],
        "extensions": [],
        "signers": {"eip155:*": [chain.accounts[SETTLER].address]},
    }
    parsed = SupportedResponse.model_validate(document)
    assert parsed.kinds[0].network == chain.network


async def test_bearer_token_guards_settle_only(chain: DevChain) -> None:
    app, _ = service(chain, token="s3cret-token")
    proof, offer, _, merchant = paying(chain)
    async with client_for(app) as client:
        missing = await client.post("/settle", json=body(proof, offer))
        wrong = await client.post(
            "/settle", json=body(proof, offer), headers={"Authorization": "Bearer s3cret-tokem"}
        )
        open_verify = await client.post("/verify", json=body(proof, offer))
        assert chain.balance_of(merchant) == 0
        good = await client.post(
            "/settle", json=body(proof, offer), headers={"Authorization": "bearer s3cret-token"}
        )
        spec = (await client.get("/openapi.json")).json()
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["status"] == 401
        assert "s3cret" not in refused.text
    assert open_verify.json()["isValid"] is True
    assert good.json()["success"] is True
    assert chain.balance_of(merchant) == offer.amount
    assert spec["paths"]["/settle"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/verify"]["post"]


async def test_malformed_requests_are_400_problems(chain: DevChain) -> None:
    app, _ = service(chain)
    proof, offer, _, _ = paying(chain)
    good = body(proof, offer)
    bad_bodies: list[bytes | dict[str, Any] | list[Any]] = [
        b"not json",
        b"\xff\xfe",
        b"",
        [good],
        {**good, "x402Version": "2"},
        {**good, "x402Version": 3},
        {**good, "x402Version": True},
        {**good, "x402Version": 1},  # the payload says 2
        {k: v for k, v in good.items() if k != "paymentPayload"},
        {**good, "paymentRequirements": "exact"},
        {**good, "paymentRequirements": {**good["paymentRequirements"], "amount": 10_000}},
        {**good, "paymentPayload": {**good["paymentPayload"], "payload": []}},
    ]
    async with client_for(app) as client:
        for path in ("/verify", "/settle"):
            for bad in bad_bodies:
                if isinstance(bad, bytes):
                    response = await client.post(path, content=bad)
                else:
                    response = await client.post(path, json=bad)
                assert response.status_code == 400, (path, bad)
                assert response.headers["content-type"] == "application/problem+json"
                problem = response.json()
                assert problem["status"] == 400
                assert problem["code"] in ("invalid_payload", "invalid_x402_version")
        assert (await client.get("/verify")).status_code == 405
        assert (await client.get("/nowhere")).status_code == 404


async def test_oversized_bodies_are_413_without_reading_them(chain: DevChain) -> None:
    app, _ = service(chain, max_body=1024)
    async with client_for(app) as client:
        declared = await client.post("/verify", content=b"x" * 2048)
    assert declared.status_code == 413
    assert declared.json()["code"] == "payload_too_large"

    # Streamed without a length: counted as it arrives, refused past the limit.
    chunks = [b"{" + b" " * 600, b" " * 600, b"}"]
    received: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        chunk = chunks[len(received) - 1]
        return {"type": "http.request", "body": chunk, "more_body": len(received) < len(chunks)}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/settle", "headers": []}
    await app(scope, receive, send)
    assert sent[0]["status"] == 413
    assert len(received) == 2  # stopped reading at the chunk that crossed the limit


async def test_an_unexpected_error_is_a_generic_500(chain: DevChain) -> None:
    class Broken(LocalFacilitator):
        async def verify(self, verified: Any) -> None:
            raise RuntimeError("secret internals")

    ledger = EvmLedger(chain.rpc, chain.accounts[SETTLER].account, network=chain.network)
    app = facilitator_app(Broken([ledger]), MemoryStore())
    proof, offer, _, _ = paying(chain)
    async with client_for(app) as client:
        response = await client.post("/verify", json=body(proof, offer))
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "secret" not in response.text


@pytest.fixture
def served(chain: DevChain) -> Iterator[str]:
    app, _ = service(chain)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/supported")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def test_the_official_client_over_a_socket(chain: DevChain, served: str) -> None:
    proof, offer, _, merchant = paying(chain)
    request = body(proof, offer)
    payload = PaymentPayload.model_validate(request["paymentPayload"])
    requirements = PaymentRequirements.model_validate(request["paymentRequirements"])
    official = HTTPFacilitatorClient(FacilitatorConfig(url=served))
    try:
        supported = await anyio.to_thread.run_sync(official.get_supported)
        verdict = await official.verify(payload, requirements)
        started = time.perf_counter()
        settled = await official.settle(payload, requirements)
        elapsed = time.perf_counter() - started
    finally:
        await official.aclose()
    assert supported.kinds[0].network == chain.network
    assert verdict.is_valid
    assert settled.success
    assert settled.transaction.startswith("0x")
    assert chain.balance_of(merchant) == offer.amount
    print(f"settle over HTTP on the devchain: {elapsed * 1000:.1f} ms")


async def test_the_lifespan_reconciles_what_a_crashed_service_left_held(chain: DevChain) -> None:
    """A service died between broadcasting and recording: its claim stayed held. The next one,
    started with ``reconcile_every``, finds the transfer on chain and records it as settled, so
    the authorization is not left in limbo."""
    from farebox.schemes.evm_exact import verify

    app, store = service(chain, reconcile_every=0.05)
    payer = fund(chain)
    offer = offer_on(chain, "0x" + os.urandom(20).hex())
    now = int(time.time())
    proof = verify(make_proof(payer, offer, now=now, nonce=os.urandom(32)), offer, now=now)
    assert await store.claim(proof.claim_key, owner="crashed", now=now - 600)
    assert (await app.facilitator.settle(proof)).success  # broadcast, then the crash
    messages = [{"type": "lifespan.startup"}]
    sent: list[dict[str, Any]] = []
    done = anyio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await done.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with anyio.create_task_group() as group:
        group.start_soon(app, {"type": "lifespan"}, receive, send)
        with anyio.fail_after(10):
            while (claim := await store.get_claim(proof.claim_key)) is None or (
                claim.state != "settled"
            ):
                await anyio.sleep(0.05)
        done.set()
    assert claim.transaction
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


class ReleaseFails(MemoryStore):
    """A store that goes down just when a refused settlement gives its claim back."""

    async def release(self, key: str, *, owner: str) -> bool:
        from farebox.errors import PaymentError

        raise PaymentError("store_unavailable", "the payment store is unreachable")


async def test_a_refusal_is_answered_when_the_store_cannot_release(chain: DevChain) -> None:
    ledger = EvmLedger(chain.rpc, chain.accounts[SETTLER].account, network=chain.network)
    store = ReleaseFails()
    app = facilitator_app(LocalFacilitator([ledger]), store)
    proof, offer, _, merchant = paying(chain, EvmAccount.generate())  # holds nothing
    async with client_for(app) as client:
        response = await client.post("/settle", json=body(proof, offer))
    assert response.status_code == 200  # the refusal, not a 500
    assert response.json()["success"] is False
    assert response.json()["errorReason"] == "invalid_exact_evm_insufficient_balance"
    assert chain.balance_of(merchant) == 0


class CountingRpc:
    """The chain's RPC, counting each method asked."""

    def __init__(self, chain: DevChain) -> None:
        self.inner = chain.rpc
        self.calls: dict[str, int] = {}

    async def request(self, method: str, params: Any = ()) -> Any:
        self.calls[method] = self.calls.get(method, 0) + 1
        return await self.inner.request(method, params)


async def test_a_settle_simulates_once(chain: DevChain) -> None:
    """The settler dry-runs the transfer right before it signs; /settle asks for nothing more
    (the token check is remembered from /verify)."""
    rpc = CountingRpc(chain)
    ledger = EvmLedger(rpc, chain.accounts[SETTLER].account, network=chain.network)
    app = facilitator_app(LocalFacilitator([ledger]), MemoryStore())
    proof, offer, _, merchant = paying(chain)
    async with client_for(app) as client:
        assert (await client.post("/verify", json=body(proof, offer))).json()["isValid"]
        before = dict(rpc.calls)
        settled = await client.post("/settle", json=body(proof, offer))
    assert settled.json()["success"] is True
    assert rpc.calls.get("eth_call", 0) - before.get("eth_call", 0) == 1
    assert rpc.calls.get("eth_getCode", 0) == before.get("eth_getCode", 0)
    assert chain.balance_of(merchant) == 10_000

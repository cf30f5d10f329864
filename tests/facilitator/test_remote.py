"""The gate settling through :class:`RemoteFacilitator`: our service, and facilitators that misbehave.

Whatever a facilitator does wrong (hangs, HTML error pages, garbage, truncated bodies, a "success"
inside a 503, a pending settlement), the paid API serves nothing and answers 402 or 503 with a
code, and no money moves twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest

from farebox.dev.devchain import DevChain
from farebox.errors import ConfigError, PaymentError
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.facilitator.remote import RemoteFacilitator
from farebox.facilitator.service import FacilitatorApp, facilitator_app
from farebox.ledgers.evm import EvmLedger
from farebox.protocol.challenge import read_challenge
from farebox.protocol.models import Offer
from farebox.protocol.x402 import PAYMENT_SIGNATURE, decode_settlement, encode_proof
from farebox.schemes.evm_exact import make_proof, verify
from farebox.server.asgi import PaymentMiddleware
from farebox.store.memory import MemoryStore
from tests.support.chain import fund, offer_on
from tests.support.gates import ISSUER, PRICE, Paid, make_gate
from tests.support.servers import free_port

pytestmark = pytest.mark.anyio

SERVICE = "http://facilitator.test"
SETTLER = 3
TOKEN = "remote-test-token"
TX = "0x" + "ab" * 32


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def our_service(chain: DevChain, token: str | None = TOKEN) -> FacilitatorApp:
    ledger = EvmLedger(chain.rpc, chain.accounts[SETTLER].account, network=chain.network)
    return facilitator_app(LocalFacilitator([ledger]), MemoryStore(), token=token)


def remote_to(app: FacilitatorApp, **options: Any) -> RemoteFacilitator:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    return RemoteFacilitator(SERVICE, client=client, **options)


async def pay_once(paid: Paid, payer: EvmAccount) -> httpx.Response:
    """Ask for /weather, pay the challenge once, and return the paid request's answer."""
    app = PaymentMiddleware(_weather, paid.gate)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as client:
        challenge_response = await client.get("/weather")
        assert challenge_response.status_code == 402
        challenge = read_challenge(challenge_response.headers, challenge_response.content)
        proof = make_proof(
            payer,
            challenge.accepts[0],
            now=int(time.time()),
            nonce=os.urandom(32),
            resource=challenge.resource,
        )
        return await client.get("/weather", headers={PAYMENT_SIGNATURE: encode_proof(proof)})


async def _weather(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"sunny and served"})


async def test_the_gate_settles_through_our_service(chain: DevChain) -> None:
    paid = make_gate(chain)
    remote = remote_to(our_service(chain), token=TOKEN)
    paid.gate.facilitator = remote
    payer = fund(chain)
    try:
        started = time.perf_counter()
        response = await pay_once(paid, payer)
        elapsed = time.perf_counter() - started
        kinds = await remote.supported()
    finally:
        await remote.aclose()
    assert response.status_code == 200, response.text
    assert response.text == "sunny and served"
    settlement = decode_settlement(response.headers["payment-response"])
    assert settlement.success
    assert chain.balance_of(paid.merchant) == PRICE
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE
    assert kinds.kinds[0].network == chain.network
    assert kinds.signers["eip155:*"] == (chain.accounts[SETTLER].address,)
    print(f"paid request through the remote facilitator: {elapsed * 1000:.1f} ms")


async def test_without_the_token_nothing_is_served_and_the_proof_stays_usable(
    chain: DevChain,
) -> None:
    paid = make_gate(chain)
    remote = remote_to(our_service(chain), token="wrong")
    paid.gate.facilitator = remote
    payer = fund(chain)
    try:
        response = await pay_once(paid, payer)
    finally:
        await remote.aclose()
    assert response.status_code == 503
    assert "served" not in response.text
    assert response.json()["code"] == "facilitator_unavailable"
    assert chain.balance_of(paid.merchant) == 0
    # /settle refused the request itself: nothing can have moved, so the claim was released.
    assert await paid.store.events(kind="settlement") == []


async def test_a_refusal_keeps_the_facilitators_code(chain: DevChain) -> None:
    paid = make_gate(chain)
    remote = remote_to(our_service(chain))
    paid.gate.facilitator = remote
    try:
        response = await pay_once(paid, EvmAccount.generate())  # no money
    finally:
        await remote.aclose()
    assert response.status_code == 402
    assert response.json()["code"] == "invalid_exact_evm_insufficient_balance"


# --- a facilitator that misbehaves ----------------------------------------------------------------


class _Misbehaving(BaseHTTPRequestHandler):
    """``/<mode>/verify`` and ``/<mode>/settle``, answering as ``mode`` says."""

    stop = threading.Event()
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, {"kinds": [{"x402Version": 2, "scheme": "exact", "network": "eip155:1"}]})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        request = orjson.loads(self.rfile.read(length))
        network = request["paymentRequirements"]["network"]
        _, mode, endpoint = self.path.split("/")
        if endpoint == "verify":
            self._verify(mode)
        else:
            self._settle(mode, network)

    def _verify(self, mode: str) -> None:
        if mode == "verify-hang":
            self.stop.wait(5)
        elif mode == "verify-html":
            self._raw(502, b"<html><body>Bad Gateway</body></html>", "text/html")
        elif mode == "verify-refuses-400":
            self._send(400, {"isValid": False, "invalidReason": "insufficient_funds"})
        elif mode == "verify-valid-in-500":
            self._send(500, {"isValid": True})
        else:
            self._send(200, {"isValid": True})

    def _settle(self, mode: str, network: str) -> None:
        success = {"success": True, "transaction": TX, "network": network}
        if mode == "hang":
            self.stop.wait(5)
        elif mode == "html":
            self._raw(502, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        elif mode == "not-json":
            self._raw(200, b"OK, settled!", "text/plain")
        elif mode == "truncated":
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "300")
            self.end_headers()
            self.wfile.write(b'{"success": true, "transac')
            self.wfile.flush()
            self.close_connection = True
        elif mode == "success-in-503":
            self._send(503, success)
        elif mode == "pending":
            self._send(200, {**success, "success": False, "errorReason": "settlement_pending"})
        elif mode == "hostile-code":
            self._send(200, {**success, "success": False, "errorReason": "bad\r\nX-Evil: 1"})
        elif mode == "bad-request":
            self._send(400, {"error": "missing field"})

    def _send(self, status: int, document: Any) -> None:
        self._raw(status, orjson.dumps(document), "application/json")

    def _raw(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def misbehaving() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Misbehaving.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# mode -> (status, code) the paid API answers; nothing is ever served.
SETTLE_FAILURES = {
    "hang": (402, "settlement_pending"),
    "html": (402, "settlement_pending"),
    "not-json": (402, "settlement_pending"),
    "truncated": (402, "settlement_pending"),
    "success-in-503": (402, "settlement_pending"),
    "pending": (402, "settlement_pending"),
    "hostile-code": (402, "unexpected_settle_error"),
    "bad-request": (503, "facilitator_unavailable"),
    "verify-hang": (503, "facilitator_unavailable"),
    "verify-html": (503, "facilitator_unavailable"),
    "verify-valid-in-500": (503, "facilitator_unavailable"),
    "verify-refuses-400": (402, "insufficient_funds"),
}


@pytest.mark.parametrize("mode", sorted(SETTLE_FAILURES))
async def test_a_misbehaving_facilitator_never_gets_a_response_served(
    chain: DevChain, misbehaving: str, mode: str
) -> None:
    paid = make_gate(chain)
    remote = RemoteFacilitator(f"{misbehaving}/{mode}", timeout=0.5)
    paid.gate.facilitator = remote
    payer = fund(chain)
    started = time.monotonic()
    try:
        response = await pay_once(paid, payer)
    finally:
        await remote.aclose()
    status, code = SETTLE_FAILURES[mode]
    assert response.status_code == status, response.text
    assert "served" not in response.text
    assert response.json()["code"] == code
    assert time.monotonic() - started < 3  # a hang is cut at the timeout
    assert chain.balance_of(paid.merchant) == 0
    pending = await paid.store.events(kind="settlement")
    if code == "settlement_pending":
        # The facilitator may have acted: the proof stays claimed until reconciled.
        assert pending
        assert pending[0].data["success"] is False
        if mode in ("success-in-503", "pending"):
            assert pending[0].reference == TX
        assert "x-evil" not in response.headers


# --- the client on its own -------------------------------------------------------------------------


def verified_proof(chain: DevChain) -> Any:
    offer: Offer = offer_on(chain, EvmAccount.generate().address)
    now = int(time.time())
    return verify(make_proof(fund(chain), offer, now=now, nonce=os.urandom(32)), offer, now=now)


async def test_an_unreachable_facilitator(chain: DevChain) -> None:
    remote = RemoteFacilitator(f"http://127.0.0.1:{free_port()}", timeout=2)
    proof = verified_proof(chain)
    try:
        with pytest.raises(PaymentError) as at_verify:
            await remote.verify(proof)
        # Never connected: certainly nothing broadcast, so it raises (the gate releases).
        with pytest.raises(PaymentError) as at_settle:
            await remote.settle(proof)
    finally:
        await remote.aclose()
    assert at_verify.value.code == at_settle.value.code == "facilitator_unavailable"
    assert at_verify.value.status == 503
    assert "127.0.0.1" not in at_settle.value.message


async def test_supports_follows_supported(chain: DevChain, misbehaving: str) -> None:
    remote = RemoteFacilitator(misbehaving + "/ok")
    offer = offer_on(chain, EvmAccount.generate().address)
    try:
        assert remote.supports(offer)  # exact, before /supported is known
        assert not remote.supports(Offer("upto", chain.network, 1, offer.asset, offer.pay_to))
        found = await remote.supported()
    finally:
        await remote.aclose()
    assert [(k.scheme, k.network) for k in found.kinds] == [("exact", "eip155:1")]
    assert not remote.supports(offer)  # the devchain is not listed


def test_from_env_and_no_secrets_in_repr() -> None:
    remote = RemoteFacilitator.from_env(
        {
            "X402_FACILITATOR_URL": "https://user:pw@facilitator.example/x402/",
            "FAREBOX_FACILITATOR_TOKEN": "tok",
        }
    )
    assert "pw" not in repr(remote)
    assert "tok" not in repr(remote)
    with pytest.raises(ConfigError):
        RemoteFacilitator.from_env({})
    with pytest.raises(ConfigError):
        RemoteFacilitator("ftp://facilitator.example")

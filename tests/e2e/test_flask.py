"""A Flask app behind the WSGI middleware (the same gate, driven from a portal), paid by the agent."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest
from flask import Flask, Response, stream_with_context

from farebox.agent.agent import Agent
from farebox.agent.httpx_auth import PAYMENT_EXTENSION, PaymentAuth
from farebox.dev.devchain import DevChain
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.protocol.challenge import read_challenge
from farebox.protocol.x402 import decode_settlement, encode_proof
from farebox.schemes.evm_exact import make_proof
from farebox.server.wsgi import WsgiPaymentMiddleware
from tests.support.chain import fund
from tests.support.gates import ISSUER, PRICE, Paid, make_gate


@pytest.fixture
def paid(chain: DevChain) -> Paid:
    return make_gate(chain)


@pytest.fixture
def flask_client(paid: Paid) -> Iterator[tuple[httpx.Client, WsgiPaymentMiddleware]]:
    app = Flask(__name__)
    calls = {"flaky": 0}

    @app.get("/weather")
    def weather() -> dict[str, str]:
        return {"forecast": "rain"}

    @app.post("/items")
    def items() -> tuple[dict[str, int], int, dict[str, str]]:
        return {"id": 7}, 201, {"Location": "/items/7"}

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            for i in range(4):
                yield f"part {i}\n"

        return Response(stream_with_context(chunks()), mimetype="text/plain")

    @app.get("/flaky")
    def flaky() -> tuple[dict[str, str], int]:
        calls["flaky"] += 1
        return ({"detail": "boom"}, 503) if calls["flaky"] == 1 else ({"ok": "yes"}, 200)

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    middleware = WsgiPaymentMiddleware(app.wsgi_app, paid.gate)
    app.wsgi_app = middleware  # type: ignore[method-assign]
    client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url=ISSUER)
    yield client, middleware
    client.close()
    middleware.close()


def header_for(client: httpx.Client, payer: EvmAccount, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 402
    challenge = read_challenge(dict(response.headers), response.content)
    proof = make_proof(
        payer,
        challenge.accepts[0],
        now=int(time.time()),
        nonce=os.urandom(32),
        resource=challenge.resource,
    )
    return encode_proof(proof)


def test_free_route_and_402(flask_client: tuple[httpx.Client, WsgiPaymentMiddleware]) -> None:
    client, _ = flask_client
    assert client.get("/health").json() == {"ok": True}
    unpaid = client.get("/weather")
    assert unpaid.status_code == 402
    assert unpaid.headers["cache-control"] == "no-store"
    assert unpaid.json()["payment"]["amount"] == "0.01"


def test_agent_pays_through_flask(
    flask_client: tuple[httpx.Client, WsgiPaymentMiddleware], paid: Paid, chain: DevChain
) -> None:
    client, _ = flask_client
    payer = fund(chain)
    client.auth = PaymentAuth(Agent(payer))
    response = client.get("/weather")
    assert response.status_code == 200
    assert response.json() == {"forecast": "rain"}
    assert decode_settlement(response.headers["payment-response"]).success
    assert response.extensions[PAYMENT_EXTENSION].receipt.issuer == ISSUER
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE
    assert chain.balance_of(paid.merchant) == PRICE
    created = client.post("/items")
    assert created.status_code == 201
    assert created.headers["location"] == "/items/7"
    streamed = client.get("/stream")
    assert streamed.text == "".join(f"part {i}\n" for i in range(4))
    assert chain.balance_of(payer.address) == 1_000_000 - 4 * PRICE


def test_replay_and_app_error(
    flask_client: tuple[httpx.Client, WsgiPaymentMiddleware], chain: DevChain
) -> None:
    client, _ = flask_client
    payer = fund(chain)
    header = header_for(client, payer, "/flaky")
    failed = client.get("/flaky", headers={"payment-signature": header})
    assert failed.status_code == 503
    assert "payment-response" not in failed.headers
    assert chain.balance_of(payer.address) == 1_000_000
    ok = client.get("/flaky", headers={"payment-signature": header})
    assert ok.status_code == 200
    replay = client.get("/flaky", headers={"payment-signature": header})
    assert replay.status_code == 402
    assert replay.json()["code"] == "proof_replayed"
    assert chain.balance_of(payer.address) == 1_000_000 - PRICE


def test_unfunded_agent_gets_the_code(
    flask_client: tuple[httpx.Client, WsgiPaymentMiddleware],
) -> None:
    client, _ = flask_client
    client.auth = PaymentAuth(Agent(EvmAccount.generate()))
    with pytest.raises(PaymentError) as refused:
        client.get("/weather")
    assert refused.value.code == "invalid_exact_evm_insufficient_balance"


def test_malformed_header_is_400(flask_client: tuple[httpx.Client, WsgiPaymentMiddleware]) -> None:
    client, _ = flask_client
    response = client.get("/weather", headers={"x-payment": "%%%"})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_payload"

"""Idempotent retries on the embedded chain: one charge per id, stored responses replayed."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import anyio
import httpx
import orjson
import pytest
from flask import Flask, request

from farebox.agent.agent import Agent
from farebox.agent.httpx_auth import PaymentAuth, PaymentTransport
from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.protocol.challenge import read_challenge
from farebox.protocol.x402 import decode_proof, encode_proof
from farebox.schemes.evm_exact import make_proof
from farebox.server.asgi import PaymentMiddleware
from farebox.server.idempotency import new_id, read_id
from farebox.server.wsgi import WsgiPaymentMiddleware
from tests.support.chain import fund
from tests.support.gates import ISSUER, PRICE, Paid, make_gate

pytestmark = pytest.mark.anyio

ITEMS = 2 * PRICE  # what POST /items costs in make_gate's table

Sent = list[dict[str, Any]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Counting:
    """An ASGI app that echoes the request body with a call number, failing on chosen calls."""

    def __init__(self, *, fail: Sequence[int] = (), size: int = 0) -> None:
        self.calls = 0
        self.fail = set(fail)
        self.size = size

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        status = 500 if self.calls in self.fail else 200
        payload = orjson.dumps({"call": self.calls, "echo": body.decode()}) + b" " * self.size
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def call(
    app: Any,
    method: str,
    path: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
) -> Sent:
    sent: Sent = []
    chunks = [body[:3], body[3:]]  # in two messages, as a server may deliver it

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "method": method,
        "scheme": "https",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"api.test"), *headers],
        "server": ("api.test", 443),
    }
    await app(scope, receive, send)
    return sent


def headers_of(sent: Sent) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in sent[0]["headers"]}


def body_of(sent: Sent) -> bytes:
    return b"".join(m.get("body", b"") for m in sent[1:])


async def paid_headers(
    app: Any, payer: EvmAccount, method: str, path: str, request_id: str | None
) -> list[tuple[bytes, bytes]]:
    """A freshly signed payment for ``path``, carrying ``request_id`` as payment-identifier."""
    first = await call(app, method, path)
    assert first[0]["status"] == 402
    challenge = read_challenge(headers_of(first), body_of(first))
    declared = challenge.extensions["payment-identifier"]
    assert declared["info"] == {"required": False}
    extensions = None
    if request_id is not None:
        extensions = {
            "payment-identifier": {**declared, "info": {"required": False, "id": request_id}}
        }
    proof = make_proof(
        payer,
        challenge.accepts[0],
        now=int(time.time()),
        nonce=os.urandom(32),
        resource=challenge.resource,
        extensions=extensions,
    )
    return [(b"payment-signature", encode_proof(proof).encode())]


def setup(chain: DevChain, app: Any) -> tuple[Paid, PaymentMiddleware, EvmAccount]:
    paid = make_gate(chain)
    return paid, PaymentMiddleware(app, paid.gate), fund(chain)


async def test_same_request_with_a_fresh_payment_gets_the_stored_response(chain: DevChain) -> None:
    inner = Counting()
    paid, app, payer = setup(chain, inner)
    rid = new_id()
    first = await call(
        app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
    )
    assert first[0]["status"] == 200
    second_proof = await paid_headers(app, payer, "POST", "/items", rid)
    again = await call(app, "POST", "/items", second_proof, b"{}")
    assert again[0]["status"] == 200
    assert body_of(again) == body_of(first)
    replayed = headers_of(again)
    assert replayed["idempotent-replayed"] == "true"
    assert replayed["payment-response"] == headers_of(first)["payment-response"]
    assert inner.calls == 1
    assert chain.balance_of(payer.address) == 1_000_000 - ITEMS
    assert chain.balance_of(paid.merchant) == ITEMS
    # The retry's payment was not claimed: it still pays for a request of its own (under a new
    # id; the extensions are outside the signed authorization, so the payment stays valid).
    proof = decode_proof(second_proof[0][1].decode())
    renamed = replace(proof, extensions={"payment-identifier": {"info": {"id": new_id()}}})
    other = [(b"payment-signature", encode_proof(renamed).encode())]
    fresh = await call(app, "POST", "/items", other, b"{}")
    assert fresh[0]["status"] == 200
    assert "idempotent-replayed" not in headers_of(fresh)
    assert chain.balance_of(payer.address) == 1_000_000 - 2 * ITEMS
    [replay] = await paid.store.events(kind="replay")
    assert replay.payer == payer.address


async def test_same_id_with_another_body_is_a_conflict(chain: DevChain) -> None:
    inner = Counting()
    _, app, payer = setup(chain, inner)
    rid = new_id()
    await call(app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"a")
    other = await call(
        app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"b"
    )
    assert other[0]["status"] == 409
    assert orjson.loads(body_of(other))["code"] == "idempotency_conflict"
    assert "payment-required" in headers_of(other)
    assert inner.calls == 1
    assert chain.balance_of(payer.address) == 1_000_000 - ITEMS


async def test_the_key_is_scoped_to_the_payer(chain: DevChain) -> None:
    inner = Counting()
    _, app, payer = setup(chain, inner)
    rid = new_id()
    await call(app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"x")
    thief = fund(chain)
    stolen = await call(
        app, "POST", "/items", await paid_headers(app, thief, "POST", "/items", rid), b"x"
    )
    # Another payer's id is another key: its request runs (and pays) on its own.
    assert "idempotent-replayed" not in headers_of(stolen)
    assert orjson.loads(body_of(stolen))["call"] == 2


async def test_concurrent_requests_with_one_id_settle_once(chain: DevChain) -> None:
    inner = Counting()
    paid, app, payer = setup(chain, inner)
    rid = new_id()
    proofs = [await paid_headers(app, payer, "POST", "/items", rid) for _ in range(20)]
    results: list[Sent] = []

    async def one(headers: list[tuple[bytes, bytes]]) -> None:
        results.append(await call(app, "POST", "/items", headers, b"{}"))

    async with anyio.create_task_group() as group:
        for headers in proofs:
            group.start_soon(one, headers)
    assert [r[0]["status"] for r in results] == [200] * 20
    assert len({body_of(r) for r in results}) == 1
    assert inner.calls == 1
    assert chain.balance_of(paid.merchant) == ITEMS
    assert sum("idempotent-replayed" in headers_of(r) for r in results) == 19


async def test_an_app_error_gives_the_id_back(chain: DevChain) -> None:
    inner = Counting(fail=[1])
    paid, app, payer = setup(chain, inner)
    rid = new_id()
    failed = await call(
        app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
    )
    assert failed[0]["status"] == 500
    assert chain.balance_of(payer.address) == 1_000_000
    retried = await call(
        app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
    )
    assert retried[0]["status"] == 200
    assert "idempotent-replayed" not in headers_of(retried)
    assert inner.calls == 2
    assert chain.balance_of(paid.merchant) == ITEMS


async def test_a_response_too_large_to_keep_is_not_replayed(chain: DevChain) -> None:
    inner = Counting(size=5000)
    paid, app, payer = setup(chain, inner)
    paid.gate.max_stored_body = 1000
    rid = new_id()
    first = await call(
        app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
    )
    assert first[0]["status"] == 200
    assert len(body_of(first)) > 5000  # streamed through whole, only the copy is bounded
    again = await call(
        app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
    )
    assert again[0]["status"] == 409
    problem = orjson.loads(body_of(again))
    assert problem["code"] == "idempotency_conflict"
    assert "too large" in problem["detail"]
    assert inner.calls == 1
    assert chain.balance_of(paid.merchant) == ITEMS


async def test_request_body_too_large_to_fingerprint_is_a_413(chain: DevChain) -> None:
    inner = Counting()
    paid, app, payer = setup(chain, inner)
    paid.gate.max_request_body = 10
    headers = await paid_headers(app, payer, "POST", "/items", new_id())
    refused = await call(app, "POST", "/items", headers, b"x" * 11)
    assert refused[0]["status"] == 413
    assert inner.calls == 0
    # Without an id the body is not read by the gate: any size passes to the app.
    plain = await call(
        app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", None), b"y" * 50
    )
    assert plain[0]["status"] == 200
    assert orjson.loads(body_of(plain))["echo"] == "y" * 50


@pytest.mark.parametrize("bad", ["short", "x" * 129, "has space in it!!"])
async def test_malformed_ids_are_refused(chain: DevChain, bad: str) -> None:
    inner = Counting()
    _, app, payer = setup(chain, inner)
    headers = await paid_headers(app, payer, "POST", "/items", None)
    refused = await call(
        app, "POST", "/items", [*headers, (b"idempotency-key", bad.encode())], b"{}"
    )
    assert refused[0]["status"] == 400
    assert orjson.loads(body_of(refused))["code"] == "invalid_payload"
    assert inner.calls == 0


def test_the_extension_wins_over_the_header() -> None:
    proof = decode_proof(
        encode_proof(
            make_proof(
                EvmAccount.generate(),
                make_offer(),
                now=int(time.time()),
                nonce=os.urandom(32),
                extensions={"payment-identifier": {"info": {"required": False, "id": "a" * 16}}},
            )
        )
    )
    assert read_id(proof, {"idempotency-key": '"' + "b" * 16 + '"'}) == "a" * 16
    bare = decode_proof(
        encode_proof(make_proof(EvmAccount.generate(), make_offer(), now=1, nonce=os.urandom(32)))
    )
    assert read_id(bare, {"idempotency-key": '"' + "b" * 16 + '"'}) == "b" * 16
    assert read_id(bare, {}) is None


def make_offer() -> Any:
    from farebox.protocol.models import Offer

    return Offer(
        scheme="exact",
        network="eip155:84532",
        amount=1,
        asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        pay_to="0x000000000000000000000000000000000000dEaD",
        max_timeout_seconds=60,
        extra={"name": "USDC", "version": "2"},
    )


async def test_agent_resends_the_same_payment_after_a_dropped_connection(chain: DevChain) -> None:
    inner = Counting()
    paid, app, payer = setup(chain, inner)
    drops = {"n": 0}
    seen: list[tuple[str | None, str | None]] = []

    async def dropping(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        if b"payment-signature" not in headers:
            await app(scope, receive, send)
            return
        seen.append(
            (headers[b"payment-signature"].decode(), headers.get(b"idempotency-key", b"").decode())
        )
        if drops["n"] == 0:
            drops["n"] += 1
            # The app runs and settles, then the connection drops before the client hears it.
            await app(scope, receive, lambda message: anyio.sleep(0))
            raise httpx.ReadError("connection reset by peer")
        await app(scope, receive, send)

    agent = Agent(payer)
    async with httpx.AsyncClient(
        transport=PaymentTransport(httpx.ASGITransport(app=dropping)),
        base_url=ISSUER,
        auth=PaymentAuth(agent),
    ) as client:
        response = await client.post("/items", content=b'{"q": 1}')
    assert response.status_code == 200
    assert response.headers["idempotent-replayed"] == "true"
    assert response.json()["call"] == 1
    # The same signed payment and the same id, twice; the proof carries the id too.
    assert len(seen) == 2
    assert seen[0] == seen[1]
    proof = decode_proof(seen[0][0] or "")
    assert proof.extensions["payment-identifier"]["info"]["id"] == seen[0][1]
    assert inner.calls == 1
    assert chain.balance_of(payer.address) == 1_000_000 - ITEMS
    assert chain.balance_of(paid.merchant) == ITEMS
    assert agent.budget.spent(now=int(time.time())).today == agent.budget.to_units(
        ITEMS, asset=chain.asset
    )


async def test_agent_gives_up_after_its_resends_and_counts_the_spend(chain: DevChain) -> None:
    inner = Counting()
    _, app, payer = setup(chain, inner)

    async def always_dropping(scope: Any, receive: Any, send: Any) -> None:
        if b"payment-signature" in dict(scope["headers"]):
            raise httpx.ConnectError("unreachable")
        await app(scope, receive, send)

    agent = Agent(payer, resends=2)
    async with httpx.AsyncClient(
        transport=PaymentTransport(httpx.ASGITransport(app=always_dropping)),
        base_url=ISSUER,
        auth=PaymentAuth(agent),
    ) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post("/items", content=b"{}")
    # The signed authorization left the agent: it counts, once.
    assert agent.budget.spent(now=int(time.time())).today == agent.budget.to_units(
        ITEMS, asset=chain.asset
    )


def test_wsgi_face_replays_and_charges_once(chain: DevChain) -> None:
    paid = make_gate(chain)
    flask = Flask(__name__)
    calls = {"n": 0}

    @flask.post("/items")
    def items() -> dict[str, Any]:
        calls["n"] += 1
        return {"call": calls["n"], "echo": request.get_data(as_text=True)}

    middleware = WsgiPaymentMiddleware(flask.wsgi_app, paid.gate)
    payer = fund(chain)
    rid = new_id()
    try:
        with httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url=ISSUER) as client:

            def pay(body: bytes) -> httpx.Response:
                first = client.post("/items", content=body)
                assert first.status_code == 402
                challenge = read_challenge(dict(first.headers), first.content)
                proof = make_proof(
                    payer,
                    challenge.accepts[0],
                    now=int(time.time()),
                    nonce=os.urandom(32),
                    resource=challenge.resource,
                )
                headers = {"payment-signature": encode_proof(proof), "idempotency-key": rid}
                return client.post("/items", content=body, headers=headers)

            first = pay(b"hello")
            assert first.status_code == 200
            assert first.json() == {"call": 1, "echo": "hello"}
            again = pay(b"hello")
            assert again.status_code == 200
            assert again.json() == first.json()
            assert again.headers["idempotent-replayed"] == "true"
            conflict = pay(b"other")
            assert conflict.status_code == 409
    finally:
        middleware.close()
    assert calls["n"] == 1
    assert chain.balance_of(payer.address) == 1_000_000 - ITEMS


# --- a first attempt whose process died while its entry was running ----------------------------

STALE = 200  # seconds before now the dead attempt ran: past the gate's 120 s threshold


class Clock:
    """The gate's clock, real time moved by ``offset`` seconds."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def dead_setup(chain: DevChain, app: Any) -> tuple[Paid, PaymentMiddleware, EvmAccount, Clock]:
    """:func:`setup` with a controllable clock and a long wait: a stale entry must be decided
    at once, so a test that waited would time out (each runs under ``fail_after``)."""
    paid, middleware, payer = setup(chain, app)
    clock = Clock()
    paid.gate.clock = clock
    paid.gate.idempotency_wait = 30.0
    return paid, middleware, payer, clock


async def die_mid_request(
    paid: Paid,
    app: Any,
    payer: EvmAccount,
    clock: Clock,
    rid: str,
    monkeypatch: pytest.MonkeyPatch,
    *,
    dropped: Sequence[str],
) -> Sent:
    """Run a first attempt ``STALE`` seconds ago whose store writes ``dropped`` are lost, as when
    its process died before making them; later requests see the store as that process left it."""

    async def lost(*args: Any, **kwargs: Any) -> None:
        return None

    headers = await paid_headers(app, payer, "POST", "/items", rid)
    clock.offset = -STALE
    with monkeypatch.context() as patch:
        for method in dropped:
            patch.setattr(paid.store, method, lost)
        first = await call(app, "POST", "/items", headers, b"{}")
    clock.offset = 0
    # The memory store has no listing of entries; the test looks inside.
    [entry] = paid.store._idempotent.values()
    assert entry.response is None
    return first


async def test_a_stale_entry_whose_payment_settled_names_the_transaction(
    chain: DevChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = Counting()
    paid, app, payer, clock = dead_setup(chain, inner)
    rid = new_id()
    # The first attempt settled, then died before keeping its response.
    await die_mid_request(
        paid, app, payer, clock, rid, monkeypatch, dropped=["complete_idempotent"]
    )
    assert chain.balance_of(paid.merchant) == ITEMS
    [settlement] = await paid.store.events(kind="settlement")
    with anyio.fail_after(10):
        retried = await call(
            app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
        )
    assert retried[0]["status"] == 409
    problem = orjson.loads(body_of(retried))
    assert problem["code"] == "idempotency_conflict"
    assert settlement.reference is not None
    assert f"settled in transaction {settlement.reference}" in problem["detail"]
    assert "response was lost" in problem["detail"]
    assert inner.calls == 1
    assert chain.balance_of(paid.merchant) == ITEMS
    assert chain.balance_of(payer.address) == 1_000_000 - ITEMS


@pytest.mark.parametrize("claim", ["released", "never recorded"])
async def test_a_stale_entry_that_moved_no_money_lets_the_retry_run(
    chain: DevChain, monkeypatch: pytest.MonkeyPatch, claim: str
) -> None:
    inner = Counting(fail=[1])
    paid, app, payer, clock = dead_setup(chain, inner)
    rid = new_id()
    if claim == "never recorded":
        # An entry written before entries kept their claim.
        begin = paid.store.begin_idempotent

        async def without_claim(key: str, **kwargs: Any) -> Any:
            return await begin(key, **{**kwargs, "claim": None})

        monkeypatch.setattr(paid.store, "begin_idempotent", without_claim)
    # The app failed, the proof's claim was released, then the process died before giving the
    # idempotency id back.
    first = await die_mid_request(
        paid, app, payer, clock, rid, monkeypatch, dropped=["abandon_idempotent"]
    )
    assert first[0]["status"] == 500
    assert chain.balance_of(paid.merchant) == 0
    with anyio.fail_after(10):
        retried = await call(
            app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
        )
    assert retried[0]["status"] == 200
    assert "idempotent-replayed" not in headers_of(retried)
    assert inner.calls == 2
    assert chain.balance_of(paid.merchant) == ITEMS
    # The retry's response is kept as usual: the next retry replays it.
    again = await call(
        app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
    )
    assert headers_of(again)["idempotent-replayed"] == "true"
    assert chain.balance_of(paid.merchant) == ITEMS


async def test_a_stale_entry_whose_claim_is_still_held_stays_in_progress(
    chain: DevChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = Counting(fail=[1])
    paid, app, payer, clock = dead_setup(chain, inner)
    rid = new_id()
    # Died with the proof still claimed: only the reconciler can tell whether it paid.
    await die_mid_request(
        paid, app, payer, clock, rid, monkeypatch, dropped=["release", "abandon_idempotent"]
    )
    with anyio.fail_after(10):
        retried = await call(
            app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
        )
    assert retried[0]["status"] == 409
    assert orjson.loads(body_of(retried))["code"] == "idempotency_in_progress"
    assert inner.calls == 1
    assert chain.balance_of(paid.merchant) == 0


async def test_a_fresh_running_entry_is_waited_for_not_judged(
    chain: DevChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = Counting(fail=[1])
    paid, app, payer, clock = dead_setup(chain, inner)
    paid.gate.idempotency_wait = 0.2
    rid = new_id()
    await die_mid_request(paid, app, payer, clock, rid, monkeypatch, dropped=["abandon_idempotent"])
    # Seen from 100 s after the first attempt, its entry may still belong to a live request.
    clock.offset = -STALE + 100
    started = time.monotonic()
    retried = await call(
        app, "POST", "/items", await paid_headers(app, payer, "POST", "/items", rid), b"{}"
    )
    assert time.monotonic() - started >= 0.2  # it waited for the first attempt
    assert retried[0]["status"] == 409
    assert orjson.loads(body_of(retried))["code"] == "idempotency_in_progress"
    assert inner.calls == 1
    assert chain.balance_of(paid.merchant) == 0

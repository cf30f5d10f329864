"""The paid reverse proxy in front of a real upstream (uvicorn on a free port), settling on the
embedded chain: free paths pass, paid ones are 402 then the upstream's own answer, the proof never
reaches the upstream, and an upstream that is down or slow costs the client nothing."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
import uvicorn

from farebox._asgi import run_lifespan
from farebox.agent.agent import Agent
from farebox.agent.httpx_auth import PaymentAuth
from farebox.config import FareboxApp, build_app, parse_config
from farebox.dev.devchain import DevChain
from farebox.money import DEVCHAIN_USDC
from farebox.server.proxy import ReverseProxy
from farebox.server.routes import RouteTable
from tests.support.chain import fund
from tests.support.servers import free_port, wait_for

pytestmark = pytest.mark.anyio

BASE = "https://api.test"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Upstream:
    """A small ASGI API that records what it was sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        self.seen.append(
            {
                "method": scope["method"],
                "path": path,
                "query": scope["query_string"].decode(),
                "headers": headers,
                "body": body,
            }
        )
        status, extra, chunks = 200, [(b"x-upstream", b"yes")], [b'{"ok": true}']
        if path == "/items":
            status, extra, chunks = 201, [(b"location", b"/items/7")], [b"created:" + body]
        elif path == "/stream":
            chunks = [b"one,", b"two,", b"three"]
        elif path == "/broken":
            status = 500
        elif path == "/slow":
            await anyio.sleep(2)
        start = {"type": "http.response.start", "status": status}
        await send({**start, "headers": [(b"content-type", b"text/plain"), *extra]})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if path == "/stream":
                await anyio.sleep(0.05)  # separate chunks on the wire
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Upstream]]:
    app = Upstream()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health")
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def proxied(chain: DevChain, upstream_url: str, tmp_path: Path) -> FareboxApp:
    routes = [
        {"method": method, "path": path, "price": "$0.01"}
        for method, path in (
            ("GET", "/weather"),
            ("POST", "/items"),
            ("GET", "/stream"),
            ("GET", "/broken"),
        )
    ]
    config = parse_config(
        {
            "server": {"store": "memory", "upstream": upstream_url},
            "payment": {"network": "devchain", "pay_to": PAY_TO},
            "settlement": {"ledger": "embedded"},
            "routes": routes,
        },
        base_dir=tmp_path,
        env={},
    )
    return build_app(config, chain=chain)


@pytest.fixture
async def client(
    chain: DevChain, upstream: tuple[str, Upstream], tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    payer = fund(chain)
    app = proxied(chain, upstream[0], tmp_path)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=BASE, auth=PaymentAuth(Agent(payer))
    ) as http:
        yield http, payer.address
    await app.aclose()


async def test_free_path_passes_with_query_and_forwarded_headers(
    client: tuple[httpx.AsyncClient, str], upstream: tuple[str, Upstream]
) -> None:
    http, _ = client
    response = await http.get("/free?a=1&b=two", headers={"x-forwarded-for": "10.0.0.1"})
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "yes"
    seen = upstream[1].seen[-1]
    assert (seen["path"], seen["query"]) == ("/free", "a=1&b=two")
    assert seen["headers"]["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["headers"]["x-forwarded-proto"] == "https"
    assert seen["headers"]["x-forwarded-host"] == "api.test"
    assert seen["headers"]["host"] == upstream[0].removeprefix("http://")


async def test_paid_path_402_then_the_upstreams_answer(
    client: tuple[httpx.AsyncClient, str], upstream: tuple[str, Upstream], chain: DevChain
) -> None:
    http, payer = client
    count = len(upstream[1].seen)
    unpaid = await http.get("/weather", auth=None)
    assert unpaid.status_code == 402
    assert len(upstream[1].seen) == count  # the upstream is not asked before payment
    response = await http.get("/weather")
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert response.headers["x-upstream"] == "yes"
    assert "payment-response" in response.headers
    assert "peac-receipt" in response.headers
    assert chain.balance_of(payer) == 1_000_000 - 10_000
    for seen in upstream[1].seen:
        assert "payment-signature" not in seen["headers"]
        assert "x-payment" not in seen["headers"]


async def test_created_with_location_and_a_request_body(
    client: tuple[httpx.AsyncClient, str], upstream: tuple[str, Upstream], chain: DevChain
) -> None:
    http, payer = client
    response = await http.post("/items", content=b"a new item")
    assert response.status_code == 201
    assert response.headers["location"] == "/items/7"
    assert response.content == b"created:a new item"
    assert upstream[1].seen[-1]["body"] == b"a new item"
    assert "payment-signature" not in upstream[1].seen[-1]["headers"]
    assert chain.balance_of(payer) == 1_000_000 - 10_000


async def test_streamed_body_is_paid_and_relayed(
    client: tuple[httpx.AsyncClient, str], chain: DevChain
) -> None:
    http, payer = client
    response = await http.get("/stream")
    assert response.status_code == 200
    assert response.content == b"one,two,three"
    assert chain.balance_of(payer) == 1_000_000 - 10_000


async def test_upstream_error_is_not_charged(
    client: tuple[httpx.AsyncClient, str], chain: DevChain
) -> None:
    http, payer = client
    response = await http.get("/broken")
    assert response.status_code == 500
    assert chain.balance_of(payer) == 1_000_000


async def test_upstream_down_is_502_and_not_charged(chain: DevChain, tmp_path: Path) -> None:
    payer = fund(chain)
    app = proxied(chain, f"http://127.0.0.1:{free_port()}", tmp_path)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=BASE, auth=PaymentAuth(Agent(payer))
    ) as http:
        response = await http.get("/weather")
        free = await http.get("/free")
    await app.aclose()
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 502
    assert "payment-response" not in response.headers
    assert free.status_code == 502
    assert chain.balance_of(payer.address) == 1_000_000


async def call(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    return sent


def scope(path: str, headers: list[tuple[bytes, bytes]], method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("192.0.2.1", 5000),
    }


async def test_stream_is_relayed_chunk_by_chunk(upstream: tuple[str, Upstream]) -> None:
    proxy = ReverseProxy(upstream[0], routes=RouteTable())
    try:
        sent = await call(proxy, scope("/stream", [(b"host", b"shop.test")]))
    finally:
        await proxy.aclose()
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    assert bodies == [b"one,", b"two,", b"three"]  # not gathered into one buffer


async def test_hop_by_hop_and_payment_headers_are_dropped(upstream: tuple[str, Upstream]) -> None:
    proxy = ReverseProxy(upstream[0] + "/", routes=RouteTable())
    headers = [
        (b"host", b"shop.test"),
        (b"connection", b"keep-alive, x-hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"payment-signature", b"proof"),
        (b"x-payment", b"proof"),
        (b"x-kept", b"1"),
        (b"content-length", b"4"),
    ]
    try:
        sent = await call(proxy, scope("/items", headers, "POST"), b"body")
    finally:
        await proxy.aclose()
    assert sent[0]["status"] == 201
    seen = upstream[1].seen[-1]
    for name in ("x-hop", "keep-alive", "payment-signature", "x-payment"):
        assert name not in seen["headers"]
    assert seen["headers"]["x-kept"] == "1"
    assert seen["headers"]["x-forwarded-for"] == "192.0.2.1"
    assert seen["body"] == b"body"


async def test_slow_upstream_is_504(upstream: tuple[str, Upstream]) -> None:
    proxy = ReverseProxy(upstream[0], timeout=0.3, routes=RouteTable())
    try:
        sent = await call(proxy, scope("/slow", []))
    finally:
        await proxy.aclose()
    assert sent[0]["status"] == 504
    assert (b"content-type", b"application/problem+json") in sent[0]["headers"]


async def test_lifespan_closes_the_pool(upstream: tuple[str, Upstream]) -> None:
    proxy = ReverseProxy(upstream[0], routes=RouteTable())
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    await proxy({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert proxy._client.is_closed


def test_upstream_url_is_checked() -> None:
    with pytest.raises(ValueError, match="http"):
        ReverseProxy("ftp://files.test")


# --- the proxy alone (without the gate in front) never forwards a second reading ------------------


async def test_the_proxy_alone_normalizes_and_refuses(upstream: tuple[str, Upstream]) -> None:
    proxy = ReverseProxy(upstream[0] + "/base/", routes=RouteTable())
    count = len(upstream[1].seen)
    try:
        refused = [
            await call(proxy, {**scope("/", [(b"host", b"shop.test")]), "raw_path": raw})
            for raw in (b"@127.0.0.1:1/", b"/a%2Fb", b"http://elsewhere.test/free", b"/a#b")
        ]
        sent = await call(proxy, {**scope("/", []), "raw_path": b"/x/%2e%2e/free//y/."})
    finally:
        await proxy.aclose()
    assert [messages[0]["status"] for messages in refused] == [400, 400, 400, 400]
    assert sent[0]["status"] == 200
    assert [seen["path"] for seen in upstream[1].seen[count:]] == ["/base/free/y/"]


async def test_the_proxy_refuses_content_length_with_chunked(
    upstream: tuple[str, Upstream],
) -> None:
    proxy = ReverseProxy(upstream[0], routes=RouteTable())
    count = len(upstream[1].seen)
    headers = [(b"content-length", b"4"), (b"transfer-encoding", b"chunked")]
    try:
        sent = await call(proxy, scope("/items", headers, "POST"), b"body")
    finally:
        await proxy.aclose()
    assert sent[0]["status"] == 400
    assert upstream[1].seen[count:] == []


async def test_unpriced_methods_on_a_priced_path(upstream: tuple[str, Upstream]) -> None:
    routes = RouteTable()
    routes.add("GET", "/weather", "$0.01", assets=DEVCHAIN_USDC, pay_to=PAY_TO)
    refusing = ReverseProxy(upstream[0], routes=routes)
    passing = ReverseProxy(upstream[0], routes=routes, unpriced_methods="pass")
    count = len(upstream[1].seen)
    try:
        refused = await call(refusing, scope("/weather/", [], "POST"))
        free = await call(refusing, scope("/free", [], "POST"))
        passed = await call(passing, scope("/weather", [], "POST"))
    finally:
        await refusing.aclose()
        await passing.aclose()
    assert refused[0]["status"] == 405
    assert (b"allow", b"GET, HEAD") in refused[0]["headers"]
    assert orjson.loads(refused[1]["body"])["code"] == "method_not_allowed"
    assert (free[0]["status"], passed[0]["status"]) == (200, 200)
    assert [(s["method"], s["path"]) for s in upstream[1].seen[count:]] == [
        ("POST", "/free"),
        ("POST", "/weather"),
    ]


async def test_every_rails_credential_is_dropped_and_a_bearer_token_kept(
    upstream: tuple[str, Upstream],
) -> None:
    proxy = ReverseProxy(upstream[0], routes=RouteTable())
    headers = [
        (b"authorization", b"payment eyJ9"),
        (b"payment-authorization", b"Payment eyJ9"),
        (b"x-receipt", b"pi_123_secret_456"),
        (b"Payment-Signature", b"proof"),
    ]
    count = len(upstream[1].seen)
    try:
        paid = await call(proxy, scope("/free", headers))
        bearer = await call(proxy, scope("/free", [(b"authorization", b"Bearer upstream-token")]))
    finally:
        await proxy.aclose()
    assert (paid[0]["status"], bearer[0]["status"]) == (200, 200)
    first, second = upstream[1].seen[count:]
    assert not set(first["headers"]) & {
        "authorization",
        "payment-authorization",
        "x-receipt",
        "payment-signature",
    }
    assert second["headers"]["authorization"] == "Bearer upstream-token"


@pytest.mark.parametrize("url", ["http://h.test/a%2Fb", "http://h.test/a\\b", "http://h.test/?q=1"])
def test_an_upstream_path_must_normalize(url: str) -> None:
    with pytest.raises(ValueError, match="upstream"):
        ReverseProxy(url)


async def test_a_payment_credential_joined_to_another_is_dropped(
    upstream: tuple[str, Upstream],
) -> None:
    proxy = ReverseProxy(upstream[0], routes=RouteTable())
    count = len(upstream[1].seen)
    try:
        for value in (b"Bearer t, Payment eyJ9", b"Basic dTpw,payment eyJ9"):
            sent = await call(proxy, scope("/free", [(b"authorization", value)]))
            assert sent[0]["status"] == 200
        kept = await call(proxy, scope("/free", [(b"authorization", b"Bearer a, Bearer b")]))
    finally:
        await proxy.aclose()
    assert kept[0]["status"] == 200
    first, second, third = upstream[1].seen[count:]
    assert "authorization" not in first["headers"]
    assert "authorization" not in second["headers"]
    assert third["headers"]["authorization"] == "Bearer a, Bearer b"


def test_the_proxy_needs_the_gates_routes_to_refuse_unpriced_methods() -> None:
    with pytest.raises(ValueError, match=r"routes=gate\.routes"):
        ReverseProxy("http://127.0.0.1:9000")
    ReverseProxy("http://127.0.0.1:9000", unpriced_methods="pass")  # forwarding every method

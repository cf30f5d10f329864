"""A reverse proxy as a pure ASGI app: farebox's gate in front of an API it does not own.

``PaymentMiddleware(ReverseProxy("http://127.0.0.1:9000"), gate)`` charges for the gate's routes and
forwards every request to the upstream: method, path, query, end-to-end headers and the request body
as it streams in; the upstream's answer streams back as it arrives, never buffered. The payment
headers are removed on the way: the upstream must never see (and could never replay) a proof.
An upstream that cannot be reached is a 502, one that does not answer in time a 504; neither is a
2xx, so the gate charges nothing for them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson

from farebox.server.asgi import run_lifespan

__all__ = ["HOP_BY_HOP", "STRIPPED_REQUEST_HEADERS", "ReverseProxy"]

logger = logging.getLogger("farebox.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The proof is the client's money: it stays between the client and the gate. ``host`` is the
# upstream's own (the client's goes in X-Forwarded-Host); X-Forwarded-* are rebuilt here.
STRIPPED_REQUEST_HEADERS = HOP_BY_HOP | {
    "payment-signature",
    "x-payment",
    "host",
    "x-forwarded-host",
    "x-forwarded-proto",
}


class _ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


def _problem(status: int, title: str, detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = orjson.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    return headers, body


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[str]:
    # Headers named in Connection are hop-by-hop too (RFC 9110 section 7.6.1).
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.decode("latin-1").split(","))
    return tokens


class ReverseProxy:
    """Forwards every request to ``upstream`` (``http(s)://host[:port][/base/path]``).

    One :class:`httpx.AsyncClient` (a connection pool) serves all requests; it is closed on the
    ASGI lifespan shutdown or by :meth:`aclose`. ``timeout`` bounds connecting and each wait for
    upstream bytes, in seconds; a slow but steady stream is never cut.
    """

    def __init__(
        self, upstream: str, *, timeout: float = 30.0, client: httpx.AsyncClient | None = None
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ValueError("upstream must be an http(s) URL without a query")
        self.upstream = upstream
        self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._timeout = httpx.Timeout(timeout).as_dict()
        # No cookie jar (a shared client would hand one client's cookies to the next), no proxy
        # variables from the environment, no redirects followed: the client sees what upstream says.
        self._client = client or httpx.AsyncClient(
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            trust_env=False,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send, self.aclose)
            return
        if scope["type"] != "http":
            return
        request = self._request(scope, receive)
        try:
            response = await self._client.send(request, stream=True)
        except _ClientGone:
            return
        except httpx.TimeoutException:
            await self._fail(send, 504, "Gateway Timeout", "the upstream did not answer in time")
            return
        except httpx.HTTPError as exc:
            # The upstream's address stays out of the answer: it is internal.
            logger.warning("upstream unreachable: %s", type(exc).__name__)
            await self._fail(send, 502, "Bad Gateway", "the upstream could not be reached")
            return
        try:
            await self._relay(response, send)
        finally:
            await response.aclose()

    def _request(self, scope: Scope, receive: Receive) -> httpx.Request:
        raw_headers: list[tuple[bytes, bytes]] = list(scope.get("headers", ()))
        dropped = STRIPPED_REQUEST_HEADERS | _connection_tokens(raw_headers)
        headers = [(k, v) for k, v in raw_headers if k.decode("latin-1").lower() not in dropped]
        forwarded_for = [v for k, v in raw_headers if k.lower() == b"x-forwarded-for"]
        headers = [(k, v) for k, v in headers if k.lower() != b"x-forwarded-for"]
        client = scope.get("client")
        if client:
            forwarded_for.append(str(client[0]).encode("latin-1"))
        if forwarded_for:
            headers.append((b"x-forwarded-for", b", ".join(forwarded_for)))
        headers.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode("latin-1")))
        host = next((v for k, v in raw_headers if k.lower() == b"host"), None)
        if host is not None:
            headers.append((b"x-forwarded-host", host))
        raw_path = scope.get("raw_path") or quote(scope.get("path", "/")).encode("latin-1")
        url = self._base + raw_path.decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        names = {k.lower() for k, _ in raw_headers}
        # Only a request that declares a body gets one: a chunked empty body on a GET confuses
        # some servers.
        has_body = b"transfer-encoding" in names or any(
            k.lower() == b"content-length" and v.strip() != b"0" for k, v in raw_headers
        )
        return httpx.Request(
            scope["method"],
            url,
            headers=headers,
            content=self._body(receive) if has_body else None,
            extensions={"timeout": self._timeout},
        )

    @staticmethod
    async def _body(receive: Receive) -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    @staticmethod
    async def _relay(response: httpx.Response, send: Send) -> None:
        raw = response.headers.raw
        dropped = HOP_BY_HOP | _connection_tokens(raw)
        headers = [(k.lower(), v) for k, v in raw if k.decode("latin-1").lower() not in dropped]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        # Raw bytes: content-encoding and content-length pass through as the upstream set them.
        # A failure mid-stream propagates, so the server cuts the connection and the client sees
        # a truncated response rather than a complete-looking one.
        async for chunk in response.aiter_raw():
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _fail(send: Send, status: int, title: str, detail: str) -> None:
        headers, body = _problem(status, title, detail)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

"""A reverse proxy as a pure ASGI app: farebox's gate in front of an API it does not own.

``PaymentMiddleware(ReverseProxy("http://127.0.0.1:9000", routes=gate.routes), gate)`` charges for
the gate's routes and forwards every request to the upstream: method, path, query, end-to-end headers
and the request body as it streams in; the upstream's answer streams back as it arrives, never
buffered. An upstream that cannot be reached is a 502, one that does not answer in time a 504;
neither is a 2xx, so the gate charges nothing for them.

What the upstream receives is decided here and nowhere else:

- the path the gate matched, normalized once (:func:`~farebox.server.asgi.checked_scope`), sent as
  those exact bytes; a target that cannot be normalized is a 400 and reaches nothing;
- at the scheme, host and port of the configured URL: the URL is built from its parsed parts with
  only the path and query replaced, never by gluing a client's target onto a string;
- without any payment credential of any rail (:data:`PAYMENT_CREDENTIALS`): the upstream must
  never see, and could never replay, a proof. Other ``Authorization`` schemes (the upstream's own
  ``Bearer``) pass;
- on a path some route prices, only a method some route prices for it (with ``routes``): another
  method is a 405 with ``Allow``, since an upstream that ignores methods would serve it free.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Literal

import httpx
import orjson

from farebox._asgi import Receive, Scope, Send, run_lifespan, send_response
from farebox.errors import PROBLEM_TYPE_BASE, ConfigError
from farebox.protocol import x402
from farebox.rails import card
from farebox.server.asgi import checked_scope
from farebox.server.routes import RouteTable
from farebox.server.target import BadTarget, normalize_target

__all__ = ["HOP_BY_HOP", "PAYMENT_CREDENTIALS", "STRIPPED_REQUEST_HEADERS", "ReverseProxy"]

logger = logging.getLogger("farebox.proxy")

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
# ``host`` is the upstream's own (the client's goes in X-Forwarded-Host); X-Forwarded-* are
# rebuilt here.
STRIPPED_REQUEST_HEADERS = HOP_BY_HOP | {"host", "x-forwarded-host", "x-forwarded-proto"}
# The proof is the client's money: it stays between the client and the gate. Each rail names the
# headers it reads a credential from, ``(header, auth scheme or None for any value)``; a new rail
# adds its own list here, the one place the proxy looks.
PAYMENT_CREDENTIALS: tuple[tuple[str, str | None], ...] = (*x402.CREDENTIALS, *card.CREDENTIALS)
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")  # as Allow lists them


class _ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


def _is_payment_credential(name: str, value: bytes) -> bool:
    wanted = [want for header, want in PAYMENT_CREDENTIALS if header == name]
    if not wanted:
        return False
    if None in wanted:
        return True
    # One header may carry several credentials, comma-joined (RFC 9110 section 11.6.2, or a front
    # proxy merging two headers): any one of a payment scheme makes the whole value a credential.
    schemes = {part.split(None, 1)[0].lower() for part in value.split(b",") if part.strip()}
    return any(want.encode("latin-1") in schemes for want in wanted if want is not None)


def _problem(status: int, title: str, detail: str, code: str) -> dict[str, Any]:
    return {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }


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

    ``routes`` are the gate's: on a path one of them prices, a method none of them prices is
    answered 405 (``unpriced_methods="refuse"``, the default) instead of reaching an upstream
    that may serve it whatever the method; ``"pass"`` forwards it free.
    """

    def __init__(
        self,
        upstream: str,
        *,
        timeout: float = 30.0,
        client: httpx.AsyncClient | None = None,
        routes: RouteTable | None = None,
        unpriced_methods: Literal["refuse", "pass"] = "refuse",
    ) -> None:
        try:
            url = httpx.URL(upstream)
        except httpx.InvalidURL:
            raise ConfigError("upstream must be an http(s) URL without a query") from None
        if url.scheme not in ("http", "https") or not url.host or url.query or url.fragment:
            raise ConfigError("upstream must be an http(s) URL without a query")
        if unpriced_methods not in ("refuse", "pass"):
            raise ConfigError('unpriced_methods must be "refuse" or "pass"')
        try:
            base = normalize_target(url.raw_path.partition(b"?")[0]).raw_path.rstrip(b"/")
        except BadTarget as exc:
            raise ConfigError(f"upstream path: {exc.message}") from None
        if routes is None and unpriced_methods == "refuse":
            # Without the gate's routes the proxy cannot tell a priced path, and would forward
            # POST /weather free when only GET is priced: the safe default needs them.
            raise ConfigError(
                'pass routes=gate.routes (or unpriced_methods="pass" to forward every method)'
            )
        self.upstream = upstream
        self._url = url
        self._base_path = base
        self._routes = routes if unpriced_methods == "refuse" else None
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
        try:
            # Normalizing is idempotent: behind PaymentMiddleware this is the path the gate
            # matched; mounted alone, the proxy still never forwards an unnormalized one.
            scope = checked_scope(scope)
            url = self._url_for(scope)
        except BadTarget as exc:
            await self._fail(send, exc.to_problem())
            return
        allowed = self._unpriced(scope)
        if allowed:
            detail = f"this path is priced for {allowed} only"
            problem = _problem(405, "Method Not Allowed", detail, "method_not_allowed")
            await self._fail(send, problem, [(b"allow", allowed.encode("latin-1"))])
            return
        request = self._request(scope, receive, url)
        try:
            response = await self._client.send(request, stream=True)
        except _ClientGone:
            return
        except httpx.TimeoutException:
            detail = "the upstream did not answer in time"
            await self._fail(send, _problem(504, "Gateway Timeout", detail, "upstream_timeout"))
            return
        except httpx.HTTPError as exc:
            # The upstream's address stays out of the answer: it is internal.
            logger.warning("upstream unreachable: %s", type(exc).__name__)
            detail = "the upstream could not be reached"
            await self._fail(send, _problem(502, "Bad Gateway", detail, "upstream_unreachable"))
            return
        try:
            await self._relay(response, send)
        finally:
            await response.aclose()

    def _url_for(self, scope: Scope) -> httpx.URL:
        """The configured URL with only its path and query replaced by the normalized ones."""
        query: bytes = scope["query_string"]
        raw = self._base_path + scope["raw_path"] + (b"?" + query if query else b"")
        try:
            url = self._url.copy_with(raw_path=raw)
        except httpx.InvalidURL:
            raise BadTarget("the request target cannot be forwarded") from None
        # Nothing between here and the socket may re-read the target: if the client library would
        # send other bytes (or another host), refuse rather than forward a second interpretation.
        where = (url.scheme, url.host, url.port)
        if where != (self._url.scheme, self._url.host, self._url.port) or url.raw_path != raw:
            raise BadTarget("the request target cannot be forwarded unchanged")
        return url

    def _unpriced(self, scope: Scope) -> str:
        """The ``Allow`` value when the path is priced but not for this method, else ``""``."""
        if self._routes is None:
            return ""
        method, path = scope["method"], scope["path"]
        if self._routes.match(method, path) is not None:
            return ""
        priced = self._routes.methods_at(path)
        if "GET" in priced:
            priced |= {"HEAD"}
        return ", ".join(m for m in _METHOD_ORDER if m in priced)

    def _request(self, scope: Scope, receive: Receive, url: httpx.URL) -> httpx.Request:
        raw_headers: list[tuple[bytes, bytes]] = list(scope.get("headers", ()))
        dropped = STRIPPED_REQUEST_HEADERS | _connection_tokens(raw_headers) | {"x-forwarded-for"}
        headers = [
            (k, v)
            for k, v in raw_headers
            if (name := k.decode("latin-1").lower()) not in dropped
            and not _is_payment_credential(name, v)
        ]
        forwarded_for = [v for k, v in raw_headers if k.lower() == b"x-forwarded-for"]
        client = scope.get("client")
        if client:
            forwarded_for.append(str(client[0]).encode("latin-1"))
        if forwarded_for:
            headers.append((b"x-forwarded-for", b", ".join(forwarded_for)))
        headers.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode("latin-1")))
        host = next((v for k, v in raw_headers if k.lower() == b"host"), None)
        if host is not None:
            headers.append((b"x-forwarded-host", host))
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
    async def _fail(
        send: Send, problem: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"cache-control", b"no-store"),
            *(extra or []),
        ]
        await send_response(send, problem["status"], orjson.dumps(problem), headers)

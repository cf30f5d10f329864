"""The agent as an ``httpx.Auth``: one flow for ``httpx.Client`` and ``httpx.AsyncClient``.

``httpx.Client(auth=PaymentAuth(agent))``: a 402 is paid and the request retried; the paid
response comes back with its :class:`~farebox.agent.agent.Payment` in
``response.extensions["farebox.payment"]``. Only refusals and discovery documents are read here;
the paid response streams to the caller untouched.

httpx gives an auth flow no say when sending fails, so resending a paid request after a transport
error (same signed payment, same idempotency id) is the job of :class:`PaymentTransport`, wrapped
around the client's transport: ``httpx.Client(auth=PaymentAuth(agent),
transport=PaymentTransport(httpx.HTTPTransport()))``. It resends only the paid retries this auth
marks, and only errors raised before the response arrived (a body cut mid-stream is not resent).

A card payment's token is minted with the agent's card: ``httpx.Client`` calls the wallet's
blocking :meth:`~farebox.agent.card.CardWallet.mint`, ``httpx.AsyncClient`` awaits
:meth:`~farebox.agent.card.CardWallet.mint_async`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from farebox.agent.agent import Agent, Answer, Fetch, MintToken, Payment, Retry
from farebox.errors import PaymentError

__all__ = ["PAYMENT_EXTENSION", "PaymentAuth", "PaymentTransport"]

PAYMENT_EXTENSION = "farebox.payment"
MAX_402_BODY = 64 * 1024
_FETCH = "farebox.fetch"
# Marks a paid retry, with how many times PaymentTransport may send it again.
_RESENDS = "farebox.resends"

Exchange = tuple[httpx.Response, bytes | None]
# What the shared flow asks the sync or async face to do, and what it gets back.
Outgoing = httpx.Request | MintToken
Incoming = Exchange | str | BaseException


def _already_paying(request: httpx.Request) -> bool:
    # The caller set a payment header itself: its 402 is the caller's to handle.
    authorization = request.headers.get("authorization", "")
    return "payment-signature" in request.headers or authorization[:8].lower() == "payment "


def _wants_body(response: httpx.Response) -> bool:
    # A refusal from the gate (402, or 400/503 with the challenge) explains itself in its body.
    return (
        response.status_code == 402
        or "payment-required" in response.headers
        or bool(response.request.extensions.get(_FETCH))
    )


def _answer(response: httpx.Response, body: bytes | None) -> Answer:
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Answer(response.status_code, headers, body if body is not None else b"")


class PaymentAuth(httpx.Auth):
    """Pays 402 challenges with ``agent``; raises the agent's errors when it cannot or may not."""

    def __init__(self, agent: Agent, *, max_body: int = MAX_402_BODY) -> None:
        self.agent = agent
        self.max_body = max_body

    def _flow(self, request: httpx.Request) -> Generator[Outgoing, Incoming, None]:
        first = yield request
        assert isinstance(first, tuple)
        response, body = first
        if response.status_code != 402 or _already_paying(request):
            return
        flow = self.agent.pay(request.method, str(request.url), _answer(response, body))
        payment: Payment | None = None
        try:
            step = next(flow)
            while True:
                if isinstance(step, MintToken):
                    minted = yield step
                    if isinstance(minted, BaseException):
                        step = flow.throw(minted)
                    else:
                        assert isinstance(minted, str)
                        step = flow.send(minted)
                    continue
                if isinstance(step, Retry):
                    for name, value in step.headers.items():
                        request.headers[name] = value
                    request.extensions = {**request.extensions, _RESENDS: self.agent.resends}
                    exchange = yield request
                else:
                    assert isinstance(step, Fetch)
                    fetch = httpx.Request(
                        "GET",
                        step.url,
                        headers={"accept": "application/json"},
                        extensions={_FETCH: True},
                    )
                    exchange = yield fetch
                assert isinstance(exchange, tuple)
                response, body = exchange
                step = flow.send(_answer(response, body))
        except StopIteration as done:
            payment = done.value
        if payment is not None:
            response.extensions[PAYMENT_EXTENSION] = payment

    def _check_size(self, response: httpx.Response) -> None:
        # httpx reads every intermediate response of an auth flow in full itself, so refuse a
        # declared giant here; a chunked one is read, then ignored past the limit.
        length = response.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > 16 * self.max_body:
            response.close()
            raise PaymentError("payload_too_large", "the 402 response body is too large")

    def _bounded(self, body: bytes) -> bytes | None:
        return body if len(body) <= self.max_body else None

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self._flow(request)
        outgoing = next(flow)
        while True:
            incoming: Incoming
            if isinstance(outgoing, MintToken):
                try:
                    incoming = outgoing.wallet.mint(outgoing.request)
                except Exception as exc:  # handed to the flow, which releases and raises it
                    incoming = exc
            else:
                response = yield outgoing
                body: bytes | None = None
                if _wants_body(response):
                    self._check_size(response)
                    body = self._bounded(response.read())
                incoming = (response, body)
            try:
                outgoing = flow.send(incoming)
            except StopIteration:
                return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self._flow(request)
        outgoing = next(flow)
        while True:
            incoming: Incoming
            if isinstance(outgoing, MintToken):
                try:
                    incoming = await outgoing.wallet.mint_async(outgoing.request)
                except Exception as exc:  # handed to the flow, which releases and raises it
                    incoming = exc
            else:
                response = yield outgoing
                body: bytes | None = None
                if _wants_body(response):
                    self._check_size(response)
                    body = self._bounded(await response.aread())
                incoming = (response, body)
            try:
                outgoing = flow.send(incoming)
            except StopIteration:
                return


class PaymentTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wraps a transport (sync or async) to resend paid retries that failed in transport.

    A request :class:`PaymentAuth` marked as a paid retry is sent again, unchanged, up to the
    agent's ``resends`` times on :class:`httpx.TransportError` (connect, read, write, timeouts,
    protocol errors); the server's idempotency then replays a response it already settled.
    Everything else passes straight through.
    """

    def __init__(self, inner: httpx.BaseTransport | httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.inner, httpx.BaseTransport):
            raise TypeError("PaymentTransport wraps an async transport: use httpx.AsyncClient")
        resends = int(request.extensions.get(_RESENDS, 0))
        while True:
            try:
                return self.inner.handle_request(request)
            except httpx.TransportError:
                if resends <= 0:
                    raise
                resends -= 1

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.inner, httpx.AsyncBaseTransport):
            raise TypeError("PaymentTransport wraps a sync transport: use httpx.Client")
        resends = int(request.extensions.get(_RESENDS, 0))
        while True:
            try:
                return await self.inner.handle_async_request(request)
            except httpx.TransportError:
                if resends <= 0:
                    raise
                resends -= 1

    def close(self) -> None:
        if isinstance(self.inner, httpx.BaseTransport):
            self.inner.close()

    async def aclose(self) -> None:
        if isinstance(self.inner, httpx.AsyncBaseTransport):
            await self.inner.aclose()

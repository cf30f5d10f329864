"""The agent as an ``httpx.Auth``: one flow for ``httpx.Client`` and ``httpx.AsyncClient``.

``httpx.Client(auth=PaymentAuth(agent))``: a 402 is paid and the request retried; the paid
response comes back with its :class:`~farebox.agent.agent.Payment` in
``response.extensions["farebox.payment"]``. Only refusals and discovery documents are read here;
the paid response streams to the caller untouched.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from farebox.agent.agent import Agent, Answer, Fetch, Payment, Retry
from farebox.errors import PaymentError

__all__ = ["PAYMENT_EXTENSION", "PaymentAuth"]

PAYMENT_EXTENSION = "farebox.payment"
MAX_402_BODY = 64 * 1024
_FETCH = "farebox.fetch"

Exchange = tuple[httpx.Response, bytes | None]


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

    def _flow(self, request: httpx.Request) -> Generator[httpx.Request, Exchange, None]:
        response, body = yield request
        if response.status_code != 402 or "payment-signature" in request.headers:
            return
        flow = self.agent.pay(request.method, str(request.url), _answer(response, body))
        payment: Payment | None = None
        try:
            step = next(flow)
            while True:
                if isinstance(step, Retry):
                    for name, value in step.headers.items():
                        request.headers[name] = value
                    response, body = yield request
                else:
                    assert isinstance(step, Fetch)
                    fetch = httpx.Request(
                        "GET",
                        step.url,
                        headers={"accept": "application/json"},
                        extensions={_FETCH: True},
                    )
                    response, body = yield fetch
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
            response = yield outgoing
            body: bytes | None = None
            if _wants_body(response):
                self._check_size(response)
                body = self._bounded(response.read())
            try:
                outgoing = flow.send((response, body))
            except StopIteration:
                return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self._flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            body: bytes | None = None
            if _wants_body(response):
                self._check_size(response)
                body = self._bounded(await response.aread())
            try:
                outgoing = flow.send((response, body))
            except StopIteration:
                return

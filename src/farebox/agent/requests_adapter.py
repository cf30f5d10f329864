"""The agent for ``requests``: a session that pays 402 challenges with the same flow as httpx.

``session = PaymentSession(agent)``; ``session.get(url)`` pays when asked to and returns the paid
response, whose :class:`~farebox.agent.agent.Payment` is in ``response.farebox_payment``. A paid
retry that fails to connect or times out is handed back to the flow, which sends the same signed
payment and idempotency id again (``Agent.resends`` times) before the error is raised. A card
payment's token is minted with the card wallet's blocking
:meth:`~farebox.agent.card.CardWallet.mint`.

Redirects: the agent pays the URL that answered 402 (after the redirects the session followed to
get there), checked by the policy, and sends the proof there only. The paid retry is sent with
``allow_redirects=False`` and its redirect is not even prepared as ``response.next``: a 3xx comes
back to the caller as it is, same origin or not, body unread. Discovery documents (the PEAC issuer
document, the JWKS) are not followed either (PEAC's discovery profile: ``redirect: "error"``).

Discovery fetches carry none of the session's credentials: no session headers, auth, netrc or
cookies go to whatever host an issuer document names (the session's proxies, TLS and timeout
settings still apply).

Bodies: every body the agent parses (402s and refusals, discovery documents) is read off the wire
through :class:`~farebox.agent.httpx_auth.BodyBound`: at most ``max_body`` decoded bytes (64 KiB),
at most 16 times that in body bytes off the wire, in at most 256 pieces as urllib3 hands them over
(the chunk framing around each, which http.client takes up to 64 KiB of a chunk, is not counted),
gzip and deflate decoded under the same cap, ``br`` and ``zstd`` not read at all, and for at most
``max_body_seconds`` (30 s), checked as each piece arrives (a wait for the next one is bounded by
the request's read timeout). What fits stays the response's ``content``; a body past the bound or
the deadline is dropped (``content`` is empty) and its connection closed.

When the paid retry got an answer and the flow still fails (:class:`PaymentFailed`, e.g.
``receipt_invalid`` under ``require_receipt``), the exception carries that answer as
``exc.response``, its body unread unless it was a refusal the agent read.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import Any

try:
    import requests
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the requests adapter needs: pip install 'farebox[requests]'") from exc

from farebox.agent.agent import Agent, Answer, Fetch, MintToken, Payment, PaymentFailed, Retry
from farebox.agent.httpx_auth import MAX_BODY_SECONDS, BodyBound

__all__ = ["PaymentSession"]

MAX_402_BODY = 64 * 1024
_CHUNK = 8192
# What a discovery fetch sends: no session header, which may be a credential for another host.
_FETCH_HEADERS = {
    "accept": "application/json",
    "accept-encoding": "gzip, deflate",  # what the bound decodes
    "user-agent": requests.utils.default_user_agent(),
}


def _wire(response: requests.Response) -> Iterator[bytes]:
    # The body as it came (transfer coding undone, content coding not): the bound decodes it.
    raw = response.raw
    read1 = getattr(raw, "read1", None)
    if read1 is not None and getattr(raw, "stream", None) is not None:
        # urllib3 2: a piece as soon as one arrives. stream() blocks until 8 KiB (or a whole
        # chunk) came, for ever when a server sends one byte at a time under the read timeout.
        while chunk := read1(_CHUNK, decode_content=False):
            yield chunk
        return
    stream = getattr(raw, "stream", None)
    if stream is not None:
        yield from stream(_CHUNK, decode_content=False)
        return
    while chunk := raw.read(_CHUNK):
        yield chunk


def _read(response: requests.Response, max_body: int, seconds: float) -> Answer:
    codings = response.headers.get("content-encoding", "").split(",")
    bound = BodyBound(codings, max_body, x_gzip=True)
    body: bytes | None = None
    if bound.readable:
        deadline = time.monotonic() + seconds
        for chunk in _wire(response):
            if not bound.feed(chunk) or time.monotonic() > deadline:
                break
        else:
            body = bound.finish()
    response.close()
    # requests' own state for a body read: what fits stays readable, for the caller and for
    # exc.response; the rest of a body past the bound is gone with its connection.
    response._content = body if body is not None else b""
    response._content_consumed = True
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Answer(response.status_code, headers, body if body is not None else b"")


def _already_paying(request: requests.PreparedRequest) -> bool:
    # The caller set a payment header itself: its 402 is the caller's to handle.
    authorization = str(request.headers.get("authorization", ""))
    return "payment-signature" in request.headers or authorization[:8].lower() == "payment "


def _attach(exc: PaymentFailed, response: requests.Response) -> None:
    if exc.response is None:
        exc.response = response


class PaymentSession(requests.Session):
    """A ``requests.Session`` whose requests pay for themselves within the agent's limits.

    ``max_body`` and ``max_body_seconds`` bound every body the agent reads (402s, refusals,
    discovery documents).
    """

    def __init__(
        self,
        agent: Agent,
        *,
        max_body: int = MAX_402_BODY,
        max_body_seconds: float = MAX_BODY_SECONDS,
    ) -> None:
        super().__init__()
        self.agent = agent
        self.max_body = max_body
        self.max_body_seconds = max_body_seconds
        # The agent's own requests (paid retries, discovery fetches): never followed.
        self._own: weakref.WeakSet[requests.PreparedRequest] = weakref.WeakSet()

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        # requests reads a redirect's whole body before following it, and even to offer it as
        # ``response.next`` when not following: for the agent's own requests there is no target.
        if resp.request in self._own:
            return None
        target: str | None = super().get_redirect_target(resp)
        return target

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        stream = kwargs.pop("stream", False)
        response = super().send(request, stream=True, **kwargs)
        # The request that got this answer: after redirects the session followed, the URL whose
        # 402 this is, and so the one the policy checks and the proof goes to.
        asked = response.request
        if response.status_code != 402 or _already_paying(asked):
            return self._finish(response, stream)
        own_kwargs = {**kwargs, "allow_redirects": False}
        flow = self.agent.pay(str(asked.method), str(asked.url), self._read(response))
        payment: Payment | None = None
        try:
            step = next(flow)
            while True:
                if isinstance(step, MintToken):
                    try:
                        spt = step.wallet.mint(step.request)
                    except Exception as exc:  # the flow releases the reservation and raises
                        step = flow.throw(exc)
                        continue
                    step = flow.send(spt)
                    continue
                if isinstance(step, Retry):
                    retry = asked.copy()
                    retry.headers.update(step.headers)
                    self._own.add(retry)
                    try:
                        response = super().send(retry, stream=True, **own_kwargs)
                    except (requests.ConnectionError, requests.Timeout) as exc:
                        step = flow.throw(exc)  # the same step again, or the error raised
                        continue
                    if response.status_code == 402 or "payment-required" in response.headers:
                        answer = self._read(response)
                    else:
                        headers = {k.lower(): v for k, v in response.headers.items()}
                        answer = Answer(response.status_code, headers, b"")
                    try:
                        step = flow.send(answer)
                    except PaymentFailed as exc:
                        _attach(exc, response)
                        raise
                    continue
                assert isinstance(step, Fetch)
                # Not prepare_request: it merges the session's headers, auth, netrc and cookies,
                # credentials for the caller's hosts, into a fetch to a host the server names.
                fetch = requests.Request("GET", step.url, headers=_FETCH_HEADERS).prepare()
                self._own.add(fetch)
                answer = self._read(super().send(fetch, stream=True, **own_kwargs))
                step = flow.send(answer)
        except StopIteration as done:
            payment = done.value
        finally:
            flow.close()
        response.farebox_payment = payment  # type: ignore[attr-defined]
        return self._finish(response, stream)

    def _read(self, response: requests.Response) -> Answer:
        return _read(response, self.max_body, self.max_body_seconds)

    @staticmethod
    def _finish(response: requests.Response, stream: bool) -> requests.Response:
        if not stream:
            _ = response.content  # what requests does itself when not streaming
        return response

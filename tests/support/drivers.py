"""Hostile-server helpers for the agent driver tests: a seller on raw sockets that asks for a
payment and then misbehaves, the agents and drivers run against it, and what the caller got."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from farebox.agent.agent import Agent, Answer, Fetch, Payment, Reply, Step
from farebox.agent.httpx_auth import (
    PAYMENT_EXTENSION,
    PaymentAuth,
    paying_async_client,
    paying_client,
)
from farebox.agent.requests_adapter import PaymentSession
from farebox.errors import PaymentError
from farebox.money import BASE_SEPOLIA_USDC
from farebox.protocol.models import Challenge, Offer, Resource, Settlement
from farebox.protocol.x402 import encode_challenge_header, encode_settlement
from tests.support.raw_http import RawServer, Seen, response

PAY_TO = "0x" + "33" * 20
PRICE = 10_000  # $0.01 in 6-decimal USDC
MiB = 1 << 20
GIVE_UP = 64 * MiB  # an "endless" body ends here, so that a client that reads it all finishes
PAYING = ["httpx", "httpx-async", "requests"]  # the configurations the docs recommend
BARE = ["bare-httpx", "bare-httpx-async"]  # httpx.Client(auth=PaymentAuth(agent)), no transport
PROOF_HEADERS = ("payment-signature", "x-payment", "idempotency-key")


OFFER = Offer(
    "exact",
    BASE_SEPOLIA_USDC.network,
    PRICE,
    BASE_SEPOLIA_USDC.address,
    PAY_TO,
    extra={"name": BASE_SEPOLIA_USDC.name, "version": BASE_SEPOLIA_USDC.version},
)


def challenge_header() -> str:
    return encode_challenge_header(Challenge(Resource("http://127.0.0.1/report"), (OFFER,)))


def asks_payment() -> Iterator[bytes]:
    return response(402, [("payment-required", challenge_header())], b"{}")


def carries_proof(seen: Seen) -> bool:
    return "payment-signature" in seen.headers or "x-payment" in seen.headers


def seller(on_paid: Callable[[Seen], Iterable[bytes]]) -> Callable[[Seen], Iterable[bytes]]:
    """Asks $0.01 of every request without a proof; answers the paid retry with ``on_paid``."""

    def answer(seen: Seen) -> Iterable[bytes]:
        return on_paid(seen) if carries_proof(seen) else asks_payment()

    return answer


def settled(seen: Seen) -> Iterator[bytes]:
    settlement = Settlement(True, BASE_SEPOLIA_USDC.network, "0x" + "ab" * 32, amount=PRICE)
    return response(200, [("payment-response", encode_settlement(settlement))], b"the goods")


def goods(seen: Seen) -> Iterator[bytes]:
    return response(200, [("content-type", "text/plain")], b"elsewhere's answer")


def proofs_seen(server: RawServer) -> list[str]:
    return [value for name in PROOF_HEADERS for value in server.saw(name)]


@dataclass
class Got:
    """What the caller got: the response (or the one the exception carried) and the error."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # None: streamed, or not read
    error: PaymentError | None = None
    payment: Payment | None = None


def _httpx_got(got: Got, answer: httpx.Response) -> None:
    got.status, got.headers = answer.status_code, dict(answer.headers)
    got.payment = answer.extensions.get(PAYMENT_EXTENSION)


def run(
    driver: str,
    agent: Agent,
    url: str,
    *,
    stream: bool = False,
    read_error_body: bool = False,
    transport: httpx.BaseTransport | None = None,
    options: Mapping[str, Any] | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> Got:
    """GET ``url`` through ``driver`` with redirects followed; a streamed answer is not read.
    ``options`` go to the driver (``PaymentAuth``, ``paying_client``, ``PaymentSession``),
    ``client_options`` to the httpx client."""
    got = Got()
    options = dict(options or {})
    if driver in ("httpx", "bare-httpx"):
        kwargs: dict[str, Any] = {"follow_redirects": True, "timeout": 10, **(client_options or {})}
        if transport is not None:
            kwargs["transport"] = transport
        client = (
            paying_client(agent, **options, **kwargs)
            if driver == "httpx"
            else httpx.Client(auth=PaymentAuth(agent, **options), **kwargs)
        )
        with client:
            try:
                answer = client.send(client.build_request("GET", url), stream=stream)
            except PaymentError as exc:
                got.error = exc
                carried = getattr(exc, "response", None)
                if carried is not None:
                    _httpx_got(got, carried)
                    if read_error_body:
                        got.body = carried.read()
                    carried.close()
                return got
            _httpx_got(got, answer)
            got.body = None if stream else answer.content
            answer.close()
        return got
    if driver in ("httpx-async", "bare-httpx-async"):

        async def go() -> None:
            kwargs: dict[str, Any] = {
                "follow_redirects": True,
                "timeout": 10,
                **(client_options or {}),
            }
            client = (
                paying_async_client(agent, **options, **kwargs)
                if driver == "httpx-async"
                else httpx.AsyncClient(auth=PaymentAuth(agent, **options), **kwargs)
            )
            async with client:
                try:
                    answer = await client.send(client.build_request("GET", url), stream=stream)
                except PaymentError as exc:
                    got.error = exc
                    carried = getattr(exc, "response", None)
                    if carried is not None:
                        _httpx_got(got, carried)
                        if read_error_body:
                            got.body = await carried.aread()
                        await carried.aclose()
                    return
                _httpx_got(got, answer)
                got.body = None if stream else answer.content
                await answer.aclose()

        anyio.run(go)
        return got
    assert driver == "requests"
    with PaymentSession(agent, **options) as session:
        try:
            paid = session.get(url, timeout=10, stream=stream)
        except PaymentError as exc:
            got.error = exc
            carried = getattr(exc, "response", None)
            if carried is not None:
                got.status, got.headers = carried.status_code, dict(carried.headers)
                if read_error_body:
                    got.body = carried.content
                carried.close()
            return got
        got.status, got.headers = paid.status_code, dict(paid.headers)
        got.payment = getattr(paid, "farebox_payment", None)
        got.body = None if stream else paid.content
        paid.close()
    return got


def measured(call: Callable[[], Got]) -> tuple[Got, int]:
    """``call()`` and the peak of memory Python allocated meanwhile (the servers' threads too)."""
    tracemalloc.start()
    try:
        got = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return got, peak


# --- redirects of the paid retry -------------------------------------------------------------


JUNK = b"{" * 65536


@dataclass
class Discovering(Agent):
    """An agent whose flow only fetches ``documents`` (as PEAC discovery does) and keeps the
    answers: the drivers' side of a Fetch step, over plain http."""

    documents: list[str] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    def pay(self, method: str, url: str, first: Answer) -> Generator[Step, Reply, Payment | None]:
        for document in self.documents:
            reply = yield Fetch(document)
            assert isinstance(reply, Answer)
            self.answers.append(reply)
        # Ends as a refusal would: the caller gets no document as an answer.
        raise PaymentError("no_payable_offer", "only discovering")

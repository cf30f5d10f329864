"""The drivers against hostile servers, second round (tests/support/raw_http.py, real sockets).

The proof is signed only when something is known to keep it from a redirect httpx follows (a
request hook that replaces the ``trace`` extension no longer disables the guard silently); a
bare client's trace stops httpx before it reads a 3xx to follow it, and a settlement that 3xx
carried reaches the caller. Every bounded read has a deadline, counts the pieces a body comes in
(chunk extensions cannot stretch the wire bound), and gives its connection back when the body
went past the bound. A requests discovery fetch carries none of the session's credentials.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from farebox.agent.agent import Agent, PaymentFailed
from farebox.agent.httpx_auth import paying_async_client, paying_client
from farebox.agent.requests_adapter import PaymentSession
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.money import BASE_SEPOLIA_USDC
from farebox.protocol.challenge import render_challenge
from farebox.protocol.models import Challenge, Resource, Settlement
from farebox.protocol.x402 import encode_settlement
from tests.support.drivers import (
    BARE,
    GIVE_UP,
    JUNK,
    OFFER,
    PAYING,
    PRICE,
    Discovering,
    MiB,
    asks_payment,
    carries_proof,
    challenge_header,
    goods,
    measured,
    proofs_seen,
    run,
    seller,
    settled,
)
from tests.support.raw_http import RawServer, Seen, chunked, endless, response

HTTPX = ["httpx", "httpx-async"]


def trace_replacing_hook(driver: str) -> dict[str, Any]:
    """An event hook that sets its own ``trace`` on every request, as tracing code does."""
    events: list[str] = []
    if driver.endswith("async"):

        async def atrace(event: str, info: Any) -> None:
            events.append(event)

        async def ahook(request: httpx.Request) -> None:
            request.extensions = {**request.extensions, "trace": atrace}

        return {"event_hooks": {"request": [ahook]}}

    def trace(event: str, info: Any) -> None:
        events.append(event)

    def hook(request: httpx.Request) -> None:
        request.extensions = {**request.extensions, "trace": trace}

    return {"event_hooks": {"request": [hook]}}


def extensions_replacing_hook(driver: str) -> dict[str, Any]:
    """An event hook that replaces the extensions whole (the agent's markers go with them)."""
    if driver.endswith("async"):

        async def ahook(request: httpx.Request) -> None:
            request.extensions = {}

        return {"event_hooks": {"request": [ahook]}}

    def hook(request: httpx.Request) -> None:
        request.extensions = {}

    return {"event_hooks": {"request": [hook]}}


# --- 1. the guard is known to run before anything is signed ----------------------------------


@pytest.mark.parametrize("driver", BARE)
def test_a_hook_that_replaces_the_trace_gets_nothing_signed(driver: str) -> None:
    with (
        RawServer(goods) as elsewhere,
        RawServer(seller(lambda s: response(302, [("location", elsewhere.url + "/loot")]))) as api,
    ):
        got = run(
            driver,
            Agent(EvmAccount.generate()),
            api.url + "/report",
            client_options=trace_replacing_hook(driver),
        )
    # Before: the hook removed the auth's trace, httpx followed the paid retry's 302 and
    # PAYMENT-SIGNATURE and Idempotency-Key reached the other host.
    assert proofs_seen(elsewhere) == []
    assert proofs_seen(api) == []  # refused before signing: no proof left at all
    assert got.error is not None
    assert got.error.code == "payment_unguarded"
    assert "paying_client" in got.error.message


@pytest.mark.parametrize("hook", [trace_replacing_hook, extensions_replacing_hook])
@pytest.mark.parametrize("driver", HTTPX)
def test_paying_client_keeps_the_proof_home_whatever_a_hook_does(driver: str, hook: Any) -> None:
    with (
        RawServer(goods) as elsewhere,
        RawServer(seller(lambda s: response(302, [("location", elsewhere.url + "/loot")]))) as api,
    ):
        got = run(
            driver, Agent(EvmAccount.generate()), api.url + "/report", client_options=hook(driver)
        )
    # Before (a hook that replaces the extensions): PaymentTransport no longer knew the paid
    # retry, and httpx followed it to the other host with the proof. It knows it by its proof
    # headers now; the 302 comes back, unfollowed.
    assert elsewhere.seen == []
    assert len(api.saw("payment-signature")) == 1
    assert got.error is None
    assert got.status == 302


# --- 2. a bare client does not read a 3xx to follow it ---------------------------------------


@pytest.mark.parametrize("driver", BARE)
def test_a_bare_client_stopped_before_a_settled_303_carries_the_payment(driver: str) -> None:
    settlement = Settlement(True, BASE_SEPOLIA_USDC.network, "0x" + "cd" * 32, amount=PRICE)

    def paid(seen: Seen) -> Iterable[bytes]:
        if seen.target == "/receipt":
            return goods(seen)
        headers = [("location", "/receipt"), ("payment-response", encode_settlement(settlement))]
        return response(303, headers, b"see /receipt")

    with RawServer(seller(paid)) as api:
        got = run(driver, Agent(EvmAccount.generate()), api.url + "/report")
    assert [s.target for s in api.seen] == ["/report", "/report"]  # never followed
    # Money moved. Before: payment_redirected with no payment, no settlement and no response.
    assert isinstance(got.error, PaymentFailed)
    assert got.error.code == "payment_redirected"
    assert got.error.payment is not None
    assert got.error.payment.settlement.transaction == settlement.transaction
    assert got.error.settlement is not None
    assert got.error.settlement.transaction == settlement.transaction
    assert (got.status, got.headers["location"]) == (303, "/receipt")
    assert got.payment is got.error.payment  # also on exc.response.extensions


@pytest.mark.parametrize("where", ["paid", "discovery"])
@pytest.mark.parametrize("driver", BARE)
def test_a_bare_client_does_not_read_an_endless_redirect_to_follow_it(
    driver: str, where: str
) -> None:
    def endless_302() -> Iterator[bytes]:
        return chunked(302, [("location", "/moved")], endless(JUNK, give_up=GIVE_UP))

    def answer(seen: Seen) -> Iterable[bytes]:
        if where == "discovery" and seen.target == "/.well-known/peac-issuer.json":
            return endless_302()
        if where == "paid" and carries_proof(seen):
            return endless_302()
        return asks_payment()

    with RawServer(answer) as api:
        agent = (
            Discovering(
                EvmAccount.generate(), documents=[api.url + "/.well-known/peac-issuer.json"]
            )
            if where == "discovery"
            else Agent(EvmAccount.generate())
        )
        got, peak = measured(lambda: run(driver, agent, api.url, stream=True))
    # Before: httpx read the whole 64 MiB body of the 302 to follow it (peak 129 MiB).
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert max(api.written) < 16 * MiB
    assert got.error is not None
    assert got.error.code == "payment_redirected"
    assert "/moved" not in [s.target for s in api.seen]
    if where == "discovery":
        assert proofs_seen(api) == []  # the payment ended before anything was signed


# --- 3. a deadline on every bounded read -----------------------------------------------------


def dribbled_402(*, content_length: bool) -> Iterator[bytes]:
    """A 402 whose body comes one byte every 0.1 s (for 8 s, then the server gives up)."""
    head = [("payment-required", challenge_header())]
    if content_length:
        lines = ["HTTP/1.1 402 Hostile", f"payment-required: {challenge_header()}"]
        lines += ["content-length: 100000", "connection: close", "", ""]
        yield "\r\n".join(lines).encode("latin-1")
        for _ in range(80):
            time.sleep(0.1)
            yield b"{"
        return

    def pieces() -> Iterator[bytes]:
        for _ in range(80):
            time.sleep(0.1)
            yield b"{"

    yield from chunked(402, head, pieces())


@pytest.mark.parametrize("content_length", [False, True])
@pytest.mark.parametrize("driver", PAYING)
def test_a_dribbled_402_is_read_for_max_body_seconds_only(
    driver: str, content_length: bool
) -> None:
    def answer(seen: Seen) -> Iterable[bytes]:
        return settled(seen) if carries_proof(seen) else dribbled_402(content_length=content_length)

    with RawServer(answer) as api:
        started = time.monotonic()
        got = run(driver, Agent(EvmAccount.generate()), api.url, options={"max_body_seconds": 1})
        took = time.monotonic() - started
    # Before: read for as long as the server dribbled (8 s here, for ever in general; each byte
    # came within the read timeout). The body ends at the deadline, as one past the bound does,
    # and the challenge in the header is paid.
    assert took < 5, f"{took:.1f} s"
    assert got.error is None
    assert got.status == 200
    assert got.payment is not None


def dribbled_framing(seen: Seen) -> Iterator[bytes]:
    """A chunked 402 whose first chunk's size line never ends: extension bytes, one every 0.1 s."""
    yield b"HTTP/1.1 402 Hostile\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n1;"
    for _ in range(80):
        time.sleep(0.1)
        yield b"a"


def test_async_cancels_a_read_at_its_deadline_even_without_a_piece() -> None:
    with RawServer(dribbled_framing) as api:
        started = time.monotonic()
        got = run(
            "httpx-async", Agent(EvmAccount.generate()), api.url, options={"max_body_seconds": 1}
        )
        took = time.monotonic() - started
    assert isinstance(got.error, PaymentError)
    assert took < 5, f"{took:.1f} s"


# --- 4. chunk framing does not stretch the wire bound ----------------------------------------

EXTENSION = b"a" * 16_000


def padded_chunks(seen: Seen) -> Iterator[bytes]:
    """One byte of body per chunk, with 16 KB of chunk extension around it (64 MiB in all)."""
    yield b"HTTP/1.1 402 Hostile\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    batch = (b"1;" + EXTENSION + b"\r\n{\r\n") * 64
    sent = 0
    while sent < GIVE_UP:
        yield batch
        sent += len(batch)
    yield b"0\r\n\r\n"


@pytest.mark.parametrize("driver", PAYING)
def test_chunk_extensions_do_not_stretch_the_wire_bound(driver: str) -> None:
    with RawServer(padded_chunks) as api:
        got, peak = measured(lambda: run(driver, Agent(EvmAccount.generate()), api.url))
    # Before: the bound counted 1 byte a chunk and read all 64 MiB (257 MiB of 256 in the
    # review's run); now at most 256 pieces: about 4 MiB of it, plus what the socket buffered.
    assert isinstance(got.error, PaymentError)
    assert max(api.written) < 16 * MiB, f"{max(api.written) / MiB:.0f} MiB"
    assert peak < 8 * MiB


@pytest.mark.parametrize("driver", PAYING)
def test_a_402_in_many_small_chunks_is_still_paid(driver: str) -> None:
    rendered = render_challenge(Challenge(Resource("http://127.0.0.1/report"), (OFFER,)))
    body = rendered.body
    pieces = [body[i : i + 8] for i in range(0, len(body), 8)]
    assert 32 < len(pieces) < 256

    def answer(seen: Seen) -> Iterable[bytes]:
        return settled(seen) if carries_proof(seen) else chunked(402, [], pieces)

    with RawServer(answer) as api:
        got = run(driver, Agent(EvmAccount.generate()), api.url)
    assert got.error is None
    assert got.payment is not None


# --- 5. a refusal past the bound gives its connection back -----------------------------------


def refusal_past_the_bound(seen: Seen) -> Iterator[bytes]:
    return chunked(402, [], endless(JUNK, give_up=GIVE_UP))


def test_a_refusal_past_the_bound_gives_its_connection_back() -> None:
    kept: list[PaymentFailed] = []
    limits = httpx.Limits(max_connections=2)
    timeout = httpx.Timeout(5, pool=2)
    with (
        RawServer(seller(refusal_past_the_bound)) as api,
        paying_client(Agent(EvmAccount.generate()), timeout=timeout, limits=limits) as client,
    ):
        for _ in range(4):
            with pytest.raises(PaymentFailed) as caught:
                client.get(api.url + "/report")
            kept.append(caught.value)  # kept, never read nor closed, as a caller may
    # Before: each exc.response held its connection; the third payment waited for the pool and
    # failed with httpx.PoolTimeout. Now the response keeps the prefix that was read.
    assert len(kept) == 4
    for refusal in kept:
        assert refusal.response is not None
        prefix = refusal.response.read()
        assert prefix.startswith(b"{")
        assert len(prefix) < 2 * MiB


def test_async_a_refusal_past_the_bound_gives_its_connection_back() -> None:
    kept: list[PaymentFailed] = []

    async def go(url: str) -> None:
        limits = httpx.Limits(max_connections=2)
        timeout = httpx.Timeout(5, pool=2)
        agent = Agent(EvmAccount.generate())
        async with paying_async_client(agent, timeout=timeout, limits=limits) as client:
            for _ in range(4):
                with pytest.raises(PaymentFailed) as caught:
                    await client.get(url + "/report")
                kept.append(caught.value)

    with RawServer(seller(refusal_past_the_bound)) as api:
        anyio.run(go, api.url)
    assert len(kept) == 4
    for refusal in kept:
        assert refusal.response is not None
        assert refusal.response.read().startswith(b"{")


# --- 6. a requests discovery fetch carries no session credential -----------------------------


@pytest.mark.parametrize("source", ["session", "netrc"])
def test_a_discovery_fetch_carries_none_of_the_sessions_credentials(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if source == "netrc":
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login user password pw\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
    with (
        RawServer(lambda s: response(200, [], b"{}")) as elsewhere,
        RawServer(lambda s: asks_payment()) as api,
    ):
        agent = Discovering(EvmAccount.generate(), documents=[elsewhere.url + "/jwks.json"])
        with PaymentSession(agent) as session:
            if source == "session":
                session.headers["x-api-key"] = "caller-secret"
                session.auth = ("user", "pw")
                session.cookies.set("sid", "caller-cookie")
            with pytest.raises(PaymentError):
                session.get(api.url, timeout=10)
    # The caller's own request carried them, as it should.
    assert api.seen[0].headers.get("authorization", "").startswith("Basic ")
    # Before: the fetch to the host the server named got x-api-key and the Basic credentials.
    fetched = elsewhere.seen[0].headers
    assert "authorization" not in fetched
    assert "x-api-key" not in fetched
    assert "cookie" not in fetched
    assert fetched["accept"] == "application/json"


def test_paying_client_builds_with_a_deadline() -> None:
    agent = Agent(EvmAccount.generate())
    with paying_client(agent) as client:
        assert getattr(client.auth, "max_body_seconds", None) == 30
    with PaymentSession(agent) as session:
        assert session.max_body_seconds == 30

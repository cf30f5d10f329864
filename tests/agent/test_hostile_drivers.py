"""The httpx and requests drivers against hostile servers on real sockets (tests/support/raw_http.py).

A payment proof goes only to the URL whose 402 it answers: the paid retry's redirects, to another
origin or the same one, are handed back and never followed with the proof, and the policy checks
the URL that asked for the money. Every body the agent parses is read with a bound: an endless
chunked 402, a gzip bomb and endless padding that decodes to nothing leave the agent's memory and
what it reads off the wire bounded. When the flow fails after the paid retry got an answer, the
exception carries that answer.

The agent signs real EIP-3009 authorizations (no chain needed: nobody settles them here).
"""

from __future__ import annotations

import gzip
import itertools
import zlib
from collections.abc import Callable, Iterable, Iterator

import httpx
import pytest

from farebox.agent.agent import Agent, PaymentFailed
from farebox.agent.httpx_auth import (
    PaymentAuth,
)
from farebox.agent.policy import Policy
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
    goods,
    measured,
    proofs_seen,
    run,
    seller,
    settled,
)
from tests.support.raw_http import RawServer, Seen, chunked, endless, gzip_bomb, response


@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("driver", PAYING)
def test_a_cross_origin_redirect_of_the_paid_retry_comes_back_unfollowed(
    driver: str, status: int
) -> None:
    with (
        RawServer(goods) as elsewhere,
        RawServer(
            seller(lambda s: response(status, [("location", elsewhere.url + "/loot")]))
        ) as api,
    ):
        got = run(driver, Agent(EvmAccount.generate()), api.url + "/report")
    # Before: httpx and requests followed it with PAYMENT-SIGNATURE and Idempotency-Key, and the
    # other host's 200 came back as the paid answer.
    assert elsewhere.seen == []
    assert len(api.saw("payment-signature")) == 1
    assert got.status == status
    assert got.headers["location"] == elsewhere.url + "/loot"
    assert got.body != b"elsewhere's answer"


@pytest.mark.parametrize("driver", PAYING)
def test_a_same_origin_redirect_of_the_paid_retry_comes_back_unfollowed(driver: str) -> None:
    def paid(seen: Seen) -> Iterable[bytes]:
        if seen.target == "/moved":
            return goods(seen)
        return response(307, [("location", "/moved")])

    with RawServer(seller(paid)) as api:
        got = run(driver, Agent(EvmAccount.generate()), api.url + "/report")
    assert [s.target for s in api.seen] == ["/report", "/report"]  # the ask, the paid retry
    assert got.status == 307
    assert got.headers["location"] == "/moved"


@pytest.mark.parametrize("driver", PAYING)
def test_a_settled_redirect_comes_back_with_its_settlement(driver: str) -> None:
    settlement = Settlement(True, BASE_SEPOLIA_USDC.network, "0x" + "cd" * 32, amount=PRICE)

    def paid(seen: Seen) -> Iterable[bytes]:
        headers = [("location", "/receipt"), ("payment-response", encode_settlement(settlement))]
        return response(303, headers)

    with RawServer(seller(paid)) as api:
        got = run(driver, Agent(EvmAccount.generate()), api.url + "/report")
    assert [s.target for s in api.seen] == ["/report", "/report"]
    assert (got.status, got.headers["location"]) == (303, "/receipt")
    # Money moved: the caller gets the 303, unfollowed, with its Payment (it was an error
    # before: unexpected_settle_error, the settlement only on the exception).
    assert got.error is None
    assert got.payment is not None
    assert got.payment.settlement.transaction == settlement.transaction


@pytest.mark.parametrize("same_origin", [False, True])
@pytest.mark.parametrize("driver", BARE)
def test_without_the_transport_httpx_never_writes_the_proof_to_the_redirect(
    driver: str, same_origin: bool
) -> None:
    with RawServer(goods) as elsewhere:

        def paid(seen: Seen) -> Iterable[bytes]:
            if seen.target == "/moved":
                return goods(seen)
            return response(302, [("location", "/moved" if same_origin else elsewhere.url)])

        with RawServer(seller(paid)) as api:
            got = run(driver, Agent(EvmAccount.generate()), api.url + "/report")
    # httpx follows below the auth flow; its trace hook refuses to write the proof anywhere else.
    assert got.error is not None
    assert got.error.code == "payment_redirected"
    assert elsewhere.seen == []
    assert [s.target for s in api.seen] == ["/report", "/report"]


def test_the_redirect_httpx_offers_to_follow_carries_no_proof() -> None:
    with (
        RawServer(goods) as elsewhere,
        RawServer(seller(lambda s: response(302, [("location", elsewhere.url)]))) as api,
        httpx.Client(auth=PaymentAuth(Agent(EvmAccount.generate())), timeout=10) as client,
    ):
        answer = client.get(api.url + "/report")  # follow_redirects=False: httpx's default
        assert answer.status_code == 302
        assert answer.next_request is not None
        followed = client.send(answer.next_request)  # the caller follows it, deliberately
    # Before: httpx built the next request from the paid retry, proof and Idempotency-Key included.
    assert followed.text == "elsewhere's answer"
    assert len(elsewhere.seen) == 1
    assert proofs_seen(elsewhere) == []


class NoTrace(httpx.BaseTransport):
    """A transport that does not call httpcore's trace hook (as a custom or mock one may not)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.extensions = {k: v for k, v in request.extensions.items() if k != "trace"}
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_a_transport_that_drops_the_trace_gets_nothing_signed() -> None:
    with (
        RawServer(goods) as elsewhere,
        RawServer(seller(lambda s: response(302, [("location", elsewhere.url)]))) as api,
    ):
        got = run("bare-httpx", Agent(EvmAccount.generate()), api.url, transport=NoTrace())
    # Nothing below the auth flow would stop httpx here (which is why paying_client wraps the
    # transport). Before: the proof went to the other host with the redirect httpx followed, and
    # only its answer was refused; now the 402 came off a connection the auth's trace never saw,
    # and nothing is signed.
    assert got.error is not None
    assert got.error.code == "payment_unguarded"
    assert "paying_client" in got.error.message
    assert proofs_seen(api) == []
    assert elsewhere.seen == []


def test_in_process_a_followed_redirect_is_never_taken_as_the_paid_answer() -> None:
    """A mock (or ASGI, WSGI) transport calls no trace and has no network connection: the auth
    pays, and what a redirect httpx followed reached is never the paid answer."""
    asked = render_challenge(Challenge(Resource("https://seller.test/report"), (OFFER,)))
    reached: list[str] = []

    def app(request: httpx.Request) -> httpx.Response:
        reached.append(str(request.url))
        if request.url.host == "elsewhere.test":
            return httpx.Response(200, text="elsewhere's answer")
        if "payment-signature" in request.headers:
            return httpx.Response(302, headers={"location": "https://elsewhere.test/loot"})
        return httpx.Response(402, headers=asked.headers, content=asked.body)

    agent = Agent(EvmAccount.generate())
    with (
        httpx.Client(
            auth=PaymentAuth(agent), transport=httpx.MockTransport(app), follow_redirects=True
        ) as client,
        pytest.raises(PaymentFailed) as caught,
    ):
        client.get("https://seller.test/report")
    assert caught.value.code == "payment_redirected"
    assert caught.value.response is not None
    assert caught.value.response.status_code == 302
    assert reached[-1] == "https://elsewhere.test/loot"


def to(api: RawServer) -> Callable[[Seen], Iterable[bytes]]:
    """Redirects every request to the seller's /report."""
    return lambda seen: response(302, [("location", api.url + "/report")])


@pytest.mark.parametrize("driver", [*PAYING, "bare-httpx"])
def test_the_proof_goes_to_the_url_whose_402_it_answers(driver: str) -> None:
    with RawServer(seller(settled)) as api, RawServer(to(api), "localhost") as entry:
        got = run(driver, Agent(EvmAccount.generate()), entry.url + "/start")
    # Before: the retry went back to the first URL with the proof for the other one's 402.
    assert proofs_seen(entry) == []
    assert len(api.saw("payment-signature")) == 1
    assert got.error is None
    assert got.status == 200
    assert got.payment is not None
    assert got.payment.url == api.url + "/report"


@pytest.mark.parametrize("driver", [*PAYING, "bare-httpx"])
def test_the_policy_checks_the_url_that_asked_for_the_money(driver: str) -> None:
    agent = Agent(EvmAccount.generate(), policy=Policy.build(hosts=["localhost"]))
    # The seller is at 127.0.0.1, which the policy does not allow.
    with RawServer(seller(settled)) as api, RawServer(to(api), "localhost") as entry:
        got = run(driver, agent, entry.url + "/start")
    # Before: the policy checked the first URL (localhost, allowed) and the proof went there.
    assert got.error is not None
    assert got.error.code == "policy_refused"
    assert proofs_seen(entry) == []
    assert proofs_seen(api) == []


# --- bounded bodies --------------------------------------------------------------------------


def endless_402(seen: Seen) -> Iterator[bytes]:
    return chunked(402, [], endless(JUNK, give_up=GIVE_UP))


@pytest.mark.parametrize("where", ["first", "refusal"])
@pytest.mark.parametrize("driver", PAYING)
def test_an_endless_chunked_402_is_read_within_the_bound(driver: str, where: str) -> None:
    answer = endless_402 if where == "first" else seller(endless_402)
    with RawServer(answer) as api:
        got, peak = measured(lambda: run(driver, Agent(EvmAccount.generate()), api.url))
    # Before (httpx): all 64 MiB read into memory, peak 128 MiB (the body, then joined).
    assert isinstance(got.error, PaymentError)
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert max(api.written) < 16 * MiB, "the agent read on past the bound"


@pytest.mark.parametrize("driver", PAYING)
def test_an_endless_redirect_of_the_paid_retry_is_left_to_the_caller(driver: str) -> None:
    def paid(seen: Seen) -> Iterator[bytes]:
        return chunked(302, [("location", "/moved")], endless(JUNK, give_up=GIVE_UP))

    with RawServer(seller(paid)) as api:
        got, peak = measured(
            lambda: run(driver, Agent(EvmAccount.generate()), api.url, stream=True)
        )
    # Before: httpx and requests read the whole 3xx body to follow it (requests even with
    # allow_redirects=False, to offer it as response.next); a streaming caller now gets it unread.
    assert got.status == 302
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert max(api.written) < 16 * MiB


def bomb_402(seen: Seen) -> Iterator[bytes]:
    return response(402, [("content-encoding", "gzip")], gzip_bomb(256 * MiB))


@pytest.mark.parametrize("where", ["first", "refusal"])
@pytest.mark.parametrize("driver", PAYING)
def test_a_gzip_bomb_402_is_decoded_within_the_bound(driver: str, where: str) -> None:
    gzip_bomb(256 * MiB)  # made before the measure
    answer = bomb_402 if where == "first" else seller(bomb_402)
    with RawServer(answer) as api:
        got, peak = measured(lambda: run(driver, Agent(EvmAccount.generate()), api.url))
    # 256 KiB on the wire, 256 MiB decoded. Before (httpx): decoded in full, peak over 512 MiB.
    assert isinstance(got.error, PaymentError)
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"


def compressed(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, which servers send too
    return packer.compress(body) + packer.flush()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
@pytest.mark.parametrize("driver", PAYING)
def test_a_compressed_402_within_the_bound_is_still_paid(driver: str, coding: str) -> None:
    """The bound decodes what the HTTP libraries decode: a challenge in a compressed body (no
    PAYMENT-REQUIRED header) still pays."""
    rendered = render_challenge(Challenge(Resource("http://127.0.0.1/report"), (OFFER,)))
    body = compressed(rendered.body, coding)
    wire_coding = "deflate" if coding == "raw-deflate" else coding

    def answer(seen: Seen) -> Iterable[bytes]:
        if carries_proof(seen):
            return settled(seen)
        return response(402, [("content-encoding", wire_coding)], body)

    with RawServer(answer) as api:
        got = run(driver, Agent(EvmAccount.generate()), api.url + "/report")
    assert got.error is None
    assert got.status == 200
    assert got.payment is not None


GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
EMPTY_BLOCKS = b"\x00\x00\x00\xff\xff" * 13_107  # deflate stored blocks of no bytes: decode to ""


def padding_402(seen: Seen) -> Iterator[bytes]:
    pieces = itertools.chain([GZIP_HEADER], endless(EMPTY_BLOCKS, give_up=GIVE_UP))
    return chunked(402, [("content-encoding", "gzip")], pieces)


@pytest.mark.parametrize("driver", PAYING)
def test_padding_that_decodes_to_nothing_is_not_read_for_ever(driver: str) -> None:
    with RawServer(padding_402) as api:
        got = run(driver, Agent(EvmAccount.generate()), api.url)
    # Before: read to the server's end (64 MiB) by httpx and by requests alike.
    assert isinstance(got.error, PaymentError)
    assert max(api.written) < 16 * MiB, "the agent read on past the wire bound"


@pytest.mark.parametrize("driver", PAYING)
def test_a_discovery_document_is_read_within_the_bound(driver: str) -> None:
    def answer(seen: Seen) -> Iterable[bytes]:
        if seen.target == "/.well-known/peac-issuer.json":
            return chunked(200, [], endless(JUNK, give_up=GIVE_UP))
        return asks_payment()

    with RawServer(answer) as api:
        agent = Discovering(
            EvmAccount.generate(), documents=[api.url + "/.well-known/peac-issuer.json"]
        )
        _, peak = measured(lambda: run(driver, agent, api.url))
    assert [a.status for a in agent.answers] == [200]
    assert agent.answers[0].body == b""  # past the bound: nothing to parse
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert max(api.written) < 16 * MiB


@pytest.mark.parametrize("driver", [*PAYING, "bare-httpx"])
def test_a_discovery_document_is_not_followed(driver: str) -> None:
    with RawServer(lambda s: response(200, [], b'{"jwks_uri": "elsewhere"}')) as elsewhere:

        def answer(seen: Seen) -> Iterable[bytes]:
            if seen.target == "/.well-known/peac-issuer.json":
                return response(302, [("location", elsewhere.url + "/issuer.json")])
            return asks_payment()

        with RawServer(answer) as api:
            agent = Discovering(
                EvmAccount.generate(), documents=[api.url + "/.well-known/peac-issuer.json"]
            )
            got = run(driver, agent, api.url)
    # PEAC discovery: redirect "error"; the other host's document is never fetched.
    assert elsewhere.seen == []
    if driver == "bare-httpx":
        # httpx follows below the auth: its trace stops it before the 3xx is read to follow it,
        # which ends the payment there, before anything is signed. Before: httpx fetched the
        # other host's document (the flow got the 302).
        assert agent.answers == []
        assert got.error is not None
        assert got.error.code == "payment_redirected"
    else:
        assert [a.status for a in agent.answers] == [302]


# --- the paid answer is never lost -----------------------------------------------------------


@pytest.mark.parametrize("driver", [*PAYING, "bare-httpx", "bare-httpx-async"])
def test_a_failed_flow_after_the_paid_answer_carries_the_response(driver: str) -> None:
    agent = Agent(EvmAccount.generate(), require_receipt=True)  # and the server sends no receipt
    with RawServer(seller(settled)) as api:
        got = run(driver, agent, api.url + "/report", read_error_body=True)
    assert isinstance(got.error, PaymentFailed)
    assert got.error.code == "receipt_invalid"
    # Before: the exception carried no response; the paid-for body was gone.
    assert got.status == 200
    assert got.body == b"the goods"
    assert "payment-response" in got.headers

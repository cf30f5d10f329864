"""The card rail's gate for the card tests: x402 on the embedded chain beside MPP ``Payment``
(method ``stripe``), over a paid app, and reading and answering its challenges with farebox's own
MPP codec, the way pympp's client builds a credential (echo the challenge, payload ``{"spt": …}``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from farebox.dev.devchain import DevChain
from farebox.protocol import mpp
from farebox.rails.card import CardRail
from farebox.server.asgi import PaymentMiddleware
from farebox.server.routes import CardOffer, RouteTable
from tests.support.asgi import call
from tests.support.gates import Paid, make_gate

if TYPE_CHECKING:
    from farebox.ledgers.stripe import StripeLedger

__all__ = [
    "NETWORK",
    "REALM",
    "SECRET",
    "Clock",
    "authorization",
    "card_gate",
    "goods",
    "headers_of",
    "offered",
    "one",
]

SECRET = b"k" * 32
NETWORK = "profile_test_farebox"
REALM = "api.test"


class Clock:
    """A clock the test moves by hand (``clock.now += 60``)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def goods(scope: Any, receive: Any, send: Any) -> None:
    """The paid app: ``the goods``, or a 500 on ``/boom``."""
    status = 500 if scope["path"] == "/boom" else 200
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"the goods"})


def card_gate(chain: DevChain, ledger: StripeLedger, clock: Clock) -> tuple[Paid, Any]:
    """A gate with the card rail on ``ledger`` beside x402, and :func:`goods` behind it."""
    card = CardOffer(network_id=NETWORK, realm=REALM)
    routes = RouteTable()
    merchant = "0x" + "11" * 20
    for path, price in (("/report", "$0.50"), ("/premium", "$1.00"), ("/boom", "$0.50")):
        routes.add("GET", path, price, assets=chain.asset, pay_to=merchant, card=card)
    routes.add("GET", "/cheap", "$0.25", assets=chain.asset, pay_to=merchant, card=card)
    routes.add("GET", "/plain", "$0.50", assets=chain.asset, pay_to=merchant)
    paid = make_gate(chain, routes=routes)
    paid.gate.card = CardRail(SECRET, ledger, clock=clock)
    return paid, PaymentMiddleware(goods, paid.gate)


def headers_of(start: dict[str, Any]) -> list[tuple[str, str]]:
    """The headers of an ``http.response.start`` message, decoded."""
    return [(k.decode(), v.decode()) for k, v in start["headers"]]


def one(start: dict[str, Any], name: str) -> str:
    """The one value of header ``name`` in a response start."""
    [value] = [v for k, v in headers_of(start) if k == name.lower()]
    return value


async def offered(app: Any, path: str) -> list[mpp.Challenge]:
    """The MPP challenges of the 402 ``app`` answers a bare GET of ``path`` with."""
    [start, _] = await call(app, path)
    assert start["status"] == 402
    lines = [v for k, v in headers_of(start) if k == "www-authenticate"]
    return [c for line in lines for c in mpp.parse_www_authenticate(line)]


def authorization(challenge: mpp.Challenge | mpp.ChallengeEcho, spt: str) -> tuple[bytes, bytes]:
    """The ``Authorization`` header paying ``challenge`` with the Shared Payment Token ``spt``."""
    echo = challenge.echo() if isinstance(challenge, mpp.Challenge) else challenge
    credential = mpp.Credential(challenge=echo, payload=mpp.StripePayload(spt).to_json())
    return (b"authorization", mpp.render_authorization(credential).encode())

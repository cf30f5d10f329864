"""A sample paid API on the embedded chain: what ``farebox demo`` shows and ``--serve`` runs.

``GET /weather`` costs $0.01 in the devchain's test USDC; ``GET /health`` is free. The roles use the
standard development accounts: #1 settles (pays the gas), #2 is the merchant (payTo), #3 is the
agent of the demo. Given a card ledger, ``GET /report`` ($0.50) also takes cards: MPP Shared
Payment Tokens and X-Receipt invoices.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from farebox._asgi import ASGIApp, Receive, Scope, Send, run_lifespan, send_response
from farebox.dev.devchain import DevChain
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.money import ASSETS
from farebox.rails.card import CardRail
from farebox.receipts import SigningKey
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.routes import CardOffer, RouteTable
from farebox.store.base import Store
from farebox.store.memory import MemoryStore

if TYPE_CHECKING:
    from farebox.ledgers.stripe import StripeLedger

__all__ = ["SampleApi", "build_sample_api", "weather_app"]

SETTLER, MERCHANT, AGENT = 1, 2, 3


async def weather_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A plain ASGI app that knows nothing of payments."""
    if scope["type"] == "lifespan":
        await run_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/weather":
        status, body = 200, {"city": "Lisbon", "forecast": "sunny", "temperature_c": 21}
    elif path == "/report":
        status, body = 200, {"report": "Q3 weather outlook", "pages": 12}
    elif path == "/health":
        status, body = 200, {"ok": True}
    else:
        status, body = 404, {"detail": "not found"}
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json")]
    await send_response(send, status, raw, headers, head=scope["method"] == "HEAD")


@dataclass
class SampleApi:
    """The parts of the sample API, for the demo, the benchmarks and the tests."""

    chain: DevChain
    gate: Gate
    app: PaymentMiddleware
    ledger: EvmLedger
    routes: RouteTable
    store: Store

    @property
    def merchant(self) -> str:
        return self.chain.accounts[MERCHANT].address


def build_sample_api(
    chain: DevChain | None = None,
    *,
    store: Store | None = None,
    signing_key: SigningKey | None = None,
    issuer: str | None = None,
    price: str = "$0.01",
    app: ASGIApp = weather_app,
    card: StripeLedger | None = None,
    card_profile: str = "",
    card_invoice: bool = True,
) -> SampleApi:
    """The sample API on ``chain`` (a new embedded chain by default); with ``card`` (a Stripe
    ledger of the seller whose Stripe profile is ``card_profile``) ``GET /report`` takes cards
    (Shared Payment Tokens, and X-Receipt invoices unless ``card_invoice`` is false)."""
    chain = chain or DevChain()
    ASSETS.register(chain.asset)
    routes = RouteTable()
    routes.add(
        "GET",
        "/weather",
        price,
        assets=chain.asset,
        pay_to=chain.accounts[MERCHANT].address,
        description="Today's weather",
        mime_type="application/json",
    )
    if card is not None:
        routes.add(
            "GET",
            "/report",
            "$0.50",
            assets=chain.asset,
            pay_to=chain.accounts[MERCHANT].address,
            description="The quarterly report",
            mime_type="application/json",
            card=CardOffer(network_id=card_profile, realm="farebox-sample", invoice=card_invoice),
        )
    ledger = EvmLedger(chain.rpc, chain.accounts[SETTLER].account, network=chain.network)
    store = store or MemoryStore()
    gate = Gate(
        routes,
        LocalFacilitator([ledger]),
        store,
        signing_key=signing_key or SigningKey.generate(),
        issuer=issuer,
        card=CardRail(secrets.token_bytes(32), card) if card is not None else None,
    )
    return SampleApi(chain, gate, PaymentMiddleware(app, gate), ledger, routes, store)

"""A seller taking cards for the agent's card tests: farebox's gate with x402 and the card rail,
served by uvicorn on 127.0.0.1, charging against the Stripe FAKE (``tests/support/fake_stripe.py``);
and an agent paying by card, minting its Shared Payment Tokens there with its own key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import stripe
from farebox._asgi import run_lifespan
from farebox.agent.agent import Agent
from farebox.agent.book import ReceiptBook
from farebox.agent.budget import Budget
from farebox.agent.card import CardWallet
from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.ledgers.stripe import StripeLedger
from farebox.rails.card import CardRail
from farebox.receipts import SigningKey
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.routes import CardOffer, RouteTable
from farebox.store.memory import MemoryStore
from tests.support.fake_stripe import AGENT_KEY, FakeStripe
from tests.support.servers import serve

__all__ = [
    "CENTS",
    "INTENTS",
    "SECRET",
    "Seller",
    "agent_stripe_client",
    "card_agent",
    "goods",
    "serve_seller",
]

SECRET = b"c" * 32
INTENTS = "/v1/payment_intents"
CENTS = 10**16  # budget units in one US cent


@dataclass
class Seller:
    """The served API and what reached it."""

    base: str
    authorizations: list[str] = field(default_factory=list)


async def goods(scope: Any, receive: Any, send: Any) -> None:
    """The paid app: ``the goods``, or a 500 (``broken``) on ``/boom``."""
    if scope["type"] == "lifespan":
        await run_lifespan(receive, send)
        return
    failing = scope["path"] == "/boom"
    await send(
        {
            "type": "http.response.start",
            "status": 500 if failing else 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"broken" if failing else b"the goods"})


@contextmanager
def serve_seller(chain: DevChain, fake: FakeStripe) -> Iterator[Seller]:
    """farebox's gate with x402 and the card rail on ``GET /report`` ($0.50), over real HTTP."""
    routes = RouteTable()
    card = CardOffer(network_id=fake.profile, realm="127.0.0.1")
    merchant = EvmAccount.generate().address
    routes.add("GET", "/report", "$0.50", assets=chain.asset, pay_to=merchant, card=card)
    routes.add("GET", "/boom", "$0.50", assets=chain.asset, pay_to=merchant, card=card)
    ledger = EvmLedger(chain.rpc, chain.accounts[1].account, network=chain.network)
    # No https origin here: the records are signed by the key's did:key, which the agent checks.
    gate = Gate(
        routes, LocalFacilitator([ledger]), MemoryStore(), signing_key=SigningKey.generate()
    )
    http_client = stripe.HTTPXClient()
    seller_stripe = stripe.StripeClient(
        fake.api_key,
        base_addresses={"api": fake.url},
        max_network_retries=0,
        http_client=http_client,
    )
    gate.card = CardRail(SECRET, StripeLedger(seller_stripe))
    inner = PaymentMiddleware(goods, gate)
    seller = Seller("")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"authorization":
                    seller.authorizations.append(value.decode())
        if scope["type"] != "lifespan":
            await inner(scope, receive, send)
            return

        async def closing(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                # The seller's Stripe connections live in uvicorn's loop: closed there.
                await http_client.close_async()
            await send(message)

        await inner(scope, receive, closing)

    with serve(app) as base:
        seller.base = base
        yield seller


def card_agent(
    client: Any, *, payment_method: str = "pm_card_visa", per_request: str = "$1"
) -> Agent:
    """An agent paying by card only, through ``client`` (the agent's Stripe), within $5 a day."""
    wallet = CardWallet(client, payment_method, label="agent-card")
    budget = Budget.from_prices(None, per_request=per_request, per_day="$5")
    return Agent(card=wallet, budget=budget, book=ReceiptBook(None))


@contextmanager
def agent_stripe_client(fake: FakeStripe) -> Iterator[Any]:
    """A Stripe client with the AGENT's key, able to call sync and async."""
    http_client = stripe.HTTPXClient(allow_sync_methods=True)
    yield stripe.StripeClient(
        AGENT_KEY, base_addresses={"api": fake.url}, max_network_retries=0, http_client=http_client
    )
    http_client.close()

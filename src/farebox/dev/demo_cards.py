"""The card chapter of ``farebox demo``: one route, x402 and cards in the same 402.

Stripe is :mod:`farebox.dev.devstripe`, a local stand-in that follows Stripe's documented API
(Shared Payment Tokens, PaymentIntents, refunds) and moves no money: Stripe itself cannot be
reached offline. Everything else is what runs in production: the gate, the card rail, the
StripeLedger speaking to it through the official ``stripe`` library, the agent's CardWallet, the
budget and the PEAC records.
"""

from __future__ import annotations

from typing import Any

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

import stripe
from farebox.agent.agent import Agent, Payment
from farebox.agent.budget import Budget
from farebox.agent.card import CardWallet
from farebox.agent.httpx_auth import PAYMENT_EXTENSION, PaymentAuth
from farebox.dev.devchain import DevChain
from farebox.dev.devstripe import AGENT_KEY, SELLER_PROFILE, running_devstripe
from farebox.dev.sample import AGENT, build_sample_api
from farebox.ledgers.stripe import StripeLedger, stripe_client
from farebox.protocol import mpp
from farebox.receipts.records import verify_receipt
from farebox.server.refunds import refund_payment

__all__ = ["card_story"]

BASE_URL = "https://api.example"
_COMMERCE = "org.peacprotocol/commerce"


def _commerce(claims: Any) -> dict[str, Any]:
    found = claims.get("extensions", {}).get(_COMMERCE, {}) if isinstance(claims, dict) else {}
    return dict(found)


async def card_story(console: Console, chain: DevChain) -> dict[str, Any]:
    """Tell the card chapter on ``chain``; return its facts (for tests)."""
    facts: dict[str, Any] = {}
    with running_devstripe() as dev:
        seller, seller_http = stripe_client(dev.api_key, api_base=dev.url)
        agent_stripe, agent_http = stripe_client(AGENT_KEY, api_base=dev.url)
        try:
            ledger = StripeLedger(seller)
            api = build_sample_api(chain, issuer=BASE_URL, card=ledger, card_profile=SELLER_PROFILE)
            await _chapter(console, facts, api, dev, ledger, agent_stripe, chain)
        finally:
            await seller_http.close_async()  # type: ignore[no-untyped-call]
            await agent_http.close_async()  # type: ignore[no-untyped-call]
    return facts


async def _chapter(
    console: Console,
    facts: dict[str, Any],
    api: Any,
    dev: Any,
    ledger: StripeLedger,
    agent_stripe: stripe.StripeClient,
    chain: DevChain,
) -> None:
    console.rule("[bold]cards, beside x402")
    console.print(
        "Stripe is a local stand-in here (farebox.dev.devstripe): it follows Stripe's "
        "documented API and moves no money.\nPaid route: GET /report for $0.50, in USDC by x402 "
        "or by card (50 cents is the card minimum; /weather at $0.01 offers no card)."
    )
    transport = httpx.ASGITransport(app=api.app)

    # 5. One 402, three ways to pay.
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as plain:
        unpaid = await plain.get("/report")
    payment = unpaid.json()["payment"]
    lines = [v for k, v in unpaid.headers.multi_items() if k == "www-authenticate"]
    [card] = [c for line in lines for c in mpp.parse_www_authenticate(line)]
    facts["offered"] = [m["protocol"] for m in payment["methods"]]
    table = Table.grid(padding=(0, 2))
    for method in payment["methods"]:
        if method["protocol"] == "x402":
            table.add_row("x402", f"{method['price']} on {method['network']} to {method['payTo']}")
        elif method["protocol"] == "mpp":
            table.add_row(
                "MPP Payment",
                f"{method['amount']} {method['currency']} minor units, method {method['method']}, "
                f"intent {method['intent']} (WWW-Authenticate: Payment id={card.id[:12]}...)",
            )
        else:
            table.add_row(
                "X-Receipt",
                f"invoice {method['reference']}: confirm PaymentIntent {method['payment_intent']} "
                "with its client secret, then resend with X-Receipt",
            )
    console.print(Panel(table, title=f"5. GET /report -> {unpaid.status_code}, one 402 for all"))

    # 6. An agent with only a card pays with a Shared Payment Token.
    card_budget = Budget.from_prices(None, per_request="$1", per_day="$5")
    card_agent = Agent(card=CardWallet(agent_stripe, "pm_card_visa"), budget=card_budget)
    async with httpx.AsyncClient(
        transport=transport, base_url=BASE_URL, auth=PaymentAuth(card_agent)
    ) as client:
        paid = await client.get("/report")
    by_card: Payment = paid.extensions[PAYMENT_EXTENSION]
    intent = dev.intents[by_card.settlement.transaction]
    commerce = _commerce(by_card.receipt.claims if by_card.receipt else {})
    facts.update(
        card_status=paid.status_code,
        card_rail=by_card.rail,
        card_intent=(intent["status"], intent["amount"], intent["currency"]),
        card_receipt=commerce,
    )
    table = Table.grid(padding=(0, 2))
    table.add_row("status", f"{paid.status_code}: {paid.text}")
    table.add_row("token", "minted by the agent's own Stripe account, for 50 usd to this seller")
    table.add_row(
        "charge",
        f"PaymentIntent {intent['id']} {intent['status']} ({intent['amount']} {intent['currency']})",
    )
    table.add_row("Payment-Receipt", paid.headers.get("payment-receipt", "")[:60] + "...")
    table.add_row(
        "PEAC record",
        f"rail {commerce.get('payment_rail')}, {commerce.get('event')} of "
        f"{commerce.get('amount_minor')} {commerce.get('currency')}, verified by the agent",
    )
    spent = card_budget.spent(now=int(card_agent.clock()))
    table.add_row("budget", f"{card_budget.format(spent.today)} spent today")
    console.print(
        Panel(table, title="6. an agent with only a card pays (MPP, Shared Payment Token)")
    )

    # 7. The crypto agent pays the same route with x402.
    account = chain.accounts[AGENT].account
    crypto_agent = Agent(account, budget=Budget.from_prices(None, per_request="$1"))
    async with httpx.AsyncClient(
        transport=transport, base_url=BASE_URL, auth=PaymentAuth(crypto_agent)
    ) as client:
        paid = await client.get("/report")
    by_x402: Payment = paid.extensions[PAYMENT_EXTENSION]
    facts["x402_status"] = (paid.status_code, by_x402.rail)
    console.print(
        Panel(
            f"status {paid.status_code}, rail {by_x402.rail}, settled in "
            f"{by_x402.settlement.transaction[:18]}... on chain {chain.chain_id}",
            title="7. an agent with USDC pays the same route (x402)",
        )
    )

    # 8. X-Receipt: pay an invoice out of band, then present the PaymentIntent.
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as plain:
        unpaid = await plain.get("/report")
        [invoice] = [m for m in unpaid.json()["payment"]["methods"] if m["protocol"] == "x-receipt"]
        async with httpx.AsyncClient() as browser:  # what Stripe.js does in the payer's browser
            confirmed = await browser.post(
                f"{dev.url}/v1/payment_intents/{invoice['payment_intent']}/confirm",
                data={"client_secret": invoice["client_secret"], "payment_method": "pm_card_visa"},
                headers={"authorization": f"Bearer {dev.publishable_key}"},
            )
        served = await plain.get("/report", headers={"x-receipt": invoice["payment_intent"]})
        again = await plain.get("/report", headers={"x-receipt": invoice["payment_intent"]})
    record = verify_receipt(
        served.headers["peac-receipt"],
        api.gate.signing_key.public_key,
        now=int(api.gate.clock()),
        issuer=BASE_URL,
    )
    facts["x_receipt"] = (
        confirmed.json().get("status"),
        served.status_code,
        _commerce(record.claims).get("reference"),
        again.json().get("code"),
    )
    console.print(
        Panel(
            f"invoice {invoice['reference']} paid out of band: PaymentIntent "
            f"{invoice['payment_intent']} {confirmed.json().get('status')}\n"
            f"GET /report with X-Receipt -> {served.status_code}, PEAC record for "
            f"{facts['x_receipt'][2]}\n"
            f"the same receipt again -> {again.status_code}, code [bold]{facts['x_receipt'][3]}[/]",
            title="8. an invoice paid out of band (X-Receipt)",
        )
    )

    # 9. Half of the card payment is refunded, with a signed refund record.
    done = await refund_payment(
        api.store,
        ledger,
        receipt_ref=by_card.receipt.receipt_ref if by_card.receipt else "",
        amount=25,
        signing_key=api.gate.signing_key,
        issuer=api.gate.issuer,
        reason="requested_by_customer",
    )
    refund_record = verify_receipt(
        done.record, api.gate.signing_key.public_key, now=int(api.gate.clock()), issuer=BASE_URL
    )
    refund_commerce = _commerce(refund_record.claims)
    facts["refund"] = (done.amount, done.remaining, refund_commerce.get("amount_minor"))
    console.print(
        Panel(
            f"refund {done.refund}: {done.amount} {done.currency} of {by_card.offer.amount}, "
            f"{done.remaining} left to refund\nPEAC record: {refund_commerce.get('event')} of "
            f"{refund_commerce.get('amount_minor')} {refund_commerce.get('currency')}, linked to "
            f"the payment's record (farebox refund RECEIPT_REF does the same from the shell)",
            title="9. a refund",
        )
    )

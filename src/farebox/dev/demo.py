"""``farebox demo``: the whole paid request, end to end, in one process on the embedded chain.

An unpaid call and its 402; the agent paying within its budget; the server verifying, serving,
settling on the EVM and signing a PEAC record that the agent verifies; the same proof replayed and
refused; and a call that the agent's budget refuses before anything is signed.

Then cards, on a route that offers x402 and cards in one 402: an agent holding only a card pays
with a Shared Payment Token (MPP ``Payment``), the crypto agent pays the same route with x402, a
payer settles an invoice out of band and presents ``X-Receipt``, and the card payment is partly
refunded with a signed refund record. Stripe cannot be reached offline: the card calls go to
:mod:`farebox.dev.devstripe`, a local stand-in that follows Stripe's documented API and moves
no money (the demo says so). Without the ``stripe`` library the card chapter is skipped.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import anyio
import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from farebox.agent.agent import Agent, Payment
from farebox.agent.book import ReceiptBook
from farebox.agent.budget import SCALE, Budget
from farebox.agent.httpx_auth import PAYMENT_EXTENSION, PaymentAuth
from farebox.dev.sample import AGENT, build_sample_api
from farebox.errors import PaymentError
from farebox.money import format_amount
from farebox.protocol.challenge import read_challenge
from farebox.protocol.x402 import b64json_encode, decode_proof, decode_settlement, proof_to_json

__all__ = ["run_demo"]

BASE_URL = "https://api.example"


def run_demo(console: Console | None = None) -> dict[str, Any]:
    """Run the story, print it to ``console``, and return its facts (for tests)."""
    return anyio.run(_story, console or Console(quiet=True, highlight=False))


async def _story(console: Console) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    console.rule("[bold]farebox demo: a paid request, end to end")
    api = build_sample_api(issuer=BASE_URL)
    chain = api.chain
    asset = chain.asset
    agent_account = chain.accounts[AGENT].account
    console.print(
        f"Embedded EVM: chain id {chain.chain_id}, {asset.symbol} token at {asset.address}\n"
        f"Paid route: GET /weather for $0.01, paid to {api.merchant}\n"
        f"Agent: {agent_account.address}"
    )
    transport = httpx.ASGITransport(app=api.app)
    balances = (chain.balance_of(agent_account.address), chain.balance_of(api.merchant))

    # 1. No payment: 402 with the price.
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as plain:
        unpaid = await plain.get("/weather")
    challenge = read_challenge(dict(unpaid.headers), unpaid.content)
    offer = challenge.accepts[0]
    facts["unpaid_status"] = unpaid.status_code
    console.print(
        Panel(
            f"GET /weather -> [bold]{unpaid.status_code} Payment Required[/]\n"
            f"price: {asset.format(offer.amount)} {asset.symbol} ({offer.amount} atomic units) "
            f"on {offer.network}\npayTo: {offer.pay_to}\n"
            f"reference: {unpaid.json()['payment']['reference']}\n"
            f"cache-control: {unpaid.headers.get('cache-control')}",
            title="1. an unpaid call",
        )
    )

    # 2. The agent pays within its budget.
    budget = Budget.from_prices(None, per_request="$0.05", per_day="$0.02")
    agent = Agent(agent_account, budget=budget, book=ReceiptBook(None))
    async with httpx.AsyncClient(
        transport=transport, base_url=BASE_URL, auth=PaymentAuth(agent)
    ) as client:
        paid = await client.get("/weather")
        payment: Payment = paid.extensions[PAYMENT_EXTENSION]
        proof_header = paid.request.headers["payment-signature"]
        settlement = decode_settlement(paid.headers["payment-response"])
        after = (chain.balance_of(agent_account.address), chain.balance_of(api.merchant))
        facts.update(
            paid_status=paid.status_code,
            body=paid.json(),
            transaction=settlement.transaction,
            moved=(balances[0] - after[0], after[1] - balances[1]),
            receipt_claims=dict(payment.receipt.claims) if payment.receipt else None,
        )
        claims = payment.receipt.claims if payment.receipt else {}
        commerce = claims.get("extensions", {}).get("org.peacprotocol/commerce", {})
        table = Table.grid(padding=(0, 2))
        table.add_row("status", f"{paid.status_code}")
        table.add_row("body", paid.text)
        table.add_row("settlement", f"{settlement.transaction} (success: {settlement.success})")
        table.add_row(
            "balances",
            f"agent -{asset.format(facts['moved'][0])}, merchant +{asset.format(facts['moved'][1])}"
            f" {asset.symbol}, on chain",
        )
        table.add_row("receipt", f"iss {claims.get('iss')}, sub {claims.get('sub')}")
        table.add_row(
            "",
            f"{commerce.get('event')} of {commerce.get('amount_minor')} minor units of "
            f"{commerce.get('asset')}, env {commerce.get('env')}",
        )
        table.add_row(
            "verified",
            f"yes, by the agent, with the key found via {BASE_URL}/.well-known/peac-issuer.json",
        )
        console.print(Panel(table, title="2. the agent pays"))

        # 3. The same payment again. Sent as it was (same payment id), it is a retry: the stored
        # answer comes back and nothing is charged. The same authorization in another request
        # (its id stripped) is a replay: refused, naming the transaction that spent it.
        before_replays = chain.balance_of(agent_account.address)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as plain:
            retry = await plain.get("/weather", headers={"payment-signature": proof_header})
            stripped = proof_to_json(decode_proof(proof_header))
            stripped.pop("extensions", None)
            replay = await plain.get(
                "/weather", headers={"payment-signature": b64json_encode(stripped)}
            )
        facts["retry"] = (retry.status_code, retry.headers.get("idempotent-replayed"))
        facts["replay"] = (replay.status_code, replay.json().get("code"))
        facts["replays_charged"] = before_replays - chain.balance_of(agent_account.address)
        console.print(
            Panel(
                f"the same PAYMENT-SIGNATURE again -> {retry.status_code}, "
                f"Idempotent-Replayed: {facts['retry'][1]} (the stored answer, not charged)\n"
                f"the same authorization in another request -> {replay.status_code}, code "
                f"[bold]{facts['replay'][1]}[/]: {replay.json().get('detail')}\n"
                f"charged for both: {asset.format(facts['replays_charged'])} {asset.symbol}",
                title="3. the payment sent again",
            )
        )

        # 4. The budget ($0.02 a day) refuses the third cent before anything is signed.
        await client.get("/weather")
        try:
            await client.get("/weather")
            facts["budget"] = None
        except PaymentError as exc:
            facts["budget"] = exc.code
            console.print(
                Panel(
                    f"third call -> refused by the agent: [bold]{exc.code}[/]\n{exc.message}",
                    title="4. the budget runs out",
                )
            )
    spent = budget.spent(now=int(agent.clock()))
    facts["transfers"] = len(await api.store.events(kind="settlement"))
    console.print(
        f"Settlements recorded by the server: {facts['transfers']}; agent's receipt book: "
        f"{len(agent.book.entries()) if agent.book else 0} entries; spent today: "
        f"{format_amount(spent.today, SCALE)} {spent.currency}."
    )
    if importlib.util.find_spec("stripe") is None:
        console.print("Cards: skipped (install farebox[stripe] for the card chapter).")
        facts["card"] = None
        return facts
    from farebox.dev.demo_cards import card_story

    facts["card"] = await card_story(console, chain)
    return facts


def serve_demo(console: Console, *, host: str, port: int) -> None:
    """Serve the sample paid API on a fresh embedded chain until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit(
            "farebox demo --serve needs uvicorn: pip install 'farebox[serve]'"
        ) from None
    api = build_sample_api()
    chain = api.chain
    base = f"http://{host}:{port}"
    table = Table(title="funded development accounts (the 'test test ... junk' mnemonic)")
    table.add_column("#")
    table.add_column("address")
    table.add_column(chain.asset.symbol, justify="right")
    for index, account in enumerate(chain.accounts):
        table.add_row(
            str(index), account.address, chain.asset.format(chain.balance_of(account.address))
        )
    console.print(
        f"Sample paid API on {base}\n"
        f"  GET {base}/weather  $0.01 ({chain.asset.symbol}), paid to #2 {api.merchant}\n"
        f"  GET {base}/health   free\n"
        f"Embedded chain: id {chain.chain_id}, network {chain.network}, "
        f"token {chain.asset.address}; settles with #1.\n"
        f"Receipts are signed by {api.gate.issuer} (JWKS at {base}/.well-known/jwks.json)."
    )
    console.print(table)
    console.print(f"Pay for it: FAREBOX_PRIVATE_KEY=<key of account #3> farebox get {base}/weather")
    uvicorn.run(api.app, host=host, port=port, log_level="warning")

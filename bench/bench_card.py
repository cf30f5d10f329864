"""Benchmark: card payments through the gate, against Stripe's calls alone, in one run.

Stripe is the local stand-in (:mod:`farebox.dev.devstripe`) over HTTP on 127.0.0.1, reached
through the official ``stripe`` library, so every figure includes a real HTTP round trip; the
baselines are the same Stripe calls made directly through :class:`StripeLedger` in the same run.
What the gate adds (credential or receipt checks, the store claim and finish in SQLite, the PEAC
record) is the difference. Measured:

* a 402 of a card route (MPP challenge only), and with an X-Receipt invoice (one PaymentIntent
  created and one invoice stored per 402), against the free route;
* a paid request by Shared Payment Token (charge after the app) against ``StripeLedger.charge``;
* a paid request by X-Receipt against ``StripeLedger.retrieve_paid``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable for bench._harness
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import httpx

from bench._harness import fmt_time
from bench.bench_gate import _call
from farebox.agent.card import CardWallet
from farebox.dev.devchain import DevChain
from farebox.dev.devstripe import AGENT_KEY, SELLER_PROFILE, running_devstripe
from farebox.dev.sample import build_sample_api
from farebox.ledgers.stripe import StripeLedger, stripe_client
from farebox.protocol import mpp
from farebox.store.sqlite import SqliteStore

COUNT = 200


async def _timed(
    run_one: Callable[[int], Awaitable[object]], count: int, batches: int = 10
) -> float:
    per_batch = max(1, count // batches)
    samples = []
    index = 0
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per_batch):
            await run_one(index)
            index += 1
        samples.append((time.perf_counter() - start) / per_batch)
    return statistics.median(samples)


async def _ok(app: Any, path: str, headers: list[tuple[bytes, bytes]], want: int) -> None:
    status = await _call(app, path, headers)
    if status != want:
        raise SystemExit(f"{path}: answered {status}, expected {want}")


async def _unpaid(app: Any) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://api.bench"
    ) as c:
        return await c.get("/report")


async def _bench() -> dict[str, float]:
    chain = DevChain()
    with tempfile.TemporaryDirectory() as tmp, running_devstripe() as dev:
        dev.keep_requests = False
        seller, seller_http = stripe_client(dev.api_key, api_base=dev.url)
        agent, agent_http = stripe_client(AGENT_KEY, api_base=dev.url)
        ledger = StripeLedger(seller)
        wallet = CardWallet(agent, "pm_card_visa")
        api = build_sample_api(
            chain,
            store=SqliteStore(os.path.join(tmp, "card.sqlite")),
            card=ledger,
            card_profile=SELLER_PROFILE,
        )
        # The same route without invoices: tokens only.
        plain = build_sample_api(
            chain,
            store=SqliteStore(os.path.join(tmp, "plain.sqlite")),
            card=ledger,
            card_profile=SELLER_PROFILE,
            card_invoice=False,
        )

        async def minted() -> tuple[mpp.Challenge, str]:
            """A fresh challenge of the plain route and a token minted for it."""
            unpaid = await _unpaid(plain.app)
            lines = [v for k, v in unpaid.headers.multi_items() if k == "www-authenticate"]
            [challenge] = [c for line in lines for c in mpp.parse_www_authenticate(line)]
            return challenge, await wallet.mint_async(
                wallet.mint_request(challenge, now=time.time())
            )

        free = await _timed(lambda i: _ok(api.app, "/health", [], 200), 2000)
        invoice_402 = await _timed(lambda i: _ok(api.app, "/report", [], 402), COUNT)
        plain_402 = await _timed(lambda i: _ok(plain.app, "/report", [], 402), COUNT)

        # Shared Payment Tokens: challenges and tokens made before the clock runs.
        credentials = []
        for _ in range(COUNT):
            challenge, spt = await minted()
            credential = mpp.Credential(challenge.echo(), mpp.StripePayload(spt).to_json())
            credentials.append([(b"authorization", mpp.render_authorization(credential).encode())])
        spt_paid = await _timed(lambda i: _ok(plain.app, "/report", credentials[i], 200), COUNT)
        tokens = []
        for index in range(COUNT):
            challenge, spt = await minted()
            tokens.append((f"bench-{index}-{challenge.id}", spt))

        async def charge(i: int) -> None:
            await ledger.charge(
                spt=tokens[i][1], amount=50, currency="usd", challenge_id=tokens[i][0], metadata={}
            )

        charge_alone = await _timed(charge, COUNT)

        # X-Receipt: invoices made and paid before the clock runs.
        receipts: list[list[tuple[bytes, bytes]]] = []
        paid_invoices: list[tuple[str, str]] = []
        async with httpx.AsyncClient() as browser:
            for _ in range(2 * COUNT):
                unpaid = await _unpaid(api.app)
                [invoice] = [
                    m for m in unpaid.json()["payment"]["methods"] if m["protocol"] == "x-receipt"
                ]
                await browser.post(
                    f"{dev.url}/v1/payment_intents/{invoice['payment_intent']}/confirm",
                    data={"payment_method": "pm_card_visa"},
                    headers={"authorization": f"Bearer {dev.api_key}"},
                )
                receipts.append([(b"x-receipt", invoice["payment_intent"].encode())])
                paid_invoices.append((invoice["payment_intent"], invoice["reference"]))
        receipt_paid = await _timed(lambda i: _ok(api.app, "/report", receipts[i], 200), COUNT)

        async def retrieve(i: int) -> None:
            intent, reference = paid_invoices[COUNT + i]
            await ledger.retrieve_paid(intent, amount=50, currency="usd", reference=reference)

        retrieve_alone = await _timed(retrieve, COUNT)
        await seller_http.close_async()  # type: ignore[no-untyped-call]
        await agent_http.close_async()  # type: ignore[no-untyped-call]

    print("\n## Cards through the gate, against Stripe's calls alone (local stand-in over HTTP)")
    print(f"  free route                           {fmt_time(free)}")
    print(
        f"  402, MPP challenge                   {fmt_time(plain_402)}  {plain_402 / free:5.1f}x free"
    )
    print(
        f"  402 with an X-Receipt invoice        {fmt_time(invoice_402)}  "
        f"{invoice_402 / plain_402:5.1f}x the 402 without (one PaymentIntent created per 402)"
    )
    print(
        f"  paid by Shared Payment Token         {fmt_time(spt_paid)}  "
        f"{spt_paid / charge_alone:5.2f}x StripeLedger.charge alone ({fmt_time(charge_alone)})"
    )
    print(
        f"  paid by X-Receipt                    {fmt_time(receipt_paid)}  "
        f"{receipt_paid / retrieve_alone:5.2f}x StripeLedger.retrieve_paid alone "
        f"({fmt_time(retrieve_alone)})"
    )
    print(
        f"  gate's own share: {fmt_time(spt_paid - charge_alone)} (token), "
        f"{fmt_time(receipt_paid - retrieve_alone)} (receipt)"
    )
    return {
        "free": free,
        "plain_402": plain_402,
        "invoice_402": invoice_402,
        "spt_paid": spt_paid,
        "charge_alone": charge_alone,
        "receipt_paid": receipt_paid,
        "retrieve_alone": retrieve_alone,
    }


def run() -> None:
    """Measure and print the card benchmark."""
    with warnings.catch_warnings():
        # stripe 16.1's HTTPXClient hands httpx the body as data=<bytes> (deprecated in 0.28).
        warnings.simplefilter("ignore", DeprecationWarning)
        anyio.run(_bench)


if __name__ == "__main__":
    run()

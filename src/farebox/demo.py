"""The walkthrough behind ``farebox demo``: one payment cycle in one process, printed.

An API prices a route, answers 402; an agent reads the challenge and signs an EIP-3009
authorization; the server verifies it offline, refuses tampered and expired copies with their
codes, and signs a PEAC record of the payment, which is then verified. Nothing here moves money:
settlement on a chain arrives with the ledger layer, and until then the record says
``event: authorization`` (PEAC forbids claiming a settlement that did not happen).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from typing import Any

from rich.console import Console
from rich.json import JSON
from rich.panel import Panel

from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.money import BASE_SEPOLIA_USDC
from farebox.protocol.challenge import read_challenge, render_challenge
from farebox.protocol.models import Challenge, Offer, Proof, Resource
from farebox.protocol.x402 import PAYMENT_REQUIRED, decode_proof, encode_proof, find_offer
from farebox.receipts import (
    SigningKey,
    issue_receipt,
    payment_claims,
    rfc3339,
    uuid7,
    verify_receipt,
)
from farebox.schemes import evm_exact

__all__ = ["run_demo"]

# Well-known development keys (the "test test ... junk" mnemonic): public, never for real money.
AGENT_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
API_PAYEE = "0x70997970C51812dC3A010C7D01E8aAe3c6a4E2D2"
RESOURCE = Resource("http://127.0.0.1:8402/weather", "Today's weather", "application/json")


def _decoded(header: str) -> Any:
    return json.loads(base64.b64decode(header))


def _refusal(console: Console, title: str, proof: Proof, offer: Offer, now: int) -> str:
    try:
        evm_exact.verify(proof, offer, now=now)
    except PaymentError as exc:
        console.print(f"  {title}: refused with [bold red]{exc.code}[/] ({exc.status})")
        return exc.code
    raise AssertionError(f"{title} was accepted")


def run_demo(console: Console | None = None, *, now: int | None = None) -> dict[str, Any]:
    """Run the walkthrough, print it, and return its facts (for tests and scripts)."""
    console = console or Console()
    now = int(time.time()) if now is None else now
    asset = BASE_SEPOLIA_USDC

    console.rule("1. The API prices GET /weather at $0.01")
    offer = Offer(
        scheme="exact",
        network=asset.network,
        amount=asset.parse("$0.01"),
        asset=asset.address,
        pay_to=API_PAYEE,
        extra={"name": asset.name, "version": asset.version},
    )
    challenge = Challenge(RESOURCE, (offer,), reference="ch_" + os.urandom(8).hex())
    rendered = render_challenge(challenge)
    console.print(f"An unpaid call is answered [bold]{rendered.status} Payment Required[/]:")
    for name, value in rendered.headers:
        shown = value if len(value) < 60 else value[:56] + "..."
        console.print(f"  {name}: {shown}")
    console.print(Panel(JSON(rendered.body.decode()), title="402 body (plain + x402 v1)"))

    console.rule("2. The agent reads the challenge and signs an authorization")
    agent = EvmAccount.from_hex(AGENT_KEY)
    seen = read_challenge(dict(rendered.headers), rendered.body)
    chosen = seen.accepts[0]
    proof = evm_exact.make_proof(
        agent, chosen, now=now, nonce=os.urandom(32), resource=seen.resource
    )
    header = encode_proof(proof)
    console.print(f"Agent {agent.address} pays {asset.format(chosen.amount)} {asset.symbol}.")
    console.print(Panel(JSON(json.dumps(_decoded(header))), title="PAYMENT-SIGNATURE, decoded"))

    console.rule("3. The server verifies the proof offline")
    received = decode_proof(header)
    verified = evm_exact.verify(received, find_offer(received, challenge.accepts), now=now)
    console.print(
        f"  verified: payer [bold green]{verified.payer}[/], amount {verified.offer.amount} atomic units"
    )
    console.print(f"  claim key (accepted once ever): {verified.claim_key}")

    console.rule("4. Bad proofs get specific codes")
    codes = [
        _refusal(
            console,
            "amount raised",
            proof,
            dataclasses.replace(offer, amount=offer.amount + 1),
            now,
        ),
        _refusal(
            console,
            "paid to someone else",
            proof,
            dataclasses.replace(offer, pay_to=agent.address),
            now,
        ),
        _refusal(
            console, "presented after it expired", proof, offer, now + offer.max_timeout_seconds
        ),
    ]
    try:
        find_offer(
            dataclasses.replace(received, accepted=dataclasses.replace(offer, amount=1)),
            challenge.accepts,
        )
    except PaymentError as exc:
        console.print(
            f"  accepted offer tampered: refused with [bold red]{exc.code}[/] ({exc.status})"
        )
        codes.append(exc.code)

    console.rule("5. The server signs a PEAC record of the payment")
    # On plain http the server's origin cannot be a PEAC issuer: a did:key names the signing key.
    key = SigningKey.generate()
    claims = payment_claims(
        iss=key.did_key,
        iat=now,
        jti=uuid7(now * 1000),
        payment_rail="x402",
        amount_minor=verified.offer.amount,
        currency=asset.symbol,
        asset=asset.caip19,
        env="test" if asset.is_testnet else "live",
        event="authorization",
        reference=received.payload["authorization"]["nonce"],
        sub=RESOURCE.url,
        occurred_at=rfc3339(now),
    )
    record = issue_receipt(claims, key)
    console.print(f"  PEAC-Receipt: {record.jws[:72]}...")
    console.print(f"  receipt_ref: {record.receipt_ref}")

    console.rule("6. Anyone can verify the record")
    checked = verify_receipt(record.jws, now=now, issuer=key.did_key)
    console.print(
        Panel(
            JSON(json.dumps(checked.claims)),
            title=f"verified, kid {checked.kid}, warnings: {len(checked.warnings)}",
        )
    )
    return {
        "status": rendered.status,
        "payment_required": dict(rendered.headers)[PAYMENT_REQUIRED],
        "payer": verified.payer,
        "refusals": codes,
        "receipt": record.jws,
        "receipt_claims": checked.claims,
        "warnings": checked.warnings,
    }

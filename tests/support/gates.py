"""A gate on the embedded chain for one test: routes priced in the chain's USDC, a merchant of its
own, an in-memory store and a fresh receipt key."""

from __future__ import annotations

from dataclasses import dataclass

from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.receipts import SigningKey
from farebox.server.gate import Gate
from farebox.server.routes import RouteTable
from farebox.store.memory import MemoryStore

__all__ = ["ISSUER", "PRICE", "Paid", "make_gate"]

ISSUER = "https://api.test"
PRICE = 10_000  # $0.01 in 6-decimal USDC


@dataclass
class Paid:
    """A gate on the chain, with its parts, for one test."""

    chain: DevChain
    gate: Gate
    store: MemoryStore
    merchant: str
    key: SigningKey


def make_gate(chain: DevChain, *, routes: RouteTable | None = None) -> Paid:
    """A gate over ``routes`` (by default five priced routes paid to a new merchant), settling
    with development account #1."""
    merchant = EvmAccount.generate().address
    if routes is None:
        routes = RouteTable()
        for method, path, price in (
            ("GET", "/weather", PRICE),
            ("POST", "/items", 2 * PRICE),
            ("GET", "/stream", PRICE),
            ("GET", "/flaky", PRICE),
            ("GET", "/redirect", PRICE),
        ):
            routes.add(
                method,
                path,
                price,
                assets=chain.asset,
                pay_to=merchant,
                description=f"{method} {path}",
                mime_type="application/json",
            )
    # Tests in one process run one at a time, and each ledger reads its nonce from the chain.
    settler = chain.accounts[1].account
    ledger = EvmLedger(chain.rpc, settler, network=chain.network)
    store = MemoryStore()
    key = SigningKey.generate()
    gate = Gate(routes, LocalFacilitator([ledger]), store, signing_key=key, issuer=ISSUER)
    return Paid(chain, gate, store, merchant, key)

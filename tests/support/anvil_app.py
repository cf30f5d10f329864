"""farebox on the anvil node of the interop tests: its settler's ledger, and a FastAPI app with
``GET /weather`` at $0.01 behind farebox (the official clients pay it)."""

from __future__ import annotations

from fastapi import FastAPI

from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.ledgers.rpc import HttpRpc
from farebox.money import BASE_SEPOLIA_USDC
from farebox.receipts import SigningKey
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.routes import RouteTable
from farebox.store.memory import MemoryStore
from tests.support.anvil import AnvilChain

__all__ = ["NETWORK", "SETTLER", "farebox_app", "farebox_ledger"]

NETWORK = BASE_SEPOLIA_USDC.network
SETTLER = 1  # farebox's settler account


def farebox_ledger(chain: AnvilChain) -> EvmLedger:
    """farebox's ledger on the node, settling with development account #1."""
    return EvmLedger(HttpRpc(chain.url), chain.accounts[SETTLER], network=NETWORK)


def farebox_app(chain: AnvilChain, merchant: str) -> tuple[PaymentMiddleware, LocalFacilitator]:
    """A FastAPI app with ``GET /weather`` at $0.01 behind farebox, settling on the node."""
    api = FastAPI()

    @api.get("/weather")
    async def weather() -> dict[str, str]:
        return {"forecast": "sunny"}

    routes = RouteTable()
    routes.add("GET", "/weather", "$0.01", assets=BASE_SEPOLIA_USDC, pay_to=merchant)
    facilitator = LocalFacilitator([farebox_ledger(chain)])
    gate = Gate(routes, facilitator, MemoryStore(), signing_key=SigningKey.generate())
    return PaymentMiddleware(api, gate), facilitator

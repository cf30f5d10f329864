"""Shared parts of the end-to-end tests: one embedded chain per test process, paid apps on it.

The apps are real FastAPI and Flask apps behind farebox's ASGI and WSGI middleware, settling on
the embedded EVM; the agent is farebox's, driving httpx. Each test makes its own payer account (funded
from a development account) so tests running in parallel never share a balance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount, address_bytes, keccak256
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.money import ASSETS
from farebox.receipts import SigningKey
from farebox.schemes.evm_exact import chain_id_of, domain_separator
from farebox.server.gate import Gate
from farebox.server.routes import RouteTable
from farebox.store.memory import MemoryStore

ISSUER = "https://api.test"
PRICE = 10_000  # $0.01 in 6-decimal USDC


@pytest.fixture(scope="session")
def chain() -> DevChain:
    chain = DevChain()
    ASSETS.register(chain.asset)
    return chain


@dataclass
class Paid:
    """A gate on the chain, with its parts, for one test."""

    chain: DevChain
    gate: Gate
    store: MemoryStore
    merchant: str
    key: SigningKey


def send_usdc(chain: DevChain, to: str, amount: int) -> None:
    """Send ``amount`` atomic USDC to ``to`` from development account #9."""
    data = (
        "0xa9059cbb"  # transfer(address,uint256)
        + to[2:].lower().rjust(64, "0")
        + amount.to_bytes(32, "big").hex()
    )
    sender = chain.accounts[9].address
    call = {"from": sender, "to": chain.token, "data": data, "gas": hex(100_000)}
    chain.handle("eth_sendTransaction", [call])


def fund(chain: DevChain, amount: int = 1_000_000) -> EvmAccount:
    """A fresh payer holding ``amount`` atomic USDC (sent by development account #9)."""
    payer = EvmAccount.generate()
    if amount:
        send_usdc(chain, payer.address, amount)
    return payer


def make_gate(chain: DevChain, *, routes: RouteTable | None = None) -> Paid:
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


class SlowBroadcast:
    """A node that takes ``delay`` seconds to accept a transaction (a busy node, a far RPC)."""

    def __init__(self, chain: DevChain, delay: float) -> None:
        self.inner = chain.rpc
        self.delay = delay

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        if method == "eth_sendRawTransaction":
            await anyio.sleep(self.delay)
        return await self.inner.request(method, params)


class HiddenReceipts:
    """The chain mines, but the node never reports a receipt (a node far behind, or a lost answer).

    A fault injected in front of the real chain: everything else is answered by it.
    """

    def __init__(self, chain: DevChain) -> None:
        self.inner = chain.rpc

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        if method == "eth_getTransactionReceipt":
            return None
        return await self.inner.request(method, params)


def cancel_on_chain(chain: DevChain, payer: EvmAccount, nonce: bytes) -> None:
    """The payer cancels its authorization ``nonce`` (EIP-3009 ``cancelAuthorization``)."""
    asset = chain.asset
    separator = domain_separator(asset.name, asset.version, chain_id_of(asset.network), chain.token)
    typehash = keccak256(b"CancelAuthorization(address authorizer,bytes32 nonce)")
    struct_hash = keccak256(typehash + address_bytes(payer.address).rjust(32, b"\0") + nonce)
    signature = payer.sign_digest(keccak256(b"\x19\x01" + separator + struct_hash))
    selector = keccak256(b"cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)")[:4]
    data = (
        selector
        + address_bytes(payer.address).rjust(32, b"\0")
        + nonce
        + signature[64:].rjust(32, b"\0")
        + signature[:64]
    )
    sender = chain.accounts[9].address
    call = {"from": sender, "to": chain.token, "data": "0x" + data.hex(), "gas": hex(100_000)}
    chain.handle("eth_sendTransaction", [call])

"""farebox: charge AI agents per request with HTTP 402, and let agents pay within limits.

The public surface. A server lists its prices in a :class:`RouteTable`, puts a :class:`Gate` (a
facilitator such as :class:`LocalFacilitator` over an :class:`EvmLedger`, a store such as
:class:`SqliteStore`, a receipt :class:`SigningKey`) in front of its app with
:class:`PaymentMiddleware` (ASGI) or :class:`WsgiPaymentMiddleware`. An :class:`Agent` pays within
its :class:`Policy` and :class:`Budget`, through httpx (:class:`PaymentAuth`) or requests
(``farebox.agent.requests_adapter.PaymentSession``). What only development needs (the embedded
EVM ``farebox.dev.devchain.DevChain``, a Stripe stand-in, the demo) is in :mod:`farebox.dev`.

Cards: a route's :class:`CardOffer` and the gate's :class:`CardRail` (over a :class:`StripeLedger`)
offer MPP ``Payment`` challenges (Shared Payment Tokens) and X-Receipt invoices beside x402; an
agent holding a :class:`CardWallet` pays them; :func:`refund_payment` refunds with a signed record.

The wire layer stays importable on its own: :func:`render_challenge`, :func:`read_challenge`,
:func:`decode_proof`, :func:`find_offer`, the ``exact`` scheme (:mod:`farebox.schemes.evm_exact`),
and PEAC records (:func:`issue_receipt`, :func:`verify_receipt`). Importing ``farebox`` loads no
I/O library: the server, agent and ledger names load on first use.
"""

import typing as _typing

from farebox.errors import ConfigError, FareboxError, PaymentError, ReceiptError
from farebox.eth import EvmAccount
from farebox.money import (
    ASSETS,
    BASE_SEPOLIA_USDC,
    BASE_USDC,
    DEVCHAIN_USDC,
    Asset,
    AssetRegistry,
    parse_price,
)
from farebox.protocol.challenge import Rendered402, read_challenge, render_challenge
from farebox.protocol.models import Challenge, Offer, Proof, Resource, Settlement, VerifiedProof
from farebox.protocol.x402 import (
    decode_proof,
    decode_settlement,
    encode_proof,
    encode_settlement,
    find_offer,
)
from farebox.receipts import (
    IssuedReceipt,
    SigningKey,
    VerifiedReceipt,
    issue_receipt,
    load_signing_key,
    payment_claims,
    save_signing_key,
    verify_receipt,
)

if _typing.TYPE_CHECKING:
    from farebox.agent.agent import Agent, Payment
    from farebox.agent.book import ReceiptBook
    from farebox.agent.budget import Budget, Limits
    from farebox.agent.card import CardWallet
    from farebox.agent.httpx_auth import PaymentAuth, paying_async_client, paying_client
    from farebox.agent.policy import Policy
    from farebox.agent.reconcile import reconcile_sync
    from farebox.agent.wallet import load_wallet
    from farebox.facilitator.local import LocalFacilitator
    from farebox.ledgers.evm import EvmLedger
    from farebox.ledgers.rpc import HttpRpc
    from farebox.ledgers.stripe import StripeLedger
    from farebox.rails.card import CardRail
    from farebox.server.asgi import PaymentMiddleware
    from farebox.server.gate import Gate
    from farebox.server.refunds import refund_payment
    from farebox.server.routes import CardOffer, RouteTable
    from farebox.server.wsgi import WsgiPaymentMiddleware
    from farebox.store.memory import MemoryStore
    from farebox.store.sqlite import SqliteStore

__version__ = "0.1.0"

# Names whose modules do I/O (anyio, httpx, sqlite3, py-evm): imported when first used, so that
# `import farebox` stays as light as the protocol core.
_LAZY = {
    "Agent": "farebox.agent.agent",
    "Budget": "farebox.agent.budget",
    "CardOffer": "farebox.server.routes",
    "CardRail": "farebox.rails.card",
    "CardWallet": "farebox.agent.card",
    "EvmLedger": "farebox.ledgers.evm",
    "Gate": "farebox.server.gate",
    "HttpRpc": "farebox.ledgers.rpc",
    "Limits": "farebox.agent.budget",
    "LocalFacilitator": "farebox.facilitator.local",
    "MemoryStore": "farebox.store.memory",
    "Payment": "farebox.agent.agent",
    "PaymentAuth": "farebox.agent.httpx_auth",
    "PaymentMiddleware": "farebox.server.asgi",
    "Policy": "farebox.agent.policy",
    "ReceiptBook": "farebox.agent.book",
    "RouteTable": "farebox.server.routes",
    "SqliteStore": "farebox.store.sqlite",
    "StripeLedger": "farebox.ledgers.stripe",
    "WsgiPaymentMiddleware": "farebox.server.wsgi",
    "load_wallet": "farebox.agent.wallet",
    "paying_async_client": "farebox.agent.httpx_auth",
    "paying_client": "farebox.agent.httpx_auth",
    "reconcile_sync": "farebox.agent.reconcile",
    "refund_payment": "farebox.server.refunds",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'farebox' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ASSETS",
    "BASE_SEPOLIA_USDC",
    "BASE_USDC",
    "DEVCHAIN_USDC",
    "Agent",
    "Asset",
    "AssetRegistry",
    "Budget",
    "CardOffer",
    "CardRail",
    "CardWallet",
    "Challenge",
    "ConfigError",
    "EvmAccount",
    "EvmLedger",
    "FareboxError",
    "Gate",
    "HttpRpc",
    "IssuedReceipt",
    "Limits",
    "LocalFacilitator",
    "MemoryStore",
    "Offer",
    "Payment",
    "PaymentAuth",
    "PaymentError",
    "PaymentMiddleware",
    "Policy",
    "Proof",
    "ReceiptBook",
    "ReceiptError",
    "Rendered402",
    "Resource",
    "RouteTable",
    "Settlement",
    "SigningKey",
    "SqliteStore",
    "StripeLedger",
    "VerifiedProof",
    "VerifiedReceipt",
    "WsgiPaymentMiddleware",
    "__version__",
    "decode_proof",
    "decode_settlement",
    "encode_proof",
    "encode_settlement",
    "find_offer",
    "issue_receipt",
    "load_signing_key",
    "load_wallet",
    "parse_price",
    "paying_async_client",
    "paying_client",
    "payment_claims",
    "read_challenge",
    "reconcile_sync",
    "refund_payment",
    "render_challenge",
    "save_signing_key",
    "verify_receipt",
]

"""farebox: charge AI agents per request with HTTP 402, and let agents pay within limits.

The public surface. Servers price a route with an :class:`Asset` and an :class:`Offer`, answer
with :func:`render_challenge`, read a proof with :func:`decode_proof`, match it with
:func:`find_offer` and verify it with its scheme (:mod:`farebox.schemes.evm_exact`). Agents read
a 402 with :func:`read_challenge` and sign with an :class:`EvmAccount`. Every paid response can
carry a PEAC record: :func:`issue_receipt`, :func:`verify_receipt`.
"""

from farebox.errors import ConfigError, FareboxError, PaymentError, ReceiptError
from farebox.eth import EvmAccount
from farebox.money import ASSETS, BASE_SEPOLIA_USDC, BASE_USDC, Asset, AssetRegistry, parse_price
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

__version__ = "0.1.0"

__all__ = [
    "ASSETS",
    "BASE_SEPOLIA_USDC",
    "BASE_USDC",
    "Asset",
    "AssetRegistry",
    "Challenge",
    "ConfigError",
    "EvmAccount",
    "FareboxError",
    "IssuedReceipt",
    "Offer",
    "PaymentError",
    "Proof",
    "ReceiptError",
    "Rendered402",
    "Resource",
    "Settlement",
    "SigningKey",
    "VerifiedProof",
    "VerifiedReceipt",
    "__version__",
    "decode_proof",
    "decode_settlement",
    "encode_proof",
    "encode_settlement",
    "find_offer",
    "issue_receipt",
    "load_signing_key",
    "parse_price",
    "payment_claims",
    "read_challenge",
    "render_challenge",
    "save_signing_key",
    "verify_receipt",
]

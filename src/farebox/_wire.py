"""Names both sides of the wire share: farebox's server writes them, its agent reads them.

Spelled once here, so the server and the agent can never drift apart. HTTP header names are
case-insensitive; these are the canonical spellings (compare with ``.lower()``).
"""

from __future__ import annotations

__all__ = [
    "IDEMPOTENCY_KEY",
    "ISSUER_PATH",
    "JWKS_PATH",
    "PAYMENT_IDENTIFIER",
    "PEAC_RECEIPT",
]

#: The PEAC interaction record of a paid response (a compact JWS).
PEAC_RECEIPT = "PEAC-Receipt"
#: The idempotency id of a logical request, as a header (IETF draft ``Idempotency-Key``).
IDEMPOTENCY_KEY = "Idempotency-Key"
#: The x402 extension carrying that id inside a v2 proof (``extensions[...]["info"]["id"]``).
PAYMENT_IDENTIFIER = "payment-identifier"
#: Where an https issuer publishes its PEAC issuer document, and its keys by default.
ISSUER_PATH = "/.well-known/peac-issuer.json"
JWKS_PATH = "/.well-known/jwks.json"

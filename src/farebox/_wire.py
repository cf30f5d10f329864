"""What both sides of the wire share: names farebox's server writes and its agent reads, and the
strict readers of the encodings every protocol here uses (base64url, nested JSON).

Spelled once here, so the server and the agent can never drift apart. HTTP header names are
case-insensitive; these are the canonical spellings (compare with ``.lower()``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

__all__ = [
    "IDEMPOTENCY_KEY",
    "ISSUER_PATH",
    "JWKS_PATH",
    "MAX_JSON_DEPTH",
    "PAYMENT_IDENTIFIER",
    "PEAC_RECEIPT",
    "b64url_decode",
    "b64url_encode",
    "nests_deeper_than",
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


#: How deep decoded JSON may nest in anything farebox reads from a peer.
MAX_JSON_DEPTH = 64

_B64URL_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_VALUE: Final = {c: i for i, c in enumerate(_B64URL_ALPHABET)}
_TO_BASE64: Final = bytes.maketrans(b"-_", b"+/")


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    """Decode unpadded, canonical base64url; :class:`ValueError` saying why otherwise."""
    # "+", "/" and "=" belong to base64, not base64url; after mapping "-" and "_" onto "+" and "/",
    # the strict decoder refuses everything else outside the alphabet.
    if "=" in segment or "+" in segment or "/" in segment or len(segment) % 4 == 1:
        raise ValueError("invalid base64url (padding and other characters refused)")
    try:
        raw = segment.encode("ascii").translate(_TO_BASE64) + b"=" * (-len(segment) % 4)
        data = binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError("invalid base64url") from None
    # The last character may carry bits past the final byte; they must be zero, or one byte string
    # would have several spellings.
    if len(segment) % 4 and _B64URL_VALUE[segment[-1]] & (0x0F if len(segment) % 4 == 2 else 0x03):
        raise ValueError("non-canonical base64url (unused bits set)")
    return data


def nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON containers in ``value`` nest more than ``limit`` deep (iteratively: a hostile
    document cannot exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend(
                (child, depth + 1) for child in item.values() if isinstance(child, (dict, list))
            )
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False

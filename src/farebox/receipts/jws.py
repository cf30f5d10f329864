"""Hazmat: compact JWS with Ed25519 under the PEAC profile.

This layer knows bytes, headers and signatures, not claims. It decodes a compact JWS through steps 1-4
of the PEAC verification order (size and shape, header gate and policy, JOSE hardening, payload gate
and the typ/``peac_version`` coherence check), signs and verifies Ed25519 with the PEAC prechecks, and
encodes base64url. It applies no claim schema: use :mod:`farebox.receipts.records` for that.

Base64url policy: we never emit padding, and we reject it on input, like the Go reference
(``RawURLEncoding``) and the TypeScript x402 adapter (``jws_padded_base64url``); the TypeScript core
decoder is lenient, but a record with ``=`` in it was not made by a conforming issuer. We also reject
non-canonical encodings (unused trailing bits set): otherwise one signature could be spelled several
ways, each with its own ``receipt_ref``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from farebox._wire import b64url_decode as _strict_b64url_decode
from farebox._wire import b64url_encode
from farebox.errors import ReceiptError
from farebox.receipts.ijson import parse_ijson

__all__ = [
    "ALG",
    "MAX_JWS_BYTES",
    "MAX_KID_BYTES",
    "TYP_WIRE01",
    "TYP_WIRE02",
    "TYP_WIRE02_MEDIA",
    "DecodedJws",
    "b64url_decode",
    "b64url_encode",
    "check_wire02_header",
    "decode_compact",
    "ed25519_verify",
    "is_valid_kid",
    "peek_compact",
    "serialize_json",
    "sign_compact",
]

ALG: Final = "EdDSA"
TYP_WIRE02: Final = "interaction-record+jwt"
TYP_WIRE02_MEDIA: Final = "application/interaction-record+jwt"
TYP_WIRE01: Final = "peac-receipt/0.1"
_ACCEPTED_TYPS: Final = frozenset({TYP_WIRE01, TYP_WIRE02, TYP_WIRE02_MEDIA})

MAX_JWS_BYTES: Final = 262_144
MAX_KID_BYTES: Final = 256

_E_FORMAT: Final = "E_INVALID_FORMAT"


# --- base64url and JSON ----------------------------------------------------------------------------


def b64url_decode(segment: str) -> bytes:
    """Decode unpadded, canonical base64url, or raise ``E_INVALID_FORMAT``."""
    try:
        return _strict_b64url_decode(segment)
    except ValueError as exc:
        raise ReceiptError(_E_FORMAT, str(exc)) from None


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def serialize_json(value: Any) -> bytes:
    """The bytes an issuer signs: what ``JSON.stringify`` emits for the same JSON value.

    Compact separators, raw UTF-8 (``ensure_ascii=False``) and insertion order match the reference
    issuer byte for byte on strings, booleans, null and safe integers. A lone surrogate cannot be
    encoded as UTF-8 and is reported as the I-JSON violation it is.
    """
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        raise ReceiptError("E_IJSON_INVALID_STRING", "string holds a lone surrogate") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise ReceiptError(
            _E_FORMAT, f"value is not JSON-serializable: {type(exc).__name__}"
        ) from None


# --- header policy ---------------------------------------------------------------------------------


def is_valid_kid(kid: object) -> bool:
    """A kid is a non-empty, well-formed Unicode string of at most 256 UTF-8 bytes."""
    if not isinstance(kid, str) or not kid:
        return False
    try:
        return len(kid.encode("utf-8")) <= MAX_KID_BYTES
    except UnicodeEncodeError:  # a lone surrogate: not well-formed Unicode
        return False


def check_wire02_header(header: Mapping[str, Any]) -> None:
    """JOSE hardening for Wire 0.2 and untyped headers, in the reference order; first failure wins."""
    if not is_valid_kid(header.get("kid")):
        raise ReceiptError(
            "E_JWS_MISSING_KID", f"kid is missing, empty, or over {MAX_KID_BYTES} UTF-8 bytes"
        )
    if any(name in header for name in ("jwk", "x5c", "x5u", "jku")):
        raise ReceiptError("E_JWS_EMBEDDED_KEY", "embedded key material (jwk/x5c/x5u/jku) refused")
    if "crit" in header:
        raise ReceiptError("E_JWS_CRIT_REJECTED", "crit header refused")
    if header.get("b64", True) is False:
        raise ReceiptError("E_JWS_B64_REJECTED", "b64:false (unencoded payload) refused")
    if "zip" in header:
        raise ReceiptError("E_JWS_ZIP_REJECTED", "zip header refused")


def _header_typ(header: Mapping[str, Any]) -> str | None:
    """Check ``alg`` then ``typ``; return the typ normalised to its compact form (None if absent)."""
    if header.get("alg") != ALG:
        raise ReceiptError(_E_FORMAT, f"alg must be {ALG}")
    if "typ" not in header:
        return None
    typ = header["typ"]
    if not isinstance(typ, str) or typ not in _ACCEPTED_TYPS:
        raise ReceiptError(_E_FORMAT, "unsupported typ")
    return TYP_WIRE02 if typ == TYP_WIRE02_MEDIA else typ


# --- decode ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodedJws:
    """A compact JWS that passed steps 1-4 of the verification order. Its signature is NOT checked."""

    header: Mapping[str, Any]
    typ: str | None  # TYP_WIRE02, TYP_WIRE01, or None when the header has no typ
    kid: str
    payload: Any
    payload_bytes: bytes = field(repr=False)
    signing_input: bytes = field(repr=False)
    signature: bytes = field(repr=False)


def _split(jws: object) -> tuple[str, str, str]:
    if not isinstance(jws, str):
        raise ReceiptError(_E_FORMAT, "a compact JWS is a string")
    if len(jws) > MAX_JWS_BYTES:
        raise ReceiptError(_E_FORMAT, f"JWS exceeds {MAX_JWS_BYTES} bytes")
    parts = jws.split(".")
    if len(parts) != 3:
        raise ReceiptError(_E_FORMAT, "a compact JWS has three dot-separated parts")
    return parts[0], parts[1], parts[2]


def _decode_header(header_b64: str) -> tuple[Mapping[str, Any], str | None]:
    """Steps 2 and 3 for one header segment: the gated header (read-only) and its normalised typ."""
    header = parse_ijson(b64url_decode(header_b64))
    if not isinstance(header, dict):
        raise ReceiptError(_E_FORMAT, "JWS header is not a JSON object")
    typ = _header_typ(header)
    if typ != TYP_WIRE01:
        check_wire02_header(header)
    return MappingProxyType(header), typ


# Failures raise and are not cached; the header comes back read-only because callers share it.
_decode_header_cached: Final = functools.lru_cache(maxsize=256)(_decode_header)


def decode_compact(jws: object) -> DecodedJws:
    """Split, decode and gate a compact JWS, applying the header policy and the coherence check.

    Raises :class:`ReceiptError` with ``E_INVALID_FORMAT``, an ``E_IJSON_*`` code, an ``E_JWS_*``
    code or ``E_WIRE_VERSION_MISMATCH``, in the reference precedence.
    """
    header_b64, payload_b64, signature_b64 = _split(jws)

    # An issuer's header repeats on every record; short ones are worth remembering.
    decode_header = _decode_header_cached if len(header_b64) <= 1024 else _decode_header
    header, typ = decode_header(header_b64)
    payload_bytes = b64url_decode(payload_b64)
    payload = parse_ijson(payload_bytes)
    if typ is not None:
        version = payload.get("peac_version") if isinstance(payload, dict) else None
        if (typ == TYP_WIRE02) != (version == "0.2"):
            raise ReceiptError(
                "E_WIRE_VERSION_MISMATCH",
                f"typ {typ} does not match peac_version {version!r}",
                {"pointer": "/peac_version"},
            )

    kid = header.get("kid")
    return DecodedJws(
        header=header,
        typ=typ,
        kid=kid if isinstance(kid, str) else "",
        payload=payload,
        payload_bytes=payload_bytes,
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=b64url_decode(signature_b64),
    )


def peek_compact(jws: object) -> tuple[Any, Any]:
    """Decode header and payload WITHOUT any policy or signature check, for inspection only.

    The size limit and the I-JSON gate still apply: inspecting hostile input must stay cheap.
    """
    header_b64, payload_b64, _ = _split(jws)
    return parse_ijson(b64url_decode(header_b64)), parse_ijson(b64url_decode(payload_b64))


def sign_compact(header: bytes, payload: bytes, sign: Callable[[bytes], bytes]) -> str:
    """Hazmat: the compact JWS over exactly these header and payload bytes. No checks at all.

    The safe recipe is :func:`farebox.receipts.records.issue_receipt`; tests use this to build the
    malformed tokens a conforming issuer must never produce.
    """
    signing_input = f"{b64url_encode(header)}.{b64url_encode(payload)}"
    return f"{signing_input}.{b64url_encode(sign(signing_input.encode('ascii')))}"


# --- Ed25519 under the PEAC profile ----------------------------------------------------------------

_P: Final = 2**255 - 19
_L: Final = 2**252 + 27742317777372353535851937790883648493
_Y_MASK: Final = (1 << 255) - 1

# Canonical encodings of the eight points of small order (the torsion subgroup): the identity, the
# point of order 2, the two of order 4 and the four of order 8.
_TORSION: Final = frozenset(
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    )
)
# Two mixed-order encodings (order 4L) that the PEAC profile rejects by policy since 0.16.3.
_PEAC_MIXED_ORDER: Final = frozenset(
    bytes.fromhex(h)
    for h in (
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac0305",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac0385",
    )
)


def _point_rejected(encoding: bytes) -> bool:
    """The PEAC admissibility precheck for a point encoding (A or R); see ``ed25519_verify``."""
    value = int.from_bytes(encoding, "little")
    y = value & _Y_MASK
    if y >= _P:
        return True
    if value >> 255 and y in (1, _P - 1):  # x = 0 has no negative: the sign bit must be clear
        return True
    return encoding in _TORSION or encoding in _PEAC_MIXED_ORDER


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Ed25519 under the PEAC verification profile: prechecks, then cofactorless verification.

    The prechecks make the verdict independent of the primitive underneath (OpenSSL alone accepts
    four ed25519-speccheck vectors that PEAC rejects): reject a key or R whose encoded y is >= p, that
    encodes x = 0 with the sign bit set, that is one of the 8 torsion points or one of the 2 listed
    order-4L points; reject S >= L. ``cryptography`` (OpenSSL) then verifies cofactorlessly.
    """
    if len(public_key) != 32 or len(signature) != 64:
        return False
    if _point_rejected(public_key):
        return False
    if int.from_bytes(signature[32:], "little") >= _L:
        return False
    if _point_rejected(signature[:32]):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True

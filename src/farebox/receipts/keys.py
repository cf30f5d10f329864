"""Ed25519 signing keys, their public forms (JWK, JWKS, did:key) and the PEAC discovery documents.

A :class:`SigningKey` never shows its private half: not in ``repr``/``str``, not in an exception. The
only way the seed leaves the process is :func:`save_signing_key`, which writes a file of mode 0600.

Discovery documents are parsed here, never fetched: fetching (HTTPS only, SSRF limits, caching) is
an I/O concern of the layer above. The parsers apply the PEAC size and shape limits so that a hostile
document costs little.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from farebox.errors import ConfigError, ReceiptError
from farebox.receipts.ijson import parse_ijson
from farebox.receipts.jws import ALG, TYP_WIRE02, b64url_decode, b64url_encode, is_valid_kid

__all__ = [
    "ISSUER_CONFIG_VERSION",
    "MAX_DOCUMENT_BYTES",
    "MAX_JWKS_KEYS",
    "IssuerConfig",
    "Jwks",
    "PublicJwk",
    "RevokedKey",
    "SigningKey",
    "did_key_from_public_key",
    "https_origin",
    "issuer_config_document",
    "jwk_thumbprint",
    "jwks_document",
    "load_signing_key",
    "parse_issuer_config",
    "parse_jwks",
    "public_jwk",
    "public_key_from_did_key",
    "save_signing_key",
]

ISSUER_CONFIG_VERSION: Final = "peac-issuer/0.1"
MAX_DOCUMENT_BYTES: Final = 65_536
MAX_DOCUMENT_DEPTH: Final = 4
MAX_JWKS_KEYS: Final = 20
MAX_REVOKED_KEYS: Final = 100
REVOCATION_REASONS: Final = frozenset(
    {"key_compromise", "superseded", "cessation_of_operation", "privilege_withdrawn"}
)


def jwk_thumbprint(public_key: bytes) -> str:
    """The RFC 7638 SHA-256 thumbprint of an Ed25519 public key, base64url (43 characters)."""
    canonical = f'{{"crv":"Ed25519","kty":"OKP","x":"{b64url_encode(public_key)}"}}'
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def public_jwk(public_key: bytes, kid: str) -> dict[str, str]:
    """The public JWK of an Ed25519 key, as PEAC JWKS documents carry it."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url_encode(public_key),
        "kid": kid,
        "use": "sig",
        "alg": ALG,
    }


class SigningKey:
    """An Ed25519 private key with its key id. The private half is never shown.

    ``kid`` defaults to the RFC 7638 thumbprint of the public key: stable, 43 characters (the
    Wire 0.1 schema wants at least 8), and never reused for a different key.
    """

    __slots__ = ("_private", "kid", "public_key")

    _private: Ed25519PrivateKey
    kid: str
    public_key: bytes

    def __init__(self, private: Ed25519PrivateKey, kid: str | None = None) -> None:
        public_key = private.public_key().public_bytes_raw()
        kid = jwk_thumbprint(public_key) if kid is None else kid
        if not is_valid_kid(kid):
            raise ConfigError("kid must be 1-256 UTF-8 bytes of well-formed Unicode")
        self._private = private
        self.kid = kid
        self.public_key = public_key

    @classmethod
    def generate(cls, kid: str | None = None) -> SigningKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate(), kid)

    @classmethod
    def from_seed(cls, seed: bytes, kid: str | None = None) -> SigningKey:
        """The key whose RFC 8032 private seed is ``seed`` (32 bytes)."""
        if len(seed) != 32:
            raise ConfigError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed), kid)

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data`` (64 bytes)."""
        return self._private.sign(data)

    def public_jwk(self) -> dict[str, str]:
        """This key's public JWK, with its kid."""
        return public_jwk(self.public_key, self.kid)

    @property
    def did_key(self) -> str:
        """This key as a self-certifying ``did:key`` issuer (for servers without an https origin)."""
        return did_key_from_public_key(self.public_key)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("SigningKey cannot be pickled; use save_signing_key")


# --- key files -------------------------------------------------------------------------------------


def save_signing_key(
    key: SigningKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Write ``key`` as a private JWK to ``path`` with mode 0600.

    Without ``overwrite`` an existing file is never touched (``O_EXCL``). With it, the new file is
    written beside the old one with mode 0600 and renamed over it, so no moment exists where the
    secret sits in a file with looser permissions.
    """
    target = Path(path)
    document = dict(key.public_jwk())
    document["d"] = b64url_encode(key._private.private_bytes_raw())
    data = (json.dumps(document, indent=2) + "\n").encode("ascii")
    if not overwrite:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{target} exists; refusing to overwrite a key file") from None
        except OSError as exc:
            raise ConfigError(f"cannot create {target}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return
    fd, temp = tempfile.mkstemp(prefix=".farebox-key-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp creates the file with mode 0600
            fh.write(data)
        os.replace(temp, target)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise ConfigError(f"cannot write {target}: {exc.strerror}") from None


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Read a key file written by :func:`save_signing_key` (an Ed25519 private JWK)."""
    target = Path(path)
    try:
        with target.open("rb") as fh:
            raw = fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read key file {target}: {exc.strerror}") from None
    # Error messages below name the file and the problem, never the content: it holds the secret.
    problem = f"{target} is not an Ed25519 private JWK"
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ConfigError(problem)
    try:
        doc = parse_ijson(raw)
    except ReceiptError:
        raise ConfigError(problem) from None
    if not isinstance(doc, dict) or doc.get("kty") != "OKP" or doc.get("crv") != "Ed25519":
        raise ConfigError(problem)
    d, x, kid = doc.get("d"), doc.get("x"), doc.get("kid")
    if not isinstance(d, str) or not isinstance(x, str) or not (kid is None or is_valid_kid(kid)):
        raise ConfigError(problem)
    try:
        key = SigningKey.from_seed(b64url_decode(d), kid)
        declared = b64url_decode(x)
    except (ReceiptError, ConfigError):
        raise ConfigError(problem) from None
    if declared != key.public_key:
        raise ConfigError(f"{target}: the public key x does not match the private key d")
    return key


# --- did:key ---------------------------------------------------------------------------------------

_B58_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX: Final = {c: i for i, c in enumerate(_B58_ALPHABET)}
_ED25519_PUB_MULTICODEC: Final = b"\xed\x01"
_DID_KEY_PREFIX: Final = "did:key:z"


def _b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_B58_ALPHABET[rem])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        number = number * 58 + _B58_INDEX[char]  # KeyError on a character outside the alphabet
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return b"\0" * zeros + body


def did_key_from_public_key(public_key: bytes) -> str:
    """``did:key:z6Mk...``: multicodec ed25519-pub (0xed01) + the key, in base58btc."""
    if len(public_key) != 32:
        raise ConfigError("an Ed25519 public key is 32 bytes")
    return _DID_KEY_PREFIX + _b58encode(_ED25519_PUB_MULTICODEC + public_key)


def public_key_from_did_key(did: str) -> bytes:
    """The Ed25519 public key a ``did:key`` names, or ``E_DID_RESOLUTION_FAILED``.

    Only the canonical spelling is accepted (re-encoding must give the same DID), so one key has one
    issuer string.
    """
    failure = ReceiptError("E_DID_RESOLUTION_FAILED", "not an Ed25519 did:key", {"pointer": "/iss"})
    if not isinstance(did, str) or not did.startswith(_DID_KEY_PREFIX) or len(did) > 128:
        raise failure
    try:
        decoded = _b58decode(did[len(_DID_KEY_PREFIX) :])
    except KeyError:
        raise failure from None
    if len(decoded) != 34 or not decoded.startswith(_ED25519_PUB_MULTICODEC):
        raise failure
    public_key = decoded[2:]
    if did_key_from_public_key(public_key) != did:
        raise failure
    return public_key


# --- JWKS ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublicJwk:
    """One Ed25519 verification key from a JWKS."""

    kid: str
    public_key: bytes


@dataclass(frozen=True, slots=True)
class Jwks:
    """The Ed25519 keys of a JWK set, looked up by kid."""

    keys: tuple[PublicJwk, ...]

    def find(self, kid: str) -> bytes | None:
        """The public key with this kid, or None."""
        for key in self.keys:
            if key.kid == kid:
                return key.public_key
        return None


def jwks_document(keys: Iterable[SigningKey]) -> dict[str, list[dict[str, str]]]:
    """The JWKS a server publishes for its signing keys (public halves only)."""
    return {"keys": [key.public_jwk() for key in keys]}


def _parse_document(data: bytes | str, code: str, what: str) -> dict[str, Any]:
    # A str of n characters encodes to at least n bytes: refuse a giant before copying it.
    too_long = isinstance(data, str) and len(data) > MAX_DOCUMENT_BYTES
    raw = b"" if too_long else data.encode("utf-8") if isinstance(data, str) else data
    if too_long or len(raw) > MAX_DOCUMENT_BYTES:
        too_large = "E_VERIFY_JWKS_TOO_LARGE" if code == "E_VERIFY_JWKS_INVALID" else code
        raise ReceiptError(too_large, f"{what} exceeds {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = parse_ijson(raw)
    except ReceiptError as exc:
        # Duplicate names, comments and trailing commas all end here: strict JSON only.
        raise ReceiptError(code, f"{what} is not strict JSON", {"parse_code": exc.code}) from None
    if not isinstance(doc, dict):
        raise ReceiptError(code, f"{what} is not a JSON object")
    if _depth(doc) > MAX_DOCUMENT_DEPTH:
        raise ReceiptError(code, f"{what} nests deeper than {MAX_DOCUMENT_DEPTH}")
    return doc


def _depth(value: Any) -> int:
    """Container nesting depth: a flat object is 1."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_jwks(data: bytes | str) -> Jwks:
    """Parse a JWKS document (at most 64 KiB and 20 keys); keys other than Ed25519 are skipped.

    Codes: ``E_VERIFY_JWKS_TOO_LARGE``, ``E_VERIFY_JWKS_TOO_MANY_KEYS``, ``E_VERIFY_JWKS_INVALID``.
    """
    code = "E_VERIFY_JWKS_INVALID"
    doc = _parse_document(data, code, "JWKS")
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise ReceiptError(code, "JWKS has no keys array")
    if len(entries) > MAX_JWKS_KEYS:
        raise ReceiptError(
            "E_VERIFY_JWKS_TOO_MANY_KEYS", f"JWKS has more than {MAX_JWKS_KEYS} keys"
        )
    keys: list[PublicJwk] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ReceiptError(code, "a JWKS key is not an object", {"pointer": f"/keys/{index}"})
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        kid, x = entry.get("kid"), entry.get("x")
        if "d" in entry:
            raise ReceiptError(code, "JWKS publishes a private key", {"pointer": f"/keys/{index}"})
        if entry.get("alg", ALG) != ALG or entry.get("use", "sig") != "sig":
            continue
        if not isinstance(kid, str) or not is_valid_kid(kid) or not isinstance(x, str):
            raise ReceiptError(code, "JWKS key lacks a kid or x", {"pointer": f"/keys/{index}"})
        try:
            public_key = b64url_decode(x)
        except ReceiptError:
            public_key = b""
        if len(public_key) != 32:
            raise ReceiptError(code, "JWKS key x is not 32 bytes", {"pointer": f"/keys/{index}/x"})
        if any(k.kid == kid for k in keys):
            raise ReceiptError(code, "JWKS repeats a kid", {"pointer": f"/keys/{index}/kid"})
        keys.append(PublicJwk(kid, public_key))
    return Jwks(tuple(keys))


# --- peac-issuer.json ------------------------------------------------------------------------------

_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})"
)


def https_origin(url: object) -> str | None:
    """The origin (``https://host[:port]``) of an https URL, as WHATWG ``URL.origin`` has it."""
    if not isinstance(url, str) or any(c.isspace() or ord(c) < 0x20 for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() != "https" or not parts.hostname or "@" in parts.netloc:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}" if port in (None, 443) else f"https://{host}:{port}"


@dataclass(frozen=True, slots=True)
class RevokedKey:
    """An entry of ``revoked_keys``: this kid must no longer verify anything."""

    kid: str
    revoked_at: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """A parsed ``/.well-known/peac-issuer.json`` (``peac-issuer/0.1``)."""

    issuer: str
    jwks_uri: str
    receipt_versions: tuple[str, ...] = (TYP_WIRE02,)
    algorithms: tuple[str, ...] = (ALG,)
    payment_rails: tuple[str, ...] = ()
    revoked_keys: tuple[RevokedKey, ...] = ()
    verify_endpoint: str | None = None
    security_contact: str | None = None

    @property
    def revoked_kids(self) -> frozenset[str]:
        """The kids listed as revoked."""
        return frozenset(key.kid for key in self.revoked_keys)

    def to_document(self) -> dict[str, Any]:
        """The JSON document, in the member order of the PEAC example."""
        doc: dict[str, Any] = {
            "version": ISSUER_CONFIG_VERSION,
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
        }
        if self.verify_endpoint is not None:
            doc["verify_endpoint"] = self.verify_endpoint
        doc["receipt_versions"] = list(self.receipt_versions)
        doc["algorithms"] = list(self.algorithms)
        if self.payment_rails:
            doc["payment_rails"] = list(self.payment_rails)
        if self.security_contact is not None:
            doc["security_contact"] = self.security_contact
        if self.revoked_keys:
            doc["revoked_keys"] = [
                {"kid": k.kid, "revoked_at": k.revoked_at}
                | ({"reason": k.reason} if k.reason is not None else {})
                for k in self.revoked_keys
            ]
        return doc


def issuer_config_document(
    issuer: str,
    jwks_uri: str,
    *,
    payment_rails: Iterable[str] = (),
    revoked_keys: Iterable[RevokedKey] = (),
    verify_endpoint: str | None = None,
    security_contact: str | None = None,
) -> dict[str, Any]:
    """Build the ``peac-issuer.json`` a server publishes. ``issuer`` must be a bare https origin."""
    if https_origin(issuer) != issuer:
        raise ConfigError("issuer must be a bare https origin such as https://api.example.com")
    if https_origin(jwks_uri) is None:
        raise ConfigError("jwks_uri must be an https URL")
    config = IssuerConfig(
        issuer=issuer,
        jwks_uri=jwks_uri,
        payment_rails=tuple(payment_rails),
        revoked_keys=tuple(revoked_keys),
        verify_endpoint=verify_endpoint,
        security_contact=security_contact,
    )
    # Parsing our own output keeps builder and parser honest with each other.
    return parse_issuer_config(json.dumps(config.to_document())).to_document()


def _strings(doc: Mapping[str, Any], name: str, code: str) -> tuple[str, ...]:
    value = doc.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReceiptError(code, f"{name} must be an array of strings", {"pointer": f"/{name}"})
    return tuple(value)


def parse_issuer_config(data: bytes | str, *, expected_issuer: str | None = None) -> IssuerConfig:
    """Parse and check a ``peac-issuer.json`` document; unknown members are ignored.

    With ``expected_issuer`` (the record's ``iss``), the document's issuer must have the same origin
    (``E_VERIFY_ISSUER_MISMATCH``). Other codes: ``E_VERIFY_ISSUER_CONFIG_INVALID``,
    ``E_VERIFY_JWKS_URI_INVALID``. Inline ``keys`` are never used: keys come only from ``jwks_uri``.
    """
    code = "E_VERIFY_ISSUER_CONFIG_INVALID"
    doc = _parse_document(data, code, "issuer config")
    if doc.get("version") != ISSUER_CONFIG_VERSION:
        raise ReceiptError(
            code, f"version must be {ISSUER_CONFIG_VERSION}", {"pointer": "/version"}
        )
    issuer = doc.get("issuer")
    origin = https_origin(issuer)
    if origin is None or not isinstance(issuer, str):
        raise ReceiptError(code, "issuer must be an https URL", {"pointer": "/issuer"})
    jwks_uri = doc.get("jwks_uri")
    if https_origin(jwks_uri) is None or not isinstance(jwks_uri, str):
        raise ReceiptError(
            "E_VERIFY_JWKS_URI_INVALID", "jwks_uri must be an https URL", {"pointer": "/jwks_uri"}
        )
    if expected_issuer is not None and https_origin(expected_issuer) != origin:
        raise ReceiptError("E_VERIFY_ISSUER_MISMATCH", "issuer config names another issuer")
    revoked_raw = doc.get("revoked_keys", [])
    if not isinstance(revoked_raw, list) or len(revoked_raw) > MAX_REVOKED_KEYS:
        raise ReceiptError(
            code, "revoked_keys must be a list of at most 100", {"pointer": "/revoked_keys"}
        )
    revoked: list[RevokedKey] = []
    for index, entry in enumerate(revoked_raw):
        pointer = {"pointer": f"/revoked_keys/{index}"}
        if not isinstance(entry, dict) or not is_valid_kid(entry.get("kid")):
            raise ReceiptError(code, "a revoked key needs a valid kid", pointer)
        revoked_at, reason = entry.get("revoked_at"), entry.get("reason")
        if not isinstance(revoked_at, str) or _RFC3339.fullmatch(revoked_at) is None:
            raise ReceiptError(code, "revoked_at must be an RFC 3339 time", pointer)
        if reason is not None and reason not in REVOCATION_REASONS:
            raise ReceiptError(code, "unknown revocation reason", pointer)
        revoked.append(RevokedKey(entry["kid"], revoked_at, reason))
    optional = {}
    for name in ("verify_endpoint", "security_contact"):
        value = doc.get(name)
        if value is not None and not isinstance(value, str):
            raise ReceiptError(code, f"{name} must be a string", {"pointer": f"/{name}"})
        optional[name] = value
    return IssuerConfig(
        issuer=issuer,
        jwks_uri=jwks_uri,
        receipt_versions=_strings(doc, "receipt_versions", code) or (TYP_WIRE02,),
        algorithms=_strings(doc, "algorithms", code) or (ALG,),
        payment_rails=_strings(doc, "payment_rails", code),
        revoked_keys=tuple(revoked),
        verify_endpoint=optional["verify_endpoint"],
        security_contact=optional["security_contact"],
    )

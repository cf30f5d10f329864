"""The MPP ``Payment`` HTTP authentication scheme on the wire, sans I/O.

Spec: ``draft-httpauth-payment`` (tempoxyz/mpp-specs ``specs/core/draft-httpauth-payment-00.md``),
the ``charge`` intent (``specs/intents/draft-payment-intent-charge-00.md``) and the Stripe method
(``specs/methods/stripe/draft-stripe-charge-00.md``). Byte-level choices follow the official Python
SDK ``pympp`` 0.16.0 where the draft leaves room, so that each side reads the other.

- Challenge: ``WWW-Authenticate: Payment id="…", realm="…", method="…", intent="…", request="…"``
  with optional ``expires`` (RFC 3339), ``digest``, ``description``, ``opaque`` and ``header``.
  ``request`` and ``opaque`` are unpadded base64url of JCS (RFC 8785) JSON.
- Credential: ``Authorization: Payment <base64url-nopad JSON {challenge, payload, source?}>``.
- Receipt: ``Payment-Receipt: <base64url-nopad JSON {status, method, timestamp, reference, …}>``.
- Preferences: ``Accept-Payment: stripe/charge, tempo/*;q=0.5``.

Parsing is strict and bounded and raises only :class:`~farebox.errors.PaymentError`. Rendering a
value that cannot go on the wire (a control character, a negative amount) is a programming mistake
and raises :class:`~farebox.errors.ConfigError`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Literal, TypeGuard

import rfc8785

from farebox._wire import MAX_JSON_DEPTH, b64url_decode, b64url_encode, nests_deeper_than
from farebox.errors import ConfigError, PaymentError
from farebox.protocol.models import EMPTY

__all__ = [
    "ACCEPT_PAYMENT",
    "AUTHORIZATION",
    "MAX_ACCEPT_PAYMENT_BYTES",
    "MAX_AUTHORIZATION_BYTES",
    "MAX_RECEIPT_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_WWW_AUTHENTICATE_BYTES",
    "PAYMENT_AUTHORIZATION",
    "PAYMENT_RECEIPT",
    "PROBLEM_TYPE_BASE",
    "WWW_AUTHENTICATE",
    "Challenge",
    "ChallengeEcho",
    "ChargeRequest",
    "Credential",
    "PaymentRange",
    "Receipt",
    "StripeDetails",
    "StripePayload",
    "b64url_jcs",
    "challenge_id",
    "format_rfc3339",
    "is_spt",
    "issue_challenge",
    "parse_accept_payment",
    "parse_authorization",
    "parse_payment_receipt",
    "parse_rfc3339",
    "parse_www_authenticate",
    "problem_type",
    "read_stripe_payload",
    "render_accept_payment",
    "render_authorization",
    "render_payment_receipt",
    "render_www_authenticate",
    "render_www_authenticate_lines",
    "select_challenges",
    "verify_credential",
]

WWW_AUTHENTICATE = "WWW-Authenticate"
AUTHORIZATION = "Authorization"
PAYMENT_AUTHORIZATION = "Payment-Authorization"
PAYMENT_RECEIPT = "Payment-Receipt"
ACCEPT_PAYMENT = "Accept-Payment"
PROBLEM_TYPE_BASE = "https://paymentauth.org/problems/"

# pympp and mppx cap a decoded challenge payload at 16 KiB and an Authorization value at 64 KiB (a
# credential echoes a request that may itself be 16 KiB, grown by JSON and base64url): the same
# bounds here mean every value they emit is read, and nothing much larger is held.
MAX_REQUEST_BYTES = 16 * 1024
MAX_WWW_AUTHENTICATE_BYTES = 32 * 1024
MAX_AUTHORIZATION_BYTES = 64 * 1024
MAX_RECEIPT_BYTES = 16 * 1024
MAX_ACCEPT_PAYMENT_BYTES = 4096
_MAX_RANGES = 64
_MAX_PARAMS = 32
_MAX_STR = 2048
# Minor units as a decimal string: 78 digits hold any uint256, far beyond any card charge.
_MAX_AMOUNT_DIGITS = 78

_SCHEME = "payment"
_TCHAR = r"!#$%&'*+.^_`|~0-9A-Za-z-"
_TOKEN_RE = re.compile(f"[{_TCHAR}]+")
_TOKEN68_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")
# The draft says 1*LOWERALPHA; pympp, mppx and mpp-rs accept this wider grammar ("tempo-v2",
# "vendor:method"), and reading what they emit matters more than refusing it.
_METHOD_RE = re.compile(r"[a-z][a-z0-9:_-]*")
_INTENT_RE = re.compile(r"[A-Za-z0-9-]+")
_AMOUNT_RE = re.compile(r"0|[1-9][0-9]*")
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)
_QVALUE_RE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_HEX = frozenset("0123456789abcdefABCDEF")


def _bad(message: str) -> PaymentError:
    return PaymentError("invalid_payload", message)


# --- problem types ---------------------------------------------------------------------------------

# farebox reason codes to the draft's RFC 9457 problem types (Error Handling section).
_PROBLEMS: Mapping[str, str] = MappingProxyType(
    {
        "invalid_payload": "malformed-credential",
        "payload_too_large": "malformed-credential",
        "invalid_challenge": "invalid-challenge",
        "payment_expired": "payment-expired",
        "unsupported_scheme": "method-unsupported",
        "insufficient_funds": "payment-insufficient",
        "proof_replayed": "invalid-challenge",
    }
)


def problem_type(code: str | None) -> str:
    """The MPP problem ``type`` URI for a farebox reason code; ``None`` means payment required.

    Codes without a dedicated MPP type are ``verification-failed``.
    """
    if code is None:
        return PROBLEM_TYPE_BASE + "payment-required"
    return PROBLEM_TYPE_BASE + _PROBLEMS.get(code, "verification-failed")


# --- JSON and base64url ----------------------------------------------------------------------------


def _deep_freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _deep_freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_deep_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_thaw(v) for v in value]
    return value


def b64url_jcs(value: Mapping[str, Any]) -> str:
    """Unpadded base64url of the JCS (RFC 8785) serialization of ``value``.

    The draft requires exactly this for ``request`` and ``opaque``, because the challenge binding
    covers the encoded string as it appears on the wire.
    """
    try:
        return b64url_encode(rfc8785.dumps(_thaw(value)))
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"value cannot be serialized as JCS: {exc}") from None


def _b64url_decode(value: str, what: str) -> bytes:
    # Strict: the unpadded url-safe alphabet only, no length that no encoder produces, and no
    # non-zero trailing bits (otherwise several strings would decode to the same bytes).
    try:
        return b64url_decode(value)
    except ValueError as exc:
        raise _bad(f"{what} is not canonical unpadded base64url ({exc})") from None


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        # The stdlib decoder with hooks: duplicate names and NaN/Infinity are refused (orjson would
        # resolve duplicates silently), and the size bound checked earlier keeps this cheap.
        obj = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad(f"{what} must be a JSON object")
    if nests_deeper_than(obj, MAX_JSON_DEPTH):
        raise _bad(f"{what} nests deeper than {MAX_JSON_DEPTH}")
    try:
        # A lone surrogate escape decodes but cannot be encoded again (for JCS or the HMAC).
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{what} contains a lone surrogate") from None
    return obj


def _jcs_object(value: str, what: str, max_bytes: int) -> dict[str, Any]:
    """Decode unpadded base64url of JCS JSON, insisting the bytes are exactly canonical."""
    if len(value) > max_bytes:
        raise PaymentError("payload_too_large", f"{what} exceeds {max_bytes} bytes")
    raw = _b64url_decode(value, what)
    obj = _json_object(raw, what)
    try:
        canonical = rfc8785.dumps(obj)
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError):
        raise _bad(f"{what} cannot be canonicalized") from None
    if canonical != raw:
        # The binding covers the wire string; accepting a non-canonical form would let two
        # strings mean one request, and the draft requires JCS.
        raise _bad(f"{what} is not JCS (RFC 8785) canonical JSON")
    return obj


# --- RFC 3339 --------------------------------------------------------------------------------------


def parse_rfc3339(value: str) -> datetime:
    """An aware datetime from an RFC 3339 ``date-time``; anything else raises ``invalid_payload``."""
    match = _RFC3339_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise _bad("timestamp is not an RFC 3339 date-time")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        tz = UTC
        if offset not in ("Z", "z"):
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError("offset out of range")
            delta = timedelta(hours=hours, minutes=minutes)
            tz = timezone(delta if offset[0] == "+" else -delta)
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=tz
        )
    except (ValueError, OverflowError):
        raise _bad("timestamp is not a valid date-time") from None


def format_rfc3339(moment: datetime | float) -> str:
    """``moment`` (aware datetime or unix seconds) in UTC as ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``."""
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            raise ConfigError("timestamp must be timezone-aware")
        moment = moment.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(moment, UTC)
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


# --- values ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """The decoded ``request`` of a ``charge`` challenge (intent draft, Request Schema).

    ``amount`` is in minor units (cents for ``usd``); on the wire it is a decimal string.
    ``method_details`` holds the method's object (for Stripe: ``networkId``, ``paymentMethodTypes``,
    ``metadata``; see :class:`StripeDetails`). ``extensions`` keeps any other top-level member
    verbatim, so that a request read from the wire encodes back to the same bytes.
    """

    amount: int
    currency: str
    recipient: str | None = None
    description: str | None = None
    external_id: str | None = None
    method_details: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    extensions: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method_details", _deep_freeze(self.method_details))
        object.__setattr__(self, "extensions", _deep_freeze(self.extensions))

    def to_json(self) -> dict[str, Any]:
        """The wire object (camelCase, absent members omitted)."""
        if isinstance(self.amount, bool) or not isinstance(self.amount, int) or self.amount < 0:
            raise ConfigError("amount must be a non-negative int of minor units")
        clash = set(self.extensions) & _REQUEST_KEYS
        if clash:
            raise ConfigError(f"extensions repeat request members: {sorted(clash)}")
        wire: dict[str, Any] = _thaw(self.extensions)
        wire["amount"] = str(self.amount)
        wire["currency"] = self.currency
        for key, value in (
            ("recipient", self.recipient),
            ("description", self.description),
            ("externalId", self.external_id),
        ):
            if value is not None:
                wire[key] = value
        if self.method_details:
            wire["methodDetails"] = _thaw(self.method_details)
        return wire

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChargeRequest:
        """Read the wire object; wrong types raise ``invalid_payload``."""
        amount = data.get("amount")
        if (
            not isinstance(amount, str)
            or len(amount) > _MAX_AMOUNT_DIGITS
            or not _AMOUNT_RE.fullmatch(amount)
        ):
            raise _bad("request.amount must be a decimal string of minor units")
        currency = _req_str(data, "currency", "request")
        details = data.get("methodDetails", EMPTY)
        if not isinstance(details, Mapping):
            raise _bad("request.methodDetails must be an object")
        return cls(
            amount=int(amount),
            currency=currency,
            recipient=_opt_str(data, "recipient", "request"),
            description=_opt_str(data, "description", "request"),
            external_id=_opt_str(data, "externalId", "request"),
            method_details=details,
            extensions={k: v for k, v in data.items() if k not in _REQUEST_KEYS},
        )


_REQUEST_KEYS = frozenset(
    {"amount", "currency", "recipient", "description", "externalId", "methodDetails"}
)


def _req_str(data: Mapping[str, Any], key: str, where: str, *, limit: int = _MAX_STR) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _bad(f"{where}.{key} must be a non-empty string")
    return value


def _opt_str(data: Mapping[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_STR:
        raise _bad(f"{where}.{key} must be a string")
    return value


@dataclass(frozen=True, slots=True)
class StripeDetails:
    """``methodDetails`` of a Stripe ``charge`` request (draft-stripe-charge).

    ``network_id`` is the seller's Stripe profile (``profile_…``) the agent mints its Shared
    Payment Token for.
    """

    network_id: str
    payment_method_types: tuple[str, ...] = ("card",)
    metadata: Mapping[str, str] = field(default_factory=lambda: EMPTY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "payment_method_types", tuple(self.payment_method_types))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def to_json(self) -> dict[str, Any]:
        """The wire ``methodDetails`` object."""
        if not self.payment_method_types:
            raise ConfigError("paymentMethodTypes needs at least one entry")
        wire: dict[str, Any] = {
            "networkId": self.network_id,
            "paymentMethodTypes": list(self.payment_method_types),
        }
        if self.metadata:
            wire["metadata"] = dict(self.metadata)
        return wire

    @classmethod
    def from_request(cls, request: ChargeRequest) -> StripeDetails:
        """Read and check the Stripe fields of ``request.method_details``."""
        data = request.method_details
        network_id = _req_str(data, "networkId", "methodDetails")
        types = data.get("paymentMethodTypes")
        if (
            not isinstance(types, tuple)
            or not types
            or not all(isinstance(t, str) and t for t in types)
        ):
            raise _bad("methodDetails.paymentMethodTypes must be a non-empty list of strings")
        metadata = data.get("metadata", EMPTY)
        if not isinstance(metadata, Mapping) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise _bad("methodDetails.metadata must map strings to strings")
        return cls(network_id, types, metadata)


# The shape of a Shared Payment Token id (``spt_…``), checked before one is sent to Stripe.
_SPT = re.compile(r"spt_[A-Za-z0-9_]{1,250}")


def is_spt(value: object) -> TypeGuard[str]:
    """Whether ``value`` has the shape of a Shared Payment Token id."""
    return isinstance(value, str) and _SPT.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class StripePayload:
    """A Stripe credential ``payload``: the Shared Payment Token and the echoed ``externalId``."""

    spt: str
    external_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The wire ``payload`` object."""
        wire: dict[str, Any] = {"spt": self.spt}
        if self.external_id is not None:
            wire["externalId"] = self.external_id
        return wire


@dataclass(frozen=True, slots=True)
class ChallengeEcho:
    """The challenge parameters a credential echoes, verbatim as strings.

    Kept as received (``request`` and ``opaque`` still encoded) because the binding is computed
    over exactly these strings.
    """

    id: str
    realm: str
    method: str
    intent: str
    request: str
    expires: str | None = None
    digest: str | None = None
    opaque: str | None = None
    header: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``Payment`` challenge of the ``charge`` intent.

    ``expires`` is the RFC 3339 string as issued (the binding covers the string, so it is never
    re-formatted); :attr:`expires_at` reads it. ``opaque`` is server correlation data (a flat string
    map). ``header`` names a credential field other than ``Authorization`` when set.
    """

    id: str
    realm: str
    method: str
    request: ChargeRequest
    intent: str = "charge"
    expires: str | None = None
    digest: str | None = None
    description: str | None = None
    opaque: Mapping[str, str] | None = None
    header: str | None = None

    def __post_init__(self) -> None:
        if self.opaque is not None:
            object.__setattr__(self, "opaque", MappingProxyType(dict(self.opaque)))
        if self.header is not None and self.header.lower() == AUTHORIZATION.lower():
            # Authorization is the implied default: never advertised, never bound (as pympp).
            object.__setattr__(self, "header", None)

    @property
    def request_b64(self) -> str:
        """The ``request`` parameter: base64url of the JCS request."""
        return b64url_jcs(self.request.to_json())

    @property
    def opaque_b64(self) -> str | None:
        """The ``opaque`` parameter, or ``None``."""
        return None if self.opaque is None else b64url_jcs(self.opaque)

    @property
    def expires_at(self) -> datetime | None:
        """``expires`` as an aware datetime."""
        return None if self.expires is None else parse_rfc3339(self.expires)

    def echo(self) -> ChallengeEcho:
        """What a credential answering this challenge echoes."""
        return ChallengeEcho(
            id=self.id,
            realm=self.realm,
            method=self.method,
            intent=self.intent,
            request=self.request_b64,
            expires=self.expires,
            digest=self.digest,
            opaque=self.opaque_b64,
            header=self.header,
            description=self.description,
        )


@dataclass(frozen=True, slots=True)
class Credential:
    """A ``Payment`` credential: the challenge echo, the method's payload, the optional payer."""

    challenge: ChallengeEcho
    payload: Mapping[str, Any]
    source: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "payload", _deep_freeze(self.payload))


@dataclass(frozen=True, slots=True)
class Receipt:
    """A ``Payment-Receipt``: ``reference`` is the method's id (for Stripe the ``pi_…``).

    ``extensions`` keeps other members (``extra``, ``subscriptionId``, …) as received.
    """

    method: str
    reference: str
    timestamp: datetime
    status: Literal["success"] = "success"
    external_id: str | None = None
    extensions: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", _deep_freeze(self.extensions))


@dataclass(frozen=True, slots=True)
class PaymentRange:
    """One ``Accept-Payment`` entry: ``method``/``intent`` (either may be ``*``) and its weight."""

    method: str
    intent: str
    q: float = 1.0

    def matches(self, method: str, intent: str) -> bool:
        """Whether this range covers ``method``/``intent``."""
        return self.method in ("*", method) and self.intent in ("*", intent)

    @property
    def specificity(self) -> int:
        """2 for ``m/i``, 1 for one wildcard, 0 for ``*/*``: the most specific match wins."""
        return (self.method != "*") + (self.intent != "*")


# --- binding ---------------------------------------------------------------------------------------


def challenge_id(
    secret: bytes,
    *,
    realm: str,
    method: str,
    intent: str,
    request: str,
    expires: str | None = None,
    digest: str | None = None,
    opaque: str | None = None,
    header: str | None = None,
) -> str:
    """The HMAC-bound challenge ``id`` (draft-httpauth-payment, "Recommended: HMAC-SHA256 Binding").

    ``request`` and ``opaque`` are the wire strings (base64url of JCS). The input is the UTF-8 of
    ``realm|method|intent|request|expires|digest|opaque`` with absent optional slots empty; a
    ``header`` other than ``Authorization`` goes in its own slot just before ``opaque`` (pympp
    0.16.0, the revision that added ``header``), so challenges without it keep the seven-slot
    binding. The id is unpadded base64url of HMAC-SHA256 keyed with ``secret``.
    """
    if not secret:
        raise ConfigError("the challenge secret must not be empty")
    slots = [realm, method, intent, request, expires or "", digest or ""]
    if header and header.lower() != AUTHORIZATION.lower():
        slots.append(header)
    slots.append(opaque or "")
    try:
        message = "|".join(slots).encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("challenge parameters are not valid text") from None
    return b64url_encode(hmac.new(secret, message, hashlib.sha256).digest())


def issue_challenge(
    secret: bytes,
    *,
    realm: str,
    method: str,
    request: ChargeRequest,
    expires: datetime | float | str | None,
    intent: str = "charge",
    digest: str | None = None,
    description: str | None = None,
    opaque: Mapping[str, str] | None = None,
    header: str | None = None,
) -> Challenge:
    """A new challenge whose ``id`` is bound to its parameters with ``secret``.

    ``expires`` may be an aware datetime, unix seconds or an RFC 3339 string (kept verbatim).
    """
    if isinstance(expires, str):
        parse_rfc3339(expires)
        expires_text: str | None = expires
    else:
        expires_text = None if expires is None else format_rfc3339(expires)
    draft = Challenge(
        id="",
        realm=realm,
        method=method,
        request=request,
        intent=intent,
        expires=expires_text,
        digest=digest,
        description=description,
        opaque=opaque,
        header=header,
    )
    ident = _echo_id(secret, draft.echo())
    return Challenge(
        id=ident,
        realm=realm,
        method=method,
        request=request,
        intent=intent,
        expires=expires_text,
        digest=digest,
        description=description,
        opaque=draft.opaque,
        header=draft.header,
    )


def _echo_id(secret: bytes, echo: ChallengeEcho) -> str:
    """The id a challenge with ``echo``'s slots has (what :func:`challenge_id` binds)."""
    return challenge_id(
        secret,
        realm=echo.realm,
        method=echo.method,
        intent=echo.intent,
        request=echo.request,
        expires=echo.expires,
        digest=echo.digest,
        opaque=echo.opaque,
        header=echo.header,
    )


def verify_credential(
    secret: bytes,
    credential: Credential,
    now: float,
    *,
    realm: str | None = None,
    require_expires: bool = True,
) -> Challenge:
    """Check statelessly that ``credential`` answers a live challenge this server issued.

    Returns the challenge rebuilt from the echo. Raises ``invalid_challenge`` when the ``id`` is
    not the HMAC over the echoed slots (any changed slot), the realm differs from ``realm``, or
    (with ``require_expires``) the echo has no ``expires``; ``payment_expired`` when ``now`` (unix
    seconds) is at or past ``expires``; ``invalid_payload`` when an echoed slot is malformed.
    Single use, the ``digest`` against the body, and the payload are the caller's checks.
    """
    echo = credential.challenge
    expected = _echo_id(secret, echo)
    if not hmac.compare_digest(expected.encode("ascii"), echo.id.encode("utf-8", "replace")):
        raise PaymentError("invalid_challenge", "challenge id does not match its parameters")
    if realm is not None and echo.realm != realm:
        raise PaymentError("invalid_challenge", "challenge was issued for another realm")
    # Only now read the echoed values: they are ours, so a failure here is a server bug or a
    # rotated format rather than an attack, but still no exception other than PaymentError.
    challenge = _challenge_from_echo(echo)
    expires_at = challenge.expires_at
    if expires_at is None:
        if require_expires:
            raise PaymentError("invalid_challenge", "challenge has no expiry")
    elif expires_at.timestamp() <= now:
        raise PaymentError("payment_expired", "challenge has expired")
    return challenge


def _challenge_from_echo(echo: ChallengeEcho) -> Challenge:
    _check_method(echo.method)
    _check_intent(echo.intent)
    if echo.expires is not None:
        parse_rfc3339(echo.expires)
    request = ChargeRequest.from_json(_jcs_object(echo.request, "request", MAX_REQUEST_BYTES))
    opaque = None if echo.opaque is None else _read_opaque(echo.opaque)
    return Challenge(
        id=echo.id,
        realm=echo.realm,
        method=echo.method,
        request=request,
        intent=echo.intent,
        expires=echo.expires,
        digest=echo.digest,
        description=echo.description,
        opaque=opaque,
        header=echo.header,
    )


def read_stripe_payload(credential: Credential, challenge: Challenge) -> StripePayload:
    """The Stripe payload of ``credential``, checked against its (verified) ``challenge``.

    The ``spt`` must be a non-empty string; a request with ``externalId`` needs the payload to
    echo it exactly (draft-stripe-charge, Verification).
    """
    if challenge.method != "stripe" or challenge.intent != "charge":
        raise PaymentError("unsupported_scheme", "not a stripe charge challenge")
    payload = credential.payload
    spt = _req_str(payload, "spt", "payload")
    external_id = _opt_str(payload, "externalId", "payload")
    wanted = challenge.request.external_id
    if wanted is not None and external_id != wanted:
        raise _bad("payload.externalId does not echo the request's externalId")
    return StripePayload(spt, external_id)


# --- WWW-Authenticate ------------------------------------------------------------------------------


def _quote(value: str, what: str) -> str:
    out = ['"']
    for ch in value:
        code = ord(ch)
        if (code < 0x20 and ch != "\t") or code == 0x7F:
            raise ConfigError(f"{what} contains a control character")
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            # Non-ASCII as \\uXXXX (UTF-16), the escape pympp and mppx read: header values stay
            # ASCII, which every HTTP stack passes through unchanged.
            out.append(f"\\u{code:04x}")
        else:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    out.append('"')
    return "".join(out)


def render_www_authenticate(challenge: Challenge) -> str:
    """One ``WWW-Authenticate`` field value for ``challenge``.

    Parameters in pympp's order; every value quoted (tokens would do for some, but the draft's
    examples and both SDKs quote all of them).
    """
    _render_check(challenge)
    parts = [
        ("id", challenge.id),
        ("realm", challenge.realm),
        ("method", challenge.method),
        ("intent", challenge.intent),
        ("request", challenge.request_b64),
        ("digest", challenge.digest),
        ("expires", challenge.expires),
        ("description", challenge.description),
        ("header", challenge.header),
        ("opaque", challenge.opaque_b64),
    ]
    params = ", ".join(
        f"{name}={_quote(value, name)}" for name, value in parts if value is not None
    )
    return "Payment " + params


def render_www_authenticate_lines(challenges: Iterable[Challenge]) -> tuple[str, ...]:
    """One field value per challenge, to send as separate ``WWW-Authenticate`` field lines.

    The draft's Intent Negotiation shows one field line per challenge, and pympp's client reads
    each field line as a single challenge; RFC 9110 would allow a comma-joined list, which
    :func:`parse_www_authenticate` also reads.
    """
    return tuple(render_www_authenticate(c) for c in challenges)


def _render_check(challenge: Challenge) -> None:
    if not challenge.id:
        raise ConfigError("challenge id must not be empty")
    if not challenge.realm:
        raise ConfigError("challenge realm must not be empty")
    if not _METHOD_RE.fullmatch(challenge.method):
        raise ConfigError(f"invalid payment method id {challenge.method!r}")
    if not _INTENT_RE.fullmatch(challenge.intent):
        raise ConfigError(f"invalid intent {challenge.intent!r}")
    if challenge.header is not None and not _TOKEN_RE.fullmatch(challenge.header):
        raise ConfigError(f"invalid header name {challenge.header!r}")


class _Cursor:
    """A position in one field value, for the RFC 9110 challenge-list grammar."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ows(self) -> int:
        start = self.pos
        while self.peek() in (" ", "\t") and not self.at_end():
            self.pos += 1
        return self.pos - start

    def token(self) -> str | None:
        match = _TOKEN_RE.match(self.text, self.pos)
        if match is None:
            return None
        self.pos = match.end()
        return match.group()

    def quoted(self) -> str:
        # Called on the opening quote. quoted-pair escapes one octet (RFC 9110 5.6.4); a "\\uXXXX"
        # is read as a UTF-16 unit, as pympp and mppx write non-Latin-1 text.
        self.pos += 1
        out: list[str] = []
        text = self.text
        while True:
            if self.pos >= len(text):
                raise _bad("unterminated quoted-string")
            ch = text[self.pos]
            code = ord(ch)
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if (code < 0x20 and ch != "\t") or code == 0x7F or code > 0xFF:
                raise _bad("invalid character in quoted-string")
            if ch != "\\":
                out.append(ch)
                self.pos += 1
                continue
            if self.pos + 1 >= len(text):
                raise _bad("unterminated quoted-pair")
            nxt = text[self.pos + 1]
            if nxt == "u" and self._hex4(self.pos + 2):
                unit = int(text[self.pos + 2 : self.pos + 6], 16)
                self.pos += 6
                out.append(self._unicode(unit))
                continue
            if (ord(nxt) < 0x20 and nxt != "\t") or ord(nxt) == 0x7F or ord(nxt) > 0xFF:
                raise _bad("invalid quoted-pair")
            out.append(nxt)
            self.pos += 2

    def _hex4(self, at: int) -> bool:
        digits = self.text[at : at + 4]
        return len(digits) == 4 and all(c in _HEX for c in digits)

    def _unicode(self, unit: int) -> str:
        if 0xDC00 <= unit <= 0xDFFF:
            raise _bad("lone low surrogate escape")
        if unit < 0xD800 or unit > 0xDBFF:
            return chr(unit)
        text = self.text
        if text.startswith("\\u", self.pos) and self._hex4(self.pos + 2):
            low = int(text[self.pos + 2 : self.pos + 6], 16)
            if 0xDC00 <= low <= 0xDFFF:
                self.pos += 6
                return chr(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
        raise _bad("lone high surrogate escape")


def _read_challenges(value: str) -> list[tuple[str, dict[str, str] | None]]:
    """Split a field value into (scheme, auth-params or None for token68/none) pairs."""
    cur = _Cursor(value)
    found: list[tuple[str, dict[str, str] | None]] = []
    params: dict[str, str] | None = None
    while True:
        # Between list elements: OWS, commas, empty elements (RFC 9110 5.6.1).
        while True:
            cur.skip_ows()
            if cur.peek() != ",":
                break
            cur.pos += 1
        if cur.at_end():
            break
        mark = cur.pos
        name = cur.token()
        if name is None:
            raise _bad("expected an auth-scheme or auth-param")
        cur.skip_ows()
        if params is not None and cur.peek() == "=":
            # name BWS "=": another auth-param of the current challenge.
            cur.pos += 1
            _read_param_value(cur, name.lower(), params)
            continue
        # A new challenge: the scheme, then 1*SP and its first auth-param or a token68.
        cur.pos = mark + len(name)
        if len(found) >= _MAX_PARAMS:
            raise _bad("too many challenges")
        spaces = cur.skip_ows()
        if cur.at_end() or cur.peek() == ",":
            found.append((name, None))
            params = None
            continue
        if not spaces:
            raise _bad("auth-scheme must be followed by a space")
        mark = cur.pos
        first = cur.token()
        cur.skip_ows()
        if first is not None and cur.peek() == "=":
            cur.pos += 1
            cur.skip_ows()
            if cur.peek() and cur.peek() not in ",=":
                params = {}
                found.append((name, params))
                _read_param_value(cur, first.lower(), params, skipped=True)
                continue
        cur.pos = mark
        t68 = _TOKEN68_RE.match(cur.text, cur.pos)
        if t68 is None:
            raise _bad("expected auth-params or a token68")
        cur.pos = t68.end()
        cur.skip_ows()
        if not (cur.at_end() or cur.peek() == ","):
            raise _bad("unexpected text after token68")
        found.append((name, None))
        params = None
    return found


def _read_param_value(
    cur: _Cursor, name: str, params: dict[str, str], *, skipped: bool = False
) -> None:
    if not skipped:
        cur.skip_ows()
    if cur.peek() == '"':
        value = cur.quoted()
    else:
        token = cur.token()
        if token is None:
            raise _bad(f"auth-param {name} has no value")
        value = token
    if name in params:
        raise _bad(f"duplicate auth-param {name}")
    if len(params) >= _MAX_PARAMS:
        raise _bad("too many auth-params")
    params[name] = value
    cur.skip_ows()
    if not (cur.at_end() or cur.peek() == ","):
        raise _bad(f"unexpected text after auth-param {name}")


def parse_www_authenticate(
    value: str, *, max_bytes: int = MAX_WWW_AUTHENTICATE_BYTES
) -> list[Challenge]:
    """The ``Payment`` challenges of the ``charge`` intent in one ``WWW-Authenticate`` value.

    The value may hold several challenges (RFC 9110 11.6.1, and joined field lines); other schemes
    and other intents are skipped (the draft: unrecognized intents are unsupported), unknown
    parameters are ignored (the draft: clients MUST ignore them). A malformed list or Payment
    challenge raises ``invalid_payload``; an oversized value ``payload_too_large``.
    """
    if not isinstance(value, str):
        raise _bad("header value must be text")
    if len(value) > max_bytes:
        raise PaymentError("payload_too_large", f"WWW-Authenticate exceeds {max_bytes} bytes")
    out: list[Challenge] = []
    for scheme, params in _read_challenges(value):
        if scheme.lower() != _SCHEME:
            continue
        if params is None:
            raise _bad("Payment challenge needs auth-params")
        challenge = _challenge_from_params(params)
        if challenge is not None:
            out.append(challenge)
    return out


def _check_method(method: str) -> None:
    if not isinstance(method, str) or len(method) > 64 or not _METHOD_RE.fullmatch(method):
        raise _bad("method is not a payment method id")


def _check_intent(intent: str) -> None:
    if not isinstance(intent, str) or len(intent) > 64 or not _INTENT_RE.fullmatch(intent):
        raise _bad("intent is not an intent token")


def _read_opaque(value: str) -> Mapping[str, str]:
    opaque = _jcs_object(value, "opaque", MAX_REQUEST_BYTES)
    if not all(isinstance(v, str) for v in opaque.values()):
        raise _bad("opaque must map strings to strings")
    return opaque


def _challenge_from_params(params: Mapping[str, str]) -> Challenge | None:
    for name in ("id", "realm", "method", "intent", "request"):
        if not params.get(name):
            raise _bad(f"Payment challenge lacks {name}")
    _check_method(params["method"])
    _check_intent(params["intent"])
    if params["intent"] != "charge":
        return None
    if len(params["id"]) > _MAX_STR or len(params["realm"]) > _MAX_STR:
        raise _bad("challenge id or realm too long")
    expires = params.get("expires")
    if expires is not None:
        parse_rfc3339(expires)
    header = params.get("header")
    if header is not None and not _TOKEN_RE.fullmatch(header):
        raise _bad("header is not a field name")
    request = ChargeRequest.from_json(_jcs_object(params["request"], "request", MAX_REQUEST_BYTES))
    opaque = params.get("opaque")
    return Challenge(
        id=params["id"],
        realm=params["realm"],
        method=params["method"],
        request=request,
        intent=params["intent"],
        expires=expires,
        digest=params.get("digest"),
        description=params.get("description"),
        opaque=None if opaque is None else _read_opaque(opaque),
        header=header,
    )


# --- Authorization ---------------------------------------------------------------------------------


def render_authorization(credential: Credential) -> str:
    """The ``Authorization`` (or ``Payment-Authorization``) value: ``Payment <b64url JSON>``.

    The JSON is JCS: deterministic, and any JSON reader takes it.
    """
    echo = credential.challenge
    challenge: dict[str, Any] = {
        "id": echo.id,
        "realm": echo.realm,
        "method": echo.method,
        "intent": echo.intent,
        "request": echo.request,
    }
    for key, value in (
        ("expires", echo.expires),
        ("digest", echo.digest),
        ("opaque", echo.opaque),
        ("header", echo.header),
        ("description", echo.description),
    ):
        if value is not None:
            challenge[key] = value
    body: dict[str, Any] = {"challenge": challenge, "payload": _thaw(credential.payload)}
    if credential.source is not None:
        body["source"] = credential.source
    return "Payment " + b64url_jcs(body)


def parse_authorization(value: str, *, max_bytes: int = MAX_AUTHORIZATION_BYTES) -> Credential:
    """Read ``Payment <b64url JSON>``: strict base64url, JSON without duplicate names, the echo's
    required members as non-empty strings, ``payload`` an object, ``source`` a string."""
    if not isinstance(value, str):
        raise _bad("header value must be text")
    if len(value) > max_bytes:
        raise PaymentError("payload_too_large", f"Authorization exceeds {max_bytes} bytes")
    text = value.strip(" \t")
    scheme, sep, rest = text.partition(" ")
    if scheme.lower() != _SCHEME or not sep:
        raise _bad("not a Payment credential")
    data = _json_object(_b64url_decode(rest.lstrip(" "), "credential"), "credential")
    echo_data = data.get("challenge")
    if not isinstance(echo_data, dict):
        raise _bad("credential.challenge must be an object")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise _bad("credential.payload must be an object")
    source = _opt_str(data, "source", "credential")
    where = "credential.challenge"
    echo = ChallengeEcho(
        id=_req_str(echo_data, "id", where),
        realm=_req_str(echo_data, "realm", where),
        method=_req_str(echo_data, "method", where),
        intent=_req_str(echo_data, "intent", where),
        request=_req_str(echo_data, "request", where, limit=MAX_REQUEST_BYTES),
        expires=_opt_str(echo_data, "expires", where),
        digest=_opt_str(echo_data, "digest", where),
        opaque=_opt_str_sized(echo_data, "opaque", where),
        header=_opt_str(echo_data, "header", where),
        description=_opt_str(echo_data, "description", where),
    )
    _check_method(echo.method)
    _check_intent(echo.intent)
    if echo.header is not None and echo.header.lower() == AUTHORIZATION.lower():
        echo = ChallengeEcho(**{**_echo_dict(echo), "header": None})
    return Credential(challenge=echo, payload=payload, source=source)


def _echo_dict(echo: ChallengeEcho) -> dict[str, Any]:
    return {name: getattr(echo, name) for name in ChallengeEcho.__slots__}


def _opt_str_sized(data: Mapping[str, Any], key: str, where: str) -> str | None:
    # The encoded request and opaque maps may be longer than a plain parameter.
    if data.get(key) is None:
        return None
    return _req_str(data, key, where, limit=MAX_REQUEST_BYTES)


# --- Payment-Receipt -------------------------------------------------------------------------------

_RECEIPT_KEYS = frozenset({"status", "method", "timestamp", "reference", "externalId"})


def render_payment_receipt(receipt: Receipt) -> str:
    """The ``Payment-Receipt`` value: unpadded base64url of the JCS receipt object."""
    clash = set(receipt.extensions) & _RECEIPT_KEYS
    if clash:
        raise ConfigError(f"extensions repeat receipt members: {sorted(clash)}")
    body: dict[str, Any] = _thaw(receipt.extensions)
    body.update(
        status=receipt.status,
        method=receipt.method,
        timestamp=format_rfc3339(receipt.timestamp),
        reference=receipt.reference,
    )
    if receipt.external_id is not None:
        body["externalId"] = receipt.external_id
    return b64url_jcs(body)


def parse_payment_receipt(value: str, *, max_bytes: int = MAX_RECEIPT_BYTES) -> Receipt:
    """Read a ``Payment-Receipt`` value; ``status`` must be ``"success"`` (the draft allows only
    that), ``timestamp`` RFC 3339, ``method`` a method id, ``reference`` a non-empty string."""
    if not isinstance(value, str):
        raise _bad("header value must be text")
    if len(value) > max_bytes:
        raise PaymentError("payload_too_large", f"Payment-Receipt exceeds {max_bytes} bytes")
    data = _json_object(_b64url_decode(value.strip(" \t"), "receipt"), "receipt")
    if data.get("status") != "success":
        raise _bad('receipt.status must be "success"')
    method = _req_str(data, "method", "receipt")
    _check_method(method)
    return Receipt(
        method=method,
        reference=_req_str(data, "reference", "receipt"),
        timestamp=parse_rfc3339(_req_str(data, "timestamp", "receipt")),
        external_id=_opt_str(data, "externalId", "receipt"),
        extensions={k: v for k, v in data.items() if k not in _RECEIPT_KEYS},
    )


# --- Accept-Payment --------------------------------------------------------------------------------


def parse_accept_payment(
    value: str, *, max_bytes: int = MAX_ACCEPT_PAYMENT_BYTES
) -> tuple[PaymentRange, ...]:
    """Read ``Accept-Payment`` (draft, Client Payment Preferences): ``#payment-range`` where a range
    is ``method/intent`` (either ``*``) with an optional ``;q=`` weight (RFC 9110 qvalue, default 1).

    A repeated range or any other parameter is malformed (``invalid_payload``); the draft lets a
    server ignore a malformed header, which is the caller's choice.
    """
    if not isinstance(value, str):
        raise _bad("header value must be text")
    if len(value) > max_bytes:
        raise PaymentError("payload_too_large", f"Accept-Payment exceeds {max_bytes} bytes")
    ranges: list[PaymentRange] = []
    seen: set[tuple[str, str]] = set()
    for element in value.split(","):
        element = element.strip(" \t")
        if not element:
            continue
        token, *weights = (part.strip(" \t") for part in element.split(";"))
        method, slash, intent = token.partition("/")
        if not slash:
            raise _bad(f"payment range {token!r} lacks '/'")
        if method != "*":
            _check_method(method)
        if intent != "*":
            _check_intent(intent)
        if len(weights) > 1:
            raise _bad("a payment range takes only a q weight")
        q = 1.0
        if weights:
            name, eq, number = weights[0].partition("=")
            if name.strip(" \t").lower() != "q" or not eq:
                raise _bad("a payment range takes only a q weight")
            number = number.strip(" \t")
            if not _QVALUE_RE.fullmatch(number):
                raise _bad(f"invalid qvalue {number!r}")
            q = float(number)
        if (method, intent) in seen:
            raise _bad(f"payment range {token!r} repeated")
        seen.add((method, intent))
        if len(ranges) >= _MAX_RANGES:
            raise _bad("too many payment ranges")
        ranges.append(PaymentRange(method, intent, q))
    return tuple(ranges)


def render_accept_payment(ranges: Iterable[PaymentRange]) -> str:
    """An ``Accept-Payment`` value; ``q=1`` is implied and left out."""
    parts = []
    for r in ranges:
        if not 0.0 <= r.q <= 1.0:
            raise ConfigError("q must be between 0 and 1")
        q = "" if r.q == 1.0 else f";q={r.q:.3f}".rstrip("0").rstrip(".")
        parts.append(f"{r.method}/{r.intent}{q}")
    return ", ".join(parts)


def select_challenges(
    challenges: Sequence[Challenge], ranges: Sequence[PaymentRange] | None
) -> list[Challenge]:
    """Order and filter ``challenges`` by the client's ranges, as the draft says servers SHOULD.

    Each challenge takes the q of its most specific matching range; those with q > 0 are kept in
    descending q, server order breaking ties. No ranges (absent header) keeps all; when nothing
    matches, the server's own list is returned (the draft allows ignoring the header then).
    """
    if not ranges:
        return list(challenges)
    scored: list[tuple[float, int, Challenge]] = []
    for index, challenge in enumerate(challenges):
        matching = [r for r in ranges if r.matches(challenge.method, challenge.intent)]
        if not matching:
            continue
        best = max(matching, key=lambda r: r.specificity)
        if best.q > 0:
            scored.append((-best.q, index, challenge))
    if not scored:
        return list(challenges)
    return [c for _, _, c in sorted(scored, key=lambda s: (s[0], s[1]))]

"""PEAC Wire 0.2 interaction records: the safe recipes to issue and verify them.

:func:`issue_receipt` fixes the algorithm and the checks: it serializes claims the way the reference
issuer does, runs the I-JSON gate, the kernel constraints and the claim schema on the bytes it is
about to sign, and signs them. :func:`verify_receipt` applies the reference verification order
(``verifyLocal`` in ``@peac/protocol``); the first failing check names the ``E_*`` code. Nothing here
negotiates an algorithm, fetches a key or reads the clock.

Schema failures are reported the way the reference reports them, with a refinement. The top-level
code is ``E_INVALID_FORMAT`` (``parse_code`` ``E_INVALID_FORMAT``); where the spec names the rule
that failed (``E_ISS_NOT_CANONICAL``, ``E_PILLARS_NOT_SORTED``, ``E_OCCURRED_AT_ON_CHALLENGE``,
``E_INVALID_EXTENSION_KEY``, ``E_INVALID_EXTENSION_FORMAT``, ``E_EXTENSION_SIZE_EXCEEDED``) it is in
``details["rule"]``; ``details["pointer"]`` is the RFC 6901 pointer of the first issue and
``details["issues"]`` lists up to 25 of them. The reference puts the rule name in the issue message.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import ipaddress
import itertools
import re
import secrets
import string
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from farebox.errors import ConfigError, ReceiptError
from farebox.receipts.ijson import MAX_SAFE_INTEGER, check_kernel_constraints, parse_ijson
from farebox.receipts.jws import (
    ALG,
    MAX_JWS_BYTES,
    TYP_WIRE02,
    decode_compact,
    ed25519_verify,
    serialize_json,
    sign_compact,
)
from farebox.receipts.keys import Jwks, SigningKey, public_key_from_did_key

__all__ = [
    "CHALLENGE_EXTENSION",
    "COMMERCE_EXTENSION",
    "DEFAULT_MAX_CLOCK_SKEW",
    "PAYMENT_TYPE",
    "REGISTERED_EXTENSION_GROUPS",
    "REGISTERED_RECEIPT_TYPES",
    "TYPE_TO_EXTENSION_GROUP",
    "IssuedReceipt",
    "KeySource",
    "ReceiptWarning",
    "Strictness",
    "VerifiedReceipt",
    "build_claims",
    "challenge_claims",
    "is_canonical_iss",
    "issue_receipt",
    "payment_claims",
    "policy_digest",
    "receipt_ref",
    "rfc3339",
    "sign_payment_record",
    "uuid7",
    "validate_claims",
    "verify_receipt",
]

Strictness = Literal["strict", "interop"]

PAYMENT_TYPE: Final = "org.peacprotocol/payment"
COMMERCE_EXTENSION: Final = "org.peacprotocol/commerce"
CHALLENGE_EXTENSION: Final = "org.peacprotocol/challenge"
DEFAULT_MAX_CLOCK_SKEW: Final = 300

_E_FORMAT: Final = "E_INVALID_FORMAT"
_MAX_ISSUES: Final = 25

# --- registries (@peac/kernel 0.16.4, specs/kernel/registries.json) ---------------------------------

_P = "org.peacprotocol/"
_TYPES_BY_GROUP: Final[Mapping[str, tuple[str, ...]]] = {
    "a2a-handoff": tuple(
        f"a2a-{s}"
        for s in [
            "agent-card-observation",
            "human-approved",
            "human-rejected",
            "human-review-requested",
            "task-accepted",
            "task-completed",
            "task-failed",
            "task-rejected",
            "task-state-changed",
            "task-submitted",
        ]
    ),
    "access": ("access-decision",),
    "agent-action": tuple(
        f"agent-action-{s}-observed"
        for s in ["approved", "cancelled", "delegated", "denied", "invoked", "timed-out"]
    ),
    "attribution": ("attribution-event",),
    "challenge": (),
    "cli-execution": ("cli-command-execution",),
    "commerce": ("payment",),
    "commerce-mandate": tuple(
        f"commerce-{s}-observed"
        for s in ["authorization", "budget", "capture", "mandate", "refund", "settlement", "void"]
    ),
    "compliance": ("compliance-check",),
    "consent": ("consent-record",),
    "correlation": (),
    "gateway-export": tuple(
        f"gateway-{s}-observed"
        for s in [
            "facilitator-timeout",
            "payment-submitted",
            "settlement-confirmed-late",
            "settlement-confirmed",
            "settlement-failed",
            "settlement-failed-orphaned",
            "settlement-polling",
            "settlement-unresolved",
        ]
    ),
    "identity": ("identity-attestation",),
    "lifecycle-observation": tuple(
        f"lifecycle-{s}"
        for s in [
            "approval-denied",
            "approval-granted",
            "approval-requested",
            "evaluation-completed",
            "evaluation-started",
            "experiment-assigned",
            "experiment-result",
            "mode-observed",
            "workflow-transition",
        ]
    ),
    "privacy": ("privacy-signal",),
    "provenance": ("provenance-record",),
    "provisioning-lifecycle": tuple(
        f"provisioning-{s}-observed"
        for s in [
            "account",
            "budget",
            "catalog",
            "credential",
            "deployment",
            "domain",
            "payment-authorization",
            "provider-link",
            "resource",
            "subscription",
        ]
    ),
    "purpose": ("purpose-declaration",),
    "safety": ("safety-review",),
}
TYPE_TO_EXTENSION_GROUP: Final[Mapping[str, str]] = {
    _P + t: _P + group for group, types in _TYPES_BY_GROUP.items() for t in types
}
REGISTERED_RECEIPT_TYPES: Final = frozenset(TYPE_TO_EXTENSION_GROUP)
REGISTERED_EXTENSION_GROUPS: Final = frozenset(_P + group for group in _TYPES_BY_GROUP)
_PILLARS: Final = [
    "access",
    "attribution",
    "commerce",
    "compliance",
    "consent",
    "identity",
    "privacy",
    "provenance",
    "purpose",
    "safety",
]


# --- schema machinery ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Issue:
    pointer: str
    message: str
    rule: str | None = None

    def as_dict(self) -> dict[str, str]:
        out = {"pointer": self.pointer, "message": self.message}
        if self.rule is not None:
            out["rule"] = self.rule
        return out


# A validator looks at one value at one JSON pointer and appends what is wrong with it.
_Validator = Callable[[Any, str, list[_Issue]], None]


def _esc(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def _utf16_length(s: str) -> int:
    """String length as JavaScript's ``String.length`` counts it: UTF-16 code units."""
    return len(s) if s.isascii() else len(s.encode("utf-16-le", "surrogatepass")) // 2


def _string(
    min_len: int = 0,
    max_len: int | None = None,
    *,
    pattern: str | None = None,
    check: Callable[[str], bool] | None = None,
    message: str = "invalid value",
    rule: str | None = None,
) -> _Validator:
    fullmatch = re.compile(pattern).fullmatch if pattern is not None else None
    bounded = min_len > 0 or max_len is not None
    upper = MAX_SAFE_INTEGER if max_len is None else max_len

    def validate(value: Any, pointer: str, issues: list[_Issue]) -> None:
        if type(value) is not str:
            issues.append(_Issue(pointer, "expected a string", rule))
            return
        # zod (4.4 and later, as the pinned reference resolves it) bounds strings in code points,
        # which is what len() counts.
        if bounded and not min_len <= len(value) <= upper:
            issues.append(_Issue(pointer, f"length must be {min_len}..{max_len}", rule))
        if (fullmatch is not None and fullmatch(value) is None) or (
            check is not None and not check(value)
        ):
            issues.append(_Issue(pointer, message, rule))

    return validate


def _enum(*values: str) -> _Validator:
    allowed = frozenset(values)

    def validate(value: Any, pointer: str, issues: list[_Issue]) -> None:
        if not isinstance(value, str) or value not in allowed:
            issues.append(_Issue(pointer, f"expected one of {', '.join(values)}"))

    return validate


def _literal(expected: str) -> _Validator:
    def validate(value: Any, pointer: str, issues: list[_Issue]) -> None:
        if value != expected or not isinstance(value, str):
            issues.append(_Issue(pointer, f"expected {expected!r}"))

    return validate


def _integer(minimum: int = -MAX_SAFE_INTEGER, maximum: int = MAX_SAFE_INTEGER) -> _Validator:
    def validate(value: Any, pointer: str, issues: list[_Issue]) -> None:
        # bool is an int in Python but not a number in JSON.
        if not isinstance(value, int) or isinstance(value, bool):
            issues.append(_Issue(pointer, "expected an integer"))
        elif not minimum <= value <= maximum:
            issues.append(_Issue(pointer, f"must be {minimum}..{maximum}"))

    return validate


def _boolean(value: Any, pointer: str, issues: list[_Issue]) -> None:
    if not isinstance(value, bool):
        issues.append(_Issue(pointer, "expected a boolean"))


def _free_object(value: Any, pointer: str, issues: list[_Issue]) -> None:
    if not isinstance(value, dict):
        issues.append(_Issue(pointer, "expected an object"))


def _array(
    item: _Validator,
    min_items: int = 0,
    max_items: int | None = None,
    *,
    unique: bool = False,
) -> _Validator:
    def validate(value: Any, pointer: str, issues: list[_Issue]) -> None:
        if not isinstance(value, list):
            issues.append(_Issue(pointer, "expected an array"))
            return
        if len(value) < min_items or (max_items is not None and len(value) > max_items):
            issues.append(_Issue(pointer, f"must have {min_items}..{max_items} items"))
        before = len(issues)
        for index, element in enumerate(value):
            item(element, f"{pointer}/{index}", issues)
        if unique and len(issues) == before and len(set(value)) != len(value):
            issues.append(_Issue(pointer, "items must be unique"))

    return validate


def _object(
    fields: Mapping[str, tuple[_Validator, bool]],
    *,
    extra: Literal["reject", "allow"] = "reject",
) -> _Validator:
    """A JSON object with known members (validator, required); unknown members refused or kept."""

    members = [
        (name, "/" + _esc(name), check, required) for name, (check, required) in fields.items()
    ]

    def validate(value: Any, pointer: str, issues: list[_Issue]) -> None:
        if not isinstance(value, dict):
            issues.append(_Issue(pointer, "expected an object"))
            return
        for name, suffix, check, required in members:
            if name in value:
                check(value[name], pointer + suffix, issues)
            elif required:
                issues.append(_Issue(pointer + suffix, "required"))
        if extra == "reject":
            unknown = [name for name in value if name not in fields]
            if unknown:
                issues.append(_Issue(pointer, f"unrecognized members: {', '.join(unknown)}"))

    return validate


def _req(check: _Validator) -> tuple[_Validator, bool]:
    return check, True


def _opt(check: _Validator) -> tuple[_Validator, bool]:
    return check, False


def _memoized_for_short(limit: int) -> Callable[[Callable[[str], bool]], Callable[[str], bool]]:
    """Memoize a string predicate, but only for inputs of at most ``limit`` characters.

    Issuers repeat their ``iss``, ``type`` and extension keys on every record, so these checks are
    cached; the bound keeps a stream of hostile giant strings from filling the cache.
    """

    def decorate(predicate: Callable[[str], bool]) -> Callable[[str], bool]:
        cached = functools.lru_cache(maxsize=1024)(predicate)

        @functools.wraps(predicate)
        def check(value: str) -> bool:
            return cached(value) if len(value) <= limit else predicate(value)

        return check

    return decorate


# --- field grammars --------------------------------------------------------------------------------

_SHA256: Final = r"sha256:[0-9a-f]{64}"
_DATE: Final = r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
_DATETIME: Final = re.compile(
    _DATE + r"T([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9])(?:\.([0-9]+))?"
    r"(?:Z|([+-])([01][0-9]|2[0-3]):([0-5][0-9]))"
)
_PURPOSE_WORD: Final = r"[a-z](?:[a-z0-9_-]*[a-z0-9])?(?::[a-z](?:[a-z0-9_-]*[a-z0-9])?)?"
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_SEGMENT: Final = re.compile(r"[a-z0-9][a-z0-9_-]*")
# Printable ASCII minus WHATWG's forbidden domain code points and minus upper case.
_HOST_CHARS: Final = frozenset(
    c for c in map(chr, range(0x21, 0x7F)) if c not in "#/:<>?@[\\]^|%" and not c.isupper()
)
_PORT: Final = re.compile(r"0|[1-9][0-9]{0,4}")
_DIGITS: Final = re.compile(r"[0-9]{1,5}")
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_SPECIAL_SCHEMES: Final = frozenset({"http", "https", "ws", "wss", "ftp"})
_FORBIDDEN_HOST: Final = frozenset(" #%/:<>?@[\\]^|\t\n\r")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_MIME: Final = re.compile(
    r"[a-zA-Z0-9][a-zA-Z0-9!#$&\-^_.+]*/[a-zA-Z0-9][a-zA-Z0-9!#$&\-^_.+]*"
    r"(?:;\s*[a-zA-Z0-9][a-zA-Z0-9!#$&\-^_.+]*=[^\s;]+)*"
)


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if calendar.isleap(year) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _valid_date(year: int, month: int, day: int) -> bool:
    return 1 <= month <= 12 and 1 <= day <= _days_in_month(year, month)


def _is_datetime(value: str) -> bool:
    """RFC 3339 date-time with seconds and an offset (``Z`` or ``+hh:mm``), a real calendar date."""
    m = _DATETIME.fullmatch(value)
    return m is not None and _valid_date(int(m[1]), int(m[2]), int(m[3]))


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar; works for year 0 too."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _timestamp(value: str) -> float | None:
    """Seconds since the epoch of a valid RFC 3339 time, to the millisecond like ``Date.parse``."""
    m = _DATETIME.fullmatch(value)
    if m is None:
        return None
    days = _days_from_civil(int(m[1]), int(m[2]), int(m[3]))
    seconds = days * 86400 + int(m[4]) * 3600 + int(m[5]) * 60 + int(m[6])
    if m[8] is not None:
        offset = int(m[9]) * 3600 + int(m[10]) * 60
        seconds -= offset if m[8] == "+" else -offset
    millis = int((m[7] or "0")[:3].ljust(3, "0"))
    return seconds + millis / 1000


def rfc3339(unix_seconds: int) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` for a Unix time (the ``occurred_at`` form farebox emits)."""
    year, month, day, hour, minute, second, *_ = time.gmtime(unix_seconds)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"


def _is_duration(value: str) -> bool:
    """ISO 8601 duration as the reference accepts it: designators in order, weeks alone, no T-only."""
    m = re.fullmatch(
        r"P(?:([0-9]+)Y)?(?:([0-9]+)M)?(?:([0-9]+)W)?(?:([0-9]+)D)?"
        r"(?:(T)(?:([0-9]+)H)?(?:([0-9]+)M)?(?:([0-9]+)S)?)?",
        value,
    )
    if m is None or len(value) > 64:
        return False
    numbers = [m[i] for i in (1, 2, 3, 4, 6, 7, 8)]
    if all(n is None for n in numbers) or any(n is not None and len(n) > 15 for n in numbers):
        return False
    if m[5] and all(m[i] is None for i in (6, 7, 8)):
        return False
    years, months, weeks, days = (int(n) if n is not None else 0 for n in numbers[:4])
    return not (weeks > 0 and (years > 0 or months > 0 or days > 0))


_SPDX_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _is_spdx(expr: str) -> bool:
    """The SPDX license-expression subset of the reference: ids, ``LicenseRef-``, AND/OR/WITH, ()."""
    # Only space and tab separate words; any other whitespace makes a word invalid.
    if re.search(r"[^\S \t]", expr):
        return False
    words = re.findall(r"[()]|[^() \t]+", expr)
    pos = 0

    def peek() -> str | None:
        return words[pos] if pos < len(words) else None

    def license_id(word: str) -> bool:
        return _SPDX_ID.fullmatch(word.removesuffix("+").removeprefix("LicenseRef-")) is not None

    def expression() -> bool:
        nonlocal pos
        if not term():
            return False
        while peek() in ("AND", "OR"):
            pos += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal pos
        if not atom():
            return False
        if peek() == "WITH":
            pos += 1
            exception = peek()
            if exception is None or _SPDX_ID.fullmatch(exception) is None:
                return False
            pos += 1
        return True

    def atom() -> bool:
        nonlocal pos
        word = peek()
        if word == "(":
            pos += 1
            if not expression() or peek() != ")":
                return False
            pos += 1
            return True
        if word is None or word in (")", "AND", "OR", "WITH") or not license_id(word):
            return False
        pos += 1
        return True

    return bool(words) and expression() and pos == len(words)


def _canonical_host(host: str) -> bool:
    """Whether a WHATWG URL parser would serialize this https host unchanged.

    Lower-case printable ASCII without the forbidden domain code points stays as it is (empty labels
    and a trailing dot included); upper case would be lowered and non-ASCII turned into punycode. A
    host whose last label is a number is an IPv4 address, which has one spelling; so has IPv6.
    """
    if host.startswith("["):
        if not host.endswith("]"):
            return False
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]" == host
        except ValueError:
            return False
    if not host or not all(c in _HOST_CHARS for c in host):
        return False
    labels = host.split(".")
    last = labels[-2] if len(labels) > 1 and not labels[-1] else labels[-1]
    if last.isdigit() or (last.startswith("0x") and all(c in string.hexdigits for c in last[2:])):
        try:
            return str(ipaddress.IPv4Address(host)) == host
        except ValueError:
            return False
    return True


@_memoized_for_short(2048)
def is_canonical_iss(iss: str) -> bool:
    """A canonical issuer: ``https://<lower-case host>[:port other than 443]`` or a bare ``did:``.

    The reference compares the string with the WHATWG ``URL.origin`` of itself; this reproduces that
    comparison for ASCII hosts (a non-ASCII host is never canonical: its origin is punycode).
    """
    if not 0 < _utf16_length(iss) <= 2048:  # isCanonicalIss checks String.length itself
        return False
    if iss.startswith("did:"):
        return re.fullmatch(r"did:[a-z0-9]+:[^#?/]+", iss, re.DOTALL) is not None
    if not iss.startswith("https://"):
        return False
    authority = iss[len("https://") :]
    host, colon, port = authority.rpartition(":") if not authority.endswith("]") else ("", "", "")
    if not colon:
        host, port = authority, ""
    elif _PORT.fullmatch(port) is None or int(port) > 65535 or port == "443":
        return False
    return bool(host) and _canonical_host(host)


def _parses_as_url(value: str) -> bool:
    """Whether ``new URL(value)`` (WHATWG) succeeds, approximated: a scheme, and a host if special."""
    text = value.strip(" \t\n\r\f\x00")
    m = _SCHEME.match(text)
    if m is None:
        return False
    if m[0][:-1].lower() not in _SPECIAL_SCHEMES:
        return True
    rest = text[m.end() :].lstrip("/\\")
    hostport = re.split(r"[/?#\\]", rest, maxsplit=1)[0].rpartition("@")[2]
    if hostport.startswith("["):
        host, _, port = hostport[1:].partition("]")
        port = port.removeprefix(":")
        host_ok = bool(host) and all(c in "0123456789abcdefABCDEF:." for c in host)
    else:
        host, _, port = hostport.partition(":")
        host_ok = bool(host) and not any(c in _FORBIDDEN_HOST for c in host)
    return host_ok and (port == "" or (_DIGITS.fullmatch(port) is not None and int(port) <= 65535))


def _is_https_hint(value: str) -> bool:
    if _CONTROL.search(value) or "#" in value or not _parses_as_url(value):
        return False
    if not value.lower().startswith("https://"):
        return False
    authority = re.split(r"[/?\\]", value[len("https://") :], maxsplit=1)[0]
    return "@" not in authority and bool(authority.split(":")[0])


def _is_origin_only(value: str) -> bool:
    """``scheme://host[:port][/]`` with scheme http or https, nothing else (actor.origin)."""
    m = re.fullmatch(r"(?i:https?)://([^/?#@%]+?)(?::([0-9]*))?/?", value)
    return m is not None and not m[1].endswith(".") and _parses_as_url(value)


@_memoized_for_short(512)
def _is_valid_extension_key(key: str) -> bool:
    if not 0 < len(key) <= 512:
        return False
    domain, slash, segment = key.partition("/")
    if not slash or not domain or "." not in domain or len(domain) > 253:
        return False
    if _SEGMENT.fullmatch(segment) is None:
        return False
    return all(len(label) <= 63 and _LABEL.fullmatch(label) for label in domain.split("."))


@_memoized_for_short(256)
def _is_receipt_type(value: str) -> bool:
    if re.match(r"[a-z][a-z0-9+.-]*://", value):
        return True
    domain, slash, segment = value.partition("/")
    return (
        bool(slash)
        and "." in domain
        and re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9.-]*", domain) is not None
        and re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9._-]*", segment) is not None
    )


# --- the schemas -----------------------------------------------------------------------------------

_sha256 = _string(max_len=71, pattern=_SHA256, message="must be sha256:<64 lowercase hex>")
_https_hint = _string(1, 2048, check=_is_https_hint, message="must be an https URI hint")
_duration = _string(2, 64, check=_is_duration, message="must be an ISO 8601 duration")
_timestamp_field = _string(check=_is_datetime, message="must be an RFC 3339 date-time with offset")
_purpose_token = _string(1, 128, pattern=_PURPOSE_WORD, message="must be a purpose token")


def _bounded(max_len: int) -> _Validator:
    return _string(1, max_len)


_EXTENSION_SCHEMAS: Final[Mapping[str, _Validator]] = {
    COMMERCE_EXTENSION: _object(
        {
            "payment_rail": _req(_bounded(128)),
            "amount_minor": _req(
                _string(1, 64, pattern=r"-?[0-9]+", message="must be a base-10 integer string")
            ),
            "currency": _req(_bounded(16)),
            "reference": _opt(_string(max_len=256)),
            "asset": _opt(_string(max_len=256)),
            "env": _opt(_enum("live", "test")),
            "event": _opt(
                _enum("authorization", "capture", "settlement", "refund", "void", "chargeback")
            ),
        }
    ),
    _P + "access": _object(
        {
            "resource": _req(_bounded(2048)),
            "action": _req(_bounded(256)),
            "decision": _req(_enum("allow", "deny", "review")),
        }
    ),
    CHALLENGE_EXTENSION: _object(
        {
            "challenge_type": _req(
                _enum(
                    "payment_required",
                    "identity_required",
                    "consent_required",
                    "attestation_required",
                    "rate_limited",
                    "purpose_disallowed",
                    "custom",
                )
            ),
            # RFC 9457 problem details; members beyond these pass through.
            "problem": _req(
                _object(
                    {
                        "status": _req(_integer(100, 599)),
                        "type": _req(
                            _string(1, 2048, check=_parses_as_url, message="must be a URL")
                        ),
                        "title": _opt(_string(max_len=256)),
                        "detail": _opt(_string(max_len=4096)),
                        "instance": _opt(_string(max_len=2048)),
                    },
                    extra="allow",
                )
            ),
            "resource": _opt(_string(max_len=2048)),
            "action": _opt(_string(max_len=256)),
            "requirements": _opt(_free_object),
        }
    ),
    _P + "identity": _object({"proof_ref": _opt(_string(max_len=256))}),
    _P + "correlation": _object(
        {
            "trace_id": _opt(_string(pattern=r"[0-9a-f]{32}", message="must be 32 lowercase hex")),
            "span_id": _opt(_string(pattern=r"[0-9a-f]{16}", message="must be 16 lowercase hex")),
            "workflow_id": _opt(_bounded(256)),
            "parent_jti": _opt(_bounded(256)),
            "depends_on": _opt(_array(_bounded(256), max_items=64)),
        }
    ),
    _P + "consent": _object(
        {
            "consent_basis": _req(_bounded(128)),
            "consent_status": _req(_enum("granted", "withdrawn", "denied", "expired")),
            "data_categories": _opt(_array(_bounded(128), max_items=64)),
            "retention_period": _opt(_duration),
            "consent_method": _opt(_bounded(128)),
            "withdrawal_uri": _opt(_https_hint),
            "scope": _opt(_bounded(256)),
            "jurisdiction": _opt(_bounded(16)),
        }
    ),
    _P + "privacy": _object(
        {
            "data_classification": _req(_bounded(128)),
            "processing_basis": _opt(_bounded(128)),
            "retention_period": _opt(_duration),
            "retention_mode": _opt(_enum("time_bound", "indefinite", "session_only")),
            "recipient_scope": _opt(_enum("internal", "processor", "third_party", "public")),
            "anonymization_method": _opt(_bounded(128)),
            "data_subject_category": _opt(_bounded(128)),
            "transfer_mechanism": _opt(_bounded(128)),
        }
    ),
    _P + "safety": _object(
        {
            "review_status": _req(_enum("reviewed", "pending", "flagged", "not_applicable")),
            "risk_level": _opt(_enum("unacceptable", "high", "limited", "minimal")),
            "assessment_method": _opt(_bounded(256)),
            "safety_measures": _opt(_array(_bounded(256), max_items=32)),
            "incident_ref": _opt(_bounded(256)),
            "model_ref": _opt(_bounded(256)),
            "category": _opt(_bounded(128)),
        }
    ),
    _P + "compliance": _object(
        {
            "framework": _req(_bounded(256)),
            "compliance_status": _req(
                _enum("compliant", "non_compliant", "partial", "under_review", "exempt")
            ),
            "audit_ref": _opt(_bounded(256)),
            "auditor": _opt(_bounded(256)),
            "audit_date": _opt(
                _string(
                    10,
                    10,
                    pattern=r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
                    message="must be YYYY-MM-DD",
                )
            ),
            "scope": _opt(_bounded(512)),
            "validity_period": _opt(_duration),
            "evidence_ref": _opt(_sha256),
        }
    ),
    _P + "provenance": _object(
        {
            "source_type": _req(_bounded(128)),
            "source_ref": _opt(_bounded(256)),
            "source_uri": _opt(_https_hint),
            "build_provenance_uri": _opt(_https_hint),
            "verification_method": _opt(_bounded(128)),
            "custody_chain": _opt(
                _array(
                    _object(
                        {
                            "custodian": _req(_bounded(256)),
                            "action": _req(_bounded(128)),
                            "timestamp": _req(_timestamp_field),
                        }
                    ),
                    max_items=16,
                )
            ),
            "slsa": _opt(
                _object(
                    {
                        "track": _req(_bounded(64)),
                        "level": _req(_integer(0, 4)),
                        "version": _req(_bounded(16)),
                    }
                )
            ),
        }
    ),
    _P + "attribution": _object(
        {
            "creator_ref": _req(_bounded(256)),
            "license_spdx": _opt(_string(1, 128, check=_is_spdx, message="must be SPDX")),
            "obligation_type": _opt(_bounded(128)),
            "attribution_text": _opt(_bounded(1024)),
            "content_signal_source": _opt(
                _enum(
                    "tdmrep_json",
                    "content_signal_header",
                    "content_usage_header",
                    "robots_txt",
                    "custom",
                )
            ),
            "content_digest": _opt(_sha256),
        }
    ),
    _P + "purpose": _object(
        {
            "external_purposes": _req(_array(_purpose_token, 1, 32, unique=True)),
            "purpose_basis": _opt(_bounded(128)),
            "purpose_limitation": _opt(_boolean),
            "data_minimization": _opt(_boolean),
            "compatible_purposes": _opt(_array(_purpose_token, max_items=32, unique=True)),
            "peac_purpose_mapping": _opt(
                _string(1, 64, pattern=_PURPOSE_WORD, message="must be a PEAC purpose token")
            ),
        }
    ),
}


_pillar_list = _array(_enum(*_PILLARS), 1)


def _pillars(value: Any, pointer: str, issues: list[_Issue]) -> None:
    before = len(issues)
    _pillar_list(value, pointer, issues)
    if len(issues) == before and any(b <= a for a, b in itertools.pairwise(value)):
        issues.append(_Issue(pointer, "pillars must be sorted and unique", "E_PILLARS_NOT_SORTED"))


_ENVELOPE: Final = _object(
    {
        "peac_version": _req(_literal("0.2")),
        "kind": _req(_enum("evidence", "challenge")),
        "type": _req(
            _string(
                max_len=256,
                check=_is_receipt_type,
                message="type must be reverse-DNS (org.example/flow) or an absolute URI",
            )
        ),
        "iss": _req(
            _string(
                max_len=2048,
                check=is_canonical_iss,
                message="iss must be a bare https origin or a did: identifier",
                rule="E_ISS_NOT_CANONICAL",
            )
        ),
        "iat": _req(_integer()),
        "jti": _req(_string(1, 256)),
        "sub": _opt(_string(max_len=2048)),
        "pillars": _opt(_pillars),
        "actor": _opt(
            _object(
                {
                    "id": _req(_string(1, 256)),
                    "proof_type": _req(
                        _enum(
                            "ed25519-cert-chain",
                            "eat-passport",
                            "eat-background-check",
                            "sigstore-oidc",
                            "did",
                            "spiffe",
                            "x509-pki",
                            "custom",
                        )
                    ),
                    "proof_ref": _opt(_string(max_len=2048)),
                    "origin": _req(
                        _string(max_len=2048, check=_is_origin_only, message="must be an origin")
                    ),
                    "intent_hash": _opt(_string(pattern=_SHA256, message="must be sha256:<hex>")),
                }
            )
        ),
        "policy": _opt(
            _object(
                {
                    "digest": _req(_string(pattern=_SHA256, message="must be sha256:<hex>")),
                    "uri": _opt(
                        _string(
                            max_len=2048,
                            check=lambda u: u.startswith("https://") and _parses_as_url(u),
                            message="policy.uri must be an https URL",
                        )
                    ),
                    "version": _opt(_string(max_len=256)),
                },
                extra="allow",  # the reference schema strips unknown policy members silently
            )
        ),
        "representation": _opt(
            _object(
                {
                    "content_hash": _opt(_string(max_len=76, pattern=_SHA256, message="sha256")),
                    "content_type": _opt(
                        _string(max_len=256, pattern=_MIME.pattern, message="must be a MIME type")
                    ),
                    "content_length": _opt(_integer(0)),
                }
            )
        ),
        "occurred_at": _opt(_timestamp_field),
        "purpose_declared": _opt(_string(max_len=256)),
        "extensions": _opt(_free_object),
    }
)

_MAX_GROUP_BYTES: Final = 65_536
_MAX_EXTENSIONS_BYTES: Final = 262_144


def _check_extensions(
    extensions: Mapping[str, Any], size_hint: int | None, issues: list[_Issue]
) -> None:
    for key, value in extensions.items():
        pointer = f"/extensions/{_esc(key)}"
        if not _is_valid_extension_key(key):
            issues.append(_Issue(pointer, "malformed extension key", "E_INVALID_EXTENSION_KEY"))
            continue
        schema = _EXTENSION_SCHEMAS.get(key)
        if schema is not None:
            group_issues: list[_Issue] = []
            schema(value, pointer, group_issues)
            if group_issues:
                first = group_issues[0]
                issues.append(_Issue(first.pointer, first.message, "E_INVALID_EXTENSION_FORMAT"))
    # JSON.stringify never grows a parsed value's raw bytes more than ~4x (number exponents are the
    # worst case), so small payloads cannot break the budgets and skip the measurement.
    if size_hint is not None and size_hint * 5 <= _MAX_GROUP_BYTES:
        return
    if len(serialize_json(extensions)) > _MAX_EXTENSIONS_BYTES:
        issues.append(
            _Issue("/extensions", "extensions exceed 256 KiB", "E_EXTENSION_SIZE_EXCEEDED")
        )
        return
    for key, value in extensions.items():
        if len(serialize_json(value)) > _MAX_GROUP_BYTES:
            issues.append(
                _Issue(
                    f"/extensions/{_esc(key)}", "group exceeds 64 KiB", "E_EXTENSION_SIZE_EXCEEDED"
                )
            )


def _claim_issues(claims: Any, size_hint: int | None) -> list[_Issue]:
    issues: list[_Issue] = []
    _ENVELOPE(claims, "", issues)
    if issues:
        return issues  # like zod, refinements run only on an otherwise valid envelope
    if claims["kind"] == "challenge" and "occurred_at" in claims:
        issues.append(
            _Issue("/occurred_at", "occurred_at is for evidence only", "E_OCCURRED_AT_ON_CHALLENGE")
        )
    if "extensions" in claims:
        _check_extensions(claims["extensions"], size_hint, issues)
    return issues


def validate_claims(claims: Any, *, size_hint: int | None = None) -> None:
    """Raise ``E_INVALID_FORMAT`` unless ``claims`` is a valid Wire 0.2 claim set.

    This is the reference ``Wire02ClaimsSchema`` (strict top level, the typed extension groups,
    extension key grammar and byte budgets); see the module docstring for the details it reports.
    ``size_hint`` is the serialized size when known, to skip measuring small payloads.
    """
    if not isinstance(claims, dict):
        raise ReceiptError(
            _E_FORMAT, "claims are not a JSON object", {"parse_code": "E_PARSE_INVALID_INPUT"}
        )
    issues = _claim_issues(claims, size_hint)
    if issues:
        first = issues[0]
        details: dict[str, Any] = {
            "parse_code": _E_FORMAT,
            "pointer": first.pointer,
            "issues": tuple(i.as_dict() for i in issues[:_MAX_ISSUES]),
        }
        if first.rule is not None:
            details["rule"] = first.rule
        raise ReceiptError(
            _E_FORMAT,
            f"Wire 0.2 claims invalid at {first.pointer or '/'}: {first.message}",
            details,
        )


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceiptWarning:
    """A verification warning: the record is valid, but a reader should know this."""

    code: str
    message: str
    pointer: str | None = None

    def as_dict(self) -> dict[str, str]:
        """The warning as the reference reports it (pointer omitted when absent)."""
        out = {"code": self.code, "message": self.message}
        if self.pointer is not None:
            out["pointer"] = self.pointer
        return out


@dataclass(frozen=True, slots=True)
class IssuedReceipt:
    """A record farebox signed: the compact JWS to send in ``PEAC-Receipt`` and what it says."""

    jws: str
    claims: Mapping[str, Any] = field(repr=False)
    kid: str
    receipt_ref: str


@dataclass(frozen=True, slots=True)
class VerifiedReceipt:
    """A record whose signature, structure, times and bindings all checked out."""

    claims: Mapping[str, Any]
    kid: str
    receipt_ref: str
    warnings: tuple[ReceiptWarning, ...] = ()
    policy_binding: Literal["verified", "unavailable"] = "unavailable"
    wire_version: Literal["0.2"] = "0.2"

    @property
    def issuer(self) -> str:
        """The record's ``iss``."""
        return str(self.claims["iss"])


def receipt_ref(jws: str) -> str:
    """``sha256:<hex>`` of the compact JWS string: how carriers and bundles refer to a record."""
    return "sha256:" + hashlib.sha256(jws.encode("utf-8")).hexdigest()


def policy_digest(policy: Any) -> str:
    """``sha256:<hex>`` of the JCS (RFC 8785) form of a policy document."""
    try:
        canonical = rfc8785.dumps(policy)
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise ReceiptError(
            _E_FORMAT, f"policy cannot be canonicalized: {type(exc).__name__}"
        ) from None
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def uuid7(unix_ms: int, rand: bytes | None = None) -> str:
    """A UUIDv7 (RFC 9562) for ``jti``: 48 bits of milliseconds, then 74 random bits.

    ``rand`` supplies the randomness (10 bytes, of which 74 bits are used); by default it comes from
    the operating system's CSPRNG. Passing it makes the identifier reproducible in tests.
    """
    if rand is None:
        rand = secrets.token_bytes(10)
    if len(rand) != 10 or not 0 <= unix_ms < 1 << 48:
        raise ConfigError("uuid7 needs 0 <= unix_ms < 2**48 and 10 random bytes")
    bits = int.from_bytes(rand, "big")
    rand_a, rand_b = bits >> 68, bits & ((1 << 62) - 1)
    value = unix_ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- building claims -------------------------------------------------------------------------------


def build_claims(
    *,
    kind: Literal["evidence", "challenge"],
    type: str,
    iss: str,
    iat: int,
    jti: str,
    sub: str | None = None,
    pillars: Iterable[str] | None = None,
    occurred_at: str | None = None,
    purpose_declared: str | None = None,
    policy: Mapping[str, Any] | None = None,
    actor: Mapping[str, Any] | None = None,
    representation: Mapping[str, Any] | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A Wire 0.2 claim set in the reference issuer's member order (absent members omitted).

    The reference issuer cannot emit ``actor`` and ``representation``; they go after ``policy``.
    """
    claims: dict[str, Any] = {
        "peac_version": "0.2",
        "kind": kind,
        "type": type,
        "iss": iss,
        "iat": iat,
        "jti": jti,
    }
    optional: tuple[tuple[str, Any], ...] = (
        ("sub", sub),
        ("pillars", None if pillars is None else list(pillars)),
        ("occurred_at", occurred_at),
        ("purpose_declared", purpose_declared),
        ("policy", None if policy is None else dict(policy)),
        ("actor", None if actor is None else dict(actor)),
        ("representation", None if representation is None else dict(representation)),
        ("extensions", None if extensions is None else dict(extensions)),
    )
    claims.update((name, value) for name, value in optional if value is not None)
    return claims


def payment_claims(
    *,
    iss: str,
    iat: int,
    jti: str,
    payment_rail: str,
    amount_minor: int | str,
    currency: str,
    asset: str | None = None,
    env: Literal["live", "test"] | None = None,
    event: str | None = None,
    reference: str | None = None,
    sub: str | None = None,
    occurred_at: str | None = None,
    policy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Payment evidence (``org.peacprotocol/payment``) with the commerce extension.

    ``amount_minor`` is in minor units and is carried as a base-10 string. Set ``event`` only when an
    upstream artifact proves that state (PEAC's "no finality synthesis" rule).
    """
    if isinstance(amount_minor, bool):
        raise ConfigError("amount_minor must be an integer or an integer string")
    commerce: dict[str, Any] = {
        "payment_rail": payment_rail,
        "amount_minor": str(amount_minor) if isinstance(amount_minor, int) else amount_minor,
        "currency": currency,
    }
    for name, value in (("asset", asset), ("env", env), ("event", event), ("reference", reference)):
        if value is not None:
            commerce[name] = value
    return build_claims(
        kind="evidence",
        type=PAYMENT_TYPE,
        iss=iss,
        iat=iat,
        jti=jti,
        sub=sub,
        pillars=["commerce"],
        occurred_at=occurred_at,
        policy=policy,
        extensions={COMMERCE_EXTENSION: commerce},
    )


def challenge_claims(
    *,
    iss: str,
    iat: int,
    jti: str,
    problem: Mapping[str, Any],
    challenge_type: str = "payment_required",
    type: str = PAYMENT_TYPE,
    sub: str | None = None,
    resource: str | None = None,
    action: str | None = None,
    requirements: Mapping[str, Any] | None = None,
    policy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A challenge record (``kind: challenge``) to ride on a 402 in ``PEAC-Receipt``.

    ``problem`` is RFC 9457 problem details with at least ``type`` (a URL) and ``status``.
    """
    challenge: dict[str, Any] = {"challenge_type": challenge_type, "problem": dict(problem)}
    for name, value in (("resource", resource), ("action", action)):
        if value is not None:
            challenge[name] = value
    if requirements is not None:
        challenge["requirements"] = dict(requirements)
    return build_claims(
        kind="challenge",
        type=type,
        iss=iss,
        iat=iat,
        jti=jti,
        sub=sub,
        policy=policy,
        extensions={CHALLENGE_EXTENSION: challenge},
    )


# --- checks shared by issue and verify -------------------------------------------------------------


def _check_strictness(strictness: str) -> None:
    if strictness not in ("strict", "interop"):
        raise ConfigError("strictness is 'strict' or 'interop'")


def _type_extension_status(claims: Mapping[str, Any]) -> tuple[str, str] | None:
    """("missing" | "mismatch", expected group) when a registered type lacks its group, else None."""
    if claims["kind"] == "challenge":
        return None  # challenges state requirements, not evidence
    expected = TYPE_TO_EXTENSION_GROUP.get(claims["type"])
    extensions = claims.get("extensions") or {}
    if expected is None or expected in extensions:
        return None
    other_registered = any(k in REGISTERED_EXTENSION_GROUPS for k in extensions)
    return ("mismatch" if other_registered else "missing"), expected


def _extension_group_error(claims: Mapping[str, Any], status: str, expected: str) -> ReceiptError:
    code = "E_EXTENSION_GROUP_MISMATCH" if status == "mismatch" else "E_EXTENSION_GROUP_REQUIRED"
    extensions = claims.get("extensions") or {}
    return ReceiptError(
        code,
        f"type {claims['type']} expects extension group {expected} ({status})",
        {
            "pointer": "/type",
            "type": claims["type"],
            "expected_extension_group": expected,
            "present_registered_extension_groups": [
                k for k in extensions if k in REGISTERED_EXTENSION_GROUPS
            ],
        },
    )


# --- issue -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _header_bytes(kid: str) -> bytes:
    """The protected header for ``kid``, gated once: a kid can be valid UTF-8 but not I-JSON."""
    header = serialize_json({"typ": TYP_WIRE02, "alg": ALG, "kid": kid})
    parse_ijson(header)
    return header


def issue_receipt(
    claims: Mapping[str, Any], key: SigningKey, *, strictness: Strictness = "strict"
) -> IssuedReceipt:
    """Sign ``claims`` as a Wire 0.2 record, refusing anything a verifier would reject.

    The claims are signed in their own member order (use :func:`build_claims` or the record helpers
    for the reference order). Checks, in order: canonical ``iss`` (``E_ISS_NOT_CANONICAL``, as the
    reference issuer reports it), JSON serializability and the I-JSON gate on the exact bytes
    (``E_IJSON_*``), kernel constraints, the claim schema (``E_INVALID_FORMAT``), and in strict mode
    the type-to-extension rule (``E_EXTENSION_GROUP_*``).
    """
    _check_strictness(strictness)
    if not isinstance(claims, Mapping):
        raise ReceiptError(_E_FORMAT, "claims must be a mapping")
    iss = claims.get("iss")
    if not isinstance(iss, str) or not is_canonical_iss(iss):
        raise ReceiptError(
            "E_ISS_NOT_CANONICAL",
            "iss must be a bare https origin or a did: identifier",
            {"pointer": "/iss"},
        )
    payload = serialize_json(dict(claims))
    parsed = parse_ijson(payload)  # the gate, and the claims exactly as verifiers will read them
    check_kernel_constraints(parsed, payload)
    validate_claims(parsed, size_hint=len(payload))
    if strictness == "strict" and (status := _type_extension_status(parsed)) is not None:
        raise _extension_group_error(parsed, *status)
    jws = sign_compact(_header_bytes(key.kid), payload, key.sign)
    if len(jws) > MAX_JWS_BYTES:
        raise ReceiptError(_E_FORMAT, f"record exceeds {MAX_JWS_BYTES} bytes")
    return IssuedReceipt(jws=jws, claims=parsed, kid=key.kid, receipt_ref=receipt_ref(jws))


# --- verify ----------------------------------------------------------------------------------------

KeySource = bytes | Ed25519PublicKey | Jwks | None


def sign_payment_record(
    key: SigningKey,
    *,
    issuer: str,
    now: int,
    rail: str,
    amount_minor: int,
    currency: str,
    reference: str,
    subject: str | None,
    event: str | None,
    asset: str | None = None,
    env: Literal["live", "test"] | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> str:
    """The signed PEAC record of one payment event (a settlement, a refund) as a compact JWS:
    :func:`payment_claims` issued at ``now`` with a fresh UUIDv7 ``jti``, plus ``extensions``,
    signed by :func:`issue_receipt`. The one builder of payment records, for every rail."""
    claims = payment_claims(
        iss=issuer,
        iat=now,
        jti=uuid7(now * 1000),
        payment_rail=rail,
        amount_minor=amount_minor,
        currency=currency,
        asset=asset,
        env=env,
        event=event,
        reference=reference,
        sub=subject,
        occurred_at=rfc3339(now),
    )
    if extensions:
        claims["extensions"].update(extensions)
    return issue_receipt(claims, key).jws


def _resolve_key(key: KeySource, kid: str, payload: Any, revoked_kids: Collection[str]) -> bytes:
    if kid and kid in revoked_kids:
        raise ReceiptError("E_REVOKED_KEY_USED", f"key {kid!r} is revoked")
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes_raw()
    if isinstance(key, bytes):
        return key
    if isinstance(key, Jwks):
        found = key.find(kid)
        if found is None:
            raise ReceiptError("E_KEY_NOT_FOUND", f"no key with kid {kid!r} in the JWKS")
        return found
    if key is not None:
        raise ConfigError("key must be 32 raw bytes, an Ed25519PublicKey, a Jwks or None")
    iss = payload.get("iss") if isinstance(payload, dict) else None
    if isinstance(iss, str) and iss.startswith("did:key:"):
        return public_key_from_did_key(iss)  # self-certifying: the issuer string is the key
    if isinstance(iss, str) and iss.startswith("did:"):
        raise ReceiptError("E_DID_UNSUPPORTED_METHOD", "only did:key resolves locally")
    raise ReceiptError("E_KEY_NOT_FOUND", "no verification key supplied for this issuer")


def verify_receipt(
    jws: str,
    key: KeySource = None,
    *,
    now: int,
    issuer: str | None = None,
    subject: str | None = None,
    strictness: Strictness = "strict",
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
    policy_digest: str | None = None,
    revoked_kids: Collection[str] = (),
) -> VerifiedReceipt:
    """Verify a Wire 0.2 record in the reference order, or raise :class:`ReceiptError`.

    ``key`` is the issuer's raw 32-byte Ed25519 key, an ``Ed25519PublicKey``, a :class:`Jwks` (the
    header's kid picks the key), or None for a ``did:key`` issuer, whose key is the DID itself. Pin
    the issuer you expect with ``issuer``: a self-certifying record proves only who signed it.

    Order (first failure wins): size and shape, header gate and policy, JOSE hardening, payload gate
    and typ/version coherence; key (``E_KEY_NOT_FOUND``, ``E_REVOKED_KEY_USED``); signature under the
    PEAC Ed25519 profile; missing typ (strict: error, interop: warning); kernel constraints; wire
    version and schema; ``issuer`` and ``subject``; ``iat`` and ``occurred_at`` against ``now`` with
    ``max_clock_skew``; warnings; type-to-extension rule (strict: error, interop: warning); policy
    binding against ``policy_digest`` (a ``sha256:`` digest of the local policy).
    """
    _check_strictness(strictness)
    if isinstance(key, bytes) and len(key) != 32:
        raise ReceiptError(_E_FORMAT, "an Ed25519 public key is 32 bytes")
    decoded = decode_compact(jws)
    public_key = _resolve_key(key, decoded.kid, decoded.payload, revoked_kids)
    if not ed25519_verify(public_key, decoded.signature, decoded.signing_input):
        raise ReceiptError("E_INVALID_SIGNATURE", "Ed25519 signature verification failed")

    warnings: list[ReceiptWarning] = []
    if decoded.typ is None:
        if strictness == "strict":
            raise ReceiptError(_E_FORMAT, "JWS header has no typ (strict mode)")
        warnings.append(
            ReceiptWarning("typ_missing", "JWS typ header is absent; accepted in interop mode")
        )

    claims = decoded.payload
    check_kernel_constraints(claims, decoded.payload_bytes)
    if isinstance(claims, dict) and claims.get("peac_version") != "0.2":
        if "peac_version" not in claims:
            raise ReceiptError(
                "E_UNSUPPORTED_WIRE_VERSION", "Wire 0.1 records are not accepted; re-issue as 0.2"
            )
        raise ReceiptError(
            _E_FORMAT,
            "unsupported peac_version",
            {"parse_code": "E_UNSUPPORTED_WIRE_VERSION", "pointer": "/peac_version"},
        )
    validate_claims(claims, size_hint=len(decoded.payload_bytes))

    if issuer is not None and claims["iss"] != issuer:
        raise ReceiptError("E_INVALID_ISSUER", f"issuer is {claims['iss']!r}, not {issuer!r}")
    if subject is not None and claims.get("sub") != subject:
        raise ReceiptError("E_INVALID_SUBJECT", "subject does not match")
    if claims["iat"] > now + max_clock_skew:
        raise ReceiptError("E_NOT_YET_VALID", "iat is in the future", {"pointer": "/iat"})
    if claims["kind"] == "evidence" and "occurred_at" in claims:
        occurred = _timestamp(claims["occurred_at"])
        if occurred is not None and occurred > now + max_clock_skew:
            raise ReceiptError(
                "E_OCCURRED_AT_FUTURE", "occurred_at is in the future", {"pointer": "/occurred_at"}
            )
        if occurred is not None and occurred > claims["iat"]:
            warnings.append(
                ReceiptWarning("occurred_at_skew", "occurred_at is after iat", "/occurred_at")
            )

    if claims["type"] not in REGISTERED_RECEIPT_TYPES:
        warnings.append(
            ReceiptWarning("type_unregistered", "receipt type is not in the type registry", "/type")
        )
    for name in claims.get("extensions") or {}:
        if name not in REGISTERED_EXTENSION_GROUPS:
            warnings.append(
                ReceiptWarning(
                    "unknown_extension_preserved",
                    "unknown extension kept without schema validation",
                    f"/extensions/{_esc(name)}",
                )
            )
    status = _type_extension_status(claims)
    if status is not None:
        if strictness == "strict":
            raise _extension_group_error(claims, *status)
        warnings.append(
            ReceiptWarning(
                f"extension_group_{status[0]}", f"type expects group {status[1]}", "/type"
            )
        )

    binding: Literal["verified", "unavailable"] = "unavailable"
    if policy_digest is not None:
        if re.fullmatch(_SHA256, policy_digest) is None:
            raise ReceiptError(_E_FORMAT, "policy_digest must be sha256:<64 lowercase hex>")
        receipt_digest = (claims.get("policy") or {}).get("digest")
        if receipt_digest is not None:
            if receipt_digest != policy_digest:
                details = {
                    "receipt_policy_digest": receipt_digest,
                    "local_policy_digest": policy_digest,
                }
                if "uri" in claims["policy"]:
                    details["policy_uri"] = claims["policy"]["uri"]
                raise ReceiptError(
                    "E_POLICY_BINDING_FAILED",
                    "record policy digest differs from local policy",
                    details,
                )
            binding = "verified"

    warnings.sort(key=lambda w: (w.pointer is not None, w.pointer or "", w.code))
    return VerifiedReceipt(
        claims=claims,
        kid=decoded.kid,
        receipt_ref=receipt_ref(jws),
        warnings=tuple(warnings),
        policy_binding=binding,
    )

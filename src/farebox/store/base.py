"""What a server's store keeps: payment claims (each proof accepted once ever) and an append-only log.

:class:`Store` is the protocol the gate codes against; :class:`~farebox.store.memory.MemoryStore`
and :class:`~farebox.store.sqlite.SqliteStore` implement it. The helpers here (payer keys, event
data encoding, the query limit) are shared by the implementations so that every store answers the
same questions the same way.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

import orjson

from farebox.errors import ConfigError, PaymentError
from farebox.protocol.lifecycle import TRANSITIONS, ClaimState
from farebox.protocol.models import EMPTY, frozen

__all__ = [
    "INVOICE_CLAIM_PREFIX",
    "MAX_EVENTS",
    "MAX_INVOICE_ID",
    "MAX_INVOICE_REFERENCE",
    "TRAFFIC_KINDS",
    "Claim",
    "ClaimState",
    "Event",
    "IdempotencyEntry",
    "Invoice",
    "Store",
    "StoredResponse",
    "TrafficCount",
    "append_quietly",
    "check_finish_state",
    "claim_not_held",
    "clamp_limit",
    "decode_event_data",
    "encode_event_data",
    "invoice_claim_key",
    "invoice_conflict",
    "invoice_id_ok",
    "payer_key",
    "traffic_tally",
]

# What a held claim can finish as (the table's "settle" and "hold_pending" moves).
_FINISHED = tuple(TRANSITIONS[move]["held"] for move in ("settle", "hold_pending"))

#: The most events one query returns.
MAX_EVENTS = 10_000

_EMPTY = EMPTY

#: The kinds of event that traffic writes, paid or not, and any client can make more of: a 402
#: challenge, a refused payment, a replayed response. Each is counted per day, route and code
#: (:meth:`Store.traffic_counts`) as it is appended, and may be pruned
#: (:meth:`Store.prune_traffic`); every other kind is the payment log, which is never deleted.
TRAFFIC_KINDS = ("challenge", "refusal", "replay")

#: The width of a traffic count's bucket, in seconds.
TRAFFIC_DAY = 86_400

#: The claim key prefix of invoices: an invoice is paid for once, by claiming
#: :func:`invoice_claim_key` of its reference through :meth:`Store.claim`.
INVOICE_CLAIM_PREFIX = "invoice/"

#: The longest invoice reference an :class:`Invoice` accepts.
MAX_INVOICE_REFERENCE = 128

#: The longest payment intent id an :class:`Invoice` accepts, and the longest reference or
#: payment intent id a lookup reads (longer ones cannot be stored, so they are not looked for).
MAX_INVOICE_ID = 255

# Visible ASCII, no spaces: what server-made references and Stripe ids are made of. Lookups take
# the id from a request header; holding them to the same alphabet keeps NULs, control characters
# and unencodable text away from the databases (PostgreSQL refuses NUL in TEXT, for one).
_INVOICE_ID = re.compile(r"[\x21-\x7e]+")
_CURRENCY = re.compile(r"[a-z]{3}")
# PostgreSQL's BIGINT: the widest integer every store keeps exactly.
_MAX_AMOUNT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the append-only log.

    ``kind`` is a short word (``"challenge"``, ``"proof"``, ``"settlement"``, ``"receipt"``,
    ``"refusal"``); ``at`` is unix seconds; ``route`` the route pattern (``"GET /weather"``);
    ``payer`` a checksummed address or other payer id; ``reference`` a challenge reference, a
    transaction hash or a receipt reference; ``data`` JSON-serialisable details. ``id`` is assigned
    by the store and is ``None`` until the event was stored.
    """

    kind: str
    at: int
    route: str = ""
    payer: str | None = None
    reference: str | None = None
    data: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", frozen(self.data))


@dataclass(frozen=True, slots=True)
class Claim:
    """A payment proof's claim: who took it (``owner``, one request attempt), when, and its state.

    ``held`` while the request runs, ``settled`` once the money moved (with the ledger's
    ``transaction``), ``pending`` when a settlement was broadcast but not confirmed.
    """

    key: str
    owner: str
    state: ClaimState
    at: int
    transaction: str | None = None


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response kept for idempotent retries: status, headers (in order) and the body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class IdempotencyEntry:
    """What a store knows of an idempotency key.

    ``fingerprint`` names the request that first used the key (method, URL, body digest);
    ``response`` is ``None`` while that request runs, then what it answered. ``claim`` is the
    claim key of the proof that request spent (``None`` when unknown: an entry written before
    farebox kept it); a retry that finds the entry running long after its request should have
    ended reads that claim to learn whether the money moved.
    """

    key: str
    fingerprint: str
    owner: str
    at: int
    response: StoredResponse | None = None
    claim: str | None = None


@dataclass(frozen=True, slots=True)
class TrafficCount:
    """How many traffic events of ``kind`` on ``route`` with ``code`` (a refusal's reason code,
    else empty) were appended in the day starting at ``day`` (unix seconds, UTC)."""

    day: int
    kind: str
    route: str
    code: str
    count: int


@dataclass(frozen=True, slots=True)
class Invoice:
    """An invoice a 402 named (X-Receipt card payments): what one PaymentIntent pays for.

    Each 402 of a route that offers invoice-backed card payments creates a Stripe PaymentIntent
    (``payment_intent``, ``pi_...``) whose metadata names ``reference``, and records this. The
    agent pays the PaymentIntent out of band and retries with ``X-Receipt: pi_...``; the server
    finds the invoice by :meth:`Store.find_invoice` and consumes it, once ever, by claiming
    :func:`invoice_claim_key` of its reference. Both ``reference`` and ``payment_intent`` are
    unique in a store.

    ``reference`` is server-generated and unguessable (``"inv_"`` and 32 hex digits), at most
    :data:`MAX_INVOICE_REFERENCE` characters; ``route`` the route name (``"GET /report"``);
    ``resource`` the URL the 402 was for; ``amount`` in minor units (cents) of ``currency``
    (lower-case ISO 4217); ``created_at`` and ``expires_at`` unix seconds. A bad field is a
    :class:`~farebox.errors.ConfigError` (the server builds invoices; a bad one is its bug).
    """

    reference: str
    route: str
    resource: str
    amount: int
    currency: str
    payment_intent: str
    created_at: int
    expires_at: int

    def __post_init__(self) -> None:
        _check_id("reference", self.reference, MAX_INVOICE_REFERENCE)
        _check_id("payment_intent", self.payment_intent, MAX_INVOICE_ID)
        _check_text("route", self.route)
        _check_text("resource", self.resource)
        if type(self.amount) is not int or not 1 <= self.amount <= _MAX_AMOUNT:
            raise ConfigError("an invoice amount is a positive int of minor units (cents)")
        if not isinstance(self.currency, str) or not _CURRENCY.fullmatch(self.currency):
            raise ConfigError("an invoice currency is a lower-case ISO 4217 code such as 'usd'")
        for name in ("created_at", "expires_at"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigError(f"invoice {name} is unix seconds, an int >= 0")
        if self.expires_at < self.created_at:
            raise ConfigError("an invoice cannot expire before it was created")


def _check_id(name: str, value: object, longest: int) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"invoice {name} must be a non-empty string")
    if len(value) > longest or not _INVOICE_ID.fullmatch(value):
        raise ConfigError(
            f"invoice {name} must be at most {longest} visible ASCII characters, no spaces"
        )


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"invoice {name} must be a string")
    # Every store must be able to keep it: PostgreSQL refuses NUL, and UTF-8 lone surrogates.
    if "\x00" in value:
        raise ConfigError(f"invoice {name} must not contain NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"invoice {name} is not valid Unicode text") from None


@runtime_checkable
class Store(Protocol):
    """Claims and the log. Every method is safe to call concurrently from one event loop."""

    async def claim(self, key: str, *, owner: str, now: int) -> Claim | None:
        """Atomically take ``key`` for ``owner``.

        Returns the new claim (state ``held``), or ``None`` if the key is already held, pending or
        settled (by anyone, including an earlier attempt of this owner). Once ever: a settled key
        can never be claimed again, across processes sharing the store.
        """
        ...

    async def release(self, key: str, *, owner: str) -> bool:
        """Give back a held claim (nothing was settled).

        Only ``owner``'s claim in state ``held`` is removed; returns whether it was. A settled or
        pending claim is never released.
        """
        ...

    async def finish(
        self,
        key: str,
        *,
        owner: str,
        state: Literal["settled", "pending"],
        transaction: str | None,
        events: Sequence[Event] = (),
    ) -> None:
        """Record the outcome of ``owner``'s held claim and append ``events``, in one transaction.

        A settlement and its log lines are both stored or neither is. Raises
        :class:`~farebox.errors.PaymentError` ``invalid_transaction_state`` when the claim is not
        held by ``owner``.
        """
        ...

    async def get_claim(self, key: str) -> Claim | None:
        """The claim on ``key``, if any."""
        ...

    async def append(self, *events: Event) -> None:
        """Append ``events`` to the log, all in one transaction."""
        ...

    async def events(
        self,
        *,
        kind: str | None = None,
        payer: str | None = None,
        route: str | None = None,
        since: int | None = None,
        until: int | None = None,
        reference: str | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """Logged events, newest first.

        Filters combine with AND; ``payer`` is compared case-insensitively for ``0x`` addresses;
        ``since`` is inclusive and ``until`` exclusive; ``limit`` is capped at :data:`MAX_EVENTS`.
        """
        ...

    async def prune_traffic(self, *, before: int, keep: int, limit: int = MAX_EVENTS) -> int:
        """Delete traffic events (:data:`TRAFFIC_KINDS`) appended before ``before`` or older than
        the newest ``keep`` of them, oldest first, at most ``limit`` (capped at
        :data:`MAX_EVENTS`), never the newest event of the log; returns how many were deleted.
        Their counts stay."""
        ...

    async def traffic_counts(self, *, since: int = 0) -> list[TrafficCount]:
        """Every traffic count of the days from ``since`` on (their events pruned or not), oldest
        day first, then by kind, route and code."""
        ...

    async def prune_traffic_counts(self, *, before: int) -> int:
        """Delete the counts of days that started before ``before``; returns how many."""
        ...

    # --- recovery: claims left pending or held ------------------------------------------------

    async def unfinished(self, *, held_before: int, limit: int = 100) -> list[Claim]:
        """Claims whose outcome is unknown, oldest first: every ``pending`` claim (broadcast, not
        confirmed) and every ``held`` claim taken before ``held_before`` (its request died between
        claiming and recording an outcome)."""
        ...

    async def resolve(
        self,
        key: str,
        *,
        settled: bool,
        transaction: str | None,
        events: Sequence[Event] = (),
    ) -> bool:
        """Record what reconciliation found for a ``pending`` or ``held`` claim, with ``events``,
        in one transaction: ``settled`` (state ``settled`` with its transaction; the proof stays
        used) or not (the claim is removed: the authorization never moved money and may be used
        again). Returns False, changing nothing, when the claim is not pending or held any more
        (someone else resolved or finished it)."""
        ...

    # --- idempotency --------------------------------------------------------------------------

    async def begin_idempotent(
        self, key: str, *, fingerprint: str, owner: str, now: int, claim: str | None = None
    ) -> IdempotencyEntry | None:
        """Atomically take idempotency ``key`` for ``owner``: ``None`` means the caller now runs
        the request; otherwise the existing entry is returned unchanged (running or done, with
        whatever fingerprint and claim it has). Once ever per key, across processes sharing the
        store. ``claim`` is kept with a new entry: the claim key of the proof the request spends.
        """
        ...

    async def complete_idempotent(self, key: str, *, owner: str, response: StoredResponse) -> None:
        """Record the response of ``owner``'s request for later retries of ``key``."""
        ...

    async def abandon_idempotent(self, key: str, *, owner: str) -> bool:
        """Forget ``owner``'s running entry (the request charged nothing and stored nothing), so
        that a retry runs again; returns whether it was removed. A completed entry stays."""
        ...

    async def reopen_idempotent(
        self, key: str, *, owner: str, new_owner: str, now: int, claim: str | None
    ) -> bool:
        """Turn ``owner``'s completed entry back into a running one of ``new_owner`` (taken at
        ``now``, spending ``claim``), atomically; returns whether it was. Only for an entry whose
        stored answer withheld the response (a payment not confirmed when it answered): the one
        retry that reopens it runs the request, every other one finds it running."""
        ...

    async def get_idempotent(self, key: str) -> IdempotencyEntry | None:
        """The entry for ``key``, if any."""
        ...

    # --- invoices (X-Receipt card payments) --------------------------------------------------

    async def add_invoice(self, invoice: Invoice) -> None:
        """Record ``invoice``. Atomic: when its reference or its payment intent is already
        recorded (in any invoice), raises :class:`~farebox.errors.PaymentError`
        ``invoice_conflict`` (:func:`invoice_conflict`) and changes nothing."""
        ...

    async def get_invoice(self, reference: str) -> Invoice | None:
        """The invoice ``reference`` names, if recorded. Any string may be asked for: one that
        cannot be a reference (:func:`invoice_id_ok`) is simply not found."""
        ...

    async def find_invoice(self, payment_intent: str) -> Invoice | None:
        """The invoice paid by ``payment_intent`` (a ``pi_...`` from an ``X-Receipt`` header:
        untrusted), if recorded; an index lookup. Any string may be asked for, like
        :meth:`get_invoice`."""
        ...

    async def prune_invoices(self, *, before: int, limit: int = 1000) -> int:
        """Delete up to ``limit`` (capped at :data:`MAX_EVENTS`) invoices that expired before
        ``before`` (``expires_at < before``) and whose claim (:func:`invoice_claim_key`) does not
        exist; returns how many were deleted. An invoice whose claim exists, in any state, is
        kept: it records what its PaymentIntent paid for."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources; later calls raise ``store_unavailable``."""
        ...


def traffic_tally(event: Event) -> tuple[int, str, str, str] | None:
    """The count ``(day, kind, route, code)`` that ``event`` adds to, or ``None`` for an event of
    the payment log. Codes are the gate's own reason codes, routes its route patterns: the
    counts stay as few as the server's routes and codes, whatever clients send."""
    if event.kind not in TRAFFIC_KINDS:
        return None
    code = event.data.get("code", "")
    return event.at - event.at % TRAFFIC_DAY, event.kind, event.route, str(code)[:64]


def invoice_claim_key(reference: str) -> str:
    """The :meth:`Store.claim` key that consumes the invoice ``reference``."""
    return INVOICE_CLAIM_PREFIX + reference


def invoice_id_ok(value: object) -> bool:
    """Whether ``value`` could be a stored invoice reference or payment intent id.

    Lookups answer "not found" for anything else without asking the database: the value may come
    from a request header, and odd strings (NUL, control characters, unencodable or huge text)
    must neither raise nor reach a query.
    """
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_INVOICE_ID
        and _INVOICE_ID.fullmatch(value) is not None
    )


def invoice_conflict() -> PaymentError:
    """The error :meth:`Store.add_invoice` raises for a reference or payment intent already
    recorded.

    Both are made by the server (a random reference, a new PaymentIntent), so a conflict is a bug
    or an attack on the server's own bookkeeping (status 500), never the client's fault.
    """
    return PaymentError(
        "invoice_conflict",
        "an invoice with this reference or payment intent is already recorded",
        status=500,
    )


def payer_key(payer: str) -> str:
    """The form a payer is looked up by: ``0x`` addresses lowercased, other ids as they are."""
    if payer[:2] in ("0x", "0X"):
        return payer.lower()
    return payer


def clamp_limit(limit: int) -> int:
    """A query ``limit`` within ``0..MAX_EVENTS``."""
    return max(0, min(int(limit), MAX_EVENTS))


def check_finish_state(state: str) -> None:
    """Refuse a :meth:`Store.finish` state other than ``settled`` or ``pending`` (a caller's bug;
    see :data:`farebox.protocol.lifecycle.TRANSITIONS`)."""
    if state not in _FINISHED:
        raise ConfigError(f"a claim finishes as settled or pending, not {state!r}")


def claim_not_held() -> PaymentError:
    """The error :meth:`Store.finish` raises for a claim the caller does not hold.

    Only the attempt that claimed a key finishes it, so this is a bug in the caller (status 500),
    never the client's fault.
    """
    return PaymentError(
        "invalid_transaction_state", "the payment claim is not held by this request", status=500
    )


def _plain(value: Any) -> Any:
    # orjson knows dict but not the read-only mappings events hold. The exact type test comes
    # first: an ABC isinstance check costs more than the whole encoding of a small event.
    if type(value) is MappingProxyType or isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def encode_event_data(data: Mapping[str, Any]) -> str:
    """``data`` as compact JSON text; :class:`~farebox.errors.ConfigError` if it is not JSON.

    Integers beyond 64 bits (uint256 amounts) are written exactly, through the standard library,
    because orjson refuses them.
    """
    if not data:
        return "{}"
    try:
        return orjson.dumps(
            dict(data) if type(data) is MappingProxyType else data, default=_plain
        ).decode()
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise ConfigError(f"event data is not JSON-serialisable: {exc}") from None
    try:
        return json.dumps(data, default=_plain, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"event data is not JSON-serialisable: {exc}") from None


def decode_event_data(text: str) -> Mapping[str, Any]:
    """The inverse of :func:`encode_event_data`, read-only."""
    if text == "{}":
        return _EMPTY
    # The standard library, not orjson: orjson reads integers beyond 64 bits as floats.
    value = json.loads(text)
    return MappingProxyType(value) if isinstance(value, dict) else _EMPTY


_log = logging.getLogger("farebox.store")


async def append_quietly(store: Store, *events: Event) -> None:
    """Append ``events`` to ``store``'s log; a store that is down loses them with a warning (a
    log line is never worth refusing a request for)."""
    try:
        await store.append(*events)
    except PaymentError:
        _log.warning("store unavailable: %d log event(s) not recorded", len(events))

"""Card refunds: pay back all or part of a card payment, and sign a PEAC record of it.

:func:`refund_payment` finds the payment by the ``receipt_ref`` of the PEAC record farebox issued
for it (the ``receipt`` event the card rail logged), verifies that record with the server's own key,
checks what is left to refund against the refunds already logged for it, refunds through
:meth:`~farebox.ledgers.stripe.StripeLedger.refund` and logs the refund with a signed record.

Why farebox checks the amount itself: real Stripe refuses a refund larger than what is left, but a
Stripe stand-in (localstripe) does not, and the check costs one indexed store query.

Concurrency: two refunds of one payment must not both pass that check, so each holds the store claim
``refund-lock/<receipt_ref>`` while it checks, refunds and records (released at the end, whatever
happened). A lock held longer than ``lock_stale`` seconds is taken to be left by a process that died
and is taken over. That is safe for the money: the ``Idempotency-Key`` sent to Stripe names the
refund by (payment, refunds logged so far, amount), so the takeover that repeats a refund the dead
process made but did not log gets Stripe's saved answer (Stripe keeps keys 24 hours) instead of a
second refund. Without waiting, an operator can remove a stuck lock by hand: the ``claims`` row whose
key is ``refund-lock/<receipt_ref>`` (state ``held``).

The refund record (PEAC Wire 0.2, ``org.peacprotocol/payment``): commerce ``event`` ``refund``
(only when Stripe reports the refund ``succeeded``: PEAC's "no finality synthesis" rule), a NEGATIVE
``amount_minor`` ("negative means refund or chargeback", commerce extension), the original's
``currency`` and ``sub``, ``reference`` the Stripe Refund id (``re_…``: the rail artifact that proves
this event; the PaymentIntent is the original record's reference). It is linked to the original
record the way Wire 0.2 links records: the ``org.peacprotocol/correlation`` extension's
``parent_jti`` is the original record's ``jti`` (unique per issuer). The store links them too: the
``refund`` event's reference is the original ``receipt_ref``.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from farebox.errors import PaymentError, ReceiptError
from farebox.receipts import SigningKey, sign_payment_record
from farebox.receipts.records import COMMERCE_EXTENSION, verify_receipt
from farebox.receipts.records import receipt_ref as reference_of
from farebox.store.base import MAX_EVENTS, Event, Store

if TYPE_CHECKING:
    from farebox.ledgers.stripe import StripeLedger

__all__ = [
    "CORRELATION_EXTENSION",
    "LOCK_PREFIX",
    "REFUND_REASONS",
    "RefundResult",
    "refund_idempotency_key",
    "refund_payment",
]

logger = logging.getLogger("farebox.server")

CORRELATION_EXTENSION: Final = "org.peacprotocol/correlation"
LOCK_PREFIX: Final = "refund-lock/"
RAIL: Final = "stripe"
#: Stripe's refund reasons (``Refund.reason``); farebox writes the one given to the refund's
#: metadata as ``farebox_reason`` and to its log line.
REFUND_REASONS: Final = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
RECEIPT_METADATA_KEY: Final = "farebox_receipt"
REASON_METADATA_KEY: Final = "farebox_reason"
DEFAULT_LOCK_STALE: Final = 300


@dataclass(frozen=True, slots=True)
class RefundResult:
    """A refund made and logged.

    ``receipt_ref`` names the original record, ``refund`` the Stripe Refund (``re_…``), ``amount``
    what this refund paid back (minor units of ``currency``, lower case as Stripe writes it),
    ``refunded`` all refunds of the payment so far (this one included), ``remaining`` what may
    still be refunded. ``record`` is the signed PEAC refund record and ``record_ref`` its
    ``receipt_ref``. ``status`` is Stripe's refund status (``succeeded``, or ``pending``).
    """

    receipt_ref: str
    refund: str
    payment_intent: str
    amount: int
    currency: str
    refunded: int
    remaining: int
    status: str
    record: str
    record_ref: str

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values (amounts as integers of minor units)."""
        return {
            "receipt_ref": self.receipt_ref,
            "refund": self.refund,
            "payment_intent": self.payment_intent,
            "amount": self.amount,
            "currency": self.currency,
            "refunded": self.refunded,
            "remaining": self.remaining,
            "status": self.status,
            "record": self.record,
            "record_ref": self.record_ref,
        }


@dataclass(frozen=True, slots=True)
class _Original:
    route: str
    payment_intent: str
    amount: int
    currency: str
    jti: str
    sub: str | None


def refund_idempotency_key(receipt_ref: str, refunds_so_far: int, amount: int) -> str:
    """The ``Idempotency-Key`` of the refund of ``amount`` after ``refunds_so_far`` logged refunds.

    Deterministic, so a retry after a lost answer (or a crash before logging) asks Stripe for the
    same refund again and gets its saved answer rather than a second refund.
    """
    material = f"{receipt_ref}\x00{refunds_so_far}\x00{amount}".encode()
    return "farebox_refund_" + hashlib.sha256(material).hexdigest()


async def refund_payment(
    store: Store,
    ledger: StripeLedger,
    *,
    receipt_ref: str,
    amount: int | None = None,
    signing_key: SigningKey,
    issuer: str | None = None,
    clock: Callable[[], float] = time.time,
    reason: str | None = None,
    lock_stale: int = DEFAULT_LOCK_STALE,
) -> RefundResult:
    """Refund ``amount`` (minor units; everything left when ``None``) of the card payment whose
    PEAC record has ``receipt_ref``, and log it with a signed refund record.

    ``signing_key`` is the server's receipt key (it verifies the original record and signs the
    refund's); ``issuer`` the records' ``iss`` (the key's ``did:key`` when ``None``, as the gate).

    Raises :class:`PaymentError` before anything is sent to Stripe: ``receipt_not_found`` (no
    record with that reference in the store, status 404), ``receipt_invalid`` (the stored record
    does not verify with this key), ``refund_refused`` (not a card payment, a reason Stripe does not
    know, an amount of 0 or more than what remains, nothing left), ``refund_in_progress`` (another
    refund of this payment holds the lock, status 409). From Stripe (nothing was refunded):
    ``refund_refused``, ``card_payment_not_found``, ``idempotency_conflict``, ``ledger_unavailable``.
    After Stripe refunded, a failure to log (``store_unavailable``) is raised too: the same call
    again replays Stripe's refund (same idempotency key) and logs it.
    """
    if reason is not None and reason not in REFUND_REASONS:
        raise PaymentError(
            "refund_refused", f"reason must be one of {', '.join(sorted(REFUND_REASONS))}"
        )
    if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int)):
        raise PaymentError("refund_refused", "amount must be an integer of minor units")
    if amount is not None and amount < 1:
        raise PaymentError("refund_refused", "the amount to refund must be at least 1")
    issuer = issuer or signing_key.did_key
    original = await _find_original(store, receipt_ref, signing_key, int(clock()))

    lock = LOCK_PREFIX + receipt_ref
    owner = secrets.token_hex(8)
    await _take_lock(store, lock, owner, int(clock()), lock_stale)
    try:
        earlier = await store.events(kind="refund", reference=receipt_ref, limit=MAX_EVENTS)
        refunded = sum(_amount_of(event) for event in earlier)
        remaining = original.amount - refunded
        if remaining <= 0:
            raise PaymentError("refund_refused", "this payment is already fully refunded")
        wanted = remaining if amount is None else amount
        if wanted > remaining:
            raise PaymentError(
                "refund_refused", f"{wanted} is more than the {remaining} left to refund"
            )
        metadata = {RECEIPT_METADATA_KEY: receipt_ref}
        if reason is not None:
            metadata[REASON_METADATA_KEY] = reason
        done = await ledger.refund(
            original.payment_intent,
            wanted,
            idempotency_key=refund_idempotency_key(receipt_ref, len(earlier), wanted),
            metadata=metadata,
        )
        if done.status in ("failed", "canceled"):
            raise PaymentError("refund_refused", f"Stripe's refund status is {done.status}")
        if done.currency.lower() != original.currency.lower() or done.amount != wanted:
            # Money moved as Stripe says: log that, and tell whoever reads the log.
            logger.error(
                "refund %s of %s differs from the request (%s %s)",
                done.refund,
                receipt_ref,
                done.amount,
                done.currency,
            )
        now = int(clock())
        record = _record(original, done.refund, done.amount, done.status, now, issuer, signing_key)
        record_ref = reference_of(record)
        events = (
            Event(
                "refund",
                now,
                original.route,
                reference=receipt_ref,
                data={
                    "rail": RAIL,
                    "refund": done.refund,
                    "transaction": original.payment_intent,
                    "amount": str(done.amount),
                    "currency": done.currency,
                    "status": done.status,
                    "reason": reason,
                    "record": record_ref,
                },
            ),
            Event(
                "receipt",
                now,
                original.route,
                reference=record_ref,
                data={"transaction": done.refund, "jws": record},
            ),
        )
        try:
            await store.append(*events)
        except PaymentError as exc:
            logger.error(
                "refund %s of %s was made but not logged (%s); the same refund again logs it",
                done.refund,
                receipt_ref,
                exc.code,
            )
            raise
        total = refunded + done.amount
        return RefundResult(
            receipt_ref=receipt_ref,
            refund=done.refund,
            payment_intent=original.payment_intent,
            amount=done.amount,
            currency=done.currency,
            refunded=total,
            remaining=original.amount - total,
            status=done.status,
            record=record,
            record_ref=record_ref,
        )
    finally:
        try:
            await store.release(lock, owner=owner)
        except PaymentError as exc:
            # The refund's own outcome matters more; the lock goes stale and is taken over.
            logger.warning("could not release refund lock %s: %s", lock, exc.code)


async def _take_lock(store: Store, key: str, owner: str, now: int, stale: int) -> None:
    if await store.claim(key, owner=owner, now=now) is not None:
        return
    held = await store.get_claim(key)
    if held is not None and held.state == "held" and held.at < now - stale:
        # Left by a process that died mid-refund. Releasing needs the old owner, so only one of
        # several processes taking it over at once succeeds; the others find it held again.
        logger.warning("taking over refund lock %s held since %s", key, held.at)
        await store.release(key, owner=held.owner)
        if await store.claim(key, owner=owner, now=now) is not None:
            return
    raise PaymentError(
        "refund_in_progress", "another refund of this payment is running", status=409
    )


async def _find_original(
    store: Store, reference: str, signing_key: SigningKey, now: int
) -> _Original:
    if not isinstance(reference, str) or not reference.startswith("sha256:"):
        raise PaymentError("receipt_not_found", "not a receipt reference (sha256:…)", status=404)
    found = await store.events(kind="receipt", reference=reference, limit=1)
    if not found:
        raise PaymentError("receipt_not_found", "no record with this reference here", status=404)
    event = found[0]
    jws = event.data.get("jws")
    if not isinstance(jws, str) or reference_of(jws) != reference:
        raise PaymentError("receipt_invalid", "the stored record does not match its reference")
    try:
        verified = verify_receipt(jws, signing_key.public_key, now=now)
    except ReceiptError as exc:
        raise PaymentError(
            "receipt_invalid", f"the stored record does not verify with this key ({exc.code})"
        ) from None
    claims = verified.claims
    commerce = (claims.get("extensions") or {}).get(COMMERCE_EXTENSION)
    if (
        not isinstance(commerce, Mapping)
        or commerce.get("payment_rail") != RAIL
        or commerce.get("event") != "settlement"
    ):
        raise PaymentError("refund_refused", "not a card payment")
    intent = commerce.get("reference")
    amount_text = commerce.get("amount_minor", "")
    if not isinstance(intent, str) or not intent.startswith("pi_") or not amount_text.isdigit():
        raise PaymentError("refund_refused", "not a card payment")
    sub = claims.get("sub")
    return _Original(
        route=event.route,
        payment_intent=intent,
        amount=int(amount_text),
        currency=str(commerce["currency"]),
        jti=str(claims["jti"]),
        sub=sub if isinstance(sub, str) else None,
    )


def _amount_of(event: Event) -> int:
    value = event.data.get("amount")
    if isinstance(value, str) and value.isdigit():
        return int(value)
    # A refund line we cannot read: refusing every later refund is safer than refunding twice.
    raise PaymentError(
        "refund_refused", f"refund log line {event.id} has no readable amount", status=500
    )


def _record(
    original: _Original,
    refund: str,
    amount: int,
    status: str,
    now: int,
    issuer: str,
    signing_key: SigningKey,
) -> str:
    return sign_payment_record(
        signing_key,
        issuer=issuer,
        now=now,
        rail=RAIL,
        amount_minor=-amount,
        currency=original.currency,
        # Only a succeeded refund is proven final; a pending one is recorded without an event.
        event="refund" if status == "succeeded" else None,
        reference=refund,
        subject=original.sub,
        extensions={CORRELATION_EXTENSION: {"parent_jti": original.jti}},
    )

"""A store in this process's memory: for tests, demos and single-process servers that may forget.

Claims are not shared with other processes and are lost on restart, so a proof could be replayed
against another worker or after a restart: production servers use
:class:`~farebox.store.sqlite.SqliteStore` or another shared store.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from farebox.errors import PaymentError
from farebox.store.base import (
    TRAFFIC_KINDS,
    Claim,
    Event,
    IdempotencyEntry,
    Invoice,
    StoredResponse,
    TrafficCount,
    check_finish_state,
    claim_not_held,
    clamp_limit,
    decode_event_data,
    encode_event_data,
    invoice_claim_key,
    invoice_conflict,
    invoice_id_ok,
    payer_key,
    traffic_tally,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    """A :class:`~farebox.store.base.Store` in a dict.

    Every operation is a few dict operations under a lock and never awaits, so it is atomic for
    tasks of any event loop and for threads. Event data is stored as JSON, like a database would,
    so what comes back is exactly what a persistent store would return.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[str, Claim] = {}
        self._idempotent: dict[str, IdempotencyEntry] = {}
        self._invoices: dict[str, Invoice] = {}
        # payment intent -> reference: find_invoice is a dict lookup, and the uniqueness test.
        self._invoice_by_intent: dict[str, str] = {}
        # (event, its payer key, its data as JSON) in id order.
        self._log: list[tuple[Event, str | None, str]] = []
        self._last_id = 0  # ids are never reused, though traffic events may be pruned
        self._counts: dict[tuple[int, str, str, str], int] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise PaymentError("store_unavailable", "the payment store is closed")

    async def claim(self, key: str, *, owner: str, now: int) -> Claim | None:
        """See :meth:`farebox.store.base.Store.claim`."""
        with self._lock:
            self._check_open()
            if key in self._claims:
                return None
            claim = Claim(key, owner, "held", now)
            self._claims[key] = claim
            return claim

    async def release(self, key: str, *, owner: str) -> bool:
        """See :meth:`farebox.store.base.Store.release`."""
        with self._lock:
            self._check_open()
            claim = self._claims.get(key)
            if claim is None or claim.owner != owner or claim.state != "held":
                return False
            del self._claims[key]
            return True

    async def finish(
        self,
        key: str,
        *,
        owner: str,
        state: Literal["settled", "pending"],
        transaction: str | None,
        events: Sequence[Event] = (),
    ) -> None:
        """See :meth:`farebox.store.base.Store.finish`."""
        check_finish_state(state)
        with self._lock:
            self._check_open()
            claim = self._claims.get(key)
            if claim is None or claim.owner != owner or claim.state != "held":
                raise claim_not_held()
            # Everything that can fail happens before the first change: a failure changes nothing.
            encoded = [encode_event_data(event.data) for event in events]
            self._claims[key] = Claim(key, owner, state, claim.at, transaction)
            self._add(events, encoded)

    async def unfinished(self, *, held_before: int, limit: int = 100) -> list[Claim]:
        """See :meth:`farebox.store.base.Store.unfinished`."""
        with self._lock:
            self._check_open()
            found = [
                claim
                for claim in self._claims.values()
                if claim.state == "pending" or (claim.state == "held" and claim.at < held_before)
            ]
        found.sort(key=lambda claim: claim.at)
        return found[: clamp_limit(limit)]

    async def resolve(
        self,
        key: str,
        *,
        settled: bool,
        transaction: str | None,
        events: Sequence[Event] = (),
    ) -> bool:
        """See :meth:`farebox.store.base.Store.resolve`."""
        encoded = [encode_event_data(event.data) for event in events]
        with self._lock:
            self._check_open()
            claim = self._claims.get(key)
            if claim is None or claim.state not in ("pending", "held"):
                return False
            if settled:
                self._claims[key] = Claim(key, claim.owner, "settled", claim.at, transaction)
            else:
                del self._claims[key]
            self._add(events, encoded)
            return True

    async def begin_idempotent(
        self, key: str, *, fingerprint: str, owner: str, now: int, claim: str | None = None
    ) -> IdempotencyEntry | None:
        """See :meth:`farebox.store.base.Store.begin_idempotent`."""
        with self._lock:
            self._check_open()
            existing = self._idempotent.get(key)
            if existing is not None:
                return existing
            self._idempotent[key] = IdempotencyEntry(key, fingerprint, owner, now, claim=claim)
            return None

    async def complete_idempotent(self, key: str, *, owner: str, response: StoredResponse) -> None:
        """See :meth:`farebox.store.base.Store.complete_idempotent`."""
        with self._lock:
            self._check_open()
            entry = self._idempotent.get(key)
            if entry is None or entry.owner != owner or entry.response is not None:
                raise claim_not_held()
            self._idempotent[key] = replace(entry, response=response)

    async def abandon_idempotent(self, key: str, *, owner: str) -> bool:
        """See :meth:`farebox.store.base.Store.abandon_idempotent`."""
        with self._lock:
            self._check_open()
            entry = self._idempotent.get(key)
            if entry is None or entry.owner != owner or entry.response is not None:
                return False
            del self._idempotent[key]
            return True

    async def reopen_idempotent(
        self, key: str, *, owner: str, new_owner: str, now: int, claim: str | None
    ) -> bool:
        """See :meth:`farebox.store.base.Store.reopen_idempotent`."""
        with self._lock:
            self._check_open()
            entry = self._idempotent.get(key)
            if entry is None or entry.owner != owner or entry.response is None:
                return False
            self._idempotent[key] = IdempotencyEntry(
                key, entry.fingerprint, new_owner, now, claim=claim
            )
            return True

    async def get_idempotent(self, key: str) -> IdempotencyEntry | None:
        """See :meth:`farebox.store.base.Store.get_idempotent`."""
        with self._lock:
            self._check_open()
            return self._idempotent.get(key)

    async def get_claim(self, key: str) -> Claim | None:
        """See :meth:`farebox.store.base.Store.get_claim`."""
        with self._lock:
            self._check_open()
            return self._claims.get(key)

    async def append(self, *events: Event) -> None:
        """See :meth:`farebox.store.base.Store.append`."""
        encoded = [encode_event_data(event.data) for event in events]
        with self._lock:
            self._check_open()
            self._add(events, encoded)

    def _add(self, events: Sequence[Event], encoded: list[str]) -> None:
        for event, data in zip(events, encoded, strict=True):
            # Without its data (kept as JSON beside it), and built directly: replace() is slow.
            stored = Event(
                event.kind,
                event.at,
                event.route,
                event.payer,
                event.reference,
                {},
                self._last_id + 1,
            )
            self._last_id += 1
            key = payer_key(event.payer) if event.payer is not None else None
            self._log.append((stored, key, data))
            tally = traffic_tally(event)
            if tally is not None:
                self._counts[tally] = self._counts.get(tally, 0) + 1

    async def prune_traffic(self, *, before: int, keep: int, limit: int = 10_000) -> int:
        """See :meth:`farebox.store.base.Store.prune_traffic`."""
        with self._lock:
            self._check_open()
            traffic = [item for item in self._log if item[0].kind in TRAFFIC_KINDS]
            beyond = max(0, len(traffic) - max(0, keep))
            newest = self._log[-1] if self._log else None
            doomed = [
                item
                for n, item in enumerate(traffic)
                if (n < beyond or item[0].at < before) and item is not newest
            ][: clamp_limit(limit)]
            gone = {id(item) for item in doomed}
            self._log = [item for item in self._log if id(item) not in gone]
            return len(doomed)

    async def traffic_counts(self, *, since: int = 0) -> list[TrafficCount]:
        """See :meth:`farebox.store.base.Store.traffic_counts`."""
        with self._lock:
            self._check_open()
            return [
                TrafficCount(*key, count)
                for key, count in sorted(self._counts.items())
                if key[0] >= since
            ]

    async def prune_traffic_counts(self, *, before: int) -> int:
        """See :meth:`farebox.store.base.Store.prune_traffic_counts`."""
        with self._lock:
            self._check_open()
            doomed = [key for key in self._counts if key[0] < before]
            for key in doomed:
                del self._counts[key]
            return len(doomed)

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
        """See :meth:`farebox.store.base.Store.events`."""
        wanted_payer = payer_key(payer) if payer is not None else None
        with self._lock:
            self._check_open()
            found = [
                (event, data)
                for event, key, data in self._log
                if (kind is None or event.kind == kind)
                and (wanted_payer is None or key == wanted_payer)
                and (route is None or event.route == route)
                and (since is None or event.at >= since)
                and (until is None or event.at < until)
                and (reference is None or event.reference == reference)
            ]
        found.sort(key=lambda pair: (pair[0].at, pair[0].id or 0), reverse=True)
        return [
            replace(event, data=decode_event_data(data))
            for event, data in found[: clamp_limit(limit)]
        ]

    async def add_invoice(self, invoice: Invoice) -> None:
        """See :meth:`farebox.store.base.Store.add_invoice`."""
        with self._lock:
            self._check_open()
            if (
                invoice.reference in self._invoices
                or invoice.payment_intent in self._invoice_by_intent
            ):
                raise invoice_conflict()
            self._invoices[invoice.reference] = invoice
            self._invoice_by_intent[invoice.payment_intent] = invoice.reference

    async def get_invoice(self, reference: str) -> Invoice | None:
        """See :meth:`farebox.store.base.Store.get_invoice`."""
        with self._lock:
            self._check_open()
            return self._invoices.get(reference) if invoice_id_ok(reference) else None

    async def find_invoice(self, payment_intent: str) -> Invoice | None:
        """See :meth:`farebox.store.base.Store.find_invoice`."""
        with self._lock:
            self._check_open()
            if not invoice_id_ok(payment_intent):
                return None
            reference = self._invoice_by_intent.get(payment_intent)
            return None if reference is None else self._invoices.get(reference)

    async def prune_invoices(self, *, before: int, limit: int = 1000) -> int:
        """See :meth:`farebox.store.base.Store.prune_invoices`."""
        wanted = clamp_limit(limit)
        with self._lock:
            self._check_open()
            doomed = [
                invoice
                for invoice in self._invoices.values()
                if invoice.expires_at < before
                and invoice_claim_key(invoice.reference) not in self._claims
            ]
            # Oldest expiry first, as the SQL stores do.
            doomed.sort(key=lambda invoice: invoice.expires_at)
            for invoice in doomed[:wanted]:
                del self._invoices[invoice.reference]
                del self._invoice_by_intent[invoice.payment_intent]
            return min(len(doomed), wanted)

    async def aclose(self) -> None:
        """Forget nothing, but refuse further use (like a closed database)."""
        with self._lock:
            self._closed = True

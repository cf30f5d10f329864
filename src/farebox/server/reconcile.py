"""Reconciliation: settle the books for payments whose outcome the server did not record.

Two kinds of claims are unfinished: ``pending`` (a transaction was broadcast and not confirmed in
time) and ``held`` for too long (the process died between claiming a proof and recording what
happened). The chain knows the truth: the token's ``authorizationState`` says whether the payer's
authorization was used, its ``AuthorizationUsed`` log names the transaction, and a receipt says
whether a given transaction succeeded. A claim becomes ``settled`` when the money moved, and is
released when it provably never will (its transaction reverted or vanished and the authorization
is still unused after ``release_after`` seconds, longer than any authorization's window).
Nothing is ever broadcast here.

Card claims (``mpp/<challenge id>``, ``invoice/<reference>``) are not judged here: the money moved
before the app ran, and a claim left held means a process died between admitting the request and
recording it, which cannot tell a response never sent from one sent but not recorded. Releasing
would let the same receipt be served twice; the claim stays held (its PaymentIntent is in the
store's events when it was recorded, and in Stripe in any case) for an operator to refund. Expired
invoices nobody paid are pruned a day after they expire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio

from farebox.errors import PaymentError
from farebox.ledgers.evm import EvmLedger
from farebox.store.base import Claim, Event, Store

__all__ = ["ReconcileReport", "Reconciler", "parse_claim_key"]

logger = logging.getLogger("farebox.reconcile")


@dataclass
class ReconcileReport:
    """What one pass found: claims settled, released, still open, and ledger errors; and how many
    expired unpaid invoices were pruned."""

    settled: int = 0
    released: int = 0
    waiting: int = 0
    errors: int = 0
    pruned: int = 0

    @property
    def examined(self) -> int:
        return self.settled + self.released + self.waiting + self.errors


def parse_claim_key(key: str) -> tuple[str, str, bytes, bytes] | None:
    """``(network, token, authorizer, nonce)`` of an ``exact`` EVM claim key, else ``None``.

    The key is what :func:`farebox.schemes.evm_exact.verify` makes:
    ``network/token/authorizer-hex/nonce-hex``.
    """
    parts = key.split("/")
    if len(parts) != 4:
        return None
    network, token, authorizer, nonce = parts
    try:
        raw_from, raw_nonce = bytes.fromhex(authorizer), bytes.fromhex(nonce)
    except ValueError:
        return None
    if len(raw_from) != 20 or len(raw_nonce) != 32:
        return None
    return network, token, raw_from, raw_nonce


class Reconciler:
    """Resolves unfinished claims of ``store`` against the chains of ``ledgers``.

    ``held_grace`` is how long a ``held`` claim may run (a request in flight) before it counts as
    abandoned; ``release_after`` how old an unused claim must be before it is released.
    """

    def __init__(
        self,
        store: Store,
        ledgers: Iterable[EvmLedger],
        *,
        held_grace: int = 120,
        release_after: int = 3600,
        invoice_retention: int = 86_400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ledgers = {ledger.network: ledger for ledger in ledgers}
        self.held_grace = held_grace
        self.release_after = release_after
        self.invoice_retention = invoice_retention
        self.clock = clock

    async def run_once(self, *, limit: int = 500) -> ReconcileReport:
        """One pass over the unfinished claims."""
        now = int(self.clock())
        report = ReconcileReport()
        for claim in await self.store.unfinished(held_before=now - self.held_grace, limit=limit):
            try:
                outcome = await self._resolve(claim, now)
            except PaymentError as exc:
                logger.warning("cannot reconcile %s yet: %s", claim.key, exc.code)
                report.errors += 1
                continue
            if outcome == "settled":
                report.settled += 1
            elif outcome == "released":
                report.released += 1
            else:
                report.waiting += 1
        report.pruned = await self.store.prune_invoices(before=now - self.invoice_retention)
        return report

    async def run_forever(self, *, interval: float = 15.0) -> None:
        """Reconcile every ``interval`` seconds until cancelled (a server's background task)."""
        while True:
            try:
                report = await self.run_once()
                if report.examined or report.pruned:
                    logger.info("reconciled: %s", report)
            except PaymentError as exc:  # the store is down: try again later
                logger.warning("reconciliation skipped: %s", exc.code)
            await anyio.sleep(interval)

    async def _resolve(self, claim: Claim, now: int) -> str:
        parsed = parse_claim_key(claim.key)
        ledger = self.ledgers.get(parsed[0]) if parsed is not None else None
        if parsed is None or ledger is None:
            return "waiting"  # another scheme's or another network's claim: not ours to judge
        _, token, authorizer, nonce = parsed
        status = "unknown"
        if claim.transaction:
            status = await ledger.transaction_status(claim.transaction)
            if status == "success":
                return await self._record(claim, True, claim.transaction, now)
            if status == "pending":
                return "waiting"
        if await ledger.authorization_used(token, authorizer, nonce):
            # Used by our transaction or another one (a second broadcast, a facilitator): the
            # AuthorizationUsed log names the one that moved the money.
            found = await ledger.authorization_transaction(token, authorizer, nonce)
            return await self._record(claim, True, found or claim.transaction, now)
        if status == "reverted" or now - claim.at >= self.release_after:
            # Unused, and its transaction reverted or is gone for longer than any validity
            # window: no money can move for this claim any more.
            return await self._record(claim, False, claim.transaction, now)
        return "waiting"

    async def _record(self, claim: Claim, settled: bool, transaction: str | None, now: int) -> str:
        event = Event(
            "reconciliation",
            now,
            reference=transaction,
            data={
                "claim": claim.key,
                "was": claim.state,
                "outcome": "settled" if settled else "released",
            },
        )
        changed = await self.store.resolve(
            claim.key, settled=settled, transaction=transaction, events=(event,)
        )
        if not changed:
            return "waiting"  # someone else finished or resolved it meanwhile
        return "settled" if settled else "released"

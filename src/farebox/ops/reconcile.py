"""Reconciliation: settle the books for payments whose outcome the server did not record.

Two kinds of claims are unfinished: ``pending`` (a transaction was broadcast and not confirmed in
time) and ``held`` for too long (the process died between claiming a proof and recording what
happened). The chain knows the truth: the token's ``authorizationState`` says whether the payer's
authorization was used, its ``AuthorizationUsed`` log names the transaction, and a receipt says
whether a given transaction succeeded. A claim becomes ``settled`` when the money moved, and is
released when it provably never will (its transaction reverted or vanished and the authorization
is still unused after ``release_after`` seconds, longer than any authorization's window).
Nothing is ever broadcast here.

A server settling through a remote facilitator reads the chain through a node of its own
(``[settlement] reconcile_rpc_url``: a read-only :class:`ChainReader`, no key). Without one, its
pending claims wait for an operator: ``farebox reconcile CONFIG --list`` shows them and
``--settled KEY --transaction TX`` or ``--release KEY`` records what the operator found (in the
facilitator's answer, its logs or a block explorer), as the reconciler would have.

Traffic (challenges, refusals, replays: :data:`~farebox.store.base.TRAFFIC_KINDS`) is pruned on
every pass: events older than ``traffic_retention`` seconds, and all but the newest
``traffic_keep``, whatever the traffic; their daily counts are kept ``count_retention`` seconds.

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
from typing import Protocol

import anyio

from farebox.errors import PaymentError
from farebox.schemes.evm_exact import VALID_BEFORE_SLACK
from farebox.store.base import MAX_EVENTS, Claim, Event, Store

__all__ = [
    "DEFAULT_RELEASE_AFTER",
    "ChainReader",
    "ReconcileReport",
    "Reconciler",
    "parse_claim_key",
    "release_after_for",
]

#: How old an unused claim whose proof was not logged must be before it is released: longer than
#: any authorization farebox accepts is valid (maxTimeoutSeconds is at most 86,400, and validBefore
#: at most VALID_BEFORE_SLACK past it), so it can no longer land when released.
DEFAULT_RELEASE_AFTER = 86_400 + VALID_BEFORE_SLACK + 120  # release_after_for(86_400)

#: How long traffic events are kept (a day), how many at most, and how long their counts stay.
DEFAULT_TRAFFIC_RETENTION = 86_400
DEFAULT_TRAFFIC_KEEP = 100_000
DEFAULT_COUNT_RETENTION = 400 * 86_400
# Traffic prune batches per pass: a pass keeps up with 10,000 x this many events per interval.
_PRUNE_BATCHES = 20


# Seconds a block's timestamp may trail this machine's clock: past validBefore by this much, no
# block can still include the authorization.
_CHAIN_CLOCK_SKEW = 120
# A claim's proof is logged within this many seconds of the claim (verify, claim, app, settle).
_LOGGED_WITHIN = 3600


def release_after_for(max_timeout_seconds: int) -> int:
    """How old an unused, unlogged claim must be before it is released, for routes whose longest
    ``maxTimeoutSeconds`` is ``max_timeout_seconds``: its authorization has expired by then."""
    return max_timeout_seconds + VALID_BEFORE_SLACK + _CHAIN_CLOCK_SKEW


@dataclass(frozen=True, slots=True)
class _Authorized:
    """The transfer a claim's proof authorized: to ``pay_to``, ``amount`` atomic units, valid
    until ``valid_until`` (unix seconds; ``None`` when not logged)."""

    pay_to: bytes
    amount: int
    valid_until: int | None


class ChainReader(Protocol):
    """What reconciliation reads of one network's chain (an
    :class:`~farebox.ledgers.evm.EvmLedger`, or a read-only reader with no key)."""

    network: str

    async def authorization_used(self, token: str, authorizer: bytes, nonce: bytes) -> bool: ...

    async def authorization_transaction(
        self, token: str, authorizer: bytes, nonce: bytes
    ) -> str | None: ...

    async def transaction_status(self, tx_hash: str) -> str: ...

    async def authorization_cancellation(
        self, token: str, authorizer: bytes, nonce: bytes
    ) -> str | None: ...

    async def transferred(
        self, tx_hash: str, token: str, sender: bytes, recipient: bytes, value: int
    ) -> bool: ...


logger = logging.getLogger("farebox.reconcile")


@dataclass
class ReconcileReport:
    """What one pass found: claims settled, released, still open, and ledger errors; and how many
    expired unpaid invoices and traffic events were pruned."""

    settled: int = 0
    released: int = 0
    waiting: int = 0
    errors: int = 0
    pruned: int = 0
    traffic_pruned: int = 0

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
    """Resolves unfinished claims of ``store`` against the chains of ``ledgers`` (none: claims
    wait for an operator) and prunes old traffic.

    ``held_grace`` is how long a ``held`` claim may run (a request in flight) before it counts as
    abandoned; ``release_after`` how old an unused claim must be before it is released.
    """

    def __init__(
        self,
        store: Store,
        ledgers: Iterable[ChainReader],
        *,
        held_grace: int = 120,
        release_after: int = DEFAULT_RELEASE_AFTER,
        invoice_retention: int = 86_400,
        traffic_retention: int = DEFAULT_TRAFFIC_RETENTION,
        traffic_keep: int = DEFAULT_TRAFFIC_KEEP,
        count_retention: int = DEFAULT_COUNT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ledgers = {ledger.network: ledger for ledger in ledgers}
        self.held_grace = held_grace
        self.release_after = release_after
        self.invoice_retention = invoice_retention
        self.traffic_retention = traffic_retention
        self.traffic_keep = traffic_keep
        self.count_retention = count_retention
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
        report.traffic_pruned = await self.prune_traffic(now)
        return report

    async def prune_traffic(self, now: int) -> int:
        """Delete the traffic events past their retention or beyond the newest
        ``traffic_keep``, and counts past theirs; returns how many events went."""
        pruned = 0
        for _ in range(_PRUNE_BATCHES):
            batch = await self.store.prune_traffic(
                before=now - self.traffic_retention, keep=self.traffic_keep, limit=MAX_EVENTS
            )
            pruned += batch
            if batch < MAX_EVENTS:
                break
        await self.store.prune_traffic_counts(before=now - self.count_retention)
        return pruned

    async def unresolved(self, *, limit: int = 500) -> list[Claim]:
        """The claims a pass would look at now: pending, and held past the grace."""
        now = int(self.clock())
        return await self.store.unfinished(held_before=now - self.held_grace, limit=limit)

    async def resolve_by_hand(self, key: str, *, settled: bool, transaction: str | None) -> bool:
        """Record an operator's finding for the unfinished x402 claim ``key``: the money moved
        (in ``transaction``) or it never will. False when the claim is not pending or held.

        Refused (``invalid_claim``): a card claim (its money moved before the app ran, and a
        release would let one receipt be served twice) and a held claim younger than
        ``held_grace`` (its request may still be running)."""
        if parse_claim_key(key) is None:
            raise PaymentError(
                "invalid_claim",
                "only x402 payment claims (network/token/payer/nonce) are "
                "resolved by hand; card claims stay held for a refund",
            )
        claim = await self.store.get_claim(key)
        if claim is None or claim.state == "settled":
            return False
        now = int(self.clock())
        if claim.state == "held" and now - claim.at < self.held_grace:
            raise PaymentError(
                "invalid_claim",
                f"this claim was taken {now - claim.at} s ago and its request may still run; "
                f"wait {self.held_grace} s",
            )
        outcome = await self._record(claim, settled, transaction, now, by="operator")
        return outcome != "waiting"

    async def run_forever(self, *, interval: float = 15.0) -> None:
        """Reconcile every ``interval`` seconds until cancelled (a server's background task)."""
        while True:
            try:
                report = await self.run_once()
                if report.examined or report.pruned or report.traffic_pruned:
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
        # What the claim's proof authorized, when the gate logged it (a pending claim's proof
        # is logged with it; a claim whose process died before recording has none).
        paid = await self._authorized(claim, authorizer)
        if await ledger.authorization_used(token, authorizer, nonce):
            # Used or cancelled. Used by our transaction or another one (a second broadcast, a
            # facilitator): the AuthorizationUsed log names the one. That may also be another
            # authorization the payer signed with the same nonce, which paid someone else: then
            # only a transfer of what this proof authorized counts as its payment.
            found = await ledger.authorization_transaction(token, authorizer, nonce)
            if found is None:
                if await ledger.authorization_cancellation(token, authorizer, nonce):
                    return await self._record(claim, False, claim.transaction, now)
                return "waiting"  # used, and no log says by what: not ours to say
            if found != claim.transaction:
                if paid is None and claim.state == "pending":
                    # A pending claim is recorded with its proof: one not found cannot be told
                    # from another authorization that shared the nonce.
                    logger.warning("no logged proof for pending claim %s: left waiting", claim.key)
                    return "waiting"
                if paid is not None and not await ledger.transferred(
                    found, token, authorizer, paid.pay_to, paid.amount
                ):
                    return await self._record(claim, False, claim.transaction, now)
            return await self._record(claim, True, found, now)
        if paid is not None and paid.valid_until is not None:
            # Unused: it can still land (anyone holding it may broadcast it) until validBefore,
            # and never after, whatever became of our own transaction.
            if now <= paid.valid_until + _CHAIN_CLOCK_SKEW:
                return "waiting"
            return await self._record(claim, False, claim.transaction, now)
        if status == "reverted" or now - claim.at >= self.release_after:
            # Unused, and its transaction reverted or is gone for longer than any validity
            # window: no money can move for this claim any more.
            return await self._record(claim, False, claim.transaction, now)
        return "waiting"

    async def _authorized(self, claim: Claim, authorizer: bytes) -> _Authorized | None:
        """What ``claim``'s proof authorized, from the event logged with it: the gate's ``proof``
        event, or the facilitator service's ``settlement`` event; ``None`` when none is logged.
        Looked for around the claim's time, so a payer's busy history does not hide it."""
        for kind in ("proof", "settlement"):
            events = await self.store.events(
                kind=kind,
                payer="0x" + authorizer.hex(),
                since=claim.at - _LOGGED_WITHIN,
                until=claim.at + _LOGGED_WITHIN,
                limit=MAX_EVENTS,
            )
            for event in events:
                if event.data.get("claim") != claim.key or "pay_to" not in event.data:
                    continue
                try:
                    until = event.data.get("valid_until")
                    return _Authorized(
                        bytes.fromhex(str(event.data["pay_to"])[2:]),
                        int(event.data["amount"]),
                        int(until) if until is not None else None,
                    )
                except (KeyError, ValueError):
                    return None
        return None

    async def _record(
        self, claim: Claim, settled: bool, transaction: str | None, now: int, *, by: str = "chain"
    ) -> str:
        event = Event(
            "reconciliation",
            now,
            reference=transaction,
            data={
                "claim": claim.key,
                "was": claim.state,
                "outcome": "settled" if settled else "released",
                "by": by,
            },
        )
        changed = await self.store.resolve(
            claim.key, settled=settled, transaction=transaction, events=(event,)
        )
        if not changed:
            return "waiting"  # someone else finished or resolved it meanwhile
        return "settled" if settled else "released"

"""Settle-once's bookkeeping: what a settlement's outcome does to its claim, by the lifecycle
table (:mod:`farebox.protocol.lifecycle`), for the gate and the facilitator service alike.

Both hold a payment's claim while they settle it; afterwards the money moved (``settle``), may
have moved (``hold_pending``: the claim stays until reconciled), or cannot have (``release``: the
payer may pay with it again). Recording it never raises: the answer to the payer is decided by
the settlement, and a store that fails here leaves the claim held, so nothing can settle twice;
the reconciler finds it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from farebox.errors import PaymentError
from farebox.protocol.lifecycle import next_state
from farebox.store.base import Event, Store, append_quietly

__all__ = ["record_outcome", "settlement_event"]

logger = logging.getLogger("farebox.settle")


def settlement_event(
    route: str,
    now: int,
    *,
    claim: str,
    success: bool,
    network: str,
    amount: int,
    payer: str | None = None,
    transaction: str | None = None,
    error: str | None = None,
    **details: Any,
) -> Event:
    """The one shape of a settlement's log line, for every rail and for the facilitator service:
    the claim it settled, whether it succeeded (and why not), on which network, for how much (in
    the rail's units), referenced by its transaction; ``details`` add what a rail knows besides
    (the asset and payee of an authorization, the currency of a card charge)."""
    data: dict[str, Any] = {
        "claim": claim,
        "success": success,
        "error": error,
        "network": network,
        "amount": str(amount),
        **details,
    }
    return Event("settlement", now, route, payer=payer, reference=transaction or None, data=data)


async def record_outcome(
    store: Store,
    key: str,
    *,
    owner: str,
    move: Literal["settle", "hold_pending", "release"],
    transaction: str | None,
    events: Sequence[Event],
    what: str,
) -> None:
    """Make ``move`` on ``owner``'s held claim ``key`` and log ``events`` with it (in the same
    transaction when the claim is finished). ``what`` names the payment in error logs."""
    if move == "release":
        try:
            await store.release(key, owner=owner)
        except PaymentError as exc:
            # The refusal is still the answer; the claim stays held until the reconciler (or a
            # waiting settle) sees it: nothing can settle twice because of it.
            logger.warning("could not release %s: %s", key, exc.code)
        if events:
            await append_quietly(store, *events)
        return
    state = next_state("held", move)
    assert state == "settled" or state == "pending"
    try:
        await store.finish(
            key, owner=owner, state=state, transaction=transaction or None, events=events
        )
    except PaymentError as exc:
        # The money moved (or may have): the payer gets what it paid for. The claim stays held
        # (never released), so the payment cannot be used again; the log lines are lost.
        logger.error("could not record settlement %s of %s: %s", transaction or "-", what, exc.code)

"""The payment claim's lifecycle, as a table (h11's ``_state.py`` is the model).

A proof (or a card credential, or an invoice) is claimed under one key before the resource is
served, so that one payment serves one response. The claim then lives through the states below;
every legal move is a row of :data:`TRANSITIONS`, and the stores only record the moves their
callers make (each store's guard is the row's precondition, and a test checks every store against
this table). ``None`` stands for "no claim": never taken, or released (the payer may use the proof
again).

::

    None --claim--> held --settle------> settled            (the money moved)
                     |  \\--hold_pending--> pending          (it may have: keep the proof spent)
                     |                      |   \\--confirm--> settled   (reconciliation found it)
                     |                      \\----drop------> None      (it never moved money)
                     \\--release--> None      (its request moved nothing: a refusal, an app error)
                     \\--confirm/drop         (a request that died holding it, once reconciled)

Which move follows a settlement is decided once, by :func:`claim_outcome`, from
:func:`may_have_moved`: the one answer to "could money have moved although the settlement did not
report success?", used by the gate, the facilitator service and the reconciler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from farebox.errors import ConfigError
from farebox.protocol.models import Settlement

__all__ = [
    "MAYBE_MOVED",
    "STATES",
    "TRANSITIONS",
    "ClaimOutcome",
    "ClaimState",
    "Move",
    "claim_outcome",
    "may_have_moved",
    "next_state",
]

ClaimState = Literal["held", "pending", "settled"]
#: Every state a claim can be in (``None``, no claim, aside).
STATES: tuple[ClaimState, ...] = ("held", "pending", "settled")

Move = Literal["claim", "release", "settle", "hold_pending", "confirm", "drop"]

#: ``move -> {state before: state after}``; a state missing from a move's row cannot make it.
TRANSITIONS: Mapping[Move, Mapping[ClaimState | None, ClaimState | None]] = {
    # Taken before the resource is served: once ever, so a settled or pending key stays taken.
    "claim": {None: "held"},
    # By the request that holds it, when nothing was broadcast: the proof may be used again.
    "release": {"held": None},
    # By the request that holds it, after settling.
    "settle": {"held": "settled"},
    "hold_pending": {"held": "pending"},
    # By reconciliation (or an operator): a pending claim, or a held one whose request died.
    "confirm": {"held": "settled", "pending": "settled"},
    "drop": {"held": None, "pending": None},
}

#: Settlement failures after which the money may have moved: broadcast but not confirmed, or
#: mined with a transfer the settler could not match to the authorization.
MAYBE_MOVED = frozenset({"settlement_pending", "invalid_exact_evm_transfer_event_mismatch"})

ClaimOutcome = Literal["settled", "pending", "release"]


def next_state(state: ClaimState | None, move: Move) -> ClaimState | None:
    """The state after ``move`` from ``state``; :class:`ConfigError` for a move the table does not
    allow (a caller's bug: the stores refuse it too)."""
    row = TRANSITIONS.get(move)
    if row is None or state not in row:
        raise ConfigError(f"a claim in state {state!r} cannot {move}")
    return row[state]


def may_have_moved(settlement: Settlement) -> bool:
    """Whether money may have moved for ``settlement``: it succeeded, or failed in a way that
    leaves the transfer possible (:data:`MAYBE_MOVED`)."""
    return settlement.success or settlement.error_reason in MAYBE_MOVED


def claim_outcome(settlement: Settlement) -> ClaimOutcome:
    """``settled`` (the money moved: move ``settle``), ``pending`` (it may have: ``hold_pending``,
    until someone reconciles it) or ``release`` (it cannot have: the payer may use the proof
    again)."""
    if settlement.success:
        return "settled"
    if may_have_moved(settlement):
        return "pending"
    return "release"

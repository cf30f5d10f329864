"""The payment lifecycle's one decision after settling: what becomes of the proof's claim.

The gate and the facilitator service both hold a claim while they settle; what the outcome means
for that claim is decided here, once, and the stores only record it.
"""

from __future__ import annotations

from typing import Literal

from farebox.protocol.models import Settlement

__all__ = ["ClaimOutcome", "claim_outcome"]

ClaimOutcome = Literal["settled", "pending", "release"]

# Outcomes after which the money may have moved although settlement did not report success.
_MAYBE_MOVED = frozenset({"settlement_pending", "invalid_exact_evm_transfer_event_mismatch"})


def claim_outcome(settlement: Settlement) -> ClaimOutcome:
    """``settled`` (the money moved), ``pending`` (it may have: keep the claim until someone
    reconciles it) or ``release`` (it cannot have: the payer may use the proof again)."""
    if settlement.success:
        return "settled"
    if settlement.error_reason in _MAYBE_MOVED:
        return "pending"
    return "release"

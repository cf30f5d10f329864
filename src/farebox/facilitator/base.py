"""The facilitator protocol: what the server's gate needs to accept and settle a payment.

The gate decodes, matches and verifies a proof offline (signature and terms), and claims it in its
store; a facilitator then checks it against the chain and moves the money. The in-process one (:mod:`farebox.facilitator.local`) calls a ledger directly;
a remote one speaks x402's ``/verify`` and ``/settle``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from farebox.protocol.models import Offer, Settlement, VerifiedProof

__all__ = ["Facilitator"]


@runtime_checkable
class Facilitator(Protocol):
    """Verifies and settles payment proofs."""

    def supports(self, offer: Offer) -> bool:
        """Whether this facilitator can settle payments of ``offer``'s scheme and network."""
        ...

    async def verify(self, verified: VerifiedProof) -> None:
        """Check against the chain a proof that passed its scheme's offline checks (balance,
        authorization unused, the transfer would succeed now), or raise
        :class:`~farebox.errors.PaymentError` with its code."""
        ...

    async def settle(self, verified: VerifiedProof) -> Settlement:
        """Move the money. Every outcome is a :class:`Settlement`; raises
        :class:`~farebox.errors.PaymentError` only when nothing can have been broadcast."""
        ...

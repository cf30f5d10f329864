"""Payment schemes, offline: one module per (scheme, network family), and the registry of them.

x402 names a scheme (``exact``) and a network (CAIP-2, ``eip155:8453``); the same scheme name on
another family (``exact`` on ``solana:*``) is another module. :func:`verifier` finds the offline
verifier for an offer by both; a new scheme is one module plus one entry in :data:`VERIFIERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from farebox.protocol.models import Offer, VerifiedProof
from farebox.schemes import evm_exact

__all__ = ["VERIFIERS", "Verifier", "verifier"]

#: ``verify(proof, offer, now=...)``: the verified proof, or raise the scheme's PaymentError.
Verifier = Callable[..., VerifiedProof]

#: ``(scheme, CAIP-2 namespace) -> verifier``.
VERIFIERS: Mapping[tuple[str, str], Verifier] = {
    (evm_exact.SCHEME, evm_exact.NAMESPACE): evm_exact.verify,
}


def verifier(offer: Offer) -> Verifier | None:
    """The offline verifier for ``offer``'s scheme on its network's family, if farebox has one."""
    namespace = offer.network.partition(":")[0]
    return VERIFIERS.get((offer.scheme, namespace))

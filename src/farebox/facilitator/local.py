"""The in-process facilitator: a ledger's simulation and settlement, no network hop."""

from __future__ import annotations

from collections.abc import Iterable

from farebox.errors import PaymentError
from farebox.ledgers.evm import EvmLedger
from farebox.protocol.models import Offer, Settlement, VerifiedProof
from farebox.schemes import evm_exact

__all__ = ["LocalFacilitator"]


class LocalFacilitator:
    """Simulates and settles ``exact`` EVM proofs on the ledger of their network."""

    def __init__(self, ledgers: Iterable[EvmLedger], *, simulate: bool = True) -> None:
        self._ledgers = {ledger.network: ledger for ledger in ledgers}
        self._simulate = simulate

    @property
    def ledgers(self) -> tuple[EvmLedger, ...]:
        """The ledgers, one per network."""
        return tuple(self._ledgers.values())

    def ledger_for(self, network: str) -> EvmLedger:
        ledger = self._ledgers.get(network)
        if ledger is None:
            raise PaymentError("invalid_network", f"no ledger configured for {network[:64]}")
        return ledger

    def supports(self, offer: Offer) -> bool:
        return offer.scheme == evm_exact.SCHEME and offer.network in self._ledgers

    async def verify(self, verified: VerifiedProof) -> None:
        ledger = self.ledger_for(verified.offer.network)
        if self._simulate:
            await ledger.simulate(verified)

    async def settle(self, verified: VerifiedProof) -> Settlement:
        return await self.ledger_for(verified.offer.network).settle(verified)

    async def aclose(self) -> None:
        """Close the ledgers' node connections."""
        for ledger in self._ledgers.values():
            await ledger.aclose()

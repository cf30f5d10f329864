"""The in-process facilitator: a ledger's simulation and settlement, no network hop."""

from __future__ import annotations

from collections.abc import Iterable

from farebox.errors import PaymentError
from farebox.ledgers.evm import EvmLedger
from farebox.ledgers.evm_asset import DEFAULT_ASSET_TTL, TokenCheck
from farebox.protocol.models import Offer, Settlement, VerifiedProof
from farebox.schemes import evm_exact

__all__ = ["LocalFacilitator"]


class LocalFacilitator:
    """Checks the token, simulates and settles ``exact`` EVM proofs on the ledger of their network.

    ``verify`` first checks that the offer's asset is a deployed EIP-3009 token (remembered per
    asset for ``asset_ttl`` seconds, see :mod:`farebox.ledgers.evm_asset`), then, with
    ``simulate``, dry-runs the transfer. ``settle`` checks the token too, and the ledger dry-runs
    the transfer again right before signing: a settle needs no verify before it.
    """

    def __init__(
        self,
        ledgers: Iterable[EvmLedger],
        *,
        simulate: bool = True,
        asset_ttl: float = DEFAULT_ASSET_TTL,
    ) -> None:
        self._ledgers = {ledger.network: ledger for ledger in ledgers}
        self._simulate = simulate
        self._tokens = {network: TokenCheck(ttl=asset_ttl) for network in self._ledgers}

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
        network = verified.offer.network
        ledger = self.ledger_for(network)
        # Before the simulation: a call to an address without code "succeeds" and proves nothing.
        await self._tokens[network].check(ledger.rpc, verified.offer.asset)
        if self._simulate:
            await ledger.simulate(verified)

    async def settle(self, verified: VerifiedProof) -> Settlement:
        # The token check again (remembered, so free after verify): settling skips no check that
        # verifying makes; the ledger simulates the transfer itself right before it signs.
        network = verified.offer.network
        ledger = self.ledger_for(network)
        await self._tokens[network].check(ledger.rpc, verified.offer.asset)
        return await ledger.settle(verified)

    async def aclose(self) -> None:
        """Close the ledgers' node connections."""
        for ledger in self._ledgers.values():
            await ledger.aclose()

"""The x402 rail: ``PAYMENT-SIGNATURE`` (v2) and ``X-PAYMENT`` (v1) proofs, every scheme farebox
verifies (:mod:`farebox.schemes`), settled through a facilitator.

The proof is verified offline first (the scheme's signature and terms: the payer it proves scopes
the request's idempotency id), then claimed under the scheme's claim key (its nonce: one payment,
one response, once ever) and verified by the facilitator (balance, the authorization unused on
chain) before the app runs. After a 2xx it is settled; the outcome follows the lifecycle table:
settled (the PEAC record names the transaction), pending (broadcast, not confirmed: the claim is
kept and the refusal says so) or released (nothing moved: the payer may use the proof again).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from farebox.errors import PaymentError
from farebox.facilitator.base import Facilitator
from farebox.money import AssetRegistry
from farebox.protocol.lifecycle import claim_outcome
from farebox.protocol.models import Challenge, Settlement, VerifiedProof
from farebox.protocol.x402 import (
    PAYMENT_RESPONSE,
    X_PAYMENT_RESPONSE,
    decode_proof,
    encode_settlement,
    find_offer,
)
from farebox.rails.base import Admission, Checked, Headers, Offered, Outcome, Record
from farebox.schemes import verifier
from farebox.server.idempotency import Withheld
from farebox.server.routes import RequestInfo, Route
from farebox.settle import settlement_event
from farebox.store.base import Event, Store

__all__ = ["NAME", "X402Rail"]

NAME = "x402"


class X402Rail:
    """Checks, claims and settles x402 proofs through ``facilitator``; ``assets`` names the
    tokens in the PEAC records; ``max_header_bytes`` bounds the proof header; ``clock`` dates the
    settlement's log line."""

    name = NAME

    def __init__(
        self,
        facilitator: Facilitator,
        assets: AssetRegistry,
        *,
        max_header_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.facilitator = facilitator
        self.assets = assets
        self.max_header_bytes = max_header_bytes
        self.clock = clock

    def recognizes(self, route: Route, request: RequestInfo) -> bool:
        return _proof_header(request) is not None

    async def offer(
        self, route: Route, request: RequestInfo, store: Store, *, outside_calls: bool
    ) -> Offered:
        return Offered()  # x402's offers are the challenge's own ``accepts``

    async def check(
        self, route: Route, request: RequestInfo, challenge: Challenge, store: Store, now: int
    ) -> Checked:
        header = _proof_header(request)
        assert header is not None  # recognized
        proof = decode_proof(header, max_bytes=self.max_header_bytes)
        offer = find_offer(proof, challenge.accepts)
        verify = verifier(offer)
        if verify is None or not self.facilitator.supports(offer):
            raise PaymentError(
                "unsupported_scheme", f"cannot settle {offer.scheme} on {offer.network}"
            )
        verified = verify(proof, offer, now=now)
        return Checked(
            payee=verified.offer.pay_to.lower(),
            payer=verified.payer,
            claim_key=verified.claim_key,
            payment=verified,
            proof=proof,
        )

    async def take(self, checked: Checked, store: Store, owner: str, now: int) -> VerifiedProof:
        verified: VerifiedProof = checked.payment
        if await store.claim(verified.claim_key, owner=owner, now=now) is None:
            raise await _used(store, verified)
        try:
            await self.facilitator.verify(verified)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await store.release(verified.claim_key, owner=owner)
            raise
        return verified

    async def settle(self, admission: Admission, store: Store) -> Outcome:
        verified: VerifiedProof = admission.payment
        try:
            settlement = await self.facilitator.settle(verified)
        except PaymentError as exc:
            # Nothing was broadcast: no money moved, the proof stays usable.
            return Outcome("release", problem=exc)
        offer = verified.offer
        route_name = admission.route.name
        events = (
            Event(
                "proof",
                verified.verified_at,
                route_name,
                payer=verified.payer,
                reference=admission.challenge.reference,
                data={
                    "claim": verified.claim_key,
                    "network": offer.network,
                    "asset": offer.asset,
                    "amount": str(offer.amount),
                    "pay_to": offer.pay_to,
                    "valid_until": verified.valid_until,
                    "resource": admission.request.url,
                },
            ),
            settlement_event(
                route_name,
                int(self.clock()),
                claim=verified.claim_key,
                success=settlement.success,
                network=settlement.network,
                amount=offer.amount,
                payer=verified.payer,
                transaction=settlement.transaction,
                error=settlement.error_reason,
                asset=offer.asset,
                pay_to=offer.pay_to,
                valid_until=verified.valid_until,
            ),
        )
        headers = _settlement_headers(verified, settlement)
        outcome = claim_outcome(settlement)
        if outcome == "settled":
            return Outcome(
                "settle",
                transaction=settlement.transaction,
                events=events,
                record=self._record(offer.network, offer.asset, offer.amount, settlement),
                headers=headers,
                payer=verified.payer,
            )
        code = settlement.error_reason or "transaction_failed"
        problem = PaymentError(code, settlement.error_message, payer=verified.payer)
        if outcome == "pending":
            # The money may have moved: a retry under the same idempotency id must hear the
            # same, rather than pay a second time.
            withhold = {
                "claim": verified.claim_key,
                "owner": admission.owner,
                "network": offer.network,
                "asset": offer.asset,
                "amount": offer.amount,
                "payer": verified.payer,
            }
            return Outcome(
                "hold_pending",
                transaction=settlement.transaction or None,
                events=events,
                headers=headers,
                problem=problem,
                payer=verified.payer,
                withhold=withhold,
            )
        return Outcome(
            "release", events=events, headers=headers, problem=problem, payer=verified.payer
        )

    async def deliver(self, admission: Admission, paid: Withheld) -> Outcome:
        settlement = Settlement(
            success=True,
            network=paid.network,
            transaction=paid.transaction,
            payer=paid.payer,
            amount=paid.amount,
        )
        verified: VerifiedProof = admission.payment
        return Outcome(
            None,
            transaction=paid.transaction,
            record=self._record(paid.network, paid.asset, paid.amount, settlement),
            headers=_settlement_headers(verified, settlement),
            payer=paid.payer,
        )

    async def abandon(self, admission: Admission, store: Store) -> None:
        await store.release(admission.claim_key, owner=admission.owner)

    def problem_type(self, request: RequestInfo, code: str) -> str | None:
        return None

    def _record(self, network: str, token: str, amount: int, settlement: Settlement) -> Record:
        asset = self.assets.find(network, token)
        return Record(
            rail=NAME,
            amount_minor=amount,
            currency=asset.symbol if asset is not None else "UNKNOWN",
            reference=settlement.transaction,
            asset=asset.caip19 if asset is not None else f"{network}/erc20:{token}",
            env="test" if asset is None or asset.is_testnet else "live",
        )


def _proof_header(request: RequestInfo) -> str | None:
    return request.headers.get("payment-signature") or request.headers.get("x-payment")


def _settlement_headers(verified: VerifiedProof, settlement: Settlement) -> Headers:
    headers: list[tuple[str, str]] = [(PAYMENT_RESPONSE, encode_settlement(settlement))]
    if verified.proof.x402_version == 1:
        headers.append((X_PAYMENT_RESPONSE, encode_settlement(settlement, x402_version=1)))
    return tuple(headers)


async def _used(store: Store, verified: VerifiedProof) -> PaymentError:
    """Why a proof cannot be claimed, naming the transaction when one is known: a client whose
    response was lost learns where its money went instead of paying again."""
    claim = await store.get_claim(verified.claim_key)
    if claim is not None and claim.state == "settled" and claim.transaction:
        message = f"this payment was already used: settled in transaction {claim.transaction}"
    elif claim is not None and claim.state == "pending" and claim.transaction:
        return PaymentError(
            "settlement_pending",
            f"this payment's transaction {claim.transaction} is not confirmed yet",
            payer=verified.payer,
        )
    else:
        message = "this payment was already used"
    return PaymentError("proof_replayed", message, payer=verified.payer)

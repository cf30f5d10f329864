"""The card rail: MPP ``Payment`` challenges with the ``stripe`` method, beside x402 in one 402.

A route opts in with a :class:`~farebox.server.routes.CardOffer`; the gate then adds, to every 402
of that route, one ``WWW-Authenticate: Payment …`` line (method ``stripe``, intent ``charge``) and a
card entry in the plain body's ``payment.methods``. Below the offer's minimum no card method is
offered (x402 still is).

A request carrying ``Authorization: Payment …`` is checked here: the credential is parsed, its
challenge verified statelessly (HMAC binding and expiry, :func:`~farebox.protocol.mpp.verify_credential`),
its request must match this route's card price and currency now (a credential bought for a cheaper
route is refused), and the challenge id is claimed in the store as ``mpp/<id>`` (single use) before
the app runs. After a 2xx the Shared Payment Token is charged through
:class:`~farebox.ledgers.stripe.StripeLedger`; on success the response gains ``Payment-Receipt`` and a
PEAC record (rail ``stripe``, reference the PaymentIntent id). When the charge fails, no money moved:
the claim is released, the app's body is withheld and a fresh 402 names the reason. When the app
fails, the claim is released and nothing is charged.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from farebox.errors import ConfigError, PaymentError
from farebox.protocol import mpp
from farebox.protocol.models import Challenge
from farebox.receipts import SigningKey, issue_receipt, payment_claims, rfc3339, uuid7
from farebox.receipts.records import receipt_ref
from farebox.server.idempotency import IdempotentRun
from farebox.server.routes import RequestInfo, Route
from farebox.store.base import Event, Store

if TYPE_CHECKING:
    from farebox.ledgers.stripe import CardCharge, StripeLedger

__all__ = ["CLAIM_PREFIX", "METHOD", "CardAdmission", "CardRail", "is_card_credential"]

logger = logging.getLogger("farebox.server")

METHOD = "stripe"
CLAIM_PREFIX = "mpp/"
_MIN_SECRET = 32

Headers = tuple[tuple[str, str], ...]


def is_card_credential(request: RequestInfo) -> bool:
    """Whether the request carries ``Authorization: Payment …``."""
    value = request.headers.get("authorization")
    return value is not None and value.lstrip(" \t")[:8].lower() == "payment "


@dataclass(frozen=True, slots=True)
class CardAdmission:
    """A card credential verified and its challenge claimed: the app may run.

    ``challenge`` is the request's x402 challenge (a refusal offers it again); ``idempotency`` is
    always ``None`` (the faces read it; card requests are single use by their challenge id).
    """

    route: Route
    request: RequestInfo
    challenge: Challenge
    card_challenge: mpp.Challenge
    spt: str
    amount: int
    currency: str
    owner: str
    idempotency: IdempotentRun | None = None

    @property
    def claim_key(self) -> str:
        return CLAIM_PREFIX + self.card_challenge.id


class CardRail:
    """Issues and checks MPP ``stripe`` charge challenges and charges their Shared Payment Tokens.

    ``secret`` keys the challenge-id HMAC (at least 32 bytes; every server of one API shares it).
    ``lifetime`` is how long a challenge may be answered, in seconds; ``clock`` returns Unix seconds.
    """

    def __init__(
        self,
        secret: bytes,
        ledger: StripeLedger,
        *,
        lifetime: float = 300,
        clock: Callable[[], float] = time.time,
        payment_method_types: Sequence[str] = ("card",),
    ) -> None:
        if not isinstance(secret, bytes) or len(secret) < _MIN_SECRET:
            raise ConfigError(f"the card challenge secret must be at least {_MIN_SECRET} bytes")
        if not 0 < lifetime <= 86_400:
            raise ConfigError("lifetime must be between 0 and 86400 seconds")
        self._secret = secret
        self.ledger = ledger
        self.lifetime = lifetime
        self.clock = clock
        self.payment_method_types = tuple(payment_method_types)

    # --- challenges ----------------------------------------------------------------------------

    def _request(self, route: Route, amount: int) -> mpp.ChargeRequest:
        card = route.card
        assert card is not None
        details = mpp.StripeDetails(card.network_id, self.payment_method_types)
        return mpp.ChargeRequest(
            amount=amount,
            currency=card.currency,
            description=route.description or None,
            method_details=details.to_json(),
        )

    def challenges(self, route: Route, request: RequestInfo) -> tuple[mpp.Challenge, ...]:
        """The card challenges for this route and request; none without a card offer, or below its
        minimum."""
        amount = route.card_amount(request)
        if amount is None or route.card is None:
            return ()
        challenge = mpp.issue_challenge(
            self._secret,
            realm=route.card.realm,
            method=METHOD,
            request=self._request(route, amount),
            expires=self.clock() + self.lifetime,
        )
        return (challenge,)

    def offer(self, route: Route, request: RequestInfo) -> tuple[Headers, list[dict[str, Any]]]:
        """The ``WWW-Authenticate`` lines and the plain body's card methods for a 402."""
        found = self.challenges(route, request)
        lines = mpp.render_www_authenticate_lines(found)
        headers = tuple((mpp.WWW_AUTHENTICATE, line) for line in lines)
        methods = [
            {
                "protocol": "mpp",
                "method": METHOD,
                "intent": c.intent,
                "amount": str(c.request.amount),
                "currency": c.request.currency,
            }
            for c in found
        ]
        return headers, methods

    # --- before the app ------------------------------------------------------------------------

    async def admit(
        self, route: Route, request: RequestInfo, challenge: Challenge, store: Store
    ) -> CardAdmission:
        """Verify the request's card credential for ``route`` and claim its challenge.

        Raises :class:`PaymentError`: ``invalid_payload``/``payload_too_large`` (malformed),
        ``invalid_challenge`` (not ours, altered, another realm), ``payment_expired``,
        ``unsupported_scheme`` (not a stripe charge), ``card_payment_mismatch`` (issued for another
        price or currency than this route's now) and ``proof_replayed`` (challenge already used).
        """
        card = route.card
        amount = route.card_amount(request)
        if card is None or amount is None:
            raise PaymentError("unsupported_scheme", "this route takes no card payment")
        credential = mpp.parse_authorization(request.headers.get("authorization", ""))
        now = self.clock()
        verified = mpp.verify_credential(self._secret, credential, now, realm=card.realm)
        payload = mpp.read_stripe_payload(credential, verified)
        wanted = self._request(route, amount)
        terms = verified.request
        if (
            terms.amount != wanted.amount
            or terms.currency.lower() != wanted.currency
            or mpp.StripeDetails.from_request(terms).network_id != card.network_id
        ):
            raise PaymentError(
                "card_payment_mismatch", "the credential pays for another price or payee"
            )
        owner = secrets.token_hex(8)
        key = CLAIM_PREFIX + verified.id
        if await store.claim(key, owner=owner, now=int(now)) is None:
            raise PaymentError("proof_replayed", "this payment challenge was already used")
        return CardAdmission(
            route, request, challenge, verified, payload.spt, amount, wanted.currency, owner
        )

    # --- after the app -------------------------------------------------------------------------

    async def abandon(self, admission: CardAdmission, store: Store) -> None:
        """The app failed: nothing is charged and the challenge may be answered again."""
        await store.release(admission.claim_key, owner=admission.owner)

    async def settle(
        self, admission: CardAdmission, store: Store, *, issuer: str, signing_key: SigningKey
    ) -> Headers:
        """Charge the token; the headers to add to the app's response.

        Raises :class:`PaymentError` when the charge failed (the claim is released first: no money
        moved, or Stripe's idempotency key makes a retry of this credential return the same charge).
        """
        try:
            charged = await self.ledger.charge(
                spt=admission.spt,
                amount=admission.amount,
                currency=admission.currency,
                challenge_id=admission.card_challenge.id,
                metadata={"farebox_route": admission.route.name[:500]},
            )
        except BaseException:
            await store.release(admission.claim_key, owner=admission.owner)
            raise
        now = int(self.clock())
        record = self._record(admission, charged, now, issuer, signing_key)
        receipt = mpp.render_payment_receipt(
            mpp.Receipt(
                method=METHOD,
                reference=charged.payment_intent,
                timestamp=datetime.fromtimestamp(now, UTC),
            )
        )
        events = (
            Event(
                "settlement",
                now,
                admission.route.name,
                reference=charged.payment_intent,
                data={
                    "success": True,
                    "rail": METHOD,
                    "claim": admission.claim_key,
                    "amount": str(charged.amount),
                    "currency": charged.currency,
                    "replayed": charged.replayed,
                },
            ),
            Event(
                "receipt",
                now,
                admission.route.name,
                reference=receipt_ref(record),
                data={"transaction": charged.payment_intent, "jws": record},
            ),
        )
        try:
            await store.finish(
                admission.claim_key,
                owner=admission.owner,
                state="settled",
                transaction=charged.payment_intent,
                events=events,
            )
        except PaymentError as exc:
            # The card was charged: the payer gets what it paid for; the claim stays held.
            logger.error("could not record card charge %s: %s", charged.payment_intent, exc.code)
        return ((mpp.PAYMENT_RECEIPT, receipt), ("PEAC-Receipt", record))

    def _record(
        self,
        admission: CardAdmission,
        charged: CardCharge,
        now: int,
        issuer: str,
        signing_key: SigningKey,
    ) -> str:
        claims = payment_claims(
            iss=issuer,
            iat=now,
            jti=uuid7(now * 1000),
            payment_rail=METHOD,
            amount_minor=charged.amount,
            currency=charged.currency.upper(),
            event="settlement",
            reference=charged.payment_intent,
            sub=admission.request.url,
            occurred_at=rfc3339(now),
        )
        return issue_receipt(claims, signing_key).jws

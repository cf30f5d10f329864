"""The card rail: MPP ``Payment`` challenges with the ``stripe`` method, beside x402 in one 402.

A route opts in with a :class:`~farebox.server.routes.CardOffer`; the gate then adds, to every 402
of that route, one ``WWW-Authenticate: Payment …`` line (method ``stripe``, intent ``charge``) and a
card entry in the plain body's ``payment.methods``. Below the offer's minimum no card method is
offered (x402 still is).

A request carrying ``Authorization: Payment …`` is checked here: the credential is parsed, its
challenge verified statelessly (HMAC binding and expiry, :func:`~farebox.protocol.mpp.verify_credential`),
its request must match this route's card price and currency now (a credential bought for a cheaper
route is refused), the challenge id is claimed in the store as ``mpp/<id>`` (single use), and the
Shared Payment Token is charged through :class:`~farebox.ledgers.stripe.StripeLedger`, all before
the app runs (as the MPP Stripe method says: charge, require ``succeeded``, then serve; a token that
does not pay never reaches the app). When the charge fails, no money moved: the claim is released
and a fresh 402 names the reason. After a 2xx the response gains ``Payment-Receipt`` and a PEAC
record (rail ``stripe``, reference the PaymentIntent id). When the app fails or answers an error,
nothing was delivered: the charge is refunded in full and the credential stays spent.

A route whose offer sets ``invoice`` also takes the X-Receipt pattern: each 402 (not a HEAD) names an
invoice (``payment.reference``, ``inv_…``) for which the server created an unconfirmed PaymentIntent
carrying the reference in its metadata, and recorded it in the store (amount, currency, route,
expiry). The 402's card method gives its client secret; the payer confirms it out of band and
resends the request with ``X-Receipt: pi_…`` (or the client secret itself, which also proves it
holds what the 402 gave). The invoice is found by its PaymentIntent in the store (an unknown id
costs no Stripe call), must be for this route and price and unexpired, and is claimed as
``invoice/<reference>`` before the PaymentIntent is retrieved and checked (succeeded, amount,
currency, reference, nothing refunded or disputed): one claim consumes the invoice and its
PaymentIntent together, once ever. An app error releases the claim, so the paid receipt can be
presented again; a 2xx settles it with a PEAC record (rail ``stripe``, reference the PaymentIntent).
Creating a PaymentIntent per 402 is a Stripe call per unpaid request: offer invoices on routes
whose callers want them, and prune expired ones (:meth:`~farebox.store.base.Store.prune_invoices`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from farebox.errors import ConfigError, PaymentError
from farebox.protocol import mpp
from farebox.protocol.models import Challenge
from farebox.rails.base import Admission, Checked, Offered, Outcome, Record
from farebox.server.routes import RequestInfo, Route
from farebox.settle import settlement_event
from farebox.store.base import Event, Invoice, Store, invoice_claim_key

if TYPE_CHECKING:
    from farebox.server.idempotency import Withheld

if TYPE_CHECKING:
    from farebox.ledgers.stripe import CardCharge, StripeLedger

__all__ = [
    "CLAIM_PREFIX",
    "CREDENTIALS",
    "METHOD",
    "X_RECEIPT",
    "CardPayment",
    "CardRail",
    "is_card_credential",
    "is_card_receipt",
]

logger = logging.getLogger("farebox.server")

METHOD = "stripe"
CLAIM_PREFIX = "mpp/"
X_RECEIPT = "X-Receipt"
# Where a card credential travels, as ``(header, auth scheme or None)``: ``Authorization: Payment``,
# its MPP alternative ``Payment-Authorization``, and an X-Receipt (a client secret proves payment).
# A face that forwards a request removes these; ``Authorization: Bearer`` is not a payment.
CREDENTIALS: tuple[tuple[str, str | None], ...] = (
    (mpp.AUTHORIZATION.lower(), "payment"),
    (mpp.PAYMENT_AUTHORIZATION.lower(), None),
    (X_RECEIPT.lower(), None),
)
_ROUTE_KEY = "route"  # in a challenge's opaque map
_MIN_SECRET = 32
_MAX_RECEIPT = 512
# A PaymentIntent id, or its client secret (``pi_…_secret_…``); checked before any lookup.
_RECEIPT = re.compile(r"(pi_[A-Za-z0-9]{8,250})(_secret_[A-Za-z0-9]{1,250})?")
_INVOICE_INSTRUCTIONS = (
    "Or pay by card out of band: confirm the PaymentIntent of the stripe invoice method with its "
    "client secret (Stripe.js or Stripe's confirm API with the merchant's publishable key), then "
    "resend this request with the PaymentIntent id (or its client secret) in the X-Receipt "
    "header before the invoice expires. The response carries a signed receipt in PEAC-Receipt."
)

Headers = tuple[tuple[str, str], ...]


def is_card_credential(request: RequestInfo) -> bool:
    """Whether the request carries ``Authorization: Payment …``."""
    value = request.headers.get("authorization")
    return value is not None and value.lstrip(" \t")[:8].lower() == "payment "


def is_card_receipt(request: RequestInfo) -> bool:
    """Whether the request carries an ``X-Receipt`` header."""
    return "x-receipt" in request.headers


@dataclass(frozen=True, slots=True)
class CardPayment:
    """A card payment checked (and, once taken, claimed): an admission's ``payment``.

    Either an MPP credential (``card_challenge`` and ``spt``: the token is charged when taken,
    before the app runs) or an X-Receipt (``invoice`` and ``receipt``: the money already moved);
    ``paid`` is the charge once taken.
    """

    route: Route
    amount: int
    currency: str
    claim_key: str
    card_challenge: mpp.Challenge | None = None
    spt: str | None = None
    invoice: Invoice | None = None
    receipt: str | None = None
    paid: CardCharge | None = None

    @property
    def payer(self) -> str:
        """Who may replay this payment's idempotent responses: the holder of this credential
        (its challenge id) or of this invoice's receipt."""
        if self.card_challenge is not None:
            return "mpp:" + self.card_challenge.id
        # The receipt as presented is part of the scope: a replay needs what the first request
        # showed (the client secret, when one is required), not just the invoice's public id.
        shown = hashlib.sha256((self.receipt or "").encode()).hexdigest()[:32]
        return f"invoice:{self.invoice.reference if self.invoice else ''}:{shown}"


class CardRail:
    """Issues and checks MPP ``stripe`` charge challenges and charges their Shared Payment Tokens.

    ``secret`` keys the challenge-id HMAC (at least 32 bytes; every server of one API shares it).
    ``lifetime`` is how long a challenge may be answered, in seconds; ``clock`` returns Unix seconds.
    ``invoice_lifetime`` is how long an X-Receipt invoice stays payable, in seconds;
    ``require_client_secret`` accepts as a receipt only the PaymentIntent's client secret, not its
    id (ids show up in logs and dashboards; the secret was given only to the 402's recipient).
    """

    name = METHOD

    def __init__(
        self,
        secret: bytes,
        ledger: StripeLedger,
        *,
        lifetime: float = 300,
        clock: Callable[[], float] = time.time,
        payment_method_types: Sequence[str] = ("card",),
        invoice_lifetime: float = 900,
        require_client_secret: bool = False,
    ) -> None:
        if not isinstance(secret, bytes) or len(secret) < _MIN_SECRET:
            raise ConfigError(f"the card challenge secret must be at least {_MIN_SECRET} bytes")
        if not 0 < lifetime <= 86_400:
            raise ConfigError("lifetime must be between 0 and 86400 seconds")
        if not 0 < invoice_lifetime <= 7 * 86_400:
            raise ConfigError("invoice_lifetime must be between 0 and 604800 seconds")
        self.invoice_lifetime = invoice_lifetime
        self.require_client_secret = require_client_secret
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

    def challenges(
        self, route: Route, request: RequestInfo, amount: int | None = None
    ) -> tuple[mpp.Challenge, ...]:
        """The card challenges for this route and request; none without a card offer, or below its
        minimum. ``amount`` is the route's card price for the request, when already known."""
        if amount is None:
            amount = route.card_amount(request)
        if amount is None or route.card is None or not route.card.spt:
            return ()
        challenge = mpp.issue_challenge(
            self._secret,
            realm=route.card.realm,
            method=METHOD,
            request=self._request(route, amount),
            expires=self.clock() + self.lifetime,
            # Bound by the id's HMAC like the rest: a credential pays this route, not another one
            # that happens to cost the same.
            opaque={_ROUTE_KEY: route.name},
        )
        return (challenge,)

    def recognizes(self, route: Route, request: RequestInfo) -> bool:
        """An ``Authorization: Payment`` credential, or an ``X-Receipt`` on a route taking them."""
        card = route.card
        return card is not None and (
            is_card_credential(request) or (card.invoice and is_card_receipt(request))
        )

    async def offer(
        self, route: Route, request: RequestInfo, store: Store, *, outside_calls: bool
    ) -> Offered:
        """What a 402 of ``route`` offers for cards; with ``outside_calls``, a route that takes
        X-Receipts also gets a new invoice, created and recorded, unless Stripe or the store is
        down (then the 402 goes out without it, and the reason is logged). Without, none is made:
        a refusal after a failed settlement creates no PaymentIntent."""
        if route.card is None:
            return Offered()
        # Priced once: a price function is asked once per 402, and both card methods agree.
        amount = route.card_amount(request)
        found = self.challenges(route, request, amount)
        lines = mpp.render_www_authenticate_lines(found)
        methods: list[dict[str, Any]] = [
            {
                "protocol": "mpp",
                "method": METHOD,
                "intent": c.intent,
                "amount": str(c.request.amount),
                "currency": c.request.currency,
            }
            for c in found
        ]
        made: Invoice | None = None
        card = route.card
        if (
            outside_calls
            and amount is not None
            and card is not None
            and card.invoice
            and request.method != "HEAD"
        ):
            made, client_secret = await self._invoice(route, request, store, amount)
            if made is not None:
                methods.append(
                    {
                        "protocol": "x-receipt",
                        "method": METHOD,
                        "amount": str(made.amount),
                        "currency": made.currency,
                        "reference": made.reference,
                        "payment_intent": made.payment_intent,
                        "client_secret": client_secret,
                        "expires": mpp.format_rfc3339(made.expires_at),
                        "header": X_RECEIPT,
                    }
                )
        return Offered(
            headers=tuple((mpp.WWW_AUTHENTICATE, line) for line in lines),
            methods=tuple(methods),
            reference=made.reference if made is not None else None,
            instructions=_INVOICE_INSTRUCTIONS if made is not None else None,
        )

    async def _invoice(
        self, route: Route, request: RequestInfo, store: Store, amount: int
    ) -> tuple[Invoice | None, str]:
        card = route.card
        assert card is not None
        now = int(self.clock())
        try:
            # Checked before Stripe is asked, so a request the store could not record (a URL
            # that is not valid text, say) creates no PaymentIntent.
            draft = Invoice(
                reference="inv_" + secrets.token_hex(16),
                route=route.name,
                resource=request.url,
                amount=amount,
                currency=card.currency,
                payment_intent="pi_unassigned",
                created_at=now,
                expires_at=now + int(self.invoice_lifetime),
            )
        except ConfigError:
            logger.warning("no card invoice offered for %s: unrecordable request", route.name)
            return None, ""
        try:
            payment = await self.ledger.create_invoice_payment(
                amount=amount,
                currency=card.currency,
                reference=draft.reference,
                metadata={"farebox_route": route.name[:500]},
            )
            made = replace(draft, payment_intent=payment.payment_intent)
            await store.add_invoice(made)
        except (PaymentError, ConfigError) as exc:
            code = exc.code if isinstance(exc, PaymentError) else "invalid_invoice"
            logger.warning("no card invoice offered for %s: %s", route.name, code)
            return None, ""
        return made, payment.client_secret

    # --- before the app ------------------------------------------------------------------------

    async def check(
        self, route: Route, request: RequestInfo, challenge: Challenge, store: Store, now: int
    ) -> Checked:
        """Verify the request's card payment for ``route`` without claiming it.

        An ``Authorization: Payment`` credential is checked statelessly; an ``X-Receipt`` against
        the invoice it pays, found in ``store``. Raises :class:`PaymentError`:
        ``invalid_payload``/``payload_too_large`` (malformed credential or receipt, or an id where
        the client secret is required), ``invalid_challenge`` (not ours, altered, another realm),
        ``payment_expired`` (the challenge or invoice expired), ``unsupported_scheme`` (not a
        stripe charge, or a route without that card method), ``card_payment_mismatch`` (issued
        for another price, currency or route than this one now) and ``card_payment_not_found``
        (no invoice of this API has the receipt's PaymentIntent).
        """
        if is_card_credential(request):
            payment = self._check_credential(route, request)
        else:
            payment = await self._check_receipt(route, request, store)
        card = route.card
        assert card is not None  # checked above
        return Checked(
            payee="stripe " + card.network_id,
            payer=payment.payer,
            claim_key=payment.claim_key,
            payment=payment,
        )

    def _check_credential(self, route: Route, request: RequestInfo) -> CardPayment:
        card = route.card
        amount = route.card_amount(request)
        if card is None or amount is None or not card.spt:
            raise PaymentError("unsupported_scheme", "this route takes no card payment")
        credential = mpp.parse_authorization(request.headers.get("authorization", ""))
        now = self.clock()
        verified = mpp.verify_credential(self._secret, credential, now, realm=card.realm)
        payload = mpp.read_stripe_payload(credential, verified)
        wanted = self._request(route, amount)
        terms = verified.request
        if (
            verified.opaque is None
            or verified.opaque.get(_ROUTE_KEY) != route.name
            or terms.amount != wanted.amount
            or terms.currency.lower() != wanted.currency
            or mpp.StripeDetails.from_request(terms).network_id != card.network_id
        ):
            raise PaymentError(
                "card_payment_mismatch", "the credential pays for another price or payee"
            )
        return CardPayment(
            route,
            amount,
            wanted.currency,
            CLAIM_PREFIX + verified.id,
            card_challenge=verified,
            spt=payload.spt,
        )

    async def _check_receipt(self, route: Route, request: RequestInfo, store: Store) -> CardPayment:
        card = route.card
        amount = route.card_amount(request)
        if card is None or amount is None or not card.invoice:
            raise PaymentError("unsupported_scheme", "this route takes no card receipt")
        raw = request.headers.get("x-receipt", "")
        found = _RECEIPT.fullmatch(raw.strip(" \t")) if len(raw) <= _MAX_RECEIPT else None
        if found is None:
            raise PaymentError(
                "invalid_payload", "X-Receipt must be a PaymentIntent id or its client secret"
            )
        if self.require_client_secret and found[2] is None:
            raise PaymentError(
                "invalid_payload", "X-Receipt must be the PaymentIntent's client secret"
            )
        invoice = await store.find_invoice(found[1])
        if invoice is None:
            raise PaymentError("card_payment_not_found", "no invoice of this API has that payment")
        if (
            invoice.route != route.name
            or invoice.amount != amount
            or invoice.currency != card.currency
        ):
            raise PaymentError("card_payment_mismatch", "the receipt pays for another invoice")
        if self.clock() >= invoice.expires_at:
            raise PaymentError("payment_expired", "the invoice this receipt pays has expired")
        return CardPayment(
            route,
            invoice.amount,
            invoice.currency,
            invoice_claim_key(invoice.reference),
            invoice=invoice,
            receipt=found[0],
        )

    async def take(self, checked: Checked, store: Store, owner: str, now: int) -> CardPayment:
        """Claim a checked card payment (single use), and for a receipt check its PaymentIntent.

        Raises :class:`PaymentError` ``proof_replayed`` (already used; the message names the
        PaymentIntent that paid, so a client whose response was lost learns where its money
        went) and, for a receipt, what
        :meth:`~farebox.ledgers.stripe.StripeLedger.retrieve_paid` raises (not succeeded,
        refunded or disputed, another amount, currency or reference, Stripe unavailable); then
        nothing stays claimed.
        """
        admission: CardPayment = checked.payment
        key = admission.claim_key
        if await store.claim(key, owner=owner, now=int(self.clock())) is None:
            claim = await store.get_claim(key)
            where = f": paid by {claim.transaction}" if claim and claim.transaction else ""
            raise PaymentError("proof_replayed", f"this card payment was already used{where}")
        invoice = admission.invoice
        receipt = admission.receipt or ""
        try:
            if invoice is not None:
                paid = await self.ledger.retrieve_paid(
                    invoice.payment_intent,
                    amount=invoice.amount,
                    currency=invoice.currency,
                    reference=invoice.reference,
                    client_secret=receipt if "_secret_" in receipt else None,
                )
            else:
                assert admission.spt is not None
                assert admission.card_challenge is not None
                # Charged before the app runs (as the MPP Stripe method does): a token that does
                # not pay never reaches the app. A retry of this credential after a failure here
                # meets Stripe's idempotency key (challenge id + token): never a second charge.
                paid = await self.ledger.charge(
                    spt=admission.spt,
                    amount=admission.amount,
                    currency=admission.currency,
                    challenge_id=admission.card_challenge.id,
                    metadata={"farebox_route": admission.route.name[:500]},
                )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await store.release(key, owner=owner)
            raise
        return replace(admission, paid=paid)

    # --- after the app -------------------------------------------------------------------------

    async def abandon(self, admission: Admission, store: Store) -> None:
        """The app failed or answered an error: nothing was delivered.

        An X-Receipt's claim is released, so the paid receipt can be presented again. A token was
        charged before the app ran: the charge is refunded in full (an idempotency key naming the
        PaymentIntent, so it is never refunded twice) and the credential stays spent; a refund
        Stripe refuses or cannot take is logged (event ``refund_failed``) for the operator.
        """
        payment: CardPayment = admission.payment
        if payment.invoice is not None or payment.paid is None:
            await store.release(admission.claim_key, owner=admission.owner)
            return
        charged = payment.paid
        now = int(self.clock())
        event = _settlement_event(payment, charged, now, served=False)
        try:
            refund = await self.ledger.refund(
                charged.payment_intent,
                idempotency_key="farebox_unserved_" + charged.payment_intent,
                metadata={"farebox_reason": "not_served"},
            )
            refunded = Event(
                "refund",
                now,
                admission.route.name,
                reference=charged.payment_intent,
                data={
                    "refund": refund.refund,
                    "amount": str(refund.amount),
                    "status": refund.status,
                },
            )
        except PaymentError as exc:
            logger.error(
                "could not refund unserved card payment %s: %s", charged.payment_intent, exc.code
            )
            refunded = Event(
                "refund_failed",
                now,
                admission.route.name,
                reference=charged.payment_intent,
                data={"code": exc.code, "amount": str(charged.amount)},
            )
        try:
            await store.finish(
                admission.claim_key,
                owner=admission.owner,
                state="settled",
                transaction=charged.payment_intent,
                events=(event, refunded),
            )
        except PaymentError as exc:
            logger.error("could not record card charge %s: %s", charged.payment_intent, exc.code)

    async def settle(self, admission: Admission, store: Store) -> Outcome:
        """The outcome of a served request: the money moved before the app ran (a token charged
        when taken, or an invoice paid out of band), so it is always paid; what is left is the
        record and, for an MPP credential, ``Payment-Receipt``."""
        payment: CardPayment = admission.payment
        charged = payment.paid
        assert charged is not None  # set by take()
        now = int(self.clock())
        event = _settlement_event(
            payment,
            charged,
            now,
            replayed=charged.replayed,
            invoice=payment.invoice.reference if payment.invoice else None,
        )
        record = Record(
            rail=METHOD,
            amount_minor=charged.amount,
            currency=charged.currency.upper(),
            reference=charged.payment_intent,
        )
        headers: tuple[tuple[str, str], ...] = ()
        if payment.invoice is None:  # an MPP Payment-Receipt answers MPP credentials only
            receipt = mpp.render_payment_receipt(
                mpp.Receipt(
                    method=METHOD,
                    reference=charged.payment_intent,
                    timestamp=datetime.fromtimestamp(now, UTC),
                )
            )
            headers = ((mpp.PAYMENT_RECEIPT, receipt),)
        return Outcome(
            "settle",
            transaction=charged.payment_intent,
            events=(event,),
            record=record,
            headers=headers,
        )

    async def deliver(self, admission: Admission, paid: Withheld) -> Outcome:
        raise ConfigError("a card payment is never withheld: it settles before the app runs")

    def problem_type(self, request: RequestInfo, code: str) -> str | None:
        """A refused ``Authorization: Payment`` credential is answered in MPP's problem registry."""
        return mpp.problem_type(code) if is_card_credential(request) else None


def _settlement_event(payment: CardPayment, charged: CardCharge, now: int, **details: Any) -> Event:
    """The log line of a card payment that moved money (``details`` say what became of it)."""
    return settlement_event(
        payment.route.name,
        now,
        claim=payment.claim_key,
        success=True,
        network=METHOD,
        amount=charged.amount,
        transaction=charged.payment_intent,
        rail=METHOD,
        currency=charged.currency,
        **details,
    )
